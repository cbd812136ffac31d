"""Configuration of a LoRA-XS adapter (the *config* of the config + layer + model trio)."""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters.defaults import CORE_INIT_STD
from adapters.projections import parse_spec


@dataclass
class LoraXSConfig:
    """What to adapt and how.

    Attributes:
        rank: r, the side of the trainable ``r×r`` core.
        alpha: the update is scaled by ``alpha / rank``.
        target_modules: module-name patterns (see :func:`adapters.injection.find_targets`).
        projection: projection spec (``svd``, ``wsvd``, ``dct``, ``random`` or a hybrid like ``dct-1/2_svd``).
        seed: seeds the core initialisation and the ``random`` projection family.
        init_std: standard deviation of the core's initial entries (near-zero start).
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = field(default=("query", "value"))
    projection: str = "svd"
    seed: int = 0
    init_std: float = CORE_INIT_STD

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.rank < 1:
            raise ValueError(f"rank must be positive, got {self.rank}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one pattern")
        parse_spec(self.projection)  # fail early on a bad spec

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank
