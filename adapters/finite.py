"""Finiteness of many tensors at once: a bundle holds hundreds, and one small kernel pair per tensor adds up."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def first_non_finite(tensors: Mapping[str, Tensor]) -> str | None:
    """The first key whose floating-point tensor holds NaN or ±inf, or ``None`` when all are finite.

    One fused max-|x| reduction per dtype (``torch._foreach_norm`` with ``ord=inf``: NaN and inf propagate,
    and a finite value cannot overflow to inf the way a sum of squares can); only when something is wrong are
    the tensors searched one by one for its name. Non-float tensors are not checked here.
    """
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for tensor in tensors.values():
        if tensor.is_floating_point() and tensor.numel():
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
    if all(
        bool(torch.isfinite(torch.stack(torch._foreach_norm(group, float("inf")))).all()) for group in by_dtype.values()
    ):
        return None
    return next(
        key for key, t in tensors.items() if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())
    )
