"""Scores measured from each expert's own chance level, so that experts with different class counts compare
without any data (docs/design.md section 4, "Class counts").

A softmax-based score's scale depends on the class count K: flat logits (no evidence for any class) give a max
softmax of 1/K, an entropy of log K, a logsumexp log K above the logits, so an argmax over a 2-class and a 5-class
expert favours one of them whatever the input (ODIN at temperature 1000, nearly flat, sent every image to the
2-class expert). Each correction here makes the score of flat logits the same for every K and, for a score
bounded by certainty, the score of a certain output too. Each is increasing in the raw score for a given K, so it
changes no expert's ranking of its own inputs, only how experts compare. Rules apply them only where the experts'
class counts differ (``differ``): with one K a correction shared by all experts would change no route, and
leaving the scores raw there keeps every table of equal-class problems the same number for number.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from torch import Tensor


def share_of_certainty(p: Tensor, k: int, params: dict[str, Any]) -> Tensor:
    """A top probability as the share of the way from chance (1/K: 0) to certainty (1: 1)."""
    return (p - 1 / k) / (1 - 1 / k)


def entropy_share(neg_entropy: Tensor, k: int, params: dict[str, Any]) -> Tensor:
    """Minus the entropy over its chance value log K: -1 for flat logits, 0 for a certain output."""
    return neg_entropy / math.log(k)


def gen_share(gen: Tensor, k: int, params: dict[str, Any]) -> Tensor:
    """GEN's score over minus its value for flat logits, K (1/K)^gamma (1 - 1/K)^gamma: -1 there, 0 when certain."""
    gamma = params.get("gamma", 0.1)
    return gen / (k * (1 / k) ** gamma * (1 - 1 / k) ** gamma)


def mean_energy(energy: Tensor, k: int, params: dict[str, Any]) -> Tensor:
    """logsumexp less log K, the log of the mean of exp(logits): the expert's log density of the input under a
    uniform class prior, so flat logits c score c whatever K (max_logit and naive already do)."""
    return energy - math.log(k)


def odin_ratio(p: Tensor, k: int, params: dict[str, Any]) -> Tensor:
    """log(K p): the top probability at ODIN's temperature T over chance. At T = 1000 the softmax is nearly flat,
    p ~ (1 + (z_max - mean z) / T) / K, so log(K p) ~ (z_max - mean z) / T whatever K, where the share of the way
    to certainty would still divide that by K - 1."""
    return (k * p).log()


def peak_std(std: Tensor, k: int, params: dict[str, Any]) -> Tensor:
    """The logits' std times sqrt(K): one logit L above K - 1 equal others has std L / sqrt(K), so scaled it scores
    L whatever K (flat logits: 0 for any K)."""
    return std * math.sqrt(k)


# score name -> its correction; ``ash`` and ``scale`` are energies of reshaped features, ``ratio`` a logit's
# share of the logit sum (chance 1/K, like a probability)
CORRECTIONS: dict[str, Callable[[Tensor, int, dict[str, Any]], Tensor]] = {
    "max_softmax": share_of_certainty, "neg_entropy": entropy_share, "gen": gen_share, "energy": mean_energy,
    "ash": mean_energy, "scale": mean_energy, "odin": odin_ratio, "std": peak_std, "ratio": share_of_certainty,
}


def differ(counts: list[int]) -> bool:
    """Whether the experts' class counts differ (then scores need the corrections to compare)."""
    return len(set(counts)) > 1


def relative_to_chance(name: str, scores: Tensor, k: int, params: dict[str, Any] | None = None) -> Tensor:
    """Score ``name``'s values for an expert of ``k`` classes, measured from that expert's chance level; a score
    without a correction (max_logit, thirdQ_original: flat logits score alike for any K) is returned as it is."""
    correction = CORRECTIONS.get(name)
    return scores if correction is None else correction(scores, k, params or {})
