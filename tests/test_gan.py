"""train_gan.py: the DAFL loss, sampling, and the synthesis stage end to end on tiny experts (fake data root).

docs/design.md section 4, "The data question": one generator per expert and seed, each trained against its
own expert (the original trained every generator against expert 1), reading no real image; and the stored
synthetic sets of every synthesizer (DAFL's drawn from its generator, the inversions optimised directly).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import dafl as synthesis
import data
import train_gan
import train_source_networks
from archs.generator import Generator
from artifacts import ExpertId, Layout
from common import CheckpointError, load_model, make_generator, read_rows
from config import ConfigError, GanConfig, TrainConfig, parse_args
from data import InputFormat, prepare_input
from conftest import Forbidden
from test_problems import make_data_root

SEEDS = [1, 2]
TASKS = ["first5_mnist", "last5_mnist"]
ARCH = "lenet5"
# tiny experts, and a tiny generator profile: 6 Adam steps of batch 16 with an 8-channel generator
EXPERT = ["expert.epochs=2", "expert.batch_size=16", "expert.lr=0.02"]
# the stacked path, as on CUDA (auto trains them one by one on CPU); the one-by-one path is compared in its own test
DAFL = ["dafl.epochs=2", "dafl.iters_per_epoch=3", "dafl.batch_size=16", "dafl.width=8", "dafl.images=80",
        "dafl.stack_seeds=true"]
INVERSION = ["inversion.images=20", "inversion.steps=3", "inversion.batch_size=8"]
GAN_PROFILE = [*EXPERT, *DAFL, "eval_samples=64"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"




# ---------------------------------------------------------------- helpers shared with test_pan.py

def train_experts(base: Path, seeds=SEEDS) -> dict:
    """A fake data root under ``base`` and first5/last5 LeNet experts trained on it for ``seeds``."""
    root, ckpt = base / "data", base / "ckpt"
    arrays = make_data_root(root, n_train=200, n_test=64, n_cifar=0)
    for task in TASKS:
        with contextlib.redirect_stdout(io.StringIO()):
            train_source_networks.main(parse_args(TrainConfig, [
                f"dataset={task}", f"seeds={seeds}", *EXPERT, "device=cpu",
                f"data_dir={root}", f"ckpt_dir={ckpt}", f"results_dir={base / 'expert_results'}"]))
    return {"base": base, "root": root, "ckpt": ckpt, "arrays": arrays}


def gan_cfg(ckpt: Path, results: Path, *extra: str, seeds=SEEDS) -> GanConfig:
    return parse_args(GanConfig, ["problem=disjoint_mnist", f"seeds={seeds}", *GAN_PROFILE, *INVERSION, "device=cpu",
                                  f"ckpt_dir={ckpt}", f"results_dir={results}", *extra])


def expert_file(ckpt: Path, task: str, seed: int) -> Path:
    return Layout(gan_cfg(ckpt, ckpt)).expert_path(ExpertId(task, ARCH, {}), seed)


def generator_file(ckpt: Path, task: str, seed: int, *extra: str) -> Path:
    return Layout(gan_cfg(ckpt, ckpt, *extra)).generator_path(ExpertId(task, ARCH, {}), seed)


def set_file(ckpt: Path, task: str, seed: int, *extra: str, synthesizer: str = "dafl") -> Path:
    return Layout(gan_cfg(ckpt, ckpt, *extra)).synthetic_path(synthesizer, ExpertId(task, ARCH, {}), seed)


def copy_experts(source: Path, target: Path, pairs) -> None:
    (target / "experts").mkdir(parents=True, exist_ok=True)
    for task, seed in pairs:
        shutil.copy(expert_file(source, task, seed), target / "experts")


def mtimes(paths) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in paths}


def forbid_real_data(patch) -> None:
    """train_gan reads no image: any data load fails."""
    def forbidden(*args, **kwargs):
        raise Forbidden("train_gan.py must not read any data")

    patch.setattr(data, "load_source", forbidden)
    patch.setattr(data, "load_task", forbidden)
    patch.setattr(data, "_load_cached", forbidden)


# ---------------------------------------------------------------- the DAFL loss

def test_dafl_loss_matches_the_formula():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.5, 0.2, 0.4], [1.0, 1.5, -2.0]])
    features = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, -0.25], [3.0, 1.0, 1.0], [0.0, 0.0, -1.0]])
    oh_w, ie_w, a_w = 0.7, 3.0, 0.5
    # independently, in plain Python
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    one_hot = sum(-math.log(max(p)) for p in probs) / len(probs)  # cross-entropy against the argmax
    pbar = [sum(p[j] for p in probs) / len(probs) for j in range(3)]
    info_entropy = sum(q * math.log10(q) for q in pbar)  # -H(pbar) in log base 10, as DAFL's reference
    activation = sum(abs(v) for row in features.tolist() for v in row) / features.numel()
    expected = oh_w * one_hot + ie_w * info_entropy - a_w * activation

    loss, parts = synthesis.dafl_loss(logits, features, oh_w, ie_w, a_w)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert parts == pytest.approx({"one_hot": one_hot, "info_entropy": info_entropy, "activation": activation},
                                  abs=1e-5)
    # each weight scales its own term
    assert synthesis.dafl_loss(logits, features, 1.0, 0.0, 0.0)[0].item() == pytest.approx(one_hot, abs=1e-5)
    assert synthesis.dafl_loss(logits, features, 0.0, 1.0, 0.0)[0].item() == pytest.approx(info_entropy, abs=1e-5)
    assert synthesis.dafl_loss(logits, features, 0.0, 0.0, 1.0)[0].item() == pytest.approx(-activation, abs=1e-5)


def test_dafl_loss_rewards_balanced_classes_and_strong_features():
    k = 5
    balanced = torch.eye(k) * 20  # every class once: the batch-mean softmax is uniform
    collapsed = torch.zeros(k, k)
    collapsed[:, 2] = 20  # every sample says class 2
    features = torch.ones(k, 4)
    _, bal = synthesis.dafl_loss(balanced, features, 1.0, 10.0, 0.1)
    _, col = synthesis.dafl_loss(collapsed, features, 1.0, 10.0, 0.1)
    assert bal["info_entropy"] < col["info_entropy"]
    assert bal["info_entropy"] == pytest.approx(-math.log10(k), abs=1e-3)  # the minimum: -log10 K
    assert col["info_entropy"] == pytest.approx(0.0, abs=1e-3)
    assert bal["one_hot"] == pytest.approx(col["one_hot"], abs=1e-6)  # equally confident
    # larger activations lower the loss
    weak = synthesis.dafl_loss(balanced, features, 1.0, 10.0, 0.1)[0]
    strong = synthesis.dafl_loss(balanced, features * 3, 1.0, 10.0, 0.1)[0]
    assert strong.item() == pytest.approx(weak.item() - 0.1 * 2, abs=1e-5)


def test_dafl_loss_gradient_reaches_the_logits():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    features = torch.randn(6, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss, _ = synthesis.dafl_loss(logits, features, 1.0, 10.0, 0.1)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # d/df of -0.1 * mean|f| is -0.1 * sign(f) / numel
    torch.testing.assert_close(features.grad, -0.1 * features.detach().sign() / features.numel())


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("source,channels", [("mnist", 1), ("cifar10", 3)])
def test_sample_images_are_pixels_in_the_experts_channels(source, channels):
    torch.manual_seed(0)
    fmt = InputFormat.of(source)
    generator = Generator(latent_dim=100, out_channels=channels, width=8)
    generator.train()(torch.randn(16, 100))  # move the BN running statistics away from their defaults
    generator.eval()
    images = synthesis.sample_images(generator, fmt, 10, seed=3, device=torch.device("cpu"), batch_size=4)
    assert images.shape == (10, channels, 32, 32)
    assert images.min() >= 0 and images.max() <= 1
    assert images.std() > 0
    assert torch.equal(images, synthesis.sample_images(generator, fmt, 10, seed=3, device=torch.device("cpu"),
                                                       batch_size=4))  # deterministic for a seed
    assert not torch.equal(images, synthesis.sample_images(generator, fmt, 10, seed=4,
                                                           device=torch.device("cpu"), batch_size=4))
    # the generator speaks the expert's normalised space: samples are its output un-normalised to pixels
    one_batch = synthesis.sample_images(generator, fmt, 10, seed=3, device=torch.device("cpu"), batch_size=10,
                                        mode="eval")
    with torch.no_grad():
        z = torch.randn(10, 100, generator=make_generator(3))
        mean, std = torch.tensor(fmt.mean).view(1, -1, 1, 1), torch.tensor(fmt.std).view(1, -1, 1, 1)
        expected = (generator(z) * std + mean).clamp(0, 1)
    torch.testing.assert_close(one_batch, expected)


# ---------------------------------------------------------------- train_gan.main end to end

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny experts for SEEDS (once for the module)."""
    yield train_experts(tmp_path_factory.mktemp("gan"))
    data._load_cached.cache_clear()


@pytest.fixture(scope="module")
def gan_run(env):
    """train_gan.main once on the module's experts, recording every pair trained by train_generators (the
    seeds of an expert, stacked)."""
    calls = []
    original = train_gan.train_generators

    def recording(experts, generators, dafl, noise_seeds, device, desc, resumes):
        logs = original(experts, generators, dafl, noise_seeds, device, desc, resumes)
        for expert, generator in zip(experts, generators):
            calls.append({"desc": desc, "channels": generator.body[-3].out_channels,
                          "expert": {k: v.detach().clone() for k, v in expert.state_dict().items()},
                          "generator": {k: v.detach().clone() for k, v in generator.state_dict().items()}})
        return logs

    quality_calls = []
    original_quality = train_gan.sample_quality

    def recording_quality(expert, fmt, images, other_expert):
        quality = original_quality(expert, fmt, images, other_expert)
        quality_calls.append({"images": images.clone(), "quality": quality,
                              "expert": {k: v.clone() for k, v in expert.state_dict().items()},
                              "other": {k: v.clone() for k, v in other_expert.state_dict().items()}})
        return quality

    results = env["base"] / "gan_results"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setattr(train_gan, "train_generators", recording)
        patch.setattr(train_gan, "sample_quality", recording_quality)
        forbid_real_data(patch)
        summary = train_gan.main(gan_cfg(env["ckpt"], results))
    return {"summary": summary, "out": out.getvalue(), "calls": calls, "quality_calls": quality_calls,
            "results": results,
            "rows": read_rows(summary["outputs"]["jsonl"])}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_gan_end_to_end(env, gan_run):
    summary, rows, ckpt, results = gan_run["summary"], gan_run["rows"], env["ckpt"], gan_run["results"]
    assert summary["problem"] == "disjoint_mnist" and summary["seeds"] == SEEDS
    # a generator and its set per expert and seed
    assert summary["made"] == 2 * len(SEEDS) * len(TASKS) and summary["reused"] == 0
    assert summary["why_made"] == {"no checkpoint": 2 * len(SEEDS) * len(TASKS)}
    # the last printed line is the summary as JSON
    assert json.loads(gan_run["out"].strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    stem = results / "gan" / "disjoint_mnist"
    assert summary["outputs"] == {"jsonl": f"{stem}.jsonl", "csv": f"{stem}.csv", "config": f"{stem}.config.yaml"}
    assert all(Path(p).is_file() for p in summary["outputs"].values())

    assert [(r["seed"], r["task"]) for r in rows] == [(s, t) for s in SEEDS for t in TASKS]
    for row in rows:
        task, seed = row["task"], row["seed"]
        assert row["arch"] == ARCH and row["resumed"] is False
        # the generator checkpoint: plain types only, the right arch and settings
        path = generator_file(ckpt, task, seed)
        assert row["generator"] == str(path) and row["synthesizer"] == "dafl"
        stored = torch.load(path, weights_only=True)
        assert stored["arch"] == "generator"
        assert stored["arch_kwargs"] == {"latent_dim": 100, "out_channels": 1, "img_size": 32, "width": 8,
                                         "bn_eps": 0.8}
        assert stored["meta"]["task"] == task and stored["meta"]["expert_arch"] == ARCH
        assert stored["meta"]["input_format"] == InputFormat.of("mnist").as_dict()
        assert len(stored["meta"]["log"]) == 2  # one entry per epoch
        generator, _ = load_model(path, expect_arch="generator")
        with torch.no_grad():
            assert generator(torch.randn(2, 100)).shape == (2, 1, 32, 32)
        # the stored set: 8-bit images drawn from the generator
        images = torch.load(set_file(ckpt, task, seed), weights_only=True)["images"]
        assert row["set"] == str(set_file(ckpt, task, seed)) and images.dtype == torch.uint8
        assert images.shape == (80, 1, 32, 32) and row["images"] == 80
        # the grid of samples: a PNG of 8 x 8 images of 32 pixels with 1-pixel padding
        grid = Path(row["grid"])
        assert grid == results / "gan" / "dafl" / f"{set_file(ckpt, task, seed).stem}.png"
        assert grid.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(grid) as image:
            assert image.size == (8 * 33 + 1, 8 * 33 + 1)
        # quality figures, measured without real data
        assert row["expert_checkpoint"] == str(expert_file(ckpt, task, seed))
        share = row["class_share"]
        assert len(share) == 5 and sum(share) == pytest.approx(1.0)
        assert all(s * 64 == pytest.approx(round(s * 64)) for s in share)  # counts over eval_samples=64
        entropy = -sum(s * math.log(s) for s in share if s > 0)
        assert 0 <= row["balance"] <= 1 and row["balance"] == pytest.approx(entropy / math.log(5))
        assert 1 / 5 <= row["mean_confidence"] <= 1
        other_seed = next(s for s in SEEDS if s != seed)
        assert row["other_expert"] == str(expert_file(ckpt, task, other_seed))
        assert 0 <= row["cross_seed_agreement"] <= 1
        assert set(row["final_loss"]) == {"epoch", "loss", "one_hot", "info_entropy", "activation", "confidence"}
        assert row["final_loss"]["epoch"] == 1
        assert [e["epoch"] for e in row["history"]] == [0, 1] and all(0 < e["confidence"] <= 1 for e in row["history"])
    for task in TASKS:
        group = [r for r in rows if r["task"] == task]
        assert summary[f"dafl/{task}"]["balance"] == pytest.approx(sum(r["balance"] for r in group) / len(group))
        assert summary[f"dafl/{task}"]["mean_confidence"] == pytest.approx(
            sum(r["mean_confidence"] for r in group) / len(group))


def test_each_generator_trains_against_its_own_expert(env, gan_run):
    ckpt, calls = env["ckpt"], gan_run["calls"]
    assert len(calls) == len(SEEDS) * len(TASKS)
    experts = {(t, s): torch.load(expert_file(ckpt, t, s), weights_only=True)["state_dict"]
               for t in TASKS for s in SEEDS}
    # the four experts differ from each other, so a generator trained against the wrong one is caught
    keys = list(experts)
    distinct = all(not same_state(experts[a], experts[b]) for i, a in enumerate(keys) for b in keys[i + 1:])
    assert distinct
    for task in TASKS:
        for seed in SEEDS:
            stored = torch.load(generator_file(ckpt, task, seed), weights_only=True)
            matching = [c for c in calls if same_state(c["generator"], stored["state_dict"])]
            assert len(matching) == 1, f"no single training run produced the generator of {task} seed {seed}"
            call = matching[0]
            own = same_state(call["expert"], experts[(task, seed)])
            assert own, f"the generator of {task} seed {seed} was trained against another expert"
            assert call["desc"] == f"{len(SEEDS) * len(TASKS)} generator(s)" and call["channels"] == 1
    # and the generators themselves differ
    generators = [c["generator"] for c in calls]
    assert all(not same_state(a, b) for i, a in enumerate(generators) for b in generators[i + 1:])


def test_quality_figures_come_from_the_own_expert(env, gan_run):
    ckpt, rows, quality_calls = env["ckpt"], gan_run["rows"], gan_run["quality_calls"]
    assert len(quality_calls) == len(rows)
    for row in rows:  # one call per row
        task, seed = row["task"], row["seed"]
        other_seed = next(s for s in SEEDS if s != seed)
        own, _ = load_model(expert_file(ckpt, task, seed))
        other, _ = load_model(expert_file(ckpt, task, other_seed))
        [call] = [c for c in quality_calls if same_state(c["expert"], own.state_dict())]
        assert same_state(call["other"], other.state_dict())
        images = call["images"]
        assert images.shape == (64, 1, 32, 32) and images.min() >= 0 and images.max() <= 1
        with torch.no_grad():
            probs = own(prepare_input(images, InputFormat.of("mnist"))).softmax(dim=1)
            agree = other(prepare_input(images, InputFormat.of("mnist"))).argmax(dim=1) == probs.argmax(dim=1)
        assert row["mean_confidence"] == pytest.approx(probs.max(dim=1).values.mean().item(), abs=1e-5)
        assert row["cross_seed_agreement"] == pytest.approx(agree.float().mean().item(), abs=1e-6)
        share = torch.bincount(probs.argmax(dim=1), minlength=5).float() / 64
        assert row["class_share"] == pytest.approx(share.tolist(), abs=1e-6)


def test_rerun_trains_nothing_and_touches_no_file(env, gan_run, monkeypatch):
    ckpt, results = env["ckpt"], gan_run["results"]
    files = [generator_file(ckpt, t, s) for t in TASKS for s in SEEDS]
    files += [set_file(ckpt, t, s) for t in TASKS for s in SEEDS]
    files += [results / "gan" / "dafl" / f"{set_file(ckpt, t, s).stem}.png" for t in TASKS for s in SEEDS]
    before = mtimes(files)

    def forbidden(*args, **kwargs):
        raise Forbidden("a rerun must not train")

    monkeypatch.setattr(train_gan, "train_generators", forbidden)
    monkeypatch.setattr(train_gan, "train_generator", forbidden)
    monkeypatch.setattr(train_gan, "sample_images", forbidden)
    summary = train_gan.main(gan_cfg(ckpt, results))
    assert summary["made"] == 0 and summary["reused"] == 2 * len(files) // 3
    assert mtimes(files) == before
    again = read_rows(summary["outputs"]["jsonl"])
    strip = ("resumed", "config")
    assert [{k: v for k, v in r.items() if k not in strip} for r in again] == \
           [{k: v for k, v in r.items() if k not in strip} for r in gan_run["rows"]]
    assert all(r["resumed"] is True for r in again)


def test_resume_into_new_results_redraws_the_same_grids_without_training(env, gan_run, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise Forbidden("a resumed generator must not train")

    monkeypatch.setattr(train_gan, "train_generators", forbidden)
    moved = tmp_path / "moved_results"
    summary = train_gan.main(gan_cfg(env["ckpt"], moved))
    assert summary["made"] == 0
    for row in read_rows(summary["outputs"]["jsonl"]):
        grid = moved / "gan" / "dafl" / f"{Path(row['set']).stem}.png"
        assert row["grid"] == str(grid)
        assert grid.read_bytes() == (gan_run["results"] / "gan" / "dafl" / grid.name).read_bytes()


def test_other_settings_train_beside_the_old_generators(env, gan_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    copy_experts(env["ckpt"], ckpt, [(t, s) for t in TASKS for s in SEEDS])
    shutil.copytree(env["ckpt"] / "generators", ckpt / "generators")
    old = [generator_file(ckpt, t, s) for t in TASKS for s in SEEDS]
    before = mtimes(old)
    summary = train_gan.main(gan_cfg(ckpt, tmp_path / "results", "dafl.epochs=1", seeds=[1]))
    assert summary["made"] == 2 * len(TASKS) and summary["why_made"] == {"no checkpoint": 2 * len(TASKS)}
    assert mtimes(old) == before  # nothing overwritten
    for task in TASKS:
        new = generator_file(ckpt, task, 1, "dafl.epochs=1")
        assert new != generator_file(ckpt, task, 1) and new.parent == old[0].parent
        assert len(torch.load(new, weights_only=True)["meta"]["log"]) == 1


def test_force_retrains_into_a_copy(env, gan_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    copy_experts(env["ckpt"], ckpt, [(t, 1) for t in TASKS])
    shutil.copytree(env["ckpt"] / "generators", ckpt / "generators")
    summary = train_gan.main(gan_cfg(ckpt, tmp_path / "results", "force=true", seeds=[1]))
    assert summary["made"] == 2 * len(TASKS) and summary["why_made"] == {"force=true": 2 * len(TASKS)}
    # with only one seed of each expert on disk there is no other seed to agree with
    rows = read_rows(summary["outputs"]["jsonl"])
    assert all(r["cross_seed_agreement"] is None and r["other_expert"] is None for r in rows)


def test_missing_experts_name_the_training_command(env, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise Forbidden("nothing may be trained")

    monkeypatch.setattr(train_gan, "train_generators", forbidden)
    with pytest.raises(CheckpointError) as err:
        train_gan.main(gan_cfg(tmp_path / "empty", tmp_path / "results"))
    message = str(err.value)
    for task in TASKS:
        for seed in SEEDS:
            assert f"python train_source_networks.py dataset={task} arch={ARCH} seeds=[{seed}]" in message
    assert not (tmp_path / "results").exists()

    # only what is missing is named
    partial = tmp_path / "partial"
    copy_experts(env["ckpt"], partial, [("first5_mnist", 1), ("first5_mnist", 2), ("last5_mnist", 1)])
    with pytest.raises(CheckpointError) as err:
        train_gan.main(gan_cfg(partial, tmp_path / "results"))
    message = str(err.value)
    assert f"python train_source_networks.py dataset=last5_mnist arch={ARCH} seeds=[2]" in message
    assert "dataset=first5_mnist" not in message and "seeds=[1]" not in message
    assert not (partial / "generators").exists()


def test_unknown_problem_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError) as err:
        train_gan.main(gan_cfg(tmp_path / "ckpt", tmp_path / "results", "problem=disjoint"))
    assert "disjoint_mnist" in str(err.value) and "mnist_cifar10" in str(err.value)


def test_an_interrupted_generator_resumes_and_ends_with_the_uninterrupted_weights(env, tmp_path, monkeypatch):
    import training

    longer = ["dafl.epochs=4"]
    ckpt, uncut = tmp_path / "ckpt", tmp_path / "uncut"
    for folder in (ckpt, uncut):
        copy_experts(env["ckpt"], folder, [(t, s) for t in TASKS for s in SEEDS])
    whole = train_gan.main(gan_cfg(uncut, tmp_path / "whole", *longer, seeds=[1]))
    reference = {t: torch.load(generator_file(uncut, t, 1, *longer), weights_only=True) for t in TASKS}
    original = training.Resume.save
    saves = []

    def killed_after_two(self, state):
        original(self, state)
        saves.append(len(state["log"]))
        if len(saves) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(training.Resume, "save", killed_after_two)
        with pytest.raises(KeyboardInterrupt):
            train_gan.main(gan_cfg(ckpt, tmp_path / "cut", *longer, seeds=[1]))
    first = generator_file(ckpt, TASKS[0], 1, *longer)
    assert not first.exists() and first.with_name(first.stem + ".resume.pt").is_file()
    resumed = train_gan.main(gan_cfg(ckpt, tmp_path / "cut", *longer, seeds=[1]))
    assert resumed["made"] == 2 * len(TASKS)
    for task in TASKS:
        stored = torch.load(generator_file(ckpt, task, 1, *longer), weights_only=True)
        assert same_state(stored["state_dict"], reference[task]["state_dict"])
        assert stored["meta"]["log"] == reference[task]["meta"]["log"] and len(stored["meta"]["log"]) == 4
    assert resumed["dafl/first5_mnist"] == whole["dafl/first5_mnist"]



# ---------------------------------------------------------------- model inversion through the stage

def test_inversion_sets_are_made_by_the_stage_and_a_killed_run_keeps_its_finished_batches(env, tmp_path, monkeypatch):
    import training

    ckpt = tmp_path / "ckpt"
    copy_experts(env["ckpt"], ckpt, [(t, s) for t in TASKS for s in SEEDS])
    whole = train_gan.main(gan_cfg(ckpt, tmp_path / "whole", "synthesizers=[inversion]", seeds=[1]))
    assert whole["made"] == len(TASKS) and "inversion/first5_mnist" in whole
    path = set_file(ckpt, "first5_mnist", 1, synthesizer="inversion")
    reference = torch.load(path, weights_only=True)
    assert reference["images"].shape == (20, 1, 32, 32) and reference["meta"]["recipe"]["synthesizer"] == "inversion"
    for p in (ckpt / "synthetic").rglob("*.pt"):
        p.unlink()
    saves = []
    original = training.Resume.save

    def killed_after_two_batches(self, state):
        original(self, state)
        saves.append(len(state["log"]))
        if len(saves) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(training.Resume, "save", killed_after_two_batches)
        with pytest.raises(KeyboardInterrupt):
            train_gan.main(gan_cfg(ckpt, tmp_path / "cut", "synthesizers=[inversion]", seeds=[1]))
    made = []
    real_invert = train_gan.INVERSIONS["inversion"]
    monkeypatch.setitem(train_gan.INVERSIONS, "inversion",
                        lambda *args: made.append(args[3]) or real_invert(*args))
    train_gan.main(gan_cfg(ckpt, tmp_path / "cut", "synthesizers=[inversion]", seeds=[1]))
    assert made == [4] + [8, 8, 4]  # first5: only its last batch (of 8, 8, 4) was left; last5: all three
    assert torch.equal(torch.load(path, weights_only=True)["images"], reference["images"])


def test_deepinversion_on_experts_without_batchnorm_fails_before_any_work(env, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise Forbidden("nothing may run")

    monkeypatch.setattr(train_gan, "make_set", forbidden)
    with pytest.raises(ConfigError, match="no BatchNorm layer"):
        train_gan.main(gan_cfg(env["ckpt"], tmp_path / "results", "synthesizers=[deepinversion]"))



def test_stacked_generators_train_as_each_seed_alone(env, tmp_path):
    """In float64: in float32, Adam's normalised steps turn the round-off in gradients that are zero in exact
    arithmetic (the conv biases before batch norm) into visible differences, which float64 leaves at ~1e-9."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        compare_stacked_and_apart_generators(env, tmp_path)
    finally:
        torch.set_default_dtype(previous)


def compare_stacked_and_apart_generators(env, tmp_path):
    together, apart = tmp_path / "together", tmp_path / "apart"
    for folder in (together, apart):
        copy_experts(env["ckpt"], folder, [(t, s) for t in TASKS for s in SEEDS])
    train_gan.main(gan_cfg(together, tmp_path / "r1", "dafl.stack_seeds=true"))
    train_gan.main(gan_cfg(apart, tmp_path / "r2", "dafl.stack_seeds=false"))
    for task in TASKS:
        for seed in SEEDS:
            a = torch.load(generator_file(together, task, seed, "dafl.stack_seeds=true"), weights_only=True)
            b = torch.load(generator_file(apart, task, seed, "dafl.stack_seeds=false"), weights_only=True)
            for key in a["state_dict"]:
                torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], atol=1e-7, rtol=1e-6, msg=key)
            # both experts (one shape) and both seeds were one stack
            assert a["meta"]["row"]["stacked_generators"] == len(SEEDS) * len(TASKS)
            assert b["meta"]["row"]["stacked_generators"] == 1
