"""data.py: uint8 loading from a torchvision-layout root, task subsets, the disk cache, errors, input formats."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torchvision.transforms.v2.functional import resize

import data
from config import TaskSpec
from data import (DataError, InputFormat, convert_channels, load_source, load_task, normalise, prepare_input,
                  to_problem_size, to_unit)


def load(fake, name="mnist", split="train"):
    return load_source(name, split, fake.root, download=False)


# ---------------------------------------------------------------- MNIST-style IDX files

@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_shapes_padding_and_labels(make_fake_root, gz, split):
    fake = make_fake_root(gz=gz, n_cifar=0)
    suffix = ".gz" if gz else ""
    assert (fake.mnist_raw / f"t10k-images-idx3-ubyte{suffix}").is_file()
    assert not (fake.mnist_raw / f"t10k-images-idx3-ubyte{'' if gz else '.gz'}").exists()
    images, labels = load(fake, "mnist", split)
    original, original_labels = fake.mnist[split]
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert images.shape == (len(original), 1, 32, 32)
    assert labels.shape == (len(original),)
    assert torch.equal(images[:, 0, 2:30, 2:30], torch.from_numpy(original))
    border = images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.sum() == 0  # Pad(2) with zeros
    assert torch.equal(labels, torch.from_numpy(original_labels.astype(np.int64)))


def test_fashion_mnist_reads_its_own_folder(fake_root):
    (fake_root.root / "MNIST").rename(fake_root.root / "FashionMNIST")
    images, labels = load(fake_root, "fashion_mnist", "test")
    assert torch.equal(images[:, 0, 2:30, 2:30], torch.from_numpy(fake_root.mnist["test"][0]))
    with pytest.raises(DataError):
        load(fake_root, "mnist", "test")


def test_any_image_of_a_source_becomes_the_problems_32x32_as_its_sets_are(fake_root):
    """MNIST's own 28x28 is padded as the loader pads it, 32x32 is taken as is, other sizes are resized to 28x28
    first (the digit keeps its margin); a CIFAR-10 image of another size is resized to 32x32."""
    images, _ = load(fake_root, "mnist", "test")
    originals = torch.from_numpy(fake_root.mnist["test"][0]).unsqueeze(1)
    assert torch.equal(to_problem_size(originals, "mnist"), images)
    assert torch.equal(to_problem_size(to_unit(originals), "fashion_mnist"), to_unit(images))
    assert to_problem_size(images, "mnist") is images
    large = torch.rand(2, 3, 56, 40)
    padded = to_problem_size(large, "mnist")
    border = padded.clone()
    border[..., 2:30, 2:30] = 0
    assert padded.shape == (2, 3, 32, 32) and border.abs().sum() == 0
    torch.testing.assert_close(padded[..., 2:30, 2:30], resize(large, [28, 28], antialias=True), rtol=0, atol=0)
    torch.testing.assert_close(to_problem_size(large, "cifar10"), resize(large, [32, 32], antialias=True),
                               rtol=0, atol=0)


# ---------------------------------------------------------------- CIFAR-10 pickles

@pytest.mark.parametrize("bytes_keys", [False, True], ids=["str_keys", "bytes_keys"])
def test_cifar_layout_and_labels(make_fake_root, bytes_keys):
    fake = make_fake_root(bytes_keys=bytes_keys, n_cifar=20)
    for split, n in (("train", 100), ("test", 20)):
        images, labels = load(fake, "cifar10", split)
        rows, original_labels = fake.cifar[split]
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape == (n, 3, 32, 32) and labels.shape == (n,)
        # row layout: 1024 red (row-major 32x32), then 1024 green, then 1024 blue
        for channel in range(3):
            plane = rows[:, channel * 1024:(channel + 1) * 1024].reshape(n, 32, 32)
            assert torch.equal(images[:, channel], torch.from_numpy(plane))
        assert images[3, 0, 0, 1] == rows[3, 1]
        assert images[3, 0, 1, 0] == rows[3, 32]
        assert images[3, 1, 0, 0] == rows[3, 1024]
        assert images[3, 2, 31, 31] == rows[3, 3071]
        # train batches are concatenated in order 1..5
        assert torch.equal(labels, torch.from_numpy(original_labels.astype(np.int64)))


# ---------------------------------------------------------------- tasks

def test_load_task_local_labels_keep_dataset_order(fake_root):
    images, labels = load(fake_root, "mnist", "train")
    task = load_task(TaskSpec("mnist", [5, 6, 7, 8, 9]), "train", fake_root.root, download=False)
    keep = labels >= 5
    assert task.classes == [5, 6, 7, 8, 9] and task.source == "mnist"
    assert torch.equal(task.labels, labels[keep] - 5)
    assert torch.equal(task.images, images[keep])
    assert task.labels.dtype == torch.int64


def test_load_task_unsorted_classes(fake_root):
    images, labels = load(fake_root, "mnist", "test")
    task = load_task(TaskSpec("mnist", [7, 2]), "test", fake_root.root, download=False)
    keep = (labels == 7) | (labels == 2)
    assert torch.equal(task.images, images[keep])
    assert torch.equal(task.labels, (labels[keep] == 2).long())  # 7 -> 0, 2 -> 1
    assert set(task.labels.tolist()) == {0, 1}


def test_load_task_all_classes(fake_root):
    images, labels = load(fake_root, "cifar10", "test")
    task = load_task(TaskSpec("cifar10"), "test", fake_root.root, download=False)
    assert task.classes == list(range(10))
    assert torch.equal(task.images, images) and torch.equal(task.labels, labels)


def test_load_task_limit(fake_root):
    full = load_task(TaskSpec("mnist", [0, 1, 2, 3, 4]), "train", fake_root.root, download=False)
    short = load_task(TaskSpec("mnist", [0, 1, 2, 3, 4]), "train", fake_root.root, limit=7, download=False)
    assert len(full.labels) == 100 and len(short.labels) == 7
    assert torch.equal(short.images, full.images[:7]) and torch.equal(short.labels, full.labels[:7])


@pytest.mark.parametrize("classes", [[10], [-1], [1, 1], [], [0, 11]])
def test_load_task_invalid_classes(fake_root, classes):
    with pytest.raises(DataError) as err:
        load_task(TaskSpec("mnist", classes), "train", fake_root.root, download=False)
    assert "0..9" in str(err.value)


def test_class_subset_with_absent_class():
    images, labels = torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 3])
    sub_images, sub_labels = data.class_subset(images, labels, [3, 5])
    assert sub_labels.tolist() == [0]


# ---------------------------------------------------------------- disk cache

def test_disk_cache_is_written_and_reused(fake_root, monkeypatch):
    images, labels = load(fake_root, "mnist", "train")
    cache = fake_root.root / ".moe_cache" / "mnist_train.pt"
    assert cache.is_file()
    data._load_cached.cache_clear()  # as in a fresh process

    def no_parsing(*args):
        raise AssertionError("the source files were parsed again although the cache is valid")

    monkeypatch.setattr(data, "_read_idx", no_parsing)
    again_images, again_labels = load(fake_root, "mnist", "train")
    assert torch.equal(again_images, images) and torch.equal(again_labels, labels)
    assert again_images.dtype == torch.uint8 and again_labels.dtype == torch.int64


def test_cifar_disk_cache(fake_root, monkeypatch):
    images, labels = load(fake_root, "cifar10", "test")
    assert (fake_root.root / ".moe_cache" / "cifar10_test.pt").is_file()
    data._load_cached.cache_clear()
    monkeypatch.setattr(data, "_read_cifar", lambda files: pytest.fail("cache not used"))
    again_images, again_labels = load(fake_root, "cifar10", "test")
    assert torch.equal(again_images, images) and torch.equal(again_labels, labels)


def test_modified_source_invalidates_cache(fake_root):
    _, labels = load(fake_root, "mnist", "test")
    label_file = fake_root.mnist_raw / "t10k-labels-idx1-ubyte"
    before = label_file.stat()
    new_labels = (fake_root.mnist["test"][1] + 1) % 10
    header = label_file.read_bytes()[:8]
    label_file.write_bytes(header + new_labels.tobytes())  # same size
    os.utime(label_file, (before.st_atime + 10, before.st_mtime + 10))  # edited later
    data._load_cached.cache_clear()
    _, again = load(fake_root, "mnist", "test")
    assert torch.equal(again, torch.from_numpy(new_labels.astype(np.int64)))
    assert not torch.equal(again, labels)


def test_same_second_edit_invalidates_cache(fake_root):
    label_file = fake_root.mnist_raw / "t10k-labels-idx1-ubyte"
    base = int(label_file.stat().st_mtime)
    os.utime(label_file, (base + 0.1, base + 0.1))
    load(fake_root, "mnist", "test")
    new_labels = (fake_root.mnist["test"][1] + 1) % 10
    label_file.write_bytes(label_file.read_bytes()[:8] + new_labels.tobytes())
    os.utime(label_file, (base + 0.6, base + 0.6))
    data._load_cached.cache_clear()
    _, again = load(fake_root, "mnist", "test")
    assert torch.equal(again, torch.from_numpy(new_labels.astype(np.int64)))


def test_damaged_cache_is_rebuilt(fake_root):
    images, _ = load(fake_root, "mnist", "test")
    cache = fake_root.root / ".moe_cache" / "mnist_test.pt"
    cache.write_bytes(b"not a torch file")
    data._load_cached.cache_clear()
    again, _ = load(fake_root, "mnist", "test")
    assert torch.equal(again, images)
    assert torch.load(cache, weights_only=True)["images"].shape == images.shape  # rewritten


# ---------------------------------------------------------------- missing and damaged files

@pytest.mark.parametrize("name, expected_path", [
    ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
    ("cifar10", "cifar-10-batches-py/data_batch_1"),
])
def test_missing_files_without_download(tmp_path, name, expected_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError) as err:
        load_source(name, "train", root, download=False)
    message = str(err.value)
    assert str(root / expected_path) in message
    assert "python data.py" in message
    assert "downloading is turned off" in message


def test_missing_files_when_download_fails(tmp_path):
    # the autouse _no_network fixture makes the torchvision fallback fail like an offline machine
    with pytest.raises(DataError) as err:
        load_source("mnist", "test", tmp_path, download=True)
    message = str(err.value)
    assert "t10k-images-idx3-ubyte" in message and "python data.py" in message
    assert "downloading with torchvision failed" in message and "network access is disabled" in message


def test_one_missing_cifar_batch_is_named(fake_root):
    (fake_root.cifar_dir / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        load(fake_root, "cifar10", "train")
    load(fake_root, "cifar10", "test")  # the test split does not need it


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_truncated_idx(make_fake_root, gz):
    fake = make_fake_root(gz=gz, n_cifar=0)
    path = fake.mnist_raw / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(DataError) as err:
        load(fake, "mnist", "test")
    assert str(path) in str(err.value) and "python data.py" in str(err.value)


def test_idx_wrong_magic(fake_root):
    path = fake_root.mnist_raw / "t10k-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[3] = 0x03  # 2049 -> 2051: an image file where labels belong
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="magic"):
        load(fake_root, "mnist", "test")


def test_idx_count_mismatch(fake_root):
    path = fake_root.mnist_raw / "t10k-labels-idx1-ubyte"
    labels = fake_root.mnist["test"][1][:50]
    path.write_bytes((2049).to_bytes(4, "big") + (50).to_bytes(4, "big") + labels.tobytes())
    with pytest.raises(DataError, match="100 images"):
        load(fake_root, "mnist", "test")


def test_corrupt_gz_payload(make_fake_root):
    fake = make_fake_root(gz=True, n_cifar=0)
    path = fake.mnist_raw / "t10k-images-idx3-ubyte.gz"
    payload = path.read_bytes()
    path.write_bytes(payload[:10] + bytes(b ^ 0x55 for b in payload[10:-8]) + payload[-8:])
    with pytest.raises(DataError):
        load(fake, "mnist", "test")


def test_garbage_gz(fake_root):
    (fake_root.mnist_raw / "t10k-images-idx3-ubyte").unlink()
    (fake_root.mnist_raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"definitely not gzip data")
    with pytest.raises(DataError, match="damaged"):
        load(fake_root, "mnist", "test")


@pytest.mark.parametrize("content", [
    b"this is not a pickle at all",
    np.random.default_rng(0).bytes(4096),
    b"\x80\x02}q\x00(X\x04\x00\x00\x00data",  # a truncated real pickle
], ids=["text", "random", "truncated"])
def test_garbage_cifar_pickle(fake_root, content):
    path = fake_root.cifar_dir / "test_batch"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load(fake_root, "cifar10", "test")
    assert str(path) in str(err.value) and "python data.py" in str(err.value)


def test_garbage_pickle_naming_a_module(fake_root):
    (fake_root.cifar_dir / "test_batch").write_bytes(b"cno_such_module_xyz\nthing\n.")
    with pytest.raises(DataError):
        load(fake_root, "cifar10", "test")


def test_truncated_cifar_pickle(fake_root):
    path = fake_root.cifar_dir / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="data_batch_2"):
        load(fake_root, "cifar10", "train")


@pytest.mark.parametrize("batch, words", [
    ({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, ["shape"]),
    ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1]}, ["shape"]),
    ({"data": np.zeros((4, 3072), np.uint8)}, ["KeyError"]),
    ([1, 2, 3], ["not a readable"]),
])
def test_malformed_cifar_batch(fake_root, batch, words):
    import pickle

    with open(fake_root.cifar_dir / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(DataError) as err:
        load(fake_root, "cifar10", "test")
    for word in words:
        assert word in str(err.value)


def test_unknown_dataset_and_split(fake_root):
    with pytest.raises(DataError) as err:
        load_source("svhn", "test", fake_root.root, download=False)
    for choice in ("mnist", "fashion_mnist", "cifar10"):
        assert choice in str(err.value)
    with pytest.raises(DataError) as err:
        load_source("mnist", "val", fake_root.root, download=False)
    assert "train" in str(err.value) and "test" in str(err.value) and "'val'" in str(err.value)
    with pytest.raises(DataError, match="cifar10"):
        load_task(TaskSpec("svhn"), "test", fake_root.root, download=False)
    with pytest.raises(DataError):
        InputFormat.of("svhn")


# ---------------------------------------------------------------- input formats

def test_to_unit():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    unit = to_unit(x)
    assert unit.dtype == torch.float32
    assert torch.allclose(unit.flatten(), torch.tensor([0.0, 0.2, 1.0]))
    assert x.dtype == torch.uint8 and x[0, 0, 0, 2] == 255  # the uint8 input is untouched


def test_grey_to_rgb_repeats_the_channel():
    grey = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    rgb = convert_channels(grey, 3)
    assert rgb.shape == (2, 3, 5, 5)
    for channel in range(3):
        assert torch.equal(rgb[:, channel], grey[:, 0])


def test_rgb_to_grey_is_luminance():
    rgb = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    grey = convert_channels(rgb, 1)
    expected = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert grey.shape == (2, 1, 5, 5)
    assert torch.allclose(grey[:, 0], expected, atol=1e-6)
    white = convert_channels(torch.ones(1, 3, 2, 2), 1)
    assert torch.allclose(white, torch.ones(1, 1, 2, 2))


def test_convert_channels_identity_and_errors():
    x = torch.rand(1, 3, 4, 4)
    assert convert_channels(x, 3) is x
    with pytest.raises(ValueError):
        convert_channels(torch.rand(1, 2, 4, 4), 3)


def test_normalise_uses_the_sources_statistics():
    mnist = InputFormat.of("mnist")
    assert mnist.channels == 1 and mnist.mean == (0.1307,) and mnist.std == (0.3081,)
    x = torch.tensor([0.1307, 0.1307 + 0.3081, 0.0]).view(1, 1, 1, 3)
    assert torch.allclose(normalise(x, mnist).flatten(), torch.tensor([0.0, 1.0, -0.1307 / 0.3081]), atol=1e-6)
    cifar = InputFormat.of("cifar10")
    y = normalise(torch.tensor(cifar.mean).view(1, 3, 1, 1).expand(2, 3, 4, 4), cifar)
    assert torch.allclose(y, torch.zeros(2, 3, 4, 4), atol=1e-6)


def test_prepare_input_converts_then_normalises():
    grey = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    cifar = InputFormat.of("cifar10")
    out = prepare_input(grey, cifar)
    assert out.shape == (2, 3, 4, 4)
    for c in range(3):
        assert torch.allclose(out[:, c], (grey[:, 0] - cifar.mean[c]) / cifar.std[c], atol=1e-6)
    rgb = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    mnist = InputFormat.of("mnist")
    lum = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert torch.allclose(prepare_input(rgb, mnist)[:, 0], (lum - 0.1307) / 0.3081, atol=1e-5)


def test_input_format_dict_round_trip():
    fmt = InputFormat.of("cifar10")
    assert InputFormat.from_dict(fmt.as_dict()) == fmt
    assert fmt.as_dict() == {"channels": 3, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}


# ---------------------------------------------------------------- real data (skipped without a data root)

def test_real_mnist_test_split(data_dir):
    images, labels = load_source("mnist", "test", data_dir, download=False)
    assert images.shape == (10000, 1, 32, 32) and images.dtype == torch.uint8
    counts = torch.bincount(labels, minlength=10)
    assert len(counts) == 10 and counts.sum() == 10000 and (counts > 0).all()
    assert int((labels < 5).sum()) == 5139  # docs/design.md: 5139 / 4861
    assert images[:, :, :2].sum() == 0 and images[:, :, :, 30:].sum() == 0  # padding
    assert len(load_task(TaskSpec("mnist", [5, 6, 7, 8, 9]), "test", data_dir, download=False).labels) == 4861


def test_real_cifar10_test_split(data_dir):
    if not (data_dir / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip(f"no CIFAR-10 under {data_dir}; run `make data`")
    images, labels = load_source("cifar10", "test", data_dir, download=False)
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=10).tolist() == [1000] * 10
