"""Why a synthetic set transfers to real inputs, or not: measured against real *test* images (evaluation only).

- Frechet distance between an expert's feature vectors on its synthetic images and on its own real test
  images (the FID formula in the expert's own feature space: 0 when the two Gaussians coincide).
- The expert's max-softmax distribution on its synthetic images, on real images of its own domain, and on
  real images of the other experts' domains: a gate can only learn "mine" from synthetic images if the
  expert responds to them as it responds to its real inputs, and differently from the others.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

HISTOGRAM_BINS = 20  # of max-softmax over [0, 1]


def frechet_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two sets of feature vectors ``[N, D]``:
    |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), computed in float64. ``eps`` is added to both
    covariances' diagonals first: ReLU features that never fire make them singular (as pytorch-fid does)."""
    x, y = a.double().cpu().numpy(), b.double().cpu().numpy()
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    cov_x, cov_y = (np.atleast_2d(np.cov(v, rowvar=False)) + eps * np.eye(x.shape[1]) for v in (x, y))
    with warnings.catch_warnings():  # sqrtm warns on near-singular products; the offset keeps the result finite
        warnings.simplefilter("ignore")
        root = scipy.linalg.sqrtm(cov_x @ cov_y)
    if np.iscomplexobj(root):  # round-off gives tiny imaginary parts
        root = root.real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x + cov_y - 2 * root))


def msp_histogram(logits: torch.Tensor) -> list[float]:
    """The share of samples whose max-softmax falls in each of HISTOGRAM_BINS equal bins of [0, 1]."""
    msp = logits.float().softmax(dim=1).max(dim=1).values.cpu()
    counts = torch.histc(msp, bins=HISTOGRAM_BINS, min=0.0, max=1.0)
    return (counts / max(len(msp), 1)).tolist()


def set_diagnostics(synthetic: tuple[torch.Tensor, torch.Tensor], real: tuple[torch.Tensor, torch.Tensor],
                    is_own: torch.Tensor) -> dict:
    """One expert's diagnostics: ``synthetic`` and ``real`` are its (logits, features) on its synthetic set
    and on the real combined test set; ``is_own`` marks the test images of its own domain."""
    (syn_logits, syn_features), (real_logits, real_features) = synthetic, real
    is_own = is_own.to(real_logits.device)
    msp = {name: logits.float().softmax(dim=1).max(dim=1).values.mean().item()
           for name, logits in (("synthetic", syn_logits), ("real_in", real_logits[is_own]),
                                ("real_out", real_logits[~is_own]))}
    # an expert given by file without a feature layer has no feature vector to compare
    return {"frechet_distance": frechet_distance(syn_features, real_features[is_own]) if syn_features.shape[1] else None,
            "mean_msp": msp,
            "msp_histogram": {"synthetic": msp_histogram(syn_logits), "real_in": msp_histogram(real_logits[is_own]),
                              "real_out": msp_histogram(real_logits[~is_own])}}
