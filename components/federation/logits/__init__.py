"""Soft-label federated distillation: clients exchange soft labels on a public set, grouped by similarity.

Importing :mod:`components.federation.logits.protocol` registers the
``soft-labels`` protocol.
"""
