"""Detectors as merge rules: statistics sources (sources.py), stored statistics (detector_stats.py), comparable
scores, detection metrics, and the data-free guarantee, on tiny experts of a fake data root (test_pan's)."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

import data
import detector_stats
import merge
import problems
import runners
import train_pan
from artifacts import ExpertId, Layout
from common import read_rows
from config import ConfigError, MergeConfig, parse_args
from conftest import Forbidden, guard_training_splits
from detector_stats import average_ranks, detection_metrics
from sources import parse_source
from strategies import parse_strategies
from test_pan import SECTIONS, SEEDS, TASKS, TEST_LIMIT, env, listed  # noqa: F401 (env is a fixture)

DATA_FREE = "[energy(stats=synthetic:dafl),knn(stats=synthetic:dafl,k=5),input_gaussian(stats=shipped),gen,odin]"
FEW_SHOT = "[mahalanobis(stats=real:40),mahalanobis(stats=real:40,shrinkage=0.1),vim(stats=real:40)]"


def cfg_of(env, results, strategies: str, *extra: str) -> MergeConfig:
    return parse_args(MergeConfig, [
        "problem=disjoint_mnist", f"strategies={strategies}", f"seeds={listed(SEEDS)}", f"test_limit={TEST_LIMIT}",
        *SECTIONS, "device=cpu", f"data_dir={env['root']}", f"ckpt_dir={env['ckpt']}", f"results_dir={results}",
        *extra])


def run(cfg: MergeConfig) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return merge.main(cfg)


# ---------------------------------------------------------------- sources and rules at config load

@pytest.mark.parametrize("text, label, data_free", [("synthetic:inversion", "synthetic:inversion", True),
                                                     ("synthetic:dafl+inversion", "synthetic:dafl+inversion", True),
                                                     ("shipped", "shipped", True), ("real:200", "real:200", False),
                                                     ("real:all", "real:all", False)])
def test_sources_parse_and_say_whether_they_are_data_free(text, label, data_free):
    source = parse_source(text)
    assert source.label == label and source.data_free is data_free and ":" not in source.folder


@pytest.mark.parametrize("text, words", [("synthetic:nope", "unknown 'nope'"), ("real:0", "real:N"),
                                         ("real:-3", "real:N"), ("real:", "real:N"), ("shipped:1", "real:N"),
                                         ("imagenet", "real:N")])
def test_a_bad_source_is_one_line_naming_the_fix(text, words):
    with pytest.raises(ConfigError) as err:
        parse_source(text)
    assert "\n" not in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("entry, words", [
    ("mahalanobis", "give stats=SOURCE"),  # statistics needed, none named
    ("knn(stats=shipped)", "stats=shipped holds only"),
    ("energy(standardise=rank)", "standardise needs stats"),
    ("knn(stats=real:0)", "not a statistics source"),
    ("gate_hard(gate=feature,regime=real:0)", "real:N"),
])
def test_detector_and_gate_rules_are_checked_when_the_config_loads(entry, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        parse_strategies([entry])


def test_rule_labels_name_the_source_and_keep_the_raw_scores_as_they_were():
    labels = [c.label for c in parse_strategies(["energy", "energy(stats=real:200)", "knn(stats=synthetic:inversion)",
                                                 "gate_soft(gate=feature,regime=real:50)"])]
    assert labels == ["energy", "energy(stats=real:200)", "knn(k=10,stats=synthetic:inversion)",
                      "gate_soft(gate=feature,regime=real:50)"]


def test_bn_gaussian_needs_experts_with_batch_norm():
    cfg = parse_args(MergeConfig, ["problem=disjoint_mnist", "strategies=[bn_gaussian(stats=shipped)]"])
    with pytest.raises(ConfigError, match="lenet5_bn"):
        merge.main(cfg)


# ---------------------------------------------------------------- metrics

def test_detection_metrics_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn (requirements-test.txt) is the reference")
    g = torch.Generator().manual_seed(0)
    domain = torch.randint(0, 2, (300,), generator=g)
    raw = torch.randn(300, 2, generator=g) + torch.stack([domain == 0, domain == 1], dim=1).float()
    raw[:40, 0] = raw[40:80, 0].round()  # ties
    found = detection_metrics(raw, domain, ["a", "b"])
    for k, name in enumerate("ab"):
        own = (domain == k).numpy()
        assert found[name]["auroc"] == pytest.approx(metrics.roc_auc_score(own, raw[:, k].numpy()), abs=1e-12)
        threshold = torch.quantile(raw[domain == k, k].double(), 0.05)
        assert found[name]["fpr95"] == pytest.approx(float((raw[domain != k, k] >= threshold).double().mean()))


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0], dtype=torch.float64)).tolist() == [3.5, 1.0, 3.5, 2.0]


# ---------------------------------------------------------------- through merge.py

def test_data_free_detector_rows_read_no_real_training_image(env, tmp_path, monkeypatch):
    splits = []
    guard_training_splits(monkeypatch, ((data, "load_source"), (data, "load_task"), (data, "_load_cached"),
                                        (problems, "load_task"), (detector_stats, "load_task"), (merge, "load_task")),
                          "a data-free detector", splits)
    summary = run(cfg_of(env, tmp_path, DATA_FREE))
    assert set(splits) == {"test"}
    rows = [r for r in read_rows(summary["outputs"]["jsonl"]) if r.get("kind") == "strategy" and r["rule"] != "oracle"]
    assert len(rows) == 5 * len(SEEDS)
    for r in rows:  # every detector row says how well each expert's score tells its own test images
        assert set(r["detection"]) == set(TASKS)
        assert all(0 <= m["auroc"] <= 1 and 0 <= m["fpr95"] <= 1 for m in r["detection"].values())
    with pytest.raises(Forbidden):  # the guard does catch a real source
        run(cfg_of(env, tmp_path / "few", "[knn(stats=real:40)]"))


def test_statistics_are_stored_once_per_expert_seed_and_source_and_reused(env, tmp_path, monkeypatch):
    first = run(cfg_of(env, tmp_path / "a", FEW_SHOT))
    layout = Layout(cfg_of(env, tmp_path, FEW_SHOT))
    paths = [layout.stats_path(parse_source("real:40"), ExpertId(t, "lenet5", {}), s) for t in TASKS for s in SEEDS]
    assert all(p.is_file() for p in paths)
    stored = torch.load(paths[0], weights_only=True)
    assert stored["meta"]["source"] == "real:40" and len(stored["held_out"]) == 8  # the holdout: 20% of 40
    assert {"class_means", "covariance", "precision", "knn_bank", "vim_residual"} <= set(stored["statistics"])

    def forbidden(*args, **kwargs):
        raise Forbidden("stored statistics must be reused")

    monkeypatch.setattr(detector_stats, "fitted", forbidden)
    again = run(cfg_of(env, tmp_path / "b", FEW_SHOT))  # other results, same checkpoints: rows recomputed
    assert again["made"] == first["made"] and again["acc"] == first["acc"]
    # another fitting setting makes other statistics beside them
    other = Layout(cfg_of(env, tmp_path, FEW_SHOT, "statistics.holdout=0.5"))
    assert other.stats_path(parse_source("real:40"), ExpertId(TASKS[0], "lenet5", {}), SEEDS[0]) not in paths


def test_a_detector_fed_each_experts_own_training_images_routes_them_to_it(env, tmp_path):
    """Standardised on each expert's own source, the scores compare across experts: with statistics of all its
    training data, each expert wins most of its own training images (evaluated here on its training split)."""
    cfg = cfg_of(env, tmp_path, "[knn(stats=real:all,k=3)]")
    problem = problems.build_problem("disjoint_mnist", cfg.problems["disjoint_mnist"], cfg.tasks, str(env["root"]))
    layout = Layout(cfg)
    models, formats = problem.load_experts(layout, SEEDS[0], torch.device("cpu"))
    train = [data.load_task(problem.specs[t], "train", str(env["root"])) for t in TASKS]
    images = torch.cat([t.images for t in train])
    own = torch.cat([torch.full((len(t.images),), k) for k, t in enumerate(train)])
    batches = lambda: (data.to_unit(images[i:i + 64]) for i in range(0, len(images), 64))  # noqa: E731
    logits = [v.logits for v in detector_stats.expert_views(models, formats, batches)]
    scorer = runners.detector_runner(layout, problem, models, formats, logits, SEEDS[0], torch.device("cpu"), batches,
                                     cfg.data_dir)
    scores = scorer("knn", parse_source("real:all"), "zscore", {"k": 3})
    assert (scores.comparable.argmax(dim=1) == own).float().mean() > 0.9


def test_few_shot_gates_read_the_first_n_training_images(env, tmp_path):
    from test_pan import pan_cfg

    with contextlib.redirect_stdout(io.StringIO()):
        summary = train_pan.main(pan_cfg(env, env["ckpt"], tmp_path, regimes=["real:20"], gate_types=["logits"]))
    rows = read_rows(summary["outputs"]["jsonl"])
    assert {r["regime"] for r in rows} == {"real:20"} and all(r["train_positives"] == 20 for r in rows)
    layout = Layout(pan_cfg(env, env["ckpt"], tmp_path))
    assert layout.gate_path("disjoint_mnist", "real:20", "logits", 0, SEEDS[0]).parent.parent.name == "real_20"
    assert layout.gate_path("disjoint_mnist", "real:20", "logits", 0, 1) != \
        layout.gate_path("disjoint_mnist", "real", "logits", 0, 1)


def test_the_detector_gate_reads_the_same_scores_in_training_and_in_evaluation(env, tmp_path):
    """The universal gate over detector scores: train_pan measures each expert's membership accuracy on the test
    set from the scores it standardised itself; merge.py, from its own scorer, must find the same."""
    from test_pan import pan_cfg

    with contextlib.redirect_stdout(io.StringIO()):
        gates = train_pan.main(pan_cfg(env, env["ckpt"], tmp_path / "gates", regimes=["synthetic"],
                                       gate_types=["detectors"]))
    trained = {(r["seed"], r["expert"]): r["membership_acc"] for r in read_rows(gates["outputs"]["jsonl"])}
    assert len(trained) == len(SEEDS) * len(TASKS)
    merged = run(cfg_of(env, tmp_path / "merge", "[gate_hard(gate=detectors,regime=synthetic)]"))
    rows = [r for r in read_rows(merged["outputs"]["jsonl"]) if r.get("rule") == "gate_hard"]
    for r in rows:
        for task, seen in r["gate_experts"].items():
            assert seen["seen"] and seen["membership_acc"] == pytest.approx(trained[(r["seed"], task)], abs=1e-6)
