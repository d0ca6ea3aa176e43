"""Students that share the FedAvg CNN's base and differ in their head.

``shared-base`` federations (:mod:`components.federation.hetero.shared_base`)
aggregate the layers every client has in common and leave each client its own
head. ``cnn-mlp-head`` keeps :class:`~components.models.students.CNN`'s
``conv1``, ``conv2`` and ``fc1`` (same keys, same shapes) and replaces the
linear ``fc2`` by a two-layer head, so it shares a base with ``cnn`` at the
``fc2.`` prefix.
"""

from __future__ import annotations

from torch import nn

from components.models.students import CNN, register_model


@register_model("cnn-mlp-head")
class CNNWithMLPHead(CNN):
    """The FedAvg CNN whose classifier is ``fc(head_hidden) -> relu -> fc(num_classes)``."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        channels: tuple[int, int] | list[int] = (32, 64),
        hidden: int = 512,
        head_hidden: int = 64,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size, channels, hidden)
        self.fc2 = nn.Sequential(nn.Linear(hidden, head_hidden), nn.ReLU(), nn.Linear(head_hidden, num_classes))
