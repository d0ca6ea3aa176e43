"""Device profiles: the fine-tuning mode each client's device affords (``federate.protocol: few-shot``).

Declared in the ``clients`` params section, beside the architectures of the
heterogeneous protocols::

    clients:
      devices:                          # a device profile -> its mode
        weak: {mode: linear-probe}      # head only, on cached features
        medium: {mode: meta}            # FOMAML / Reptile initialisation, adapted per client
        strong: {mode: full}            # projection, adapter and head (about 3x a probe's compute)
      device_groups:                    # first match wins: fnmatch patterns of client ids
        - {clients: ["client_0[0-2]"], device: weak}
      device_assign: round-robin        # or groups; round-robin fills in the clients no group names

With no devices declared every client fine-tunes in ``federate.fewshot.default_mode``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from components.core.ids import validate_id
from components.federation.fewshot.modes import check_mode

ASSIGNMENTS = ("groups", "round-robin")


@dataclass(frozen=True)
class ClientDevice:
    """One client's device profile and the mode it fine-tunes in."""

    device: str
    mode: str


def check_devices(devices: Mapping[str, Mapping[str, Any]], groups: Sequence[Mapping[str, Any]], assign: str) -> None:
    """Refuse unknown modes, assignments and groups that name no declared device (a clear error, nothing built)."""
    if assign not in ASSIGNMENTS:
        raise ValueError(f"clients.device_assign must be one of {ASSIGNMENTS}, got {assign!r}")
    for name, device in devices.items():
        validate_id(str(name), "device profile name")
        if not isinstance(device, Mapping) or "mode" not in device:
            raise ValueError(f"device profile {name!r} needs a mode (linear-probe, full or meta)")
        unknown = set(device) - {"mode", "description"}
        if unknown:
            raise ValueError(f"device profile {name!r}: unknown keys {sorted(unknown)} (mode, description)")
        check_mode(str(device["mode"]))
    for group in groups:
        if not isinstance(group, Mapping) or set(group) != {"clients", "device"}:
            raise ValueError(f"a device group is {{clients: [patterns], device: name}}, got {group!r}")
        if group["device"] not in devices:
            raise ValueError(
                f"device group {group['clients']!r} names device {group['device']!r}; known: {sorted(devices)}"
            )


def assign_devices(
    devices: Mapping[str, Mapping[str, Any]],
    groups: Sequence[Mapping[str, Any]],
    assign: str,
    client_ids: Sequence[str],
    default_mode: str,
) -> dict[str, ClientDevice]:
    """Each client's device and mode: the first matching group, else (round-robin) its sorted position
    modulo the devices in declared order, else ``default_mode`` (device ``default``)."""
    check_devices(devices, groups, assign)
    names = list(devices)
    out = {}
    for position, cid in enumerate(sorted(client_ids)):
        device = next((g["device"] for g in groups if _matches(g["clients"], cid)), None)
        if device is None and assign == "round-robin" and names:
            device = names[position % len(names)]
        if device is None:
            out[cid] = ClientDevice("default", check_mode(default_mode))
        else:
            out[cid] = ClientDevice(str(device), str(devices[device]["mode"]))
    return out


def _matches(patterns: str | Sequence[str], client_id: str) -> bool:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return any(fnmatch.fnmatchcase(client_id, str(p)) for p in patterns)
