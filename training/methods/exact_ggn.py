"""Exact GGN Laplace (full and diagonal) for LoRA-XS cores, from per-example Jacobians.

laplace-torch's curvlinops backend builds the full GGN as ``GGN @ I``: P matrix products over the data,
hours for the ~10⁴ core parameters of an all-layer adapter; its diagonal goes through ``torch.func``
per-example Jacobians, which fall back to slow loops over PyTorch's CPU attention kernels. The GGN of a classifier is
``Σ_n J_nᵀ Λ_n J_n`` with ``Λ_n = diag(p_n) − p_n p_nᵀ`` (cross-entropy Hessian in logit space) and ``J_n``
the ``C×P`` Jacobian of the logits. For a linear layer the per-example Jacobian row of class c is
``Σ_t g_t a_tᵀ`` from its inputs ``a`` and the output gradients ``g`` of that logit — the same quantities
KFAC uses (docs/methods.md, Laplace) — so C backward passes per batch give ``J`` exactly. Writing
``Λ = Σ_c p_c (e_c − p)(e_c − p)ᵀ``, rows ``U_nc = √p_c (J_nc − Σ_c' p_c' J_nc')`` give ``GGN = Uᵀ U``.

The prior precision δ maximises the Laplace marginal likelihood
``−L(θ̂) − ½ δ ‖θ̂‖² − ½ Σ_i log(N·λ_i/N + δ) + ½ P log δ`` (λ: GGN eigenvalues), computed from one
eigendecomposition. Tested against laplace-torch's ``hessian_structure="full"`` on a small model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from adapters import DiagPosterior, FullPosterior, LoraXSClassifier, Posterior
from adapters.posteriors.base import unflatten
from training.encoding import batch_logits


@contextmanager
def _capture(modules: list[nn.Linear]) -> Iterator[tuple[dict, dict]]:
    """Record each module's input (forward) and output gradient (backward)."""
    inputs: dict[nn.Module, Tensor] = {}
    grads: dict[nn.Module, Tensor] = {}
    handles = []
    for module in modules:
        handles.append(module.register_forward_hook(lambda m, i, o: inputs.__setitem__(m, i[0].detach())))
        handles.append(module.register_full_backward_hook(lambda m, gi, go: grads.__setitem__(m, go[0].detach())))
    try:
        yield inputs, grads
    finally:
        for handle in handles:
            handle.remove()


def _per_example_rows(modules: list[nn.Linear], params: dict, inputs: dict, grads: dict) -> Tensor:
    """``(B, P)``: per-example gradients of the backpropagated scalar, in ``params`` order."""
    by_param = {}
    for module in modules:
        a = inputs[module].reshape(inputs[module].shape[0], -1, inputs[module].shape[-1])
        g = grads[module].reshape(grads[module].shape[0], -1, grads[module].shape[-1])
        by_param[id(module.weight)] = torch.einsum("bto,bti->boi", g, a).flatten(1)
        if module.bias is not None:
            by_param[id(module.bias)] = g.sum(dim=1)
    return torch.cat([by_param[id(p)] for p in params.values()], dim=1)


def exact_ggn(
    model: LoraXSClassifier,
    loader: DataLoader,
    params: dict[str, nn.Parameter],
    progress: bool = False,
    diagonal: bool = False,
) -> tuple[Tensor, float, int]:
    """``(GGN summed over the data, summed NLL, number of examples)`` at the current parameters.

    The GGN is ``(P, P)``, or its diagonal ``(P,)`` when ``diagonal`` (same Jacobians, no P×P product).
    """
    owners = {id(p): m for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    modules = list(dict.fromkeys(owners[id(p)] for p in params.values()))
    P = sum(p.numel() for p in params.values())
    device = next(iter(params.values())).device
    ggn = torch.zeros((P,) if diagonal else (P, P), dtype=torch.float64, device=device)
    loss, count = 0.0, 0
    model.eval()
    with _capture(modules) as (inputs, grads):
        for batch in tqdm(loader, desc="full GGN", disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = batch_logits(model, batch)
            probs = torch.softmax(logits.detach().double(), dim=-1)
            loss += F.cross_entropy(logits.detach().double(), batch["labels"], reduction="sum").item()
            count += logits.shape[0]
            jacobian = []
            for c in range(logits.shape[1]):
                model.zero_grad(set_to_none=True)
                with warnings.catch_warnings():  # we want exactly the output gradients it warns about
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    logits[:, c].sum().backward(retain_graph=c < logits.shape[1] - 1)
                jacobian.append(_per_example_rows(modules, params, inputs, grads).double())
            J = torch.stack(jacobian, dim=1)  # (B, C, P)
            centred = J - torch.einsum("bc,bcp->bp", probs, J).unsqueeze(1)
            U = (probs.sqrt().unsqueeze(-1) * centred).reshape(-1, P)
            ggn += U.square().sum(dim=0) if diagonal else U.T @ U
    model.zero_grad(set_to_none=True)
    return ggn, loss, count


def log_marginal_likelihood(delta: Tensor, eigvals: Tensor, loss: float, mean_sq: float, P: int) -> Tensor:
    """Laplace evidence at prior precision δ (up to constants in δ), GGN eigenvalues ``eigvals``."""
    return -loss - 0.5 * delta * mean_sq - 0.5 * torch.log(eigvals + delta).sum() + 0.5 * P * torch.log(delta)


def _tune_prior(eigvals: Tensor, loss: float, mean_sq: float, P: int) -> float:
    """δ maximising the evidence (L-BFGS on log δ)."""
    log_delta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_delta], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = -log_marginal_likelihood(log_delta.exp(), eigvals, loss, mean_sq, P)
        value.backward()
        return value

    optimizer.step(closure)
    return float(log_delta.detach().exp())


def fit_exact(
    model: LoraXSClassifier,
    loader: DataLoader,
    params: dict[str, nn.Parameter],
    structure: str,
    *,
    n_data: int | None = None,
    progress: bool = False,
) -> tuple[FullPosterior | DiagPosterior, dict, Callable[[float], Posterior]]:
    """``full``: ``N(θ̂, (GGN + δI)⁻¹)``; ``diag``: ``N(θ̂, diag(1 / (diag GGN + δ)))``; δ by marginal likelihood.

    Returns the posterior, a record of the fit, and ``at(δ)``: the posterior for another prior precision.
    """
    if structure not in ("diag", "full"):
        raise ValueError(f"exact GGN fits 'diag' or 'full', not {structure!r}")
    ggn, loss, count = exact_ggn(model, loader, params, progress, diagonal=structure == "diag")
    scale = (n_data or count) / count  # a subset stands for the N training examples
    ggn, loss = ggn * scale, loss * scale
    mean = {name: p.detach().clone() for name, p in params.items()}
    dtype = next(iter(mean.values())).dtype
    theta = torch.cat([t.reshape(-1) for t in mean.values()]).double()
    mean_sq = float(theta @ theta)
    if structure == "diag":
        eigvals = ggn.clamp_min(0)

        def at(delta: float) -> DiagPosterior:
            return DiagPosterior(mean, unflatten((1.0 / (eigvals + delta)).to(dtype), mean))
    else:
        eigvals, eigvecs = torch.linalg.eigh(ggn)
        eigvals = eigvals.clamp_min(0)

        def at(delta: float) -> FullPosterior:
            covariance = (eigvecs / (eigvals + delta)) @ eigvecs.T
            return FullPosterior(mean, torch.linalg.cholesky(0.5 * (covariance + covariance.T)).to(dtype))

    spectrum = eigvals.cpu()  # the prior is tuned on the CPU whatever device the curvature is on
    delta = _tune_prior(spectrum, loss, mean_sq, len(theta))
    posterior = at(delta)
    evidence = log_marginal_likelihood(torch.tensor(delta, dtype=torch.float64), spectrum, loss, mean_sq, len(theta))
    info = {
        "structure": structure,
        "prior_precision": delta,
        "prior_structure": "scalar",
        "log_marginal_likelihood": float(evidence),
        "n_data": int(n_data or count),
        "curvature_examples": count,
        "n_params": len(theta),
        "backend": "caveat exact GGN (per-example core Jacobians)",
    }
    return posterior, info, at
