"""Few-shot federated fine-tuning of the pretrained tower: linear probe, full and meta, chosen per device.

- :mod:`.model`: the frozen tower + projection + CLIP-Adapter + linear head, and its starting point;
- :mod:`.features`: frozen features, computed once per image;
- :mod:`.modes`: ``linear-probe``, ``full`` and ``meta`` (FOMAML / Reptile with ``torch.func``);
- :mod:`.aggregation`: how clients that trained different parameter sets are combined;
- :mod:`.convergence`: the per-round convergence record, plateau and rate constant;
- :mod:`.protocol`: the ``few-shot`` protocol (registered on import);
- :mod:`.simulate`: federations measured every round, local-only training, forgetting vs retraining.
"""
