"""Arithmetic over model state dicts.

Every function returns a new state dict and never mutates its inputs. Floating
point entries are combined in float64 and cast back to their own dtype, so that
a sum of many small contributions loses no more precision than the final cast;
integer entries (e.g. BatchNorm's ``num_batches_tracked``) are rounded back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]


def _check_same_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    if a.keys() != b.keys():
        missing = sorted(set(a) ^ set(b))
        raise ValueError(f"state dicts have different keys: {missing[:5]}")
    for key in a:
        if a[key].shape != b[key].shape:
            raise ValueError(f"state dicts differ in shape at {key!r}: {tuple(a[key].shape)} vs {tuple(b[key].shape)}")


def _cast_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.is_floating_point() or like.is_complex():
        return value.to(like.dtype)
    return value.round().to(like.dtype)


def cast_to(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` (a float64 accumulator) as ``dtype``, rounded when that is an integer type."""
    return _cast_like(value, torch.empty(0, dtype=dtype))


def widen(state: Mapping[str, torch.Tensor]) -> StateDict:
    """``state`` with half-precision floats as float32 (exact): what the server applies of an fp16 upload."""
    return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in state.items()}


def narrow(state: Mapping[str, torch.Tensor]) -> StateDict:
    """``state`` with float32/float64 entries as float16 (what a client uploads with ``update_dtype: float16``)."""
    return {k: v.half() if v.dtype in (torch.float32, torch.float64) else v for k, v in state.items()}


def clone_state(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Return a detached deep copy of ``state`` on the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def subtract(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> StateDict:
    """Return ``a - b`` entry by entry (e.g. a local model minus the global one)."""
    _check_same_keys(a, b)
    return {k: _cast_like(a[k].double() - b[k].double(), a[k]) for k in a}


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> StateDict:
    """Return ``a + b`` entry by entry."""
    _check_same_keys(a, b)
    return {k: _cast_like(a[k].double() + b[k].double(), a[k]) for k in a}


def scale(a: Mapping[str, torch.Tensor], factor: float) -> StateDict:
    """Return ``factor * a``."""
    return {k: _cast_like(v.double() * float(factor), v) for k, v in a.items()}


def weighted_sum(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
    """Return ``sum_i weights[i] * states[i]``, accumulated in float64."""
    if len(states) == 0:
        raise ValueError("weighted_sum needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    first = states[0]
    for other in states[1:]:
        _check_same_keys(first, other)
    out: StateDict = {}
    for key, like in first.items():
        acc = torch.zeros(like.shape, dtype=torch.float64)
        for state, weight in zip(states, weights):
            acc += state[key].double() * float(weight)
        out[key] = _cast_like(acc, like)
    return out


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
    """Return the average of ``states`` weighted by ``weights`` (normalised to sum 1)."""
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must have a positive sum, got {list(weights)}")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative, got {list(weights)}")
    return weighted_sum(states, [float(w) / total for w in weights])


def zeros_like(a: Mapping[str, torch.Tensor]) -> StateDict:
    """Return a state of zeros with the keys, shapes and dtypes of ``a``."""
    return {k: torch.zeros_like(v, device="cpu") for k, v in a.items()}


def is_finite(a: Mapping[str, torch.Tensor]) -> bool:
    """True when no floating point entry holds NaN or infinity."""
    return all(bool(torch.isfinite(v).all()) for v in a.values() if v.is_floating_point())


def non_finite_keys(a: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys whose entries hold NaN or infinity."""
    return [k for k, v in a.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def l2_norm(a: Mapping[str, torch.Tensor]) -> float:
    """Euclidean norm of all floating point entries taken together."""
    total = 0.0
    for v in a.values():
        if v.is_floating_point():
            total += float(v.double().pow(2).sum())
    return total**0.5


def l2_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Euclidean distance between two states over their floating point entries."""
    return l2_norm(subtract(a, b))


def max_abs_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute entry-wise difference; 0.0 for identical states."""
    _check_same_keys(a, b)
    return max(
        (float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()),
        default=0.0,
    )


def total_numel(states: Iterable[Mapping[str, torch.Tensor]]) -> int:
    """Number of scalar entries over several states (for size reports)."""
    return sum(v.numel() for s in states for v in s.values())


def weights_digest(state: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None) -> str:
    """The sha256 of a state's tensors (names, dtypes, shapes and bytes, sorted by name).

    It names the weights themselves, whatever file format holds them, so the
    archive's safetensors and the registry's exported model can be compared.
    ``keys`` restricts it to those entries (an exported model may carry more:
    constants of a frozen tower); a missing key raises ``KeyError``.
    """
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state if keys is None else keys):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
