"""strategies.py: every registered rule's contract, hand-made logits with known answers, TTA combiners, parsing."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

import strategies
from archs.mlp import MLP
from config import LOGIT_RULES, ConfigError, MergeConfig, parse_args
from conftest import Forbidden
from detector_stats import DetectorScores
from strategies import NO_EXPERT, REGISTRY, Decision, FusionInputs, MergeInputs, StrategyCall, parse_strategies

IMG = 4  # the synthetic fusion parents read 1 x 4 x 4 images


# ---------------------------------------------------------------- helpers

def consecutive_maps(sizes) -> list[torch.Tensor]:
    """Expert k's local class j -> the next free global id (as problems.build_problem assigns them)."""
    maps, start = [], 0
    for k in sizes:
        maps.append(torch.arange(start, start + k))
        start += k
    return maps


def random_inputs(sizes=(3, 4), n=50, seed=0, num_passes=3, device="cpu", shared=False) -> MergeInputs:
    """Random logits, a random domain, and ``run_passes`` returning the logits plus perturbed copies.

    ``shared=True`` makes a problem of fusion parents instead (all ``sizes`` equal): tiny random MLPs
    over one label space, whose logits on random test images are the experts' logits, with the
    ``FusionInputs`` merge.py would build (random class counts decide the domain, as they do there)."""
    if shared:
        return shared_inputs(len(sizes), sizes[0], n, seed, num_passes, device)
    g = torch.Generator().manual_seed(seed)
    logits = [(3 * torch.randn(n, k, generator=g)).to(device) for k in sizes]
    domain = torch.randint(0, len(sizes), (n,), generator=g).to(device)
    return with_runners(logits, consecutive_maps(sizes), domain, num_passes, g, device)


def with_runners(logits, label_maps, domain, num_passes, g, device, fusion=None) -> MergeInputs:
    """MergeInputs whose ``run_passes`` gives the logits plus perturbed copies, ``run_gates`` random probabilities."""
    n, sizes = len(logits[0]), [o.shape[1] for o in logits]
    noise = [[torch.randn(n, k, generator=g).to(device) for k in sizes] for _ in range(num_passes - 1)]
    gate_probs = torch.rand(n, len(sizes), generator=g).to(device)

    def run_passes(setting):
        return [logits] + [[o + e for o, e in zip(logits, eps)] for eps in noise]

    def run_gates(gate, regime, gates_from, synthesizer):
        return gate_probs

    # expert k's logits on expert j's synthetic images: its own ones shifted up, as inverted images are
    on_sets = [[torch.randn(7, k, generator=g).to(device) + 2.0 * (j == i) for j in range(len(sizes))]
               for i, k in enumerate(sizes)]

    def run_synthetic(synthesizer):
        return on_sets

    # every detector its own scores, and its parameters and source shift them: a rule that asked the scorer for
    # another detector's scores, or dropped its parameters, would route differently (test_detector_rules_route_...)
    detector_seed = int(torch.randint(0, 2**31, (1,), generator=g))
    # what the rules fitted on unlabeled inputs read: feature vectors, and every other input as the selection half
    features = [torch.randn(n, 5, generator=g).to(device) for _ in sizes]
    select = torch.arange(n) % 2 == 0

    def run_detector(name, source, standardisation, params):  # the scorer's interface (detector_stats.py)
        scores = fake_detector_scores(detector_seed, n, len(sizes), name, source, standardisation, params)
        return DetectorScores(scores.to(device), scores.to(device))

    return MergeInputs(logits, label_maps, domain, run_passes=run_passes, run_gates=run_gates,
                       run_synthetic=run_synthetic, run_detector=run_detector, fusion=fusion, features=features,
                       select=select, seed=7)


def fake_detector_scores(seed: int, n: int, experts: int, name: str, source, standardisation: str,
                         params: dict) -> torch.Tensor:
    """[n, experts] scores drawn from a generator seeded by everything a detector rule asks the scorer for."""
    key = json.dumps([seed, name, str(source), standardisation, sorted(params.items())], default=str)
    g = torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
    return torch.randn(n, experts, generator=g)


def shared_inputs(parents: int, classes: int, n: int, seed: int, num_passes: int, device: str) -> MergeInputs:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    models = [MLP(1, classes, [6], img_size=IMG, crop=0).to(device).eval() for _ in range(parents)]
    test_images = torch.randn(n, 1, IMG, IMG, generator=g).to(device)
    samples = torch.randn(30, 1, IMG, IMG, generator=g).to(device)
    sample_labels = torch.randint(0, classes, (30,), generator=g).to(device)
    labels = torch.randint(0, classes, (n,), generator=g)
    class_counts = torch.randint(0, 20, (parents, classes), generator=g)
    with torch.no_grad():
        logits = [m(test_images) for m in models]

    @torch.no_grad()
    def predict(network):
        return network(test_images).argmax(1).cpu()

    fusion = FusionInputs(models, samples, class_counts, predict, lambda: (samples, sample_labels), seed=seed)
    return with_runners(logits, [torch.arange(classes) for _ in models], class_counts.argmax(0)[labels].to(device),
                        num_passes, g, device, fusion)


def run_if_it_fits(name: str, inputs: MergeInputs) -> Decision | None:
    """Rule ``name`` with its defaults on ``inputs``; a fusion rule the inputs do not fit (no shared labels,
    another number of parents than it fuses) must refuse with an error naming the need, giving None."""
    needs = REGISTRY[name].fusion
    if needs is not None and inputs.fusion is None:
        with pytest.raises(RuntimeError, match="shared_labels"):
            StrategyCall(name, {})(inputs)
        return None
    if needs is not None and needs.parents not in (None, len(inputs.logits)):
        with pytest.raises(ValueError, match=f"exactly {needs.parents}"):
            StrategyCall(name, {})(inputs)
        return None
    return StrategyCall(name, {})(inputs)


def split_rows(rows, sizes) -> list[torch.Tensor]:
    """Concatenated logit rows [N, sum K] -> one [N, K_k] tensor per expert."""
    return list(torch.tensor(rows, dtype=torch.float32).split(list(sizes), dim=1))


def hand_inputs(e0_rows, e1_rows, domain=None) -> MergeInputs:
    logits = [torch.tensor(e0_rows, dtype=torch.float32), torch.tensor(e1_rows, dtype=torch.float32)]
    maps = consecutive_maps([o.shape[1] for o in logits])
    return MergeInputs(logits, maps, None if domain is None else torch.tensor(domain))


def run(name: str, inputs: MergeInputs, **params) -> Decision:
    return StrategyCall(name, params)(inputs)


def assert_decision(decision: Decision, pred, expert):
    assert decision.pred.tolist() == pred
    assert decision.expert.tolist() == expert


# ---------------------------------------------------------------- every registered rule

def test_registry_holds_the_default_rules():
    assert set(LOGIT_RULES) <= set(REGISTRY)
    assert {"tta_mean", "tta_voting"} <= set(REGISTRY)
    for strategy in REGISTRY.values():
        assert strategy.summary, f"{strategy.name} needs a docstring (its first line is the summary)"


# routing problems (disjoint label spaces) and problems of fusion parents (one shared label space)
PROBLEMS = {"2experts": ((3, 4), False), "3experts": ((3, 4, 2), False),
            "2parents": ((5, 5), True), "3parents": ((5, 5, 5), True)}


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_rule_returns_a_valid_decision(name, problem):
    n, (sizes, shared) = 50, PROBLEMS[problem]
    inputs = random_inputs(sizes, n=n, shared=shared)
    decision = run_if_it_fits(name, inputs)
    if decision is None:
        return
    assert isinstance(decision, Decision)
    num_classes = int(torch.cat(inputs.label_maps).max()) + 1
    for tensor in (decision.pred, decision.expert):
        assert tensor.shape == (n,)
        assert tensor.dtype == torch.long
    assert decision.pred.min() >= 0 and decision.pred.max() < num_classes
    if REGISTRY[name].fusion is not None:  # one network answers every sample: no expert was chosen
        assert (decision.expert == NO_EXPERT).all()
    else:
        assert decision.expert.min() >= 0 and decision.expert.max() < len(sizes)
        # every prediction is a class of the expert the rule says it trusted
        assert all(int(p) in inputs.label_maps[int(k)].tolist() for p, k in zip(decision.pred, decision.expert))
    if decision.fallback is not None:
        assert decision.fallback.shape == (n,) and decision.fallback.dtype == torch.bool


@pytest.mark.parametrize("problem", ["2experts", "2parents"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_rule_leaves_its_inputs_alone(name, problem):
    sizes, shared = PROBLEMS[problem]
    inputs = random_inputs(sizes, n=20, seed=3, shared=shared)
    before = [o.clone() for o in inputs.logits]
    parents = [] if inputs.fusion is None else [copy.deepcopy(p.state_dict()) for p in inputs.fusion.parents]
    run_if_it_fits(name, inputs)
    assert all(torch.equal(a, b) for a, b in zip(before, inputs.logits))
    for state, parent in zip(parents, [] if inputs.fusion is None else inputs.fusion.parents):
        assert all(torch.equal(state[k], v) for k, v in parent.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("problem", ["3experts", "3parents"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_rule_runs_on_cuda_with_the_cpu_answer(name, problem):
    sizes, shared = PROBLEMS[problem]
    cpu = run_if_it_fits(name, random_inputs(sizes, seed=5, shared=shared))
    gpu = run_if_it_fits(name, random_inputs(sizes, seed=5, device="cuda", shared=shared))
    if cpu is None:
        return
    assert torch.equal(cpu.pred, gpu.pred.cpu())
    assert torch.equal(cpu.expert, gpu.expert.cpu())


# ---------------------------------------------------------------- logit statistics with known answers

def test_naive_picks_the_global_max():
    inputs = hand_inputs([[5, 1, 0], [0, 2, 1], [9, 0, 0]],
                         [[1, 7, 0, 0], [0, 0, 0, 1], [0, 0, 0, 8]])
    # row 0: expert 1's 7 beats expert 0's 5; row 1: expert 0's 2; row 2: expert 0's 9 beats 8
    assert_decision(run("naive", inputs), [4, 1, 0], [1, 0, 0])


def test_naive_respects_arbitrary_label_maps():
    inputs = hand_inputs([[5, 1, 0], [0, 2, 1]], [[1, 7, 0, 0], [0, 0, 0, 1]])
    inputs.label_maps = [torch.tensor([6, 2, 4]), torch.tensor([0, 5, 1, 3])]
    assert_decision(run("naive", inputs), [5, 2], [1, 0])
    assert_decision(run("max_logit", inputs), [5, 2], [1, 0])


def test_std_lower_and_higher():
    inputs = hand_inputs([[0, 1, 2], [0, 0, 10]],
                         [[0, 0, 10, 0], [1, 2, 3, 4]])
    # row 0: std 1 (expert 0) vs 5 (expert 1); row 1: std 5.77 (expert 0) vs 1.29 (expert 1)
    assert_decision(run("std_lower", inputs), [2, 6], [0, 1])
    assert_decision(run("std_higher", inputs), [5, 2], [1, 0])


def test_third_quartile_differs_from_the_original_max_minus_min():
    inputs = hand_inputs(
        [[10, 9, 2, 1, -100],  # max - Q3 = 10 - 9 = 1 (max - median would be 8), max - min = 110
         [0, 0, 8, 0, 0],      # both gaps 8
         [1, 1, 1, 1, 1]],     # both gaps 0
        [[5, 0, 0, 0, 0],      # both gaps 5
         [1, 0, 0, 0, 0],      # both gaps 1
         [0, 0, 0, 3, 0]])     # both gaps 3
    assert_decision(run("thirdQ", inputs), [5, 2, 8], [1, 0, 1])
    assert_decision(run("thirdQ_original", inputs), [0, 2, 8], [0, 0, 1])


@pytest.mark.parametrize("sizes", [(3, 4), (5, 6, 4)])
def test_third_quartile_against_numpy(sizes):
    import numpy as np

    inputs = random_inputs(sizes, n=200, seed=4)
    gaps = np.stack([o.numpy().max(1) - np.percentile(o.numpy(), 75, axis=1) for o in inputs.logits], axis=1)
    chosen = gaps.argmax(1)
    decision = run("thirdQ", inputs)
    assert decision.expert.tolist() == chosen.tolist()
    preds = [int(inputs.label_maps[k][inputs.logits[k][i].argmax()]) for i, k in enumerate(chosen)]
    assert decision.pred.tolist() == preds


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sizes", [(3, 4), (5, 2, 4)])
def test_max_logit_equals_naive(sizes, seed):
    inputs = random_inputs(sizes, n=200, seed=seed)
    a, b = run("naive", inputs), run("max_logit", inputs)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.expert, b.expert)


def test_ood_scores_pick_the_confident_expert():
    inputs = hand_inputs([[10, 0, 0], [2, 2, 2.1]],
                         [[1, 1, 1.1, 1], [0, 0, 9, 0]])
    for name in ("max_softmax", "energy", "neg_entropy"):
        assert_decision(run(name, inputs), [0, 5], [0, 1])


def test_max_softmax_and_entropy_read_confidence_not_the_size_of_the_logits():
    # expert 0 is sure (3 vs -5, -5); expert 1 has the larger logits but is undecided
    inputs = hand_inputs([[3, -5, -5]], [[4, 4.1, 4, 4]])
    assert_decision(run("naive", inputs), [4], [1])
    assert_decision(run("max_softmax", inputs), [0], [0])
    assert_decision(run("neg_entropy", inputs), [0], [0])


def test_energy_is_the_logsumexp():
    # logsumexp: expert 0 ~ 3.0007, expert 1 = 2.6 + log(1 + 3 e^-0.1) ~ 3.91; naive prefers expert 0's 3
    inputs = hand_inputs([[3, -5, -5]], [[2.6, 2.5, 2.5, 2.5]])
    assert_decision(run("energy", inputs), [3], [1])
    assert_decision(run("naive", inputs), [0], [0])


def integer_logits(sizes, n, seed):
    """Integer-valued logits whose row sums (per expert and over the concatenation) are never 0, so the
    ratios are computed exactly and a direct formula must agree to the last bit. Each expert's row
    sum is made 1 mod 4, so the total is len(sizes) mod 4 (nonzero for 2 or 3 experts)."""
    assert len(sizes) % 4
    g = torch.Generator().manual_seed(seed)
    logits = []
    for k in sizes:
        o = torch.randint(-9, 10, (n, k), generator=g)
        o[:, -1] += (1 - o.sum(1)) % 4
        logits.append(o.double())
    return logits


def direct_argmax(rows_per_expert, label_maps):
    """Per sample, a plain Python scan for the largest value over all experts' columns (first wins)."""
    preds, experts = [], []
    for i in range(len(rows_per_expert[0])):
        best = None
        for k, (rows, m) in enumerate(zip(rows_per_expert, label_maps)):
            for j, value in enumerate(rows[i].tolist()):
                if best is None or value > best[0]:
                    best = (value, int(m[j]), k)
        preds.append(best[1])
        experts.append(best[2])
    return preds, experts


@pytest.mark.parametrize("sizes", [(3, 4), (2, 5, 3)])
def test_ratio_against_a_direct_formula(sizes):
    logits = integer_logits(sizes, 300, seed=len(sizes))
    inputs = MergeInputs(logits, consecutive_maps(sizes))
    # the experts' class counts differ, so each share is measured from its chance level 1/K (chance.py)
    shares = [(o / o.sum(1, keepdim=True) - 1 / o.shape[1]) / (1 - 1 / o.shape[1]) for o in logits]
    expected = direct_argmax(shares, inputs.label_maps)
    decision = run("ratio", inputs)
    assert (decision.pred.tolist(), decision.expert.tolist()) == expected


@pytest.mark.parametrize("sizes", [(3, 4), (2, 5, 3)])
def test_overall_ratio_against_a_direct_formula(sizes):
    logits = integer_logits(sizes, 300, seed=10 + len(sizes))
    inputs = MergeInputs(logits, consecutive_maps(sizes))
    total = torch.cat(logits, 1).sum(1, keepdim=True)
    expected = direct_argmax([o / total for o in logits], inputs.label_maps)
    decision = run("overall_ratio", inputs)
    assert (decision.pred.tolist(), decision.expert.tolist()) == expected
    assert (total < 0).any() and (total > 0).any()  # both regimes were exercised


def test_ratio_and_overall_ratio_known_answers():
    # ratio: 2/4 = 0.5 for expert 0 beats 3/12 = 0.25 for expert 1, although naive takes expert 1's 3
    inputs = hand_inputs([[2, 1, 1]], [[3, 3.5, 3, 2.5]])
    assert_decision(run("naive", inputs), [4], [1])
    assert_decision(run("ratio", inputs), [0], [0])
    # overall_ratio: a negative total sum turns the argmax into the argmin of the logits
    inputs = hand_inputs([[-1, -2, -3]], [[-4, -5, -6, -7]])
    assert_decision(run("naive", inputs), [0], [0])
    assert_decision(run("overall_ratio", inputs), [6], [1])


def test_oracle_trusts_the_domain_expert_and_scores_like_the_experts():
    sizes = (3, 4, 2)
    inputs = random_inputs(sizes, n=300, seed=7)
    maps = inputs.label_maps
    g = torch.Generator().manual_seed(8)
    # true labels: a random class of each sample's own expert
    labels = torch.stack([maps[int(d)][torch.randint(0, sizes[int(d)], (1,), generator=g)][0]
                          for d in inputs.domain])
    decision = run("oracle", inputs)
    assert torch.equal(decision.expert, inputs.domain)
    for k, (o, m) in enumerate(zip(inputs.logits, maps)):
        own = inputs.domain == k
        assert torch.equal(decision.pred[own], m[o[own].argmax(1)])
    expert_acc = [(maps[k][o[inputs.domain == k].argmax(1)] == labels[inputs.domain == k]).float().mean().item()
                  for k, o in enumerate(inputs.logits)]
    counts = [int((inputs.domain == k).sum()) for k in range(len(sizes))]
    oracle_acc = (decision.pred == labels).double().mean().item()
    assert oracle_acc == pytest.approx(sum(n * a for n, a in zip(counts, expert_acc)) / sum(counts), abs=1e-6)
    assert 0.2 < oracle_acc < 0.8  # neither trivial bound


def test_oracle_needs_the_domain():
    inputs = random_inputs((3, 4))
    inputs.domain = None
    with pytest.raises(RuntimeError, match="domain"):
        run("oracle", inputs)


# ---------------------------------------------------------------- multi-pass combiners

SIZES = (3, 4)  # global classes 0-2 belong to expert 0, 3-6 to expert 1


def voting_inputs(votes_per_pass: list[list[int]]) -> tuple[MergeInputs, list[str]]:
    """Passes whose naive prediction for sample i in pass p is ``votes_per_pass[p][i]``."""
    passes = []
    for votes in votes_per_pass:
        rows = torch.zeros(len(votes), sum(SIZES))
        rows[torch.arange(len(votes)), torch.tensor(votes)] = 5.0
        passes.append(list(rows.split(list(SIZES), dim=1)))
    asked = []

    def run_passes(setting):
        asked.append(setting)
        return passes

    return MergeInputs(passes[0], consecutive_maps(SIZES), run_passes=run_passes), asked


def test_tta_voting_majority_wins():
    # sample 0: 1 vote for class 0 (the original pass), 2 for class 5; sample 1: 3 votes for class 2
    inputs, _ = voting_inputs([[0, 2], [5, 2], [5, 2]])
    assert_decision(run("tta_voting", inputs, setting="flips"), [5, 2], [1, 0])


def test_tta_voting_breaks_ties_towards_the_class_voted_first():
    inputs, _ = voting_inputs([
        [0, 5, 6, 1],
        [5, 0, 0, 2],
        [5, 0, 2, 6],
        [0, 5, 1, 1],
        [6, 6, 6, 2],
    ])
    # sample 0: 0,5,5,0,6 -> 0 and 5 tie at 2, 0 voted first; sample 1: 5,0,0,5,6 -> 5 first
    # sample 2: 6,0,2,1,6 -> 6 has 2; sample 3: 1,2,6,1,2 -> 1 and 2 tie, 1 voted first
    decision = run("tta_voting", inputs, setting="flips")
    assert_decision(decision, [0, 5, 6, 1], [0, 1, 1, 0])
    # deterministic: the same answer every time
    again = run("tta_voting", inputs, setting="flips")
    assert torch.equal(decision.pred, again.pred) and torch.equal(decision.expert, again.expert)


def test_tta_voting_tie_not_decided_by_class_id():
    # 4 and 1 tie; 4 was voted first although 1 is the smaller id and expert 0 the smaller expert
    inputs, _ = voting_inputs([[4], [1], [1], [4]])
    assert_decision(run("tta_voting", inputs, setting="flips"), [4], [1])


@pytest.mark.parametrize("sizes", [(3, 4), (2, 5, 3)])
def test_tta_mean_is_the_argmax_of_the_mean_logits(sizes):
    inputs = random_inputs(sizes, n=200, seed=11, num_passes=4)
    passes = inputs.passes("flips")
    mean = torch.stack([torch.cat(p, 1) for p in passes]).mean(0)
    expected = direct_argmax(list(mean.split(list(sizes), dim=1)), inputs.label_maps)
    decision = run("tta_mean", inputs, setting="flips")
    assert (decision.pred.tolist(), decision.expert.tolist()) == expected
    # the augmented passes matter: the mean differs from the first pass alone somewhere
    assert not torch.equal(decision.pred, run("naive", inputs).pred)


def test_tta_mean_and_voting_can_disagree():
    # class 0 wins two passes narrowly; class 4 wins one pass by a mile
    rows = [[[3, 0, 0, 0, 2.9, 0, 0]], [[3, 0, 0, 0, 2.9, 0, 0]], [[0, 0, 0, 0, 20, 0, 0]]]
    passes = [split_rows(r, SIZES) for r in rows]
    inputs = MergeInputs(passes[0], consecutive_maps(SIZES), run_passes=lambda s: passes)
    assert_decision(run("tta_voting", inputs, setting="flips"), [0], [0])
    assert_decision(run("tta_mean", inputs, setting="flips"), [4], [1])


def test_passes_are_run_once_per_setting_with_the_setting_asked_for():
    inputs, asked = voting_inputs([[0, 2], [5, 2]])
    run("tta_voting", inputs, setting="flips")
    run("tta_mean", inputs, setting="flips")
    run("tta_mean", inputs)  # the default setting
    assert asked == ["flips", "gaussian_1"]


def test_multi_pass_rules_need_run_passes():
    inputs = MergeInputs([torch.zeros(2, 3), torch.zeros(2, 4)], consecutive_maps(SIZES))
    for name in ("tta_mean", "tta_voting"):
        with pytest.raises(RuntimeError, match="augmented"):
            run(name, inputs)


# ---------------------------------------------------------------- parse_strategies

def test_parse_names_and_mappings():
    calls = parse_strategies(["naive", {"name": "tta_mean", "setting": "flips"}, {"name": "tta_voting"}])
    assert calls == [StrategyCall("naive", {}), StrategyCall("tta_mean", {"setting": "flips"}),
                     StrategyCall("tta_voting", {"setting": "gaussian_1"})]  # defaults filled in
    assert [c.label for c in calls] == ["naive", "tta_mean(setting=flips)", "tta_voting(setting=gaussian_1)"]


def test_parse_from_the_command_line():
    cfg = parse_args(MergeConfig, ["strategies=[naive,{name: tta_voting, setting: sharpen_sweep}]"])
    calls = parse_strategies(cfg.strategies)
    assert [c.label for c in calls] == ["naive", "tta_voting(setting=sharpen_sweep)"]


def test_default_strategies_parse():
    assert [c.name for c in parse_strategies(MergeConfig().strategies)] == LOGIT_RULES


def test_unknown_name_lists_choices_and_suggests():
    with pytest.raises(ConfigError) as err:
        parse_strategies(["naive", "enrgy"])
    message = str(err.value)
    assert "'enrgy'" in message and "did you mean 'energy'" in message
    assert all(name in message for name in REGISTRY)


def test_unknown_parameter_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        parse_strategies([{"name": "tta_mean", "settin": "flips"}])
    assert "'settin'" in str(err.value) and "setting" in str(err.value).replace("'settin'", "")
    with pytest.raises(ConfigError, match="parameters: none"):
        parse_strategies([{"name": "naive", "setting": "flips"}])


def test_bad_setting_lists_the_settings():
    from augments import TTA_SETTINGS

    with pytest.raises(ConfigError) as err:
        parse_strategies([{"name": "tta_voting", "setting": "flip"}])
    message = str(err.value)
    assert "'flip'" in message
    assert all(setting in message for setting in TTA_SETTINGS)


@pytest.mark.parametrize("entries", [
    ["naive", "energy", "naive"],
    ["tta_mean", {"name": "tta_mean", "setting": "gaussian_1"}],  # the default spelled out
    [{"name": "tta_mean", "setting": "flips"}, "naive", {"name": "tta_mean", "setting": "flips"}],
])
def test_duplicates_are_refused(entries):
    with pytest.raises(ConfigError, match="twice"):
        parse_strategies(entries)


def test_same_rule_with_other_parameters_is_not_a_duplicate():
    calls = parse_strategies([{"name": "tta_mean", "setting": "flips"}, {"name": "tta_mean", "setting": "poisson_1"}])
    assert len(calls) == 2


@pytest.mark.parametrize("entry", [3, ["naive"], {"setting": "flips"}, None])
def test_malformed_entries(entry):
    with pytest.raises(ConfigError, match="name"):
        parse_strategies([entry])


def test_param_falls_back_to_the_default():
    assert StrategyCall("tta_mean", {}).param("setting") == "gaussian_1"
    assert StrategyCall("tta_mean", {"setting": "flips"}).param("setting") == "flips"
    assert StrategyCall("naive", {}).param("setting") is None


def test_registered_parameters_are_typed():
    tp, default = REGISTRY["tta_voting"].params["setting"]
    assert default == "gaussian_1"
    from augments import TTA_SETTINGS
    import typing

    assert set(typing.get_args(tp)) == set(TTA_SETTINGS)
    assert REGISTRY["naive"].params == {}


def test_register_adds_a_rule_that_parse_and_call_accept(monkeypatch):
    monkeypatch.setattr(strategies, "REGISTRY", dict(REGISTRY))

    @strategies.register("first_expert_scaled")
    def first_expert_scaled(inputs: MergeInputs, *, scale: float = 1.0, k: int = 0) -> Decision:
        """Trust expert k (a test rule)."""
        return strategies.choose(inputs, torch.full((len(inputs.logits[0]),), k, dtype=torch.long))

    (call,) = parse_strategies([{"name": "first_expert_scaled", "scale": "2", "k": 1}])
    assert call.params == {"scale": 2.0, "k": 1} and isinstance(call.params["scale"], float)
    assert call.label == "first_expert_scaled(scale=2.0,k=1)"
    assert call.param("scale") == 2.0 and StrategyCall("first_expert_scaled", {}).param("k") == 0
    with pytest.raises(ConfigError, match="integer"):
        parse_strategies([{"name": "first_expert_scaled", "k": 1.5}])
    decision = call(random_inputs((3, 4), n=5))
    assert decision.expert.tolist() == [1] * 5
    assert all(3 <= p <= 6 for p in decision.pred.tolist())


# ---------------------------------------------------------------- gating rules on hand-made gate outputs

def gated_inputs(gate_rows) -> MergeInputs:
    """Two experts (2 and 3 classes) with fixed logits and the given gate probabilities [N, 2]."""
    e0 = [[5.0, 0.0]] * len(gate_rows)  # naive always picks expert 0's class 0 (global 0)
    e1 = [[0.0, 1.0, 0.0]] * len(gate_rows)  # expert 1 would say its class 1 (global 3)
    inputs = hand_inputs(e0, e1)
    probs = torch.tensor(gate_rows)
    inputs.run_gates = lambda gate, regime, gates_from, synthesizer: probs
    return inputs


def test_gate_hard_routes_when_exactly_one_gate_says_yes():
    inputs = gated_inputs([[0.2, 0.9], [0.9, 0.2], [0.9, 0.8], [0.1, 0.3]])
    decision = run("gate_hard", inputs)
    assert_decision(decision, [3, 0, 0, 0], [1, 0, 0, 0])  # rows 3 and 4 fall back to naive
    assert decision.fallback.tolist() == [False, False, True, True]


def test_gate_confident_picks_the_most_confident_gate():
    inputs = gated_inputs([[0.2, 0.9], [0.9, 0.2], [0.9, 0.95], [0.1, 0.3]])
    assert_decision(run("gate_confident", inputs), [3, 0, 3, 3], [1, 0, 1, 1])


def test_gate_soft_weights_each_softmax_by_its_gate():
    inputs = gated_inputs([[0.5, 0.5], [0.01, 0.99]])
    # row 1: 0.5*softmax([5,0])[0] = 0.497 beats 0.5*softmax([0,1,0])[1] = 0.288; row 2: expert 1 wins
    assert_decision(run("gate_soft", inputs), [0, 3], [0, 1])


def test_gates_are_computed_once_per_gate_and_regime():
    calls = []
    inputs = gated_inputs([[0.2, 0.9]])
    probs = inputs.run_gates(None, None, None, None)
    inputs.run_gates = lambda *key: calls.append(key) or probs
    for name in ("gate_hard", "gate_confident", "gate_soft"):
        run(name, inputs, gate="logits", regime="real")
    run("gate_hard", inputs, gate="logits", regime="synthetic")
    run("gate_soft", inputs, gate="logits", regime="synthetic", synthesizer="dafl")  # dafl is the default
    run("gate_hard", inputs, gate="logits", regime="synthetic", synthesizer="inversion")
    assert calls == [("logits", "real", "", "dafl"), ("logits", "synthetic", "", "dafl"),
                     ("logits", "synthetic", "", "inversion")]


def test_synthesizer_parameters_are_checked_and_dafl_is_the_default():
    (default,) = parse_strategies([{"name": "gate_hard", "regime": "synthetic", "synthesizer": "dafl"}])
    assert default.label == "gate_hard(gate=feature,regime=synthetic)" and default.param("synthesizer") == ""
    (mixture,) = parse_strategies(["gate_soft(gate=logits,regime=noise,synthesizer=dafl+inversion)"])
    assert mixture.param("synthesizer") == "dafl+inversion"
    with pytest.raises(ConfigError, match="unknown 'gan'"):
        parse_strategies([{"name": "calibrated", "synthesizer": "gan"}])
    with pytest.raises(ConfigError, match="regime real read real images"):
        parse_strategies([{"name": "gate_hard", "regime": "real", "synthesizer": "inversion"}])


def test_strategy_grids_expand_in_key_order():
    calls = parse_strategies([{"name": ["gate_hard", "gate_soft"], "gate": ["feature", "logits"], "regime": "real"},
                              "naive"])
    assert [c.label for c in calls] == ["gate_hard(gate=feature,regime=real)", "gate_hard(gate=logits,regime=real)",
                                        "gate_soft(gate=feature,regime=real)", "gate_soft(gate=logits,regime=real)",
                                        "naive"]


def test_calibration_standardises_each_experts_score_by_its_synthetic_images():
    """Expert 1's logits run on a larger scale than expert 0's: naive always trusts it; calibrated by each
    expert's own synthetic images, expert 0 wins where it stands out from its own typical score."""
    logits = [torch.tensor([[3.0, 0.0], [1.0, 0.0]]), torch.tensor([[5.0, 0.0], [5.0, 0.0]])]
    own = [[torch.tensor([[2.0, 0.0], [4.0, 0.0]]), torch.zeros(2, 2)],  # expert 0's max logit: mean 3, std 1.41
           [torch.zeros(2, 2), torch.tensor([[9.0, 0.0], [11.0, 0.0]])]]  # expert 1's: mean 10
    inputs = MergeInputs(logits, consecutive_maps([2, 2]), run_synthetic=lambda name: own)
    assert naive_experts(inputs) == [1, 1]
    decision = run("calibrated", inputs, score="max_logit", reference="own")
    assert decision.expert.tolist() == [0, 0]  # z = 0 and -1.4 for expert 0, -3.5 for expert 1


def naive_experts(inputs) -> list[int]:
    return run("naive", inputs).expert.tolist()


def test_gate_parameters_are_checked():
    with pytest.raises(ConfigError, match="synthetic"):
        parse_strategies([{"name": "gate_hard", "regime": "fake"}])
    with pytest.raises(ConfigError, match="universal"):
        parse_strategies([{"name": "gate_soft", "gate": "features"}])


# ---------------------------------------------------------------- what a rule may read (issue 27)

def unreadable_domain(inputs: MergeInputs) -> MergeInputs:
    """``inputs`` whose ``domain`` raises Forbidden on any read (a data descriptor wins over the instance's field)."""
    def forbidden(self):
        raise Forbidden("a rule read the true domain")
    inputs.__class__ = type("NoDomain", (MergeInputs,), {"domain": property(forbidden)})
    return inputs


@pytest.mark.parametrize("problem", ["2experts", "2parents"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_only_the_oracle_reads_the_domain(name, problem):
    sizes, shared = PROBLEMS[problem]
    inputs = unreadable_domain(random_inputs(sizes, n=20, seed=5, shared=shared))
    if name == "oracle":
        with pytest.raises(Forbidden):
            run("oracle", inputs)
    else:
        run_if_it_fits(name, inputs)


def test_the_detector_gates_label_names_its_statistics_source():
    calls = strategies.with_gate_statistics(
        parse_strategies(["gate_hard(gate=detectors,regime=synthetic)", "gate_soft(gate=feature,regime=synthetic)",
                          "gate_confident(gate=detectors,regime=noise,stats=real:200)"]), "real:200")
    assert [c.label for c in calls] == ["gate_hard(gate=detectors,regime=synthetic,stats=real:200)",
                                        "gate_soft(gate=feature,regime=synthetic)",
                                        "gate_confident(gate=detectors,regime=noise,stats=real:200)"]
    with pytest.raises(ConfigError, match="pass gate.detector_stats=real:200"):
        strategies.with_gate_statistics(parse_strategies(["gate_hard(gate=detectors,stats=real:200)"]),
                                        "synthetic:dafl")
    with pytest.raises(ConfigError, match="gate=detectors only"):
        parse_strategies(["gate_hard(gate=feature,stats=synthetic:dafl)"])


@pytest.mark.parametrize("name", sorted(n for n, strategy in REGISTRY.items() if strategy.detector))
def test_detector_rules_route_by_their_own_detectors_scores(name):
    """Each detector rule trusts, per sample, the expert its own detector (with its parameters and source) scores
    highest; with statistics every detector is read through the scorer, never the raw logits."""
    inputs = random_inputs((3, 4, 2), n=60, seed=11)
    for params in ({"stats": "synthetic:dafl"}, {"stats": "real:200", "standardise": "rank"}):
        call = parse_strategies([{"name": name, **params}])[0]
        decision = call(inputs)
        given = {k: v for k, v in call.params.items() if k not in ("stats", "standardise")}
        expected = inputs.detector(name, call.param("stats"), call.param("standardise") or "zscore", given)
        assert torch.equal(decision.expert, expected.comparable.argmax(dim=1)), call.label
