"""problems.py and the cross-domain input conversion: global labels, problems as config data, expert_logits."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import data
from config import ConfigError, MergeConfig, ProblemSpec, ExpertSpec, parse_args
from data import InputFormat, convert_channels, prepare_input, to_unit
from conftest import square_digits, write_idx
from problems import build_problem, expert_logits


# ---------------------------------------------------------------- a tiny fake data root

def make_data_root(root: Path, *, n_train: int = 200, n_test: int = 40, n_cifar: int = 10,
                   fashion: bool = False, seed: int = 0) -> dict:
    """MNIST/raw (and FashionMNIST/raw) IDX files and cifar-10-batches-py pickles under ``root``.

    Returns ``{source: {split: (images, labels)}}`` with the arrays written (MNIST-style images 28x28,
    CIFAR images as uint8 [n, 3, 32, 32])."""
    rng = np.random.default_rng(seed)
    arrays: dict = {}
    idx_names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    for source, folder in (("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")):
        if source == "fashion_mnist" and not fashion:
            continue
        raw = root / folder / "raw"
        raw.mkdir(parents=True)
        arrays[source] = {}
        for split, n in (("train", n_train), ("test", n_test)):
            labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
            images = square_digits(labels, rng)
            write_idx(raw / idx_names[split][0], images)
            write_idx(raw / idx_names[split][1], labels)
            arrays[source][split] = (images, labels.astype(np.int64))
    if n_cifar:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        arrays["cifar10"] = {}
        for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
            parts = []
            for name in names:
                rows = rng.integers(0, 256, size=(n_cifar, 3072), dtype=np.uint8)
                labels = rng.permutation(np.arange(n_cifar) % 10)
                with open(folder / name, "wb") as f:
                    pickle.dump({"data": rows, "labels": [int(v) for v in labels]}, f)
                parts.append((rows.reshape(-1, 3, 32, 32), labels.astype(np.int64)))
            arrays["cifar10"][split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return arrays


@pytest.fixture
def fake(tmp_path):
    """A fresh fake root (MNIST, Fashion-MNIST, CIFAR-10): ``(root, arrays)``."""
    data._load_cached.cache_clear()
    root = tmp_path / "data"
    arrays = make_data_root(root, fashion=True)
    yield root, arrays
    data._load_cached.cache_clear()


def problem_of(cfg: MergeConfig, root, test_limit=None):
    return build_problem(cfg.problem, cfg.problems[cfg.problem], cfg.tasks, str(root), test_limit)


def padded(images28: np.ndarray) -> torch.Tensor:
    out = torch.zeros(len(images28), 1, 32, 32, dtype=torch.uint8)
    out[:, 0, 2:30, 2:30] = torch.from_numpy(images28)
    return out


# ---------------------------------------------------------------- cross-domain conversion

MNIST_FMT = InputFormat.of("mnist")
CIFAR_FMT = InputFormat.of("cifar10")


def unnormalise(x: torch.Tensor, fmt: InputFormat) -> torch.Tensor:
    mean = torch.tensor(fmt.mean).view(1, -1, 1, 1)
    std = torch.tensor(fmt.std).view(1, -1, 1, 1)
    return x * std + mean


def test_grey_image_for_an_rgb_expert_repeats_the_channel():
    grey = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    rgb = convert_channels(grey, 3)
    assert rgb.shape == (4, 3, 32, 32)
    for c in range(3):
        assert torch.equal(rgb[:, c], grey[:, 0])
    shown = prepare_input(grey, CIFAR_FMT)  # normalised with CIFAR-10's per-channel statistics
    assert shown.shape == (4, 3, 32, 32)
    pixels = unnormalise(shown, CIFAR_FMT)
    for c in range(3):
        torch.testing.assert_close(pixels[:, c], grey[:, 0], atol=1e-6, rtol=0)
    # the channels differ after normalisation only because CIFAR's statistics differ per channel
    expected = (grey - torch.tensor(CIFAR_FMT.mean).view(1, 3, 1, 1)) / torch.tensor(CIFAR_FMT.std).view(1, 3, 1, 1)
    torch.testing.assert_close(shown, expected)


def test_rgb_image_for_a_grey_expert_is_its_luminance():
    rgb = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    luminance = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
    torch.testing.assert_close(convert_channels(rgb, 1), luminance, atol=1e-6, rtol=0)
    shown = prepare_input(rgb, MNIST_FMT)
    assert shown.shape == (4, 1, 32, 32)
    torch.testing.assert_close(unnormalise(shown, MNIST_FMT), luminance, atol=1e-6, rtol=0)
    # converted on [0,1] pixels, not after normalising with CIFAR's statistics
    wrong = convert_channels(prepare_input(rgb, CIFAR_FMT), 1)
    assert not torch.allclose(shown, wrong, atol=1e-2)


def test_same_domain_is_only_normalised():
    grey = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(prepare_input(grey, MNIST_FMT), (grey - 0.1307) / 0.3081)
    rgb = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(unnormalise(prepare_input(rgb, CIFAR_FMT), CIFAR_FMT), rgb, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- build_problem

def test_disjoint_mnist_labels_are_the_digits(fake):
    root, arrays = fake
    images, digits = arrays["mnist"]["test"]
    problem = problem_of(MergeConfig(problem="disjoint_mnist"), root)
    assert problem.name == "disjoint_mnist"
    assert problem.tasks == ["first5_mnist", "last5_mnist"] and problem.archs == ["lenet5", "lenet5"]
    assert [m.tolist() for m in problem.label_maps] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert problem.num_classes == 10
    low, high = digits < 5, digits >= 5
    assert torch.equal(problem.domains[0].labels, torch.from_numpy(digits[low]))
    assert torch.equal(problem.domains[1].labels, torch.from_numpy(digits[high]))
    assert torch.equal(problem.domains[0].images, padded(images[low]))
    assert torch.equal(problem.domains[1].images, padded(images[high]))
    assert [d.expert for d in problem.domains] == [0, 1]
    assert torch.equal(problem.labels, torch.from_numpy(np.concatenate([digits[low], digits[high]])))
    assert problem.domain.tolist() == [0] * int(low.sum()) + [1] * int(high.sum())
    assert problem.domain.dtype == torch.long


def test_test_limit_is_per_expert(fake):
    root, arrays = fake
    digits = arrays["mnist"]["test"][1]
    problem = problem_of(MergeConfig(problem="disjoint_mnist"), root, test_limit=3)
    assert problem.domain.tolist() == [0, 0, 0, 1, 1, 1]
    assert problem.labels.tolist() == digits[digits < 5][:3].tolist() + digits[digits >= 5][:3].tolist()


def test_mnist_cifar10_shifts_cifar_labels(fake):
    root, arrays = fake
    problem = problem_of(MergeConfig(problem="mnist_cifar10"), root)
    mnist_images, mnist_labels = arrays["mnist"]["test"]
    cifar_images, cifar_labels = arrays["cifar10"]["test"]
    assert problem.num_classes == 20
    assert [m.tolist() for m in problem.label_maps] == [list(range(10)), list(range(10, 20))]
    assert torch.equal(problem.domains[0].labels, torch.from_numpy(mnist_labels))
    assert torch.equal(problem.domains[1].labels, torch.from_numpy(cifar_labels + 10))
    assert problem.domains[0].images.shape == (len(mnist_labels), 1, 32, 32)  # native channels kept
    assert torch.equal(problem.domains[1].images, torch.from_numpy(cifar_images))
    assert problem.domain.tolist() == [0] * len(mnist_labels) + [1] * len(cifar_labels)


def test_a_three_expert_problem_defined_only_in_config(fake):
    root, arrays = fake
    cfg = parse_args(MergeConfig, ["problem=trio", f"data_dir={root}",
                                   "problems.trio.experts=[{task: mnist}, {task: fashion_mnist}, {task: cifar10}]"])
    assert cfg.problems["trio"] == ProblemSpec([ExpertSpec("mnist"), ExpertSpec("fashion_mnist"), ExpertSpec("cifar10")])
    problem = problem_of(cfg, root)
    assert problem.num_classes == 30
    assert [m.tolist() for m in problem.label_maps] == [list(range(k, k + 10)) for k in (0, 10, 20)]
    for k, source in enumerate(["mnist", "fashion_mnist", "cifar10"]):
        assert torch.equal(problem.domains[k].labels, torch.from_numpy(arrays[source]["test"][1] + 10 * k))
    assert problem.labels.max() == 29
    assert torch.bincount(problem.domain).tolist() == [40, 40, 10]


def test_tasks_and_problems_from_a_yaml_file(fake, tmp_path):
    root, arrays = fake
    yaml_file = tmp_path / "split_cifar.yaml"
    yaml_file.write_text(
        "problem: split_cifar\n"
        "tasks:\n"
        "  cifar_odd: {source: cifar10, classes: [1, 3, 5]}\n"
        "  cifar_even: {source: cifar10, classes: [0, 2]}\n"
        "problems:\n"
        "  split_cifar:\n"
        "    experts: [{task: cifar_odd}, {task: cifar_even, arch: lenet5_half}]\n")
    cfg = parse_args(MergeConfig, [str(yaml_file)])
    problem = problem_of(cfg, root)
    assert problem.archs == ["lenet5", "lenet5_half"]
    assert [m.tolist() for m in problem.label_maps] == [[0, 1, 2], [3, 4]]
    assert problem.num_classes == 5
    labels = arrays["cifar10"]["test"][1]
    to_global = {1: 0, 3: 1, 5: 2, 0: 3, 2: 4}
    expected_odd = [to_global[c] for c in labels if c in (1, 3, 5)]
    expected_even = [to_global[c] for c in labels if c in (0, 2)]
    assert problem.domains[0].labels.tolist() == expected_odd
    assert problem.domains[1].labels.tolist() == expected_even


def test_overlapping_tasks_are_refused(fake):
    root, _ = fake
    cfg = parse_args(MergeConfig, ["problem=clash", "problems.clash.experts=[{task: mnist}, {task: first5_mnist}]"])
    with pytest.raises(ConfigError) as err:
        problem_of(cfg, root)
    assert "first5_mnist" in str(err.value) and "mnist" in str(err.value) and "disjoint" in str(err.value)


def test_same_class_ids_of_different_sources_do_not_clash(fake):
    root, _ = fake
    cfg = parse_args(MergeConfig, ["problem=ok", "problems.ok.experts=[{task: first5_mnist}, {task: fashion_mnist}]"])
    assert problem_of(cfg, root).num_classes == 15


def test_unknown_task_is_a_config_error(fake):
    root, _ = fake
    cfg = parse_args(MergeConfig, ["problem=typo", "problems.typo.experts=[{task: mnist}, {task: cifar_10}]"])
    with pytest.raises(ConfigError) as err:
        problem_of(cfg, root)
    assert "cifar_10" in str(err.value) and "cifar10" in str(err.value)  # the unknown one and the choices


def test_unknown_task_is_refused_before_loading_data(tmp_path):
    cfg = parse_args(MergeConfig, ["problem=typo", "problems.typo.experts=[{task: mnist}, {task: nope}]"])
    with pytest.raises(ConfigError, match="nope"):
        problem_of(cfg, tmp_path / "no_such_root")


def test_a_single_expert_is_not_a_problem(fake):
    root, _ = fake
    cfg = parse_args(MergeConfig, ["problem=one", "problems.one.experts=[{task: mnist}]"])
    with pytest.raises(ConfigError, match="two"):
        problem_of(cfg, root)


# ---------------------------------------------------------------- expert_logits

class Recorder(nn.Module):
    """A fake expert: records what it is shown and answers with the first ``k`` input values as logits."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return x.flatten(1)[:, :self.k].double()  # expert_logits must hand back float32


def test_expert_logits_without_augment(fake):
    root, _ = fake
    problem = problem_of(MergeConfig(problem="mnist_cifar10"), root)
    models, formats = [Recorder(10), Recorder(7)], [MNIST_FMT, CIFAR_FMT]
    logits = expert_logits(problem, models, formats, torch.device("cpu"), batch_size=16)
    n = len(problem.labels)
    assert [o.shape for o in logits] == [(n, 10), (n, 7)]
    assert all(o.dtype == torch.float32 for o in logits)
    x01 = torch.cat([to_unit(d.images) for d in problem.domains[:1]])
    grey_seen = torch.cat(models[0].inputs)
    rgb_seen = torch.cat(models[1].inputs)
    assert grey_seen.shape == (n, 1, 32, 32) and rgb_seen.shape == (n, 3, 32, 32)
    n0 = len(problem.domains[0].labels)
    torch.testing.assert_close(unnormalise(grey_seen[:n0], MNIST_FMT), x01, atol=1e-6, rtol=0)
    torch.testing.assert_close(unnormalise(rgb_seen[n0:], CIFAR_FMT), to_unit(problem.domains[1].images),
                               atol=1e-6, rtol=0)
    # rows follow problem.labels order: each row is what that model saw in that position
    torch.testing.assert_close(logits[1], rgb_seen.flatten(1)[:, :7].float())


def test_every_expert_sees_the_same_augmented_image(fake):
    root, _ = fake
    problem = problem_of(MergeConfig(problem="mnist_cifar10"), root)
    generator = torch.Generator().manual_seed(0)
    given, made, units = [], [], []

    def augment(x, unit):  # random, so two calls on one batch would differ
        given.append(x.clone())
        units.append(unit)
        out = (x + 0.2 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
        made.append(out.clone())
        return out

    models, formats = [Recorder(5), Recorder(5)], [MNIST_FMT, CIFAR_FMT]
    batch_size = 7
    logits = expert_logits(problem, models, formats, torch.device("cpu"), batch_size, augment=augment)
    sizes = [len(d.labels) for d in problem.domains]
    assert len(given) == sum(-(-n // batch_size) for n in sizes)  # once per batch, not once per expert
    # each batch comes with its source's normalisation std: the noises' unit
    first = -(-sizes[0] // batch_size)
    assert units == [MNIST_FMT.std] * first + [CIFAR_FMT.std] * (len(given) - first)
    assert [len(m.inputs) for m in models] == [len(given)] * 2
    # augment works on the [0,1] images in their native channels
    torch.testing.assert_close(torch.cat(given[:-(-sizes[0] // batch_size)]), to_unit(problem.domains[0].images))
    torch.testing.assert_close(torch.cat(given[-(-sizes[0] // batch_size):]), to_unit(problem.domains[1].images))
    for augmented, grey_in, rgb_in in zip(made, models[0].inputs, models[1].inputs):
        grey_px, rgb_px = unnormalise(grey_in, MNIST_FMT), unnormalise(rgb_in, CIFAR_FMT)
        torch.testing.assert_close(rgb_px, convert_channels(augmented, 3), atol=1e-5, rtol=0)
        torch.testing.assert_close(grey_px, convert_channels(augmented, 1), atol=1e-5, rtol=0)
        # the grey expert's image is the luminance of the RGB expert's image
        luminance = 0.299 * rgb_px[:, 0:1] + 0.587 * rgb_px[:, 1:2] + 0.114 * rgb_px[:, 2:3]
        torch.testing.assert_close(grey_px, luminance, atol=1e-5, rtol=0)
    assert [o.shape for o in logits] == [(sum(sizes), 5)] * 2
    # the augmentation reached the logits
    plain = expert_logits(problem, [Recorder(5), Recorder(5)], formats, torch.device("cpu"), batch_size)
    assert not torch.allclose(plain[0], logits[0])
