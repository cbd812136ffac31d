"""Projection families: how the frozen LoRA-XS factors ``A`` and ``B`` are built from a weight ``W0``.

Every family writes ``W0 ≈ B A`` with ``B (d_out×r)`` and ``A (r×d_in)``; the small core of the factorisation
is absorbed into ``A``, so at ``R = I`` the adapter would reproduce the rank-r reconstruction (docs/methods.md,
projection families). All maths runs in float64 and is deterministic given the weight and an explicit seed:
the global RNG is never touched.

Specs: a family name (``svd``, ``wsvd``, ``dct``, ``random``) or a hybrid such as ``dct-1/2_svd``, which gives
``floor(r·1/2)`` directions to ``dct`` and the rest to ``svd``. Hybrid parts are fitted in the order written,
each to the residual the previous parts left, and stacked along the rank axis.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

import torch
from torch import Tensor, nn

from adapters.errors import ProjectionSpecError

PROJECTION_FAMILIES = ("svd", "wsvd", "dct", "random")
EIGEN_FLOOR = 1e-10


class Projection:
    """The frozen factors of one adapted layer: ``A (r×d_in)`` and ``B (d_out×r)``.

    Instances compare by identity: the server interns identical projections (same :attr:`digest`) so
    that adapters sharing them form one group in a batched forward.
    """

    def __init__(self, A: Tensor, B: Tensor) -> None:
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"incompatible projection shapes A {tuple(A.shape)}, B {tuple(B.shape)}")
        self.A = A
        self.B = B

    def __repr__(self) -> str:
        return f"Projection(rank={self.rank}, d_in={self.A.shape[1]}, d_out={self.B.shape[0]})"

    @cached_property
    def digest(self) -> str:
        """sha256 over both tensors' shapes and float32 bytes."""
        h = hashlib.sha256()
        for t in (self.A, self.B):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Projection:
        return Projection(self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype))

    def reconstruction(self) -> Tensor:
        """``B A``: what the adapter adds at ``R = I`` (d_out×d_in)."""
        return self.B @ self.A


# --------------------------------------------------------------------------------------------- families


def svd_projection(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Truncated SVD: ``B = U_r`` (orthonormal columns), ``A = Σ_r V_rᵀ``. The Eckart–Young optimum."""
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    U, Vh = _fix_svd_signs(U[:, :rank], Vh[:rank])
    return S[:rank, None] * Vh, U


def wsvd_projection(weight: Tensor, rank: int, input_moment: Tensor) -> tuple[Tensor, Tensor]:
    """Whitened SVD: minimises ``E_x ‖(W0 − B A) x‖²`` for inputs with second moment ``Σ = E[x xᵀ]``.

    With ``W̃ = W0 Σ^{1/2} = Ũ S Ṽᵀ``: ``B = Ũ_r``, ``A = S_r Ṽ_rᵀ Σ^{-1/2}`` (eigenvalues clamped at 1e-10).
    """
    evals, evecs = torch.linalg.eigh(input_moment.to(weight.dtype))
    evals = evals.clamp_min(EIGEN_FLOOR)
    sqrt_moment = (evecs * evals.sqrt()) @ evecs.T
    inv_sqrt_moment = (evecs * evals.rsqrt()) @ evecs.T
    U, S, Vh = torch.linalg.svd(weight @ sqrt_moment, full_matrices=False)
    U, Vh = _fix_svd_signs(U[:, :rank], Vh[:rank])
    return (S[:rank, None] * Vh) @ inv_sqrt_moment, U


def dct_projection(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """DCT-II on the L1-sorted matrix, keeping the r row and r column frequencies with the most energy.

    Rows and columns are sorted by ascending L1 norm (which makes the matrix smooth), transformed by the
    orthonormal 2-D DCT-II, and the r output and r input frequencies with the largest summed squared
    coefficients are kept: ``B`` holds the kept output cosines (orthonormal columns), ``A`` the kept
    coefficients times the kept input cosines, both with the permutations undone.
    """
    d_out, d_in = weight.shape
    if rank > min(d_out, d_in):
        raise ProjectionSpecError(f"dct rank {rank} exceeds min(d_out, d_in) = {min(d_out, d_in)}")
    perm_out = torch.argsort(weight.abs().sum(dim=1), stable=True)
    perm_in = torch.argsort(weight.abs().sum(dim=0), stable=True)
    D_out, D_in = dct_matrix(d_out, weight.dtype), dct_matrix(d_in, weight.dtype)
    coeffs = D_out @ weight[perm_out][:, perm_in] @ D_in.T
    energy = coeffs.square()
    keep_out = torch.sort(torch.topk(energy.sum(dim=1), rank).indices).values
    keep_in = torch.sort(torch.topk(energy.sum(dim=0), rank).indices).values
    B = torch.empty(d_out, rank, dtype=weight.dtype)
    B[perm_out] = D_out[keep_out].T
    A = torch.empty(rank, d_in, dtype=weight.dtype)
    A[:, perm_in] = coeffs[keep_out][:, keep_in] @ D_in[keep_in]
    return A, B


def random_projection(weight: Tensor, rank: int, seed: int) -> tuple[Tensor, Tensor]:
    """Haar-random orthonormal bases ``Q_in``, ``Q_out``; ``B = Q_out``, ``A = (Q_outᵀ W0 Q_in) Q_inᵀ``."""
    d_out, d_in = weight.shape
    generator = torch.Generator().manual_seed(seed)
    Q_out = _haar_orthonormal(d_out, rank, generator, weight.dtype)
    Q_in = _haar_orthonormal(d_in, rank, generator, weight.dtype)
    return (Q_out.T @ weight @ Q_in) @ Q_in.T, Q_out


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Orthonormal DCT-II matrix ``D (n×n)``: row k is the k-th cosine basis vector, ``D Dᵀ = I``."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    D = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    D[0] /= math.sqrt(2.0)
    return D.to(dtype)


def _haar_orthonormal(n: int, k: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    gaussian = torch.randn(n, k, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(gaussian)
    return (Q * torch.sign(torch.diagonal(R))).to(dtype)  # sign fix makes Q Haar-distributed


def _fix_svd_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Make each left singular vector's largest-magnitude entry positive, so results are reproducible."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1])])
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


# ------------------------------------------------------------------------------------------------ specs

_PART = re.compile(r"^(?P<family>[a-z]+)(?:-(?P<num>\d+)/(?P<den>\d+))?$")


@dataclass(frozen=True)
class SpecPart:
    family: str
    fraction: Fraction | None  # None: this part takes what the fractions leave


def parse_spec(spec: str) -> list[SpecPart]:
    """Parse ``svd`` or a hybrid like ``dct-1/2_svd`` into parts; exactly one part of a hybrid has no fraction."""
    parts = []
    for token in spec.strip().lower().split("_"):
        match = _PART.match(token)
        if not match or match["family"] not in PROJECTION_FAMILIES:
            raise ProjectionSpecError(
                f"bad projection spec {spec!r}: part {token!r} is not one of {PROJECTION_FAMILIES}, optionally with a "
                "fraction such as 'dct-1/2'"
            )
        fraction = Fraction(int(match["num"]), int(match["den"])) if match["num"] else None
        if fraction is not None and not 0 < fraction < 1:
            raise ProjectionSpecError(f"bad projection spec {spec!r}: fraction {fraction} not in (0, 1)")
        parts.append(SpecPart(match["family"], fraction))
    if len(parts) > 1:
        free = [p for p in parts if p.fraction is None]
        if len(free) != 1:
            raise ProjectionSpecError(
                f"bad projection spec {spec!r}: a hybrid needs exactly one part without a fraction"
            )
        if sum(p.fraction for p in parts if p.fraction is not None) >= 1:
            raise ProjectionSpecError(f"bad projection spec {spec!r}: fractions must sum to less than 1")
    elif parts[0].fraction is not None:
        raise ProjectionSpecError(f"bad projection spec {spec!r}: a single family takes no fraction")
    return parts


def spec_needs_data(spec: str) -> bool:
    """Whether the spec needs the layers' input second moments (W-SVD does)."""
    return any(part.family == "wsvd" for part in parse_spec(spec))


def part_ranks(parts: list[SpecPart], rank: int) -> list[int]:
    """Directions per part: ``floor(r·f)`` for each fraction, the remainder to the free part."""
    fixed = [math.floor(rank * p.fraction) if p.fraction is not None else 0 for p in parts]
    return [rank - sum(fixed) if p.fraction is None else n for p, n in zip(parts, fixed, strict=True)]


def build_projection(
    weight: Tensor,
    rank: int,
    spec: str = "svd",
    *,
    seed: int = 0,
    input_moment: Tensor | None = None,
) -> Projection:
    """Build the projection of one layer.

    Args:
        weight: ``W0 (d_out×d_in)``; any dtype/device, the result has the same.
        rank: r, at most ``min(d_out, d_in)``.
        spec: a family or hybrid spec (module docstring).
        seed: seeds the ``random`` family; parts of a hybrid get ``seed + index``.
        input_moment: ``E[x xᵀ] (d_in×d_in)`` of the layer's inputs, required by ``wsvd``.
    """
    if not 0 < rank <= min(weight.shape):
        raise ProjectionSpecError(f"rank {rank} must be in [1, {min(weight.shape)}] for a {tuple(weight.shape)} weight")
    parts = parse_spec(spec)
    residual = weight.detach().to("cpu", torch.float64)
    As, Bs = [], []
    for index, (part, part_rank) in enumerate(zip(parts, part_ranks(parts, rank), strict=True)):
        if part_rank == 0:
            continue
        A, B = _fit_family(part.family, residual, part_rank, seed + index, input_moment)
        residual = residual - B @ A
        As.append(A)
        Bs.append(B)
    A, B = torch.cat(As, dim=0), torch.cat(Bs, dim=1)
    return Projection(A.to(weight.device, weight.dtype).contiguous(), B.to(weight.device, weight.dtype).contiguous())


def _fit_family(
    family: str, weight: Tensor, rank: int, seed: int, input_moment: Tensor | None
) -> tuple[Tensor, Tensor]:
    if family == "svd":
        return svd_projection(weight, rank)
    if family == "dct":
        return dct_projection(weight, rank)
    if family == "random":
        return random_projection(weight, rank, seed)
    if input_moment is None:
        raise ProjectionSpecError("the wsvd family needs the layer's input second moment (estimate it on data)")
    return wsvd_projection(weight, rank, input_moment.to("cpu", torch.float64))


# --------------------------------------------------------------------------------- input second moments


class InputMoments:
    """Accumulates ``E[x xᵀ]`` of the inputs of chosen linear layers, in float64, padding excluded.

    Usage::

        with InputMoments(model, ["encoder.layer.0.attention.self.query", ...]) as moments:
            for batch in batches:
                moments.set_mask(batch["attention_mask"])
                model(**batch)
        moments.moment("encoder.layer.0.attention.self.query")  # (d_in×d_in)

    ``set_mask`` takes the ``(batch, seq)`` attention mask of the next forward; tokens where it is 0 are
    left out. ``num_tokens`` records how many tokens each moment averages (the bundle records it).
    """

    def __init__(self, model: nn.Module, module_names: Iterable[str]) -> None:
        modules = dict(model.named_modules())
        self._sums: dict[str, Tensor] = {}
        self.num_tokens: dict[str, int] = {}
        self._mask: Tensor | None = None
        self._handles = []
        for name in module_names:
            linear = modules[name]
            linear = getattr(linear, "base", linear)  # an already wrapped layer: hook its frozen linear
            self._sums[name] = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float64)
            self.num_tokens[name] = 0
            self._handles.append(linear.register_forward_hook(self._hook(name)))

    def set_mask(self, attention_mask: Tensor | None) -> None:
        self._mask = attention_mask

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
            x = inputs[0].detach()
            if self._mask is not None and x.ndim == 3 and x.shape[:2] == self._mask.shape:
                x = x[self._mask.bool()]
            x = x.reshape(-1, x.shape[-1]).to("cpu", torch.float64)
            self._sums[name] += x.T @ x
            self.num_tokens[name] += x.shape[0]

        return hook

    def moment(self, name: str) -> Tensor:
        if self.num_tokens[name] == 0:
            raise ProjectionSpecError(f"no tokens reached {name}: cannot estimate its input second moment")
        return self._sums[name] / self.num_tokens[name]

    def moments(self) -> Mapping[str, Tensor]:
        return {name: self.moment(name) for name in self._sums}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> InputMoments:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
