"""unlabeled.py and its rules (strategies.py): routers fitted on the unlabeled test inputs read no label and no
training image, the stream variant reads its inputs only in stream order, and each method routes separable toy
experts right."""
from __future__ import annotations

import pytest
import torch

import data
import detector_stats
import merge
import problems
import report
import unlabeled
from common import read_rows
from config import ConfigError
from conftest import Forbidden
from strategies import REGISTRY, MergeInputs, parse_strategies
from test_merge import env, merge_cfg  # noqa: F401 (env is a fixture: tiny trained experts on a fake data root)

RULES = ("self_train", "cluster_assign", "entropy_gate", "pseudo_mahalanobis")
SIZES = (3, 4)


def toy_inputs(n: int = 4200, seed: int = 0, sizes=SIZES, noise: float = 1.0) -> tuple[MergeInputs, torch.Tensor]:
    """Experts whose feature vectors move along a direction of their own on their own inputs, and whose logits
    are sharper there: separable, but naive errs on a share of the inputs. Returns the inputs and the domain."""
    g = torch.Generator().manual_seed(seed)
    domain = torch.randint(0, len(sizes), (n,), generator=g)
    features, logits = [], []
    for k, classes in enumerate(sizes):
        own = (domain == k).float().unsqueeze(1)
        direction = torch.randn(8, generator=g)
        features.append(noise * torch.randn(n, 8, generator=g) + 3 * own * direction)
        logits.append(torch.randn(n, classes, generator=g) * (1 + 2 * own))
    maps, start = [], 0
    for classes in sizes:
        maps.append(torch.arange(start, start + classes))
        start += classes
    select = torch.arange(n) % 2 == 0
    return MergeInputs(logits, maps, features=features, select=select, seed=11), domain


LABELS = [f"{rule}(inputs={fit})" for rule in RULES for fit in ("selection", "stream:100", "stream:500", "stream:2000")]
LABELS += [f"self_train(gate={g},start={s},confident={c},rounds={r})" for g, s, c, r in
           [("logits", "energy", 0.3, 0), ("agnostic_logits", "max_softmax", 1.0, 1),
            ("agnostic_feature", "neg_entropy", 0.5, 2), ("feature", "naive", 0.8, 3)]]
LABELS += [f"cluster_assign(gate={g},score={s},clusters={c})" for g, s, c in
           [("logits", "energy", 5), ("feature", "max_softmax", 50), ("agnostic_feature", "neg_entropy", 2)]]
LABELS += [f"entropy_gate(gate={g},start={s},diversity={d})" for g, s, d in
           [("feature", "naive", 0.0), ("logits", "max_softmax", 2.0), ("agnostic_feature", "neg_entropy", 1.0)]]
LABELS += [f"pseudo_mahalanobis(start={s},confident={c},rounds={r},shrinkage={h})" for s, c, r, h in
           [("energy", 0.3, 0, 0.1), ("max_softmax", 1.0, 2, 9.0), ("neg_entropy", 0.5, 1, 1.0)]]


@pytest.mark.parametrize("label", LABELS)
def test_every_rule_and_parameter_gives_a_valid_routing(label):
    inputs, domain = toy_inputs()
    (call,) = parse_strategies([label])
    decision = call(inputs)
    n = len(domain)
    assert decision.expert.shape == (n,) and decision.expert.dtype == torch.long
    assert decision.expert.min() >= 0 and decision.expert.max() < len(SIZES)
    assert all(int(p) in inputs.label_maps[int(k)].tolist() for p, k in zip(decision.pred[:200], decision.expert[:200]))
    assert decision.scores.shape == (n, len(SIZES))
    assert decision.scores.argmax(dim=1).tolist() == decision.expert.tolist()  # the score says the route
    fit = call.param("inputs")
    assert decision.row["fit_inputs"] == (n // 2 if fit == "selection" else int(fit.partition(":")[2]))
    assert REGISTRY[call.name].code[-2:] == ("unlabeled.py", "gating.py")  # the rows are keyed by this module


@pytest.mark.parametrize("rule", RULES)
def test_each_method_routes_separable_experts_better_than_naive(rule):
    inputs, domain = toy_inputs()
    naive = parse_strategies(["naive"])[0](inputs)
    routed = parse_strategies([rule if rule == "pseudo_mahalanobis" else f"{rule}(gate=feature)"])[0](inputs)
    report = ~inputs.select
    naive_acc = (naive.expert == domain)[report].float().mean()
    acc = (routed.expert == domain)[report].float().mean()
    assert naive_acc < 0.9 and acc > 0.95, (float(naive_acc), float(acc))


class NoLabels(MergeInputs):
    """MergeInputs whose true domain cannot be read: only the oracle may read it."""

    @property
    def domain(self):
        raise Forbidden("a rule fitted on unlabeled inputs read the true domain")

    @domain.setter
    def domain(self, value):
        pass


def forbid_datasets(monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise Forbidden("a rule fitted on unlabeled inputs read a dataset")

    for name in ("load_source", "load_task", "_load_cached"):
        monkeypatch.setattr(data, name, forbidden)


@pytest.mark.parametrize("label", [f"{rule}(inputs={fit})" for rule in RULES for fit in ("selection", "stream:500")])
def test_rules_read_no_label_and_no_dataset(label, monkeypatch):
    inputs, _ = toy_inputs()
    guarded = NoLabels(inputs.logits, inputs.label_maps, features=inputs.features, select=inputs.select, seed=11)
    forbid_datasets(monkeypatch)
    with pytest.raises(Forbidden):  # the guards bite
        guarded.domain
    parse_strategies([label])[0](guarded)


def perturbed(inputs: MergeInputs, rows: torch.Tensor, seed: int = 5) -> MergeInputs:
    """``inputs`` with the logits and features of ``rows`` replaced by noise."""
    g = torch.Generator().manual_seed(seed)

    def replace(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[rows] = 5 * torch.randn(len(rows), t.shape[1], generator=g)
        return t

    return MergeInputs([replace(o) for o in inputs.logits], inputs.label_maps,
                       features=[replace(f) for f in inputs.features], select=inputs.select, seed=inputs.seed)


@pytest.mark.parametrize("label", [f"{rule}(inputs={fit})" for rule in RULES for fit in ("selection", "stream:500")])
def test_the_fit_reads_only_its_inputs_and_later_inputs_are_routed_one_at_a_time(label):
    inputs, _ = toy_inputs(n=2000)
    call = parse_strategies([label])[0]
    fit = unlabeled.fit_rows(call.param("inputs"), inputs.select, inputs.seed)
    before = call(inputs)
    later = torch.ones(len(before.expert), dtype=torch.bool)
    later[fit] = False
    changed = torch.nonzero(later).flatten()[::3]
    after = call(perturbed(inputs, changed))
    untouched = torch.ones_like(later)
    untouched[changed] = False
    # what was fitted does not move, so every input left alone keeps its route
    assert torch.equal(before.expert[untouched], after.expert[untouched])
    assert torch.allclose(before.scores[untouched], after.scores[untouched], atol=1e-5)
    assert not torch.equal(before.expert[changed], after.expert[changed])  # and the perturbation did reach the rule


def test_the_stream_is_a_seeded_shuffle_of_the_selection_half_and_fits_on_its_first_n():
    select = torch.arange(3000) % 3 == 0
    order = unlabeled.stream_order(select, seed=4)
    assert sorted(order.tolist()) == torch.nonzero(select).flatten().tolist()
    assert order.tolist() != sorted(order.tolist())
    assert torch.equal(order, unlabeled.stream_order(select, seed=4))
    assert not torch.equal(order, unlabeled.stream_order(select, seed=5))
    for n in (100, 500):
        assert torch.equal(unlabeled.fit_rows(f"stream:{n}", select, 4), order[:n])
    assert torch.equal(unlabeled.fit_rows("selection", select, 4), torch.nonzero(select).flatten())
    with pytest.raises(ValueError, match="selection half holds 1000"):
        unlabeled.fit_rows("stream:2000", select, 4)


def test_a_stream_rule_sees_the_same_prefix_whatever_n_and_more_inputs_change_the_fit():
    inputs, _ = toy_inputs(n=4200, noise=3.0)
    short = parse_strategies(["self_train(inputs=stream:100)"])[0](inputs)
    long = parse_strategies(["self_train(inputs=stream:2000)"])[0](inputs)
    assert short.row["fit_inputs"] == 100 and long.row["fit_inputs"] == 2000
    assert not torch.allclose(short.scores, long.scores)


@pytest.mark.parametrize("entry, fix", [
    ("self_train(inputs=stream:0)", "stream:N"), ("self_train(inputs=all)", "stream:N"),
    ("self_train(inputs=stream:ten)", "stream:N"), ("self_train(confident=0)", "in \\(0, 1\\]"),
    ("self_train(confident=1.5)", "in \\(0, 1\\]"), ("self_train(rounds=-1)", "0 or more"),
    ("cluster_assign(clusters=1)", "2 or more"), ("entropy_gate(diversity=-0.5)", "0 or more"),
    ("self_train(gate=universal)", "feature"), ("cluster_assign(score=gen)", "naive"),
    ("pseudo_mahalanobis(shrinkage=0)", "greater than 0"), ("pseudo_mahalanobis(gate=feature)", "gate"),
])
def test_bad_parameters_fail_at_config_load_in_one_line(entry, fix):
    with pytest.raises(ConfigError, match=fix) as error:
        parse_strategies([entry])
    assert "\n" not in str(error.value)


def test_kmeans_finds_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.3 * torch.randn(200, 2, generator=g) for c in centres])
    found = unlabeled.kmeans(x, 3, seed=1)
    nearest = torch.cdist(centres, found).min(dim=1).values
    assert (nearest < 0.2).all()
    assert torch.equal(found, unlabeled.kmeans(x, 3, seed=1))
    assert len(unlabeled.kmeans(x[:2], 5, seed=1)) == 2  # fewer inputs than clusters: one cluster each


def test_confident_rows_keep_every_experts_most_confident_share():
    rows = torch.arange(10)
    routes = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    margin = torch.tensor([0.1, 9.0, 8.0, 0.2, 7.0, 0.3, 0.4, 6.0, 0.01, 0.02])  # expert 1's margins all small
    kept = unlabeled.confident_rows(rows, routes, margin, 0.5, experts=2).tolist()
    assert sorted(kept) == [1, 2, 4, 7, 9]


def test_cluster_owner_is_the_expert_with_the_highest_standardised_score():
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1]])
    ownership = torch.tensor([[1.0, -1.0], [0.5, 0.0], [-1.0, 2.0], [0.0, 1.0]])
    routing = unlabeled.cluster_assign(x, ownership, torch.arange(4), clusters=2, seed=0)
    assert routing.expert.tolist() == [0, 0, 1, 1]
    assert routing.pseudo_experts.tolist() == [0, 0, 1, 1]


def test_relative_mahalanobis_scores_rank_an_experts_own_cluster_above_the_rest():
    g = torch.Generator().manual_seed(0)
    own = torch.randn(300, 6, generator=g) * 0.3 + torch.tensor([3.0, 0, 0, 0, 0, 0])
    other = torch.randn(700, 6, generator=g) * 2.0
    features = torch.cat([own, other])
    predictions = (features[:, 1] > 0).long()
    rows = torch.arange(1000)
    scores = unlabeled.relative_mahalanobis_scores(features, predictions, torch.arange(300), rows, shrinkage=1.0)
    assert scores[:300].min() > scores[300:].median()


def test_pseudo_mahalanobis_keeps_an_expert_nothing_was_routed_to_off_every_route():
    inputs, domain = toy_inputs(n=1000)
    start = torch.zeros(1000, 2)
    start[:, 1] = 1.0  # the starting rule sends every input to expert 1
    features = [f.float() for f in inputs.features]
    predictions = [o.argmax(dim=1) for o in inputs.logits]
    routing = unlabeled.pseudo_mahalanobis(features, predictions, start, torch.arange(0, 1000, 2), 1.0, 2, 1.0)
    assert routing.expert.unique().tolist() == [1]
    assert torch.isfinite(routing.scores).all() and (routing.scores[:, 0] < routing.scores[:, 1]).all()


def test_the_diversity_term_keeps_the_entropy_gate_from_collapsing():
    inputs, domain = toy_inputs(n=2000)
    lone = parse_strategies(["entropy_gate(diversity=0.0)"])[0](inputs)
    spread = parse_strategies(["entropy_gate(diversity=1.0)"])[0](inputs)
    share = lambda d: torch.bincount(d.expert, minlength=2).float().min() / len(d.expert)  # noqa: E731
    assert share(spread) > share(lone) + 0.05  # the domains are balanced: the lone entropy drifts to one expert
    assert (spread.expert == domain).float().mean() > (lone.expert == domain).float().mean() + 0.01


def test_merge_rows_carry_routing_auroc_and_pseudo_label_quality_and_read_no_training_image(env, tmp_path,
                                                                                          monkeypatch):
    real_load_task = data.load_task

    def test_sets_only(task, split, *args, **kwargs):
        if split != "test":
            raise Forbidden(f"merge read the {split} split for a rule fitted on unlabeled inputs")
        return real_load_task(task, split, *args, **kwargs)

    monkeypatch.setattr(data, "load_task", test_sets_only)
    for module in (merge, problems, detector_stats):
        monkeypatch.setattr(module, "load_task", test_sets_only)
    cfg = merge_cfg(env, tmp_path, strategies="[naive,self_train(inputs=selection),cluster_assign(clusters=4),"
                                              "entropy_gate]", seeds=[1])
    summary = merge.main(cfg)
    assert set(summary["acc"]) >= {"self_train(inputs=selection,gate=feature,start=naive,confident=0.5,rounds=3)"}
    rows = [r for r in read_rows(summary["outputs"]["jsonl"]) if r.get("rule") in RULES]
    assert len(rows) == 3
    for r in rows:
        assert set(r["detection"]) == {"first5_mnist", "last5_mnist"}
        assert 0 <= r["detection"]["first5_mnist"]["auroc"] <= 1
        # the selection half: half of each domain's test images
        assert r["fit"] == "transductive" and r["fit_inputs"] == sum(n // 2 for n in env["n"])
    trained = {r["rule"]: r for r in rows}
    assert trained["self_train"]["pseudo_labels"]["n"] < trained["self_train"]["fit_inputs"]
    assert trained["cluster_assign"]["pseudo_labels"]["n"] == trained["cluster_assign"]["fit_inputs"]
    assert "pseudo_labels" not in trained["entropy_gate"]


# ---------------------------------------------------------------- the report

def fitted_row(rule, fit, select, report_acc, seed=1, **extra):
    label = f"{rule}(inputs={fit})"
    return {"problem": "p", "seed": seed, "kind": "strategy", "strategy": label, "rule": rule,
            "params": {"inputs": fit}, "acc": (select + report_acc) / 2, "acc_select": select,
            "acc_report": report_acc, "n_report": 10, "routing_acc": 0.5, "fit_inputs": 100, **extra}


def test_unlabeled_rules_have_their_own_families_never_a_data_free_one():
    assert report.family(fitted_row("self_train", "selection", 0.8, 0.8)) == "unlabeled inputs, transductive"
    assert report.family(fitted_row("cluster_assign", "stream:500", 0.8, 0.8)) == "unlabeled inputs, stream 500"
    assert report.family(fitted_row("entropy_gate", "stream:50", 0.8, 0.8)) == "unlabeled inputs, stream 50"
    data_free = {f for name, group in report.ANSWER_GROUPS.items() if "data-free" in name or "training-free" in name
                 for f in group}
    assert not data_free & set(report.UNLABELED_FAMILIES)
    assert set(report.UNLABELED_RULES) == {name for name in RULES}


def test_the_answer_column_picks_the_best_unlabeled_rule_on_the_selection_half():
    rows = [picked_naive(s) for s in (1, 2)]
    rows += [fitted_row("self_train", "selection", 0.90, 0.80, seed=s) for s in (1, 2)]
    rows += [fitted_row("cluster_assign", "stream:500", 0.85, 0.95, seed=s) for s in (1, 2)]
    [answer] = report.answer_rows({"p": rows})
    cell = answer["best rule on unlabeled inputs"]
    assert cell["best"] == "self_train(inputs=selection)" and cell["mean"] == pytest.approx(0.80)
    assert answer["best data-free rule"]["best"] == "naive"  # the unlabeled rules never count as data-free
    assert "`self_train(inputs=selection)`" in report.answer_table([answer])


def picked_naive(seed):
    return {**fitted_row("naive", "", 0.7, 0.7, seed=seed), "strategy": "naive", "rule": "naive", "params": {}}


def test_the_unlabeled_table_shows_auroc_and_pseudo_label_purity_per_expert():
    detection = {"a": {"auroc": 0.9, "fpr95": 0.2}, "b": {"auroc": 0.7, "fpr95": 0.5}}
    pseudo = {"n": 50, "routing_acc": 0.8, "purity": {"a": 0.95, "b": None}, "counts": {"a": 50, "b": 0}}
    rows = [fitted_row("self_train", "selection", 0.9, 0.85, detection=detection, pseudo_labels=pseudo),
            fitted_row("entropy_gate", "stream:100", 0.7, 0.75, detection=detection)]
    text = report.unlabeled_table(rows)
    assert "| unlabeled inputs, transductive | self_train(inputs=selection) | 85.00 ± 0.00 | 90.0 | 70.0 | 80.0 | " \
           "95.0 | n/a |" in text
    assert "| unlabeled inputs, stream 100 | entropy_gate(inputs=stream:100) | 75.00 ± 0.00 | 90.0 | 70.0 | n/a |" \
        in text
    points = report.unlabeled_curve(rows)
    assert [p and p["best"] for p in points] == ["entropy_gate(inputs=stream:100)", None, None,
                                                 "self_train(inputs=selection)"]
    assert "not run" in report.unlabeled_curve_table(points)


def test_an_unlabeled_table_reports_its_rules_and_where_they_fail():
    rows = [{**fitted_row("cluster_assign", "selection", 0.9, 0.85, detection={"a": {"auroc": 0.9, "fpr95": 0.2}},
                          pseudo_labels={"n": 5, "routing_acc": 0.6, "purity": {"a": 0.6}, "counts": {"a": 5}}),
             "acc_per_domain": {"a": 0.8}, "time_s": 0.5}]
    text = report.table_report("unlabeled_p", rows)
    assert text.startswith("### unlabeled_p (p)") and "| cluster_assign(inputs=selection) | 87.50 ± 0.00 |" in text
    assert "| unlabeled inputs, transductive | cluster_assign(inputs=selection) | 85.00 ± 0.00 | 90.0 | 60.0 | 60.0 |" \
        in text
