"""predict.py over the whole rule registry (issue 28, item 2): every rule a merge table can pick classifies a few
PNGs, reading what it reads in merge.py (detector statistics of each source, the stored synthetic sets, every gate
type) and giving merge.py's answers on the same images; the oracle, the multi-pass rules and the fusion rules are
refused in one line before any image is read."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torchvision.io import encode_png, write_file

import merge
import predict
import problems
from artifacts import Layout
from config import ConfigError, PredictConfig, parse_args
from detectors import DETECTORS
from gating import GATE_TYPES
from sources import parse_source
from strategies import REGISTRY, parse_strategies, with_gate_statistics
from test_pan import SECTIONS, SEEDS, TEST_LIMIT, merge_cfg, pan_run, env  # noqa: F401 (fixtures)

SEED = SEEDS[0]
PNGS = 4  # images written as PNG files for predict.main
REFUSED = {"oracle": "reads the true domain", "tta_mean": "runs augmented passes",
           "tta_voting": "runs augmented passes",
           "bn_gaussian(stats=shipped)": "batch-norm",  # LeNet5s have none: refused as merge.py refuses it
           # the routers fitted on unlabeled test inputs need a problem's selection half (unlabeled.py)
           **{name: "selection half" for name, rule in REGISTRY.items() if "inputs" in rule.params}}

REFUSED_NAMES = {label.split("(")[0] for label in REFUSED}


def runnable_labels() -> list[str]:
    """Every registered routing rule at least once, with the parameters it needs on disjoint_mnist's LeNet5s:
    statistics from the stored DAFL sets (also ``real:20`` and ``shipped`` where they apply) and each gate type."""
    labels = []
    for name, rule in REGISTRY.items():
        if rule.fusion is not None or name in REFUSED_NAMES:
            continue
        if rule.detector and DETECTORS[name].statistics:
            labels.append(f"{name}(stats={'shipped' if name == 'input_gaussian' else 'synthetic:dafl'})")
        elif name.startswith("gate_"):
            labels += [f"{name}(gate={gate},regime=synthetic)" for gate in
                       (GATE_TYPES if name == "gate_hard" else ("universal", "detectors"))]
        else:
            labels.append(name)
    return labels + ["react(stats=real:20)", "max_logit(stats=real:20)", "odin(stats=synthetic:dafl)"]


RUNNABLE = runnable_labels()


def predict_cfg(env, *extra: str) -> PredictConfig:
    return parse_args(PredictConfig, ["problem=disjoint_mnist", f"seed={SEED}", *SECTIONS, "device=cpu",
                                      f"data_dir={env['root']}", f"ckpt_dir={env['ckpt']}", *extra])


@pytest.fixture(scope="module")
def merged(env, pan_run):
    """merge.py's accuracy of every runnable rule on the combined test set, and that test set's images."""
    strategies = "[" + ",".join(f"'{label}'" for label in RUNNABLE) + "]"
    cfg = merge_cfg(env, env["ckpt"], env["base"] / "predict_rules", strategies, seeds=[SEED])
    with contextlib.redirect_stdout(io.StringIO()):
        summary = merge.main(cfg)
    problem = problems.build_problem("disjoint_mnist", cfg.problems["disjoint_mnist"], cfg.tasks, str(env["root"]),
                                     TEST_LIMIT)
    return summary["acc"], problem


def test_every_registered_rule_is_run_or_refused():
    covered = {label.split("(")[0] for label in RUNNABLE} | REFUSED_NAMES | {
        name for name, rule in REGISTRY.items() if rule.fusion is not None}
    assert covered == set(REGISTRY)


@pytest.mark.parametrize("label", RUNNABLE)
def test_each_rule_classifies_pngs_as_merge_does(env, merged, tmp_path, label, capsys):
    accuracy, problem = merged
    full = with_gate_statistics(parse_strategies([label]), "synthetic:dafl")[0].label  # as merge.py labels it
    images = torch.cat([d.images for d in problem.domains])
    predictions = predict.predict(predict_cfg(env, f"rule={label}"), images)
    correct = sum(p.class_id == int(y) for p, y in zip(predictions, problem.labels)) / len(images)
    assert correct == pytest.approx(accuracy[full]["mean"])  # merge.py's answers on the same images
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(PNGS):  # the first digits of each domain
        domain = problem.domains[i % 2]
        write_file(str(folder / f"{i}.png"), encode_png(domain.images[i // 2]))
    summary = predict.main(predict_cfg(env, f"rule={label}", f"inputs={folder}"))
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t" in line]
    assert summary["images"] == len(lines) == PNGS and summary["rule"] == full
    assert all(line[1] in problem.class_names and line[2] in problem.names for line in lines)


@pytest.mark.parametrize("label", [*REFUSED, *(name for name, rule in REGISTRY.items() if rule.fusion)])
def test_rules_predict_cannot_run_are_refused_in_one_line_before_any_image(env, tmp_path, label, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("no image may be read")

    monkeypatch.setattr(predict, "read_inputs", forbidden)
    why = REFUSED.get(label, "builds one network from fusion parents")
    with pytest.raises(ConfigError, match=why) as caught:
        predict.main(predict_cfg(env, f"rule={label}", f"inputs={tmp_path}"))
    assert "\n" not in str(caught.value)


def test_statistics_not_stored_yet_are_fitted_and_stored_as_merge_does(env, merged, tmp_path):
    """real:30 is a source no merge run has read: predict fits each expert's statistics on the first 30 training
    images under data_dir and stores them where merge.py would read them."""
    cfg = predict_cfg(env, "rule=react(stats=real:30)")
    layout = Layout(cfg)
    _, problem = merged
    paths = [layout.stats_path(parse_source("real:30"), expert, SEED) for expert in problem.experts]
    assert not any(p.exists() for p in paths)
    predictions = predict.predict(cfg, torch.cat([d.images[:2] for d in problem.domains]))
    assert len(predictions) == 4 and all(p.exists() for p in paths)
