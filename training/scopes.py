"""Scopes every posterior method uses around its fit: which parameters train, putting the MAP back, timing."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def trainable(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Within the block only ``params`` require grad (an optimiser's or laplace-torch's weights); every
    parameter's flag is restored afterwards."""
    before = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)


@contextmanager
def restored(params: Mapping[str, nn.Parameter]) -> Iterator[dict[str, Tensor]]:
    """Yields a copy of ``params`` (the MAP) and writes it back when the block ends, however it ends."""
    saved = snapshot(params)
    try:
        yield saved
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name])


def snapshot(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached copies of ``params``."""
    return {name: p.detach().clone() for name, p in params.items()}


class Timer:
    """``with Timer() as timer: ...`` then ``timer.elapsed`` (seconds) or ``timer.seconds`` (to 0.1 s, as
    records show it)."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        self.elapsed = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self._start

    @property
    def seconds(self) -> float:
        return round(self.elapsed, 1)
