"""Teacher-student fusion (issue 30, item 3; fusion/distil.py, the ``distil`` rule): the KD loss against its formula,
a distillation of 0 epochs from the student's weights gives the student back, the fused start and its two controls
see the same training images, bad parameters fail at config load in one line, and the committed sweep parses."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fusion
from archs.mlp import MLP
from archs.vgg import VGG
from config import ConfigError, MergeConfig, parse_args
from conftest import REPO_ROOT
from strategies import FusionInputs, MergeInputs, check_fusion, parse_strategies

pytestmark = pytest.mark.pot
CLASSES = 3


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, 8, 8, generator=torch.Generator().manual_seed(seed))


def vgg_pair() -> list[nn.Module]:
    """A double-width teacher and a half-width student of one depth (the sweep's pair, tiny)."""
    torch.manual_seed(0)
    teacher = VGG(2, CLASSES, (8, "M", 12, "M"), (10,), bias=True, img_size=8).eval()
    torch.manual_seed(1)
    student = VGG(2, CLASSES, (2, "M", 3, "M"), (4,), bias=True, img_size=8).eval()
    return [teacher, student]


def inputs_of(parents: list[nn.Module], train: int = 96) -> tuple[MergeInputs, list[nn.Module], torch.Tensor]:
    """Merge inputs of a shared-label problem whose predictor keeps every network it is asked about."""
    test = images(40, 1)
    train_images, train_labels = images(train, 2), torch.randint(0, CLASSES, (train,),
                                                                 generator=torch.Generator().manual_seed(3))
    seen: list[nn.Module] = []

    def predict(network: nn.Module) -> torch.Tensor:
        seen.append(network)
        with torch.no_grad():
            return network(test).argmax(1)

    with torch.no_grad():
        logits = [p(test) for p in parents]
    fused = FusionInputs(parents, images(30, 4), torch.ones(len(parents), CLASSES), predict,
                         lambda: (train_images, train_labels), seed=11)
    return MergeInputs(logits, [torch.arange(CLASSES)] * len(parents), fusion=fused), seen, test


def run(inputs: MergeInputs, **params):
    (call,) = parse_strategies([{"name": "distil", **params}])
    return call(inputs)


def test_the_kd_loss_is_the_formula():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g,
                                                                                      dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (7,), generator=g)
    for alpha, t in ((0.9, 4.0), (0.5, 2.0), (0.0, 1.0), (1.0, 3.0)):
        p = torch.exp(teacher / t) / torch.exp(teacher / t).sum(1, keepdim=True)
        q = torch.exp(student / t) / torch.exp(student / t).sum(1, keepdim=True)
        kl = (p * (p.log() - q.log())).sum(1).mean()
        ce = -(torch.exp(student) / torch.exp(student).sum(1, keepdim=True)).log()[torch.arange(7), labels].mean()
        expected = alpha * t ** 2 * kl + (1 - alpha) * ce
        torch.testing.assert_close(fusion.kd_loss(student, teacher, labels, alpha, t), expected, rtol=1e-12, atol=0)
    # a student that already is the teacher has no soft loss left
    assert float(fusion.kd_loss(teacher, teacher, labels, 1.0, 4.0)) == pytest.approx(0.0, abs=1e-12)


def test_zero_epochs_from_the_students_weights_give_the_student_back():
    parents = vgg_pair()
    inputs, seen, test = inputs_of(parents)
    decision = run(inputs, student=1, init="student", kd_epochs=0)
    torch.testing.assert_close(seen[-1](test), parents[1](test), rtol=0, atol=0)
    assert decision.row["kd_epochs"] == 0 and decision.row["kd_images"] == 0 and decision.row["teacher"] == 0
    assert decision.row["fusion_samples"] == 0  # the control reads no fusion sample
    # one epoch moves it: the function above is not the student's by accident
    run(inputs, student=1, init="student", kd_epochs=1)
    assert not torch.allclose(seen[-1](test), parents[1](test))


def test_the_fused_start_and_its_controls_see_the_same_images():
    parents = vgg_pair()
    before = [{k: v.clone() for k, v in p.state_dict().items()} for p in parents]
    inputs, seen, test = inputs_of(parents, train=96)
    rows, outputs = {}, {}
    for init in ("fused", "student", "scratch"):
        rows[init] = run(inputs, student=1, init=init, kd_epochs=2, kd_alpha=0.5, kd_temperature=2.0).row
        outputs[init] = seen[-1](test)
        # every start ends in the student's shape
        assert [p.shape for p in seen[-1].parameters()] == [p.shape for p in parents[1].parameters()]
    assert {r["kd_images"] for r in rows.values()} == {2 * 96}
    assert {r["kd_epochs"] for r in rows.values()} == {2}
    assert rows["fused"]["fusion_samples"] == 30 and rows["scratch"]["fusion_samples"] == 0
    # three different starts, three different networks
    assert not torch.allclose(outputs["fused"], outputs["student"])
    assert not torch.allclose(outputs["scratch"], outputs["student"])
    # the parents are never changed
    for parent, state in zip(parents, before):
        assert all(torch.equal(state[k], v) for k, v in parent.state_dict().items())


def test_the_teacher_fused_into_the_students_shape_starts_from_both():
    """Zero epochs from the fused start is CLAFusion into the student's widths."""
    parents = vgg_pair()
    inputs, seen, test = inputs_of(parents)
    run(inputs, student=1, init="fused", kd_epochs=0)
    fused = fusion.clafusion(parents, inputs.fusion.samples, target=1)
    torch.testing.assert_close(seen[-1](test), fused(test))


def test_the_fused_start_may_be_repaired():
    parents = vgg_pair()
    inputs, seen, test = inputs_of(parents)
    row = run(inputs, student=1, init="fused", kd_epochs=0, repair=True).row
    network, ratios = fusion.repaired(fusion.align("clafusion", parents, inputs.fusion.samples, target=1),
                                      inputs.fusion.samples)
    torch.testing.assert_close(seen[-1](test), network(test))
    assert row["repair_std_ratio_after"] == pytest.approx(ratios["repair_std_ratio_after"])


def test_a_student_shallower_than_the_teacher_is_refused():
    torch.manual_seed(0)
    parents = [MLP(2, CLASSES, [8, 6, 4], True, 8, 0).eval(), MLP(2, CLASSES, [5, 4], True, 8, 0).eval()]
    inputs, _, _ = inputs_of(parents)
    with pytest.raises(ValueError, match="as deep as the teacher"):
        run(inputs, student=1, init="fused", kd_epochs=0)


@pytest.mark.parametrize("params, words", [
    ({"kd_alpha": 1.5}, ["kd_alpha", "[0, 1]", "1.5"]),
    ({"kd_temperature": 0}, ["kd_temperature", "above 0"]),
    ({"kd_epochs": -1}, ["kd_epochs", "0 or more"]),
    ({"init": "teacher"}, ["init", "fused", "student", "scratch"]),
    ({"init": "scratch", "repair": True}, ["repair", "init=scratch"]),
])
def test_bad_parameters_fail_at_config_load_in_one_line(params, words):
    with pytest.raises(ConfigError) as err:
        parse_strategies([{"name": "distil", **params}])
    message = str(err.value)
    assert "\n" not in message and all(word in message for word in words), message


def sweep() -> MergeConfig:
    return parse_args(MergeConfig, [str(REPO_ROOT / "experiments" / name) for name in
                                    ("fusion_parents.yaml", "fusion_cnn_full.yaml", "fusion_kd.yaml")])


def test_a_student_that_is_not_a_parent_fails_at_config_load():
    cfg = sweep()
    (call,) = parse_strategies([{"name": "distil", "student": 2}])
    with pytest.raises(ConfigError) as err:
        check_fusion(call, cfg.problem, cfg.problems[cfg.problem])
    assert "student=2 is not a parent" in str(err.value) and "\n" not in str(err.value)


def test_the_committed_sweep_fits_its_problem():
    cfg = sweep()
    spec = cfg.problems[cfg.problem]
    assert spec.shared_labels and cfg.seeds == [770597, 600522, 416719]
    assert [e.arch for e in spec.experts] == ["vgg", "vgg"]
    # one task: the distillation set (the union of the parents' training sets) holds every image once
    assert [e.task for e in spec.experts] == ["cifar10", "cifar10"]
    teacher, student = (e.arch_kwargs for e in spec.experts)
    # a double-width teacher and a half-width student of one depth
    assert [w for w in teacher["layers"] if w != "M"] == [4 * w for w in student["layers"] if w != "M"]
    calls = parse_strategies(cfg.strategies)
    for call in calls:
        check_fusion(call, cfg.problem, spec)
    kd = [c for c in calls if c.name == "distil"]
    assert {(c.params["kd_alpha"], c.params["kd_temperature"]) for c in kd} == {(0.5, 4.0), (0.9, 4.0)}
    for init, count in (("fused", 4), ("student", 2), ("scratch", 2)):  # the fused start with and without REPAIR
        assert len([c for c in kd if c.params["init"] == init]) == count
    assert {c.params["kd_epochs"] for c in kd} == {3} and {c.params["student"] for c in kd} == {1}
    header = (REPO_ROOT / "experiments" / "fusion_kd.yaml").read_text().split("\nproblem:")[0]
    for expert in spec.experts:  # the training commands name the arch_kwargs the problem reads
        layers = ", ".join(map(str, expert.arch_kwargs["layers"]))
        assert f"dataset={expert.task} arch=vgg arch_kwargs='{{layers: [{layers}], hidden: " \
               f"{expert.arch_kwargs['hidden']}}}'" in header
    assert "python merge.py experiments/fusion_parents.yaml experiments/fusion_cnn_full.yaml " \
           "experiments/fusion_kd.yaml" in header
