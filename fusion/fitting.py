"""Fitting a fused level's weights to its targets: least squares (or ridge) in closed form, and Adam from there
keeping the best iterate (KF-gradient) or the last (the authors' KF-gradient)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def least_squares(h: Tensor, target: Tensor, bias: bool, ridge: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """Fit ``target ~ h @ w.T + b`` by least squares, taking the minimum-norm solution; with ``ridge > 0``, by
    ridge regression with penalty ``ridge`` x the mean squared norm of an input row (bias column included).

    With fewer samples than inputs (a few hundred samples, 784 pixels) the system is
    under-determined: every exact solution reproduces the targets on the fusion samples, so fusing a
    network with itself gives back the same function there. The SVD-based 'gelsd' driver picks the
    unique minimum-norm one, deliberately, instead of whatever a QR driver would return. Where the
    samples barely outnumber the inputs (the Linear after a CNN's flatten: 1,025 inputs) the exact fit
    is ill-conditioned and generalises badly; the ridge keeps it in check.
    """
    a = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1) if bias else h
    if ridge:
        penalty = ridge * a.pow(2).sum() / len(a)
        if len(a) < a.shape[1]:  # the dual form: an [N, N] system instead of [inputs, inputs]
            gram = a @ a.T
            sol = a.T @ torch.linalg.solve(gram + penalty * torch.eye(len(a), dtype=a.dtype), target)
        else:
            gram = a.T @ a
            sol = torch.linalg.solve(gram + penalty * torch.eye(len(gram), dtype=a.dtype), a.T @ target)
    else:
        sol = torch.linalg.lstsq(a, target, driver="gelsd").solution
    return (sol[:-1].T.contiguous(), sol[-1].clone()) if bias else (sol.T.contiguous(), None)


def adam(params: list[Tensor], loss_of: Callable[..., Tensor], steps: int, lr: float,
         keep_best: bool = False) -> list[Tensor]:
    """``steps`` steps of Adam on ``loss_of(*params)`` from ``params``; returns the last iterate's values, or with
    ``keep_best`` the best iterate's (the start included)."""
    params = [p.clone().requires_grad_() for p in params]
    optimiser = torch.optim.Adam(params, lr=lr)
    best_loss, best = float("inf"), params
    with torch.enable_grad():
        for step in range(steps + 1):
            loss = loss_of(*params)
            if keep_best and loss.item() < best_loss:
                best_loss, best = loss.item(), [p.detach().clone() for p in params]
            if step == steps:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return best if keep_best else [p.detach().clone() for p in params]


def best_of_adam(params: list[Tensor], loss_of: Callable[..., Tensor], steps: int, lr: float) -> list[Tensor]:
    """Adam on ``loss_of(*params)`` from ``params``; returns the best iterate's values.

    Keeping the best iterate matters: the least-squares start already minimises the weighted MSE on
    these samples (the loss separates over neurons), and Adam's normalised steps would otherwise
    jitter around it at the scale of ``lr``.
    """
    return adam(params, loss_of, steps, lr, keep_best=True)
