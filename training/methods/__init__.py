"""Posterior methods behind one contract (:mod:`training.methods.base`): each module of this package is one
method and registers itself under its ``--posterior`` name when the package is imported, so adding a method
is adding a module (and its config section). Beside them sit what a method needs alone or two share
(``laplace_fit`` and ``exact_ggn`` for Laplace, ``variational`` for VI and Bayesian-LoRA); importing those
registers nothing."""

import importlib
import pkgutil

from training.methods.base import REGISTRY, Fitted, Method, fit, get_method, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "Fitted", "Method", "fit", "get_method", "register"]
