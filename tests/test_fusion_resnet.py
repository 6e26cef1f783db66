"""fusion/ on residual networks: self-fusion gives the function back, a channel-permuted ResNet (through blocks and
skips) is found again by OTFusion, with and without batch norm; batch-norm running statistics reset to samples'."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from archs.resnet import ResNet
import merge
import train_source_networks as tsn
from common import read_rows
from config import ConfigError, MergeConfig, TrainConfig, parse_args
from conftest import REPO_ROOT, SHARD_TASKS_YAML, build_fake_root, tiny_resnet
from fusion import clafusion, hungarian_fusion, kf_gradient, kf_linear, otfusion, residual_fit, vanilla_avg
from fusion.residual_depth import align_blocks, block_cost, deepen
from strategies import check_fusion, parse_strategies
from fusion.residual import plan_of, reset_norm_statistics

IMG = 8
CLASSES = 3
TIGHT = dict(rtol=0, atol=1e-9)  # parents are float64, so the fused networks are float64 too
FLAGS = [(True, False), (False, False), (False, True)]  # (batch_norm, bias)
FLAG_IDS = ["bn", "plain", "bias"]


def make_resnet(depth: int = 18, batch_norm: bool = True, bias: bool = False, seed: int = 0) -> ResNet:
    return tiny_resnet(seed, CLASSES, depth, batch_norm, bias)


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, IMG, IMG, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def same_weights(a: nn.Module, b: nn.Module, atol: float = 1e-12) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k].double(), sb[k].double(), rtol=0, atol=atol)
                                          for k in sa)


def permute_channels(model: ResNet, seed: int) -> ResNet:
    """The same function with every channel space shuffled: a stream's permutation moves the rows of every
    convolution writing it (stem, second convolutions, projection) and the columns of every one reading it."""
    permuted = copy.deepcopy(model)
    plan = plan_of(model)
    generator = torch.Generator().manual_seed(seed)
    state = permuted.state_dict()
    perms = {}
    for space in plan.spaces:
        width = state[f"{space.conv}.weight"].shape[0]
        perms[space.name] = torch.randperm(width, generator=generator)
    with torch.no_grad():
        for name, (rows, cols) in plan.axes.items():
            tensor = state[name]
            if rows is not None:
                tensor.copy_(tensor[perms[rows]])
            if cols is not None:
                tensor.copy_(tensor[:, perms[cols]])
    return permuted


def test_plan_ties_a_stage_to_its_skips():
    plan = plan_of(make_resnet())
    assert [s.name for s in plan.spaces][:4] == ["stem", "body.3.mid", "body.4.mid", "body.5.mid"]
    # the identity-skip blocks of stage 1 write the stem's channels; the projection block starts a new stream
    assert plan.axes["body.3.conv2.weight"] == ("stem", "body.3.mid")
    assert plan.axes["body.5.conv2.weight"] == ("body.5.out", "body.5.mid")
    assert plan.axes["body.5.shortcut.0.weight"] == ("body.5.out", "stem")
    assert plan.axes["fc.weight"] == (None, "body.9.out")  # the last stage starts at block 7


@pytest.mark.pot
@pytest.mark.parametrize("batch_norm,bias", FLAGS, ids=FLAG_IDS)
def test_self_fusion_gives_the_resnet_back(batch_norm, bias):
    net = make_resnet(batch_norm=batch_norm, bias=bias)
    x = images(20)
    assert same_weights(vanilla_avg([net, net]), net)
    assert same_weights(otfusion([net, net]), net)
    assert same_weights(otfusion([net, net], x, cost="activation"), net)
    torch.testing.assert_close(out(otfusion([net, net], x, cost="activation", positions="pool"), x), out(net, x),
                               **TIGHT)


@pytest.mark.pot
@pytest.mark.parametrize("batch_norm,bias", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("depth", [18, 34])
def test_a_permuted_resnet_is_found_again(depth, batch_norm, bias):
    net = make_resnet(depth, batch_norm, bias)
    permuted = permute_channels(net, seed=5)
    x = images(20)
    torch.testing.assert_close(out(permuted, x), out(net, x), **TIGHT)  # the same function
    assert not same_weights(permuted, net)
    assert same_weights(otfusion([net, permuted]), net)  # aligned back to the anchor, then averaged
    assert same_weights(otfusion([net, permuted], x, cost="activation"), net)
    assert not same_weights(vanilla_avg([net, permuted]), net)


@pytest.mark.pot
def test_resnets_of_other_depths_or_kinds_are_refused():
    with pytest.raises(ValueError, match="clafusion"):
        otfusion([make_resnet(18), make_resnet(34)])
    with pytest.raises(ValueError, match="batch_norm"):
        otfusion([make_resnet(batch_norm=True), make_resnet(batch_norm=False)])
    with pytest.raises(ValueError, match="all be ResNets"):
        otfusion([make_resnet(), nn.Linear(2, 3)])


def test_reset_statistics_are_the_samples_statistics():
    net = make_resnet()
    x = images(30)
    fresh = reset_norm_statistics(copy.deepcopy(net), x)
    stem_out = fresh.body[0](x)
    torch.testing.assert_close(fresh.body[1].running_mean, stem_out.mean((0, 2, 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(fresh.body[1].running_var, stem_out.var((0, 2, 3)), rtol=0, atol=1e-10)
    assert not fresh.training
    with pytest.raises(ValueError, match="batch_norm: false"):
        reset_norm_statistics(make_resnet(batch_norm=False), x)


# ---------------------------------------------------------------- neuron interpolation, a block as a level

@pytest.mark.parametrize("batch_norm,bias", FLAGS, ids=FLAG_IDS)
def test_neuron_interpolation_of_a_resnet_with_itself_gives_its_function(batch_norm, bias):
    net = make_resnet(batch_norm=batch_norm, bias=bias)
    x = images(24)
    permuted = permute_channels(net, seed=3)
    for fused in (hungarian_fusion([net, net], x), kf_linear([net, net], x), kf_gradient([net, net], x, steps=3),
                  hungarian_fusion([net, permuted], x), kf_linear([net, net], x, positions="pool")):
        assert type(fused) is ResNet and fused.batch_norm == batch_norm
        torch.testing.assert_close(out(fused, x), out(net, x), rtol=0, atol=1e-7)


def test_kf_gradient_trains_a_block_where_kf_linear_fits_its_pieces(monkeypatch):
    parents = [make_resnet(seed=s) for s in (0, 1, 2)]
    x = images(24)
    losses = []  # per block: the loss of KF-linear's closed-form pieces (Adam's start) and of KF-gradient's result
    adam = residual_fit.best_of_adam

    def recorded(params, loss_of, steps, lr):
        best = adam(params, loss_of, steps, lr)
        losses.append((loss_of(*params).item(), loss_of(*best).item()))
        return best
    monkeypatch.setattr(residual_fit, "best_of_adam", recorded)
    linear, gradient = kf_linear(parents, x, seed=4), kf_gradient(parents, x, seed=4, steps=30)
    assert len(losses) == 8 and all(trained <= start for start, trained in losses)
    # the first block reads the same fused stem in both, so its start is KF-linear's own block loss: trained end to
    # end through the inner ReLU, KF-gradient reaches a lower one
    start, trained = losses[0]
    assert trained < 0.99 * start
    assert not same_weights(linear, gradient)
    # the stem has a closed form, which both share; the first block is where they part
    torch.testing.assert_close(gradient.body[0].weight, linear.body[0].weight, rtol=0, atol=1e-12)
    assert not torch.allclose(gradient.body[3].conv1.weight, linear.body[3].conv1.weight)


def test_neuron_interpolation_refuses_what_resnets_do_not_take():
    a, b = make_resnet(), make_resnet(seed=1)
    x = images(8)
    with pytest.raises(ValueError, match="uniform importance"):
        kf_linear([a, b], x, widths=[4])
    with pytest.raises(ValueError, match="exactly 2"):
        hungarian_fusion([a, b, a], x)


# ---------------------------------------------------------------- CLAFusion of a ResNet34 with a ResNet18

@pytest.mark.parametrize("batch_norm,bias", FLAGS, ids=FLAG_IDS)
def test_identity_blocks_keep_a_resnets_function(batch_norm, bias):
    net = make_resnet(18, batch_norm, bias)
    x = images(10)
    for mapping in ([[0, 1], [0, 1], [0, 1], [0, 1]], [[0, 2], [0, 3], [0, 5], [0, 2]], [[0, 1], [0, 2], [0, 4], [0, 1]]):
        deep = deepen(net, 34, mapping)
        assert len(deep.blocks) == 16
        torch.testing.assert_close(out(deep, x), out(net, x), **TIGHT)
    with pytest.raises(ValueError, match="first to 0"):
        deepen(net, 34, [[1, 2], [0, 1], [0, 1], [0, 1]])


def test_block_alignment_is_the_least_cost_increasing_map():
    cost = torch.tensor([[0.0, 5, 5, 5], [5, 5, 1, 0.5], [5, 5, 5, 0]])
    assert align_blocks(cost) == [0, 2, 3]
    assert align_blocks(torch.tensor([[0.0, 1, 1], [1, 0, 1]])) == [0, 1]


@pytest.mark.pot
@pytest.mark.parametrize("batch_norm,bias", FLAGS, ids=FLAG_IDS)
def test_clafusion_of_a_resnet_with_its_deepened_self_is_exact(batch_norm, bias):
    net = make_resnet(18, batch_norm, bias)
    x = images(20)
    deep = deepen(net, 34, [[0, 2], [0, 3], [0, 5], [0, 2]])
    for ot_cost in ("weight", "activation"):
        fused = clafusion([deep, net], x, ot_cost=ot_cost)
        assert fused.depth == 34
        torch.testing.assert_close(out(fused, x), out(net, x), **TIGHT)
    # the CKA map finds where the blocks went (an identity block's output equals the block before it)
    assert [align_blocks(c) for c in block_cost(deep, net, x)] == [[0, 2], [0, 3], [0, 5], [0, 2]]


@pytest.mark.pot
def test_clafusion_of_a_resnet34_with_a_resnet18_runs_and_refuses_mixed_kinds():
    fused = clafusion([make_resnet(18), make_resnet(34, seed=1)], images(16))
    assert fused.depth == 34 and torch.isfinite(out(fused, images(4))).all()
    with pytest.raises(ValueError, match="batch_norm"):
        clafusion([make_resnet(18), make_resnet(34, batch_norm=False)], images(4))


# ---------------------------------------------------------------- the experiment files

RESNET_YAMLS = ["fusion_resnet_full.yaml", "fusion_resnet_noniid2.yaml", "fusion_resnet_noniid4.yaml",
                "fusion_resnet_depths.yaml"]


@pytest.mark.pot
@pytest.mark.parametrize("name", RESNET_YAMLS)
def test_resnet_fusion_experiments_parse_and_name_their_recipe(name):
    experiments = REPO_ROOT / "experiments"
    cfg = parse_args(MergeConfig, [str(experiments / f) for f in ("fusion_parents.yaml", "fusion_resnet.yaml", name)])
    spec = cfg.problems[cfg.problem]
    assert spec.shared_labels and cfg.seeds == [770597, 600522, 416719] and cfg.fusion_samples == 200
    assert all(e.arch == "resnet" and not e.arch_kwargs["batch_norm"] and not e.arch_kwargs["bias"]
               and e.arch_kwargs["width"] == 0.125 for e in spec.experts)
    for call in parse_strategies(cfg.strategies):
        check_fusion(call, cfg.problem, spec)
    header = (experiments / name).read_text().split("\nproblem:")[0]
    assert "python train_source_networks.py" in header and "python merge.py" in header and name in header
    for expert in spec.experts:  # the training command names the arch_kwargs the problem reads
        assert f"arch_kwargs='{{depth: {expert.arch_kwargs['depth']}, width: 0.125, batch_norm: false, bias: false}}'" \
            in header
    # the paper profile trains the parents by the recipe above; the cpu profile, where it keeps the table (its
    # header names those it leaves to the paper profile), by its cpu-sized one (issue 27)
    for profile, recipe in (("paper", "fusion_resnet.yaml"), ("cpu", "fusion_resnet_cpu.yaml")):
        text = (REPO_ROOT / "experiments" / "profiles" / f"{profile}.yaml").read_text()
        kept = f"{name[:-5]}: {{files: [experiments/{recipe}]}}" in text
        assert kept or (profile == "cpu" and name[:-5] in text.split("\nprofile:")[0]), profile


def test_norm_stats_need_batch_norm_parents():
    cfg = parse_args(MergeConfig, [str(REPO_ROOT / "experiments" / f)
                                   for f in ("fusion_parents.yaml", "fusion_resnet_full.yaml")])
    with pytest.raises(ConfigError, match="batch norm"):
        check_fusion(parse_strategies([{"name": "otfusion", "norm_stats": "reset"}])[0], cfg.problem,
                     cfg.problems[cfg.problem])
    with pytest.raises(ConfigError, match="uniform"):
        check_fusion(parse_strategies([{"name": "kf_linear", "importance": "conductance"}])[0], cfg.problem,
                     cfg.problems[cfg.problem])


# ---------------------------------------------------------------- through merge.py

RESNET_PROBLEMS = """problems:
  resnets:
    shared_labels: true
    experts:
      - {task: s_p0, arch: resnet, arch_kwargs: {depth: 18, width: 0.0625}}
      - {task: s_p1, arch: resnet, arch_kwargs: {depth: 18, width: 0.0625}}
  resnet_depths:
    shared_labels: true
    experts:
      - {task: s_p0, arch: resnet, arch_kwargs: {depth: 34, width: 0.0625}}
      - {task: s_p1, arch: resnet, arch_kwargs: {depth: 18, width: 0.0625}}
"""


@pytest.mark.pot
def test_resnets_fuse_through_merge(tmp_path):
    """Tiny batch-norm ResNets on the two shards of a fake MNIST go through every fusion rule (Git Re-Basin included),
    with and without reset statistics and with REPAIR; a ResNet34 and a ResNet18 through CLAFusion and its fine-tuning
    control."""
    fake = build_fake_root(tmp_path / "data", n_mnist_train=200, n_mnist_test=40, squares=True, n_cifar=0)
    (tmp_path / "tasks.yaml").write_text(SHARD_TASKS_YAML)
    (tmp_path / "p.yaml").write_text(RESNET_PROBLEMS)
    common = ["seeds=[1]", f"data_dir={fake.root}", f"ckpt_dir={tmp_path / 'ckpt'}", "device=cpu",
              "expert.epochs=1", "expert.batch_size=32"]
    for task, kwargs in (("s_p0", "{depth: 18, width: 0.0625}"), ("s_p1", "{depth: 18, width: 0.0625}"),
                         ("s_p0", "{depth: 34, width: 0.0625}")):
        tsn.main(parse_args(TrainConfig, [str(tmp_path / "tasks.yaml"), f"dataset={task}", "arch=resnet",
                                          f"arch_kwargs={kwargs}", *common, f"results_dir={tmp_path / 'train'}"]))

    def rows(problem: str, strategies: str) -> dict[str, dict]:
        summary = merge.main(parse_args(MergeConfig, [str(tmp_path / "tasks.yaml"), str(tmp_path / "p.yaml"),
                                                      f"problem={problem}",
                                                      f"strategies={strategies}", "fusion_samples=20", *common,
                                                      f"results_dir={tmp_path / 'results'}"]))
        return {r["strategy"]: r for r in read_rows(summary["outputs"]["jsonl"])}

    same = rows("resnets", "[vanilla_avg,{name: vanilla_avg, norm_stats: reset},{name: otfusion, cost: activation},"
                           "{name: otfusion, norm_stats: reset},{name: otfusion, repair: true},hf,kf_linear,"
                           "kf_gradient,rebasin,{name: rebasin, repair: true},ensemble,{name: parent, index: 0},"
                           "{name: parent, index: 1}]")
    for label in ("vanilla_avg", "vanilla_avg(norm_stats=reset)", "otfusion(cost=activation)",
                  "otfusion(cost=weight,norm_stats=reset)", "otfusion(cost=weight,repair=True)", "hf(ridge=0.0)",
                  "kf_linear(importance=uniform,ridge=0.0)", "kf_gradient(importance=uniform,ridge=0.0)",
                  "rebasin(iterations=100)", "rebasin(iterations=100,repair=True)"):
        assert 0 <= same[label]["acc"] <= 1 and same[label]["fuse_time_s"] >= 0, label
    assert same["vanilla_avg(norm_stats=reset)"]["fusion_samples"] == 20
    assert same["rebasin(iterations=100)"]["fusion_samples"] == 0  # weight matching reads no image
    # each parent rule is that expert's network on the same test set: its row is the expert's own accuracy
    experts = [r for label, r in same.items() if label.startswith("expert:")]
    assert len(experts) == 2
    for k, expert in enumerate(experts):
        assert same[f"parent(index={k},finetune_epochs=0)"]["acc"] == pytest.approx(expert["acc"], abs=1e-6)
    assert same["oracle"]["shared_labels"] is True  # named owner routing, not a bound (report.oracle_name)
    assert "repair_std_ratio_before" not in same["otfusion(cost=activation)"]
    for label in ("otfusion(cost=weight,repair=True)", "rebasin(iterations=100,repair=True)"):
        repaired = same[label]
        assert repaired["fusion_samples"] == 20, label
        # one ratio per renormalised convolution of a ResNet18: the stem, two per block, three projections
        assert len(repaired["repair_std_ratio_before"]) == len(repaired["repair_std_ratio_after"]) == 1 + 2 * 8 + 3
        assert all(abs(r - 1) < 1e-4 for r in repaired["repair_std_ratio_after"]), label  # float32 parents
    depths = rows("resnet_depths", "[{name: clafusion, finetune_epochs: 1},"
                                   "{name: parent, index: 1, finetune_epochs: 1},{name: clafusion, repair: true}]")
    assert 0 <= depths["clafusion(finetune_epochs=1)"]["acc"] <= 1
    assert len(depths["clafusion(finetune_epochs=0,repair=True)"]["repair_std_ratio_after"]) == 1 + 2 * 16 + 3
    assert depths["parent(index=1,finetune_epochs=1)"]["finetune_images"] == 200
