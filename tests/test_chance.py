"""chance.py through the rules: a 5-class and a 2-class expert, each confident only on its own inputs, where the
raw softmax-based scores send images to the wrong expert by the class count alone; measured from each expert's
chance level every changed rule routes each input to its own expert, and with one class count the rules give
exactly the raw scores' routes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import chance
from detector_stats import DetectorScorer, logits_view
from detectors import observe, score
from config import ConfigError
from strategies import REGISTRY, SCORES, MergeInputs, StrategyCall, check_class_counts, parse_strategies

PEAK = 3.0  # an input's own feature
SLOPE = 0.4  # the experts' weight: a peak of 1.2 logits, a modest confidence (the raw scores fail there)
N = 20  # inputs per domain
# every rule chance.py changes, by the label that runs it (odin at its published temperature 1000)
CHANGED = ["max_softmax", "energy", "neg_entropy", "gen", "odin", "ash", "scale", "std_higher", "ratio"]


def linear_expert(columns: list[int], width: int = 7) -> nn.Linear:
    """An expert reading only the features ``columns``: one class per column, no bias."""
    layer = nn.Linear(width, len(columns), bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        for j, c in enumerate(columns):
            layer.weight[j, c] = SLOPE
    return layer.eval()


def two_domains(counts: tuple[int, int]) -> tuple[list[nn.Linear], torch.Tensor, torch.Tensor]:
    """Experts of ``counts`` classes on disjoint features, and N inputs of each expert's domain: a peak on one of
    its own features over small positive noise everywhere."""
    g = torch.Generator().manual_seed(0)
    width = sum(counts)
    experts = [linear_expert(list(range(counts[0])), width),
               linear_expert(list(range(counts[0], width)), width)]
    x = 0.3 * torch.rand(2 * N, width, generator=g)
    own = torch.cat([torch.randint(0, counts[0], (N,), generator=g),
                     counts[0] + torch.randint(0, counts[1], (N,), generator=g)])
    x[torch.arange(2 * N), own] += PEAK
    return experts, x, torch.cat([torch.zeros(N), torch.ones(N)]).long()


def mixture_inputs(counts: tuple[int, int]) -> MergeInputs:
    """MergeInputs over the two experts, with the detector scorer merge.py builds (no statistics source)."""
    experts, x, domain = two_domains(counts)
    views = [observe(m, [x]) for m in experts]
    odin_views = [observe(m, [x], keep_inputs=True) for m in experts]
    logits = [v.logits for v in views]

    def no_statistics(source, k):
        raise AssertionError("these rules read no statistics")

    scorer = DetectorScorer(experts, logits, lambda: views, no_statistics, lambda k: odin_views[k],
                            [None, None], torch.device("cpu"))
    maps = [torch.arange(counts[0]), torch.arange(counts[0], sum(counts))]
    return MergeInputs(logits, maps, domain, run_detector=scorer)


def routing(label: str, inputs: MergeInputs) -> float:
    return (parse_strategies([label])[0](inputs).expert == inputs.domain).float().mean().item()


@pytest.mark.parametrize("label", [label for label in CHANGED if label != "ratio"])
def test_each_changed_rule_routes_a_5_and_a_2_class_expert_by_domain(label):
    assert routing(label, mixture_inputs((5, 2))) == 1.0


def test_ratio_measured_from_chance_routes_by_domain_where_the_sums_are_away_from_zero():
    """ratio divides by the logit sum, so near-zero sums (an expert's flat noise) make it arbitrary whatever the
    class counts; with every logit 1 higher its shares are stable, and raw they favour the 2-class expert."""
    inputs = mixture_inputs((5, 2))
    inputs.logits = [o + 1 for o in inputs.logits]
    assert routing("ratio", inputs) == 1.0
    shares = [o / o.sum(dim=1, keepdim=True) for o in inputs.logits]
    raw = torch.stack([s.max(dim=1).values for s in shares], dim=1).argmax(dim=1)
    assert (raw[:N] == 1).all()


def test_raw_softmax_scores_favour_the_2_class_expert_by_its_class_count():
    """What the corrections fix: raw, ODIN and max softmax send every 5-class input to the 2-class expert, and
    energy sends every 2-class input to the 5-class one."""
    inputs = mixture_inputs((5, 2))
    odin = inputs.detector("odin", "", "zscore", {"temperature": 1000.0, "epsilon": 0.0014}).raw
    assert odin.argmax(dim=1).tolist() == [1] * (2 * N)
    msp = torch.stack([SCORES["max_softmax"](o) for o in inputs.logits], dim=1)
    assert (msp[:N].argmax(dim=1) == 1).all()
    energy = torch.stack([SCORES["energy"](o) for o in inputs.logits], dim=1)
    assert (energy[N:].argmax(dim=1) == 0).all()


@pytest.mark.parametrize("label", CHANGED)
def test_with_one_class_count_every_changed_rule_takes_the_raw_scores_routes(label):
    inputs = mixture_inputs((5, 5))
    call = parse_strategies([label])[0]
    name = "std" if label.startswith("std") else label
    if name == "ratio":
        raw = torch.cat([o / o.sum(dim=1, keepdim=True) for o in inputs.logits], dim=1).argmax(dim=1) // 5
    elif name in SCORES or name == "std":
        fn = SCORES.get(name, lambda o: o.std(dim=1))
        raw = torch.stack([fn(o) for o in inputs.logits], dim=1).argmax(dim=1)
    else:
        params = {k: v for k, v in call.params.items() if k not in ("stats", "standardise")}
        raw = inputs.detector(name, "", "zscore", params).raw.argmax(dim=1)
    assert torch.equal(call(inputs).expert, raw)


def test_each_correction_scores_flat_logits_alike_whatever_the_class_count():
    for name, correction in chance.CORRECTIONS.items():
        values = []
        for k in (2, 5, 10):
            flat = torch.zeros(1, k)
            raw = {"max_softmax": SCORES["max_softmax"](flat), "neg_entropy": SCORES["neg_entropy"](flat),
                   "energy": flat.logsumexp(dim=1), "ash": flat.logsumexp(dim=1), "scale": flat.logsumexp(dim=1),
                   "odin": flat.softmax(dim=1).max(dim=1).values, "std": flat.std(dim=1),
                   "ratio": torch.full((1,), 1 / k),
                   "gen": score("gen", logits_view(flat))}[name]
            values.append(float(correction(raw, k, {})))
        assert values == pytest.approx([values[0]] * 3, abs=1e-6), name


def test_a_score_without_a_correction_is_left_as_it_is():
    scores = torch.tensor([1.0, -2.0])
    assert chance.relative_to_chance("max_logit", scores, 5) is scores
    assert chance.differ([5, 2]) and not chance.differ([5, 5])


def test_thirdq_is_the_one_rule_refused_for_unequal_class_counts():
    refused = [name for name in REGISTRY if REGISTRY[name].equal_classes]
    assert refused == ["thirdQ"]
    check_class_counts(StrategyCall("thirdQ", {}), "p", [5, 5])
    with pytest.raises(ConfigError, match="thirdQ_original") as caught:
        check_class_counts(StrategyCall("thirdQ", {}), "p", [5, 2])
    assert "\n" not in str(caught.value)
