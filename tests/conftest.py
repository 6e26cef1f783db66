"""Shared fixtures: the real data root (or a skip), tiny fake data roots in torchvision's layout, and guards.

Tests import the project's modules (``config``, ``data``, ``archs``, ``common``, ...) as top-level modules,
so the repository root goes on ``sys.path`` here.
"""
from __future__ import annotations

import gzip
import itertools
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# MOE_WITHOUT_POT=1 runs the suite as on a machine without POT (the GPU machine has none): "import ot" fails
if os.environ.get("MOE_WITHOUT_POT"):
    sys.modules["ot"] = None

import torch  # noqa: E402

from fusion import HAS_POT, POT_MISSING  # noqa: E402

# The tests run tiny tensors: intra-op threads only add overhead, and on a busy 2-core machine OpenMP workers
# oversubscribe the cores (a LeNet step measured 10 ms with one thread against ~290 ms with two).
# Set OMP_NUM_THREADS to choose another count.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

DATA_DIR_ENV = "MOE_DATA_DIR"


class Forbidden(AssertionError):
    """Raised by a patched function that the code under test must not call."""


def tiny_resnet(seed: int, classes: int, depth: int = 18, batch_norm: bool = True, bias: bool = False):
    """A ResNet at width 1/16 (4-8-16-32 channels) on 2-channel inputs, in float64, with random batch-norm parameters
    and statistics, so that folding into them is exercised and no two channels tie."""
    from archs.resnet import ResNet

    torch.manual_seed(seed)
    net = ResNet(2, classes, depth=depth, width=0.0625, batch_norm=batch_norm, bias=bias).double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def guard_training_splits(monkeypatch, targets, what: str, splits: list | None = None) -> None:
    """Patch every ``(module, loader name)`` of ``targets`` so that loading any split but the test split raises
    Forbidden naming ``what``; ``splits``, if given, records every split asked for."""
    def guarded(real):
        def load(*args, **kwargs):
            split = kwargs["split"] if "split" in kwargs else args[1]
            if splits is not None:
                splits.append(split)
            if split != "test":
                raise Forbidden(f"{what} loaded the {split!r} split")
            return real(*args, **kwargs)
        return load

    for module, name in targets:
        monkeypatch.setattr(module, name, guarded(getattr(module, name)))

# Two sharded MLP parents (digits 0-4 and 5-9, both with ten-way heads): disjoint_mnist in weight-space
# form, shared by the fusion tests; a test appends more problems under the `problems:` key.
SHARD_TASKS_YAML = """
tasks:
  s_p0: {source: mnist, split: shard, parts: 2, part: 0}
  s_p1: {source: mnist, split: shard, parts: 2, part: 1}
"""
SHARD_PROBLEMS_YAML = """
problems:
  shard:
    shared_labels: true
    experts:
      - {task: s_p0, arch: mlp, arch_kwargs: {widths: [16]}}
      - {task: s_p1, arch: mlp, arch_kwargs: {widths: [16]}}
"""

NO_DATA_REASON = "no data root configured: set MOE_DATA_DIR or run `make data`"


# ---------------------------------------------------------------- optional dependencies

def pytest_collection_modifyitems(config, items):
    """Without POT, skip (with the reason) every test of OTFusion or CLAFusion: by name, or marked ``pot``."""
    if HAS_POT and not os.environ.get("MOE_WITHOUT_POT"):
        return
    for item in items:
        if "otfusion" in item.nodeid or "clafusion" in item.nodeid or item.get_closest_marker("pot"):
            item.add_marker(pytest.mark.skip(reason=POT_MISSING))


# ---------------------------------------------------------------- the real data root

@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The prepared real data root: ``$MOE_DATA_DIR``, else ``REPO/data`` if it holds MNIST/raw; else skip."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        root = Path(env).expanduser()
        if not (root / "MNIST" / "raw").is_dir():
            pytest.skip(f"{NO_DATA_REASON} ({DATA_DIR_ENV}={env} has no MNIST/raw)")
        return root
    root = REPO_ROOT / "data"
    if (root / "MNIST" / "raw").is_dir():
        return root
    pytest.skip(NO_DATA_REASON)


# ---------------------------------------------------------------- guards

@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Tests never download: a load that would fall back to torchvision fails at once instead."""
    import data

    def refuse(name, root):
        raise RuntimeError("network access is disabled in the tests")

    monkeypatch.setattr(data, "_torchvision_download", refuse)


@pytest.fixture(autouse=True)
def _restore_torch_determinism():
    """``seed_everything(deterministic=True)`` flips a process-wide switch; keep it from leaking between tests."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    changed = (torch.are_deterministic_algorithms_enabled() != enabled
               or torch.is_deterministic_algorithms_warn_only_enabled() != warn_only)
    if changed:  # the call is slow the first time (it imports more of torch), so only when needed
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


# ---------------------------------------------------------------- tiny fake data roots

IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write ``array`` (uint8, 3-d images or 1-d labels) as an IDX file with a proper big-endian header."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = {3: 2051, 1: 2049}[array.ndim]
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_cifar_batch(path: Path, rows: np.ndarray, labels: np.ndarray, bytes_keys: bool = False) -> Path:
    """A CIFAR-10 python batch: ``data`` uint8 ``[n, 3072]`` (R plane, G plane, B plane) and ``labels``."""
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    batch = {key("data"): np.ascontiguousarray(rows, dtype=np.uint8),
             key("labels"): [int(v) for v in labels]}
    if bytes_keys:
        batch[b"batch_label"] = b"fake batch"
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return path


def balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels with every class 0..9 present (for n >= 10), shuffled."""
    return rng.permutation(np.arange(n) % 10).astype(np.uint8)


def square_digits(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28x28 images on dim noise with a bright 5x5 square whose position encodes the class (easy to learn)."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        top, left = 4 + 13 * (int(c) // 5), 1 + 5 * (int(c) % 5)
        images[i, top:top + 5, left:left + 5] = 255
    return images


@dataclass
class FakeRoot:
    """A fake data root and the arrays written into it (MNIST images are the unpadded 28x28 ones)."""

    root: Path
    mnist: dict = field(default_factory=dict)  # split -> (images uint8 [n,28,28], labels uint8 [n])
    cifar: dict = field(default_factory=dict)  # split -> (rows uint8 [n,3072], labels [n])

    @property
    def mnist_raw(self) -> Path:
        return self.root / "MNIST" / "raw"

    @property
    def cifar_dir(self) -> Path:
        return self.root / "cifar-10-batches-py"


def build_fake_root(root: Path, *, n_mnist_train: int = 200, n_mnist_test: int = 100, gz: bool = False,
                    squares: bool = False, n_cifar: int = 20, bytes_keys: bool = False,
                    seed: int = 0) -> FakeRoot:
    """MNIST/raw IDX files and cifar-10-batches-py pickles (5 train batches of ``n_cifar`` + a test batch)."""
    rng = np.random.default_rng(seed)
    fake = FakeRoot(root)
    fake.mnist_raw.mkdir(parents=True)
    for split, n in (("train", n_mnist_train), ("test", n_mnist_test)):
        labels = balanced_labels(n, rng)
        images = square_digits(labels, rng) if squares else rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)
        image_name, label_name = IDX_NAMES[split]
        write_idx(fake.mnist_raw / image_name, images, gz)
        write_idx(fake.mnist_raw / label_name, labels, gz)
        fake.mnist[split] = (images, labels)
    if n_cifar:
        fake.cifar_dir.mkdir(parents=True)
        rows_all, labels_all = [], []
        for i in range(1, 6):
            rows, labels = rng.integers(0, 256, size=(n_cifar, 3072), dtype=np.uint8), balanced_labels(n_cifar, rng)
            write_cifar_batch(fake.cifar_dir / f"data_batch_{i}", rows, labels, bytes_keys)
            rows_all.append(rows)
            labels_all.append(labels)
        fake.cifar["train"] = (np.concatenate(rows_all), np.concatenate(labels_all))
        rows, labels = rng.integers(0, 256, size=(n_cifar, 3072), dtype=np.uint8), balanced_labels(n_cifar, rng)
        write_cifar_batch(fake.cifar_dir / "test_batch", rows, labels, bytes_keys)
        fake.cifar["test"] = (rows, labels)
    return fake


@pytest.fixture
def make_fake_root(tmp_path):
    """A factory: ``make_fake_root(**options of build_fake_root)`` -> a fresh FakeRoot under tmp_path."""
    counter = itertools.count()

    def make(**kwargs) -> FakeRoot:
        return build_fake_root(tmp_path / f"data{next(counter)}", **kwargs)

    return make


@pytest.fixture
def fake_root(make_fake_root) -> FakeRoot:
    """A tiny fake data root with random MNIST-like and CIFAR-like data (uncompressed IDX, str pickle keys)."""
    return make_fake_root()
