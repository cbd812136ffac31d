"""The LoRA-XS layer: ``h = W0 x + b + s · B R A x`` around a frozen ``nn.Linear``.

Two modes share one module:

* *single* (training, MAP): the layer's own frozen ``A``, ``B`` buffers and trainable core
  ``R = nn.Linear(r, r, bias=False)`` (an ``nn.Linear`` so that laplace-torch's curvature backends see it);
* *batched-rows* (serving): for one forward, :attr:`LoraXSLinear.row_groups` says which core each row of the
  batch uses. Rows may mix adapters and posterior samples; ``z = A x`` is computed once per projection group
  and the per-row cores are applied with one ``bmm``. :mod:`adapters.batching` builds the groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.defaults import CORE_INIT_STD
from adapters.projections import Projection


@dataclass
class RowGroup:
    """Rows of a batched forward that share one projection.

    Attributes:
        A: ``(r×d_in)`` input projection.
        B: ``(d_out×r)`` output projection.
        cores: ``(n_rows, r, r)`` one core per row, the adapter's scaling already folded in.
        rows: ``(n_rows,)`` indices into the batch, a slice when they are one run of rows (read as a view,
            added in place), or ``None`` when the group covers every row in order.
    """

    A: Tensor
    B: Tensor
    cores: Tensor
    rows: Tensor | slice | None


class LoraXSLinear(nn.Module):
    """LoRA-XS wrapper of a frozen ``nn.Linear``.

    Args:
        base: the frozen layer (kept as ``self.base``; its parameters are not touched).
        projection: this layer's own ``A``/``B`` for single mode, or ``None`` for a host layer that only
            serves batched rows (the server's shared base model).
        alpha: single-mode scaling ``alpha / r``.
        init_std: the core starts as ``N(0, init_std²)`` entrywise.
        generator: RNG for the core initialisation (never the global one).
    """

    def __init__(
        self,
        base: nn.Linear,
        projection: Projection | None = None,
        alpha: float = 16.0,
        init_std: float = CORE_INIT_STD,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.row_groups: list[RowGroup] | None = None
        self.core: nn.Linear | None = None
        self.scaling = 0.0
        if projection is not None:
            self._check_projection(projection)
            rank = projection.rank
            weight = base.weight
            self.register_buffer("lora_A", projection.A.to(weight.device, weight.dtype).clone())
            self.register_buffer("lora_B", projection.B.to(weight.device, weight.dtype).clone())
            self.core = nn.Linear(rank, rank, bias=False, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                init = torch.randn(rank, rank, generator=generator, dtype=torch.float32) * init_std
                self.core.weight.copy_(init)
            self.scaling = alpha / rank

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _check_projection(self, projection: Projection) -> None:
        if projection.A.shape[1] != self.in_features or projection.B.shape[0] != self.out_features:
            raise ValueError(
                f"projection A {tuple(projection.A.shape)}, B {tuple(projection.B.shape)} does not fit a "
                f"linear layer {self.in_features}→{self.out_features}"
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.row_groups is not None:
            return self._add_row_deltas(out, x, self.row_groups)
        if self.core is None:
            return out
        return out + self.scaling * F.linear(self.core(F.linear(x, self.lora_A)), self.lora_B)

    @staticmethod
    def _add_row_deltas(out: Tensor, x: Tensor, groups: list[RowGroup]) -> Tensor:
        """``out[rows] += B (R_row (A x_row))`` for each group; x is ``(batch, ..., d_in)``."""
        for group in groups:
            rows = group.rows
            xs = x if rows is None else x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
            z = F.linear(xs, group.A)  # A x once per projection group
            z = z.reshape(z.shape[0], -1, z.shape[-1])  # (rows, tokens, r)
            z = torch.bmm(z, group.cores.transpose(1, 2))  # one grouped matmul: z_t ↦ R_row z_t
            delta = F.linear(z, group.B).reshape(*xs.shape[:-1], out.shape[-1])
            if rows is None:
                out = out + delta
            elif isinstance(rows, slice):  # in place: the base's output is not saved for its backward
                out[rows] += delta
            else:
                out = out.index_add(0, rows, delta)
        return out

    def extra_repr(self) -> str:
        rank = self.core.in_features if self.core is not None else None
        return f"rank={rank}, scaling={self.scaling:g}"
