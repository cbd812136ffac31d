"""Exact conversions between a LoRA update and a LoRA-XS one (docs/methods.md, LoRA-XS).

A LoRA module adds ``ΔW = s · B_L A_L`` with ``A_L (r × d_in)``, ``B_L (d_out × r)`` and ``s = α / r`` (``α / √r``
with rsLoRA). With thin QR factorisations ``B_L = Q_B R_B`` and ``A_Lᵀ = Q_A R_A``,

    ``ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ``,

a LoRA-XS update with frozen orthonormal projections ``B = Q_B (d_out × r)``, ``A = Q_Aᵀ (r × d_in)`` and the core
``R = s R_B R_Aᵀ / c`` at LoRA-XS scaling ``c``: a posterior over ``R`` lives in exactly the subspace the LoRA moved
in. A smaller rank than the bundle's is padded exactly: the projections gain orthonormal columns (rows) outside
the LoRA's, the core zeros there. The reverse is exact too: ``c B R A`` is the LoRA ``B_L = c B``, ``A_L = R A``
with ``α = r``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def lora_scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """PEFT's ``s``: ``α / r``, or ``α / √r`` with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass(frozen=True)
class XsFactors:
    """One module's LoRA-XS update ``c · B R A``: ``A (r × d_in)``, ``core (r × r)``, ``B (d_out × r)``."""

    A: Tensor
    core: Tensor
    B: Tensor

    def delta(self, scaling: float) -> Tensor:
        """``ΔW = c B R A`` ``(d_out × d_in)``."""
        return scaling * self.B @ self.core @ self.A


def lora_to_xs(
    lora_A: Tensor, lora_B: Tensor, lora_scale: float, xs_scaling: float, rank: int | None = None
) -> XsFactors:
    """The LoRA-XS factors of ``s · B_L A_L`` at LoRA-XS scaling ``c`` (``rank``: pad to this rank; default the
    LoRA's own). Computed in float64, returned in the LoRA's dtype.

    Raises:
        ValueError: shapes that do not make a LoRA, a rank below the LoRA's, or one above ``min(d_out, d_in)``.
    """
    if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not make a LoRA")
    r, (d_out, d_in) = lora_A.shape[0], (lora_B.shape[0], lora_A.shape[1])
    rank = r if rank is None else rank
    if not r <= rank <= min(d_out, d_in):
        raise ValueError(f"cannot hold a rank-{r} LoRA of a {d_out}×{d_in} layer at rank {rank}")
    q_b, r_b = torch.linalg.qr(lora_B.double())
    q_a, r_a = torch.linalg.qr(lora_A.double().T)
    core = torch.zeros(rank, rank, dtype=torch.float64)
    core[:r, :r] = lora_scale * r_b @ r_a.T / xs_scaling
    dtype = lora_A.dtype
    return XsFactors(_complete(q_a, rank).T.to(dtype), core.to(dtype), _complete(q_b, rank).to(dtype))


def _complete(basis: Tensor, rank: int) -> Tensor:
    """``basis (d × r)`` orthonormal, completed with ``rank − r`` orthonormal columns orthogonal to it."""
    d, r = basis.shape
    if rank == r:
        return basis
    generator = torch.Generator().manual_seed(d * 7919 + r)  # deterministic: the same LoRA, the same bundle
    extra = torch.randn(d, rank - r, generator=generator, dtype=basis.dtype)
    extra -= basis @ (basis.T @ extra)  # project out the LoRA's directions (twice: numerically orthogonal)
    extra -= basis @ (basis.T @ extra)
    return torch.cat([basis, torch.linalg.qr(extra).Q], dim=1)


def xs_to_lora(factors: XsFactors, xs_scaling: float) -> tuple[Tensor, Tensor]:
    """The PEFT LoRA ``(lora_A (r × d_in), lora_B (d_out × r))`` of ``c B R A``, for ``r = lora_alpha = rank``
    (PEFT's scaling 1)."""
    return factors.core @ factors.A, xs_scaling * factors.B
