"""Datasets as uint8 tensors: MNIST, Fashion-MNIST and CIFAR-10 from a data root in torchvision's layout.

Images come back as uint8 ``[N, C, 32, 32]`` (MNIST-style sets padded 28 -> 32, as ``Pad(2)``), labels
as int64; ``to_problem_size`` is that rule for an image of any size (predict.py brings your images in by it).
A decoded copy is cached under ``DATA_ROOT/.moe_cache`` so later loads skip the parsing, and in memory for the
life of the process. A task may keep just one part of a split of its training set (``split_parts``:
per-class Dirichlet shares or class shards), as the parents of weight-space fusion do.

Make a data root ready with ``python data.py DATA_ROOT``: files already there are used; otherwise the
offline mirror (``$MOE_DATA_MIRROR`` or ``../shared/data/prepare_data.py``) lays them out, or
torchvision downloads them when a network is there.
"""
from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import resize

from common import UserError, atomic_torch_save, derive_seed
from config import DATA_DIR_ENV, ConfigError, TaskSpec

MIRROR_ENV = "MOE_DATA_MIRROR"
DEFAULT_MIRROR = Path(__file__).resolve().parent.parent / "shared" / "data" / "prepare_data.py"
LUMINANCE = (0.299, 0.587, 0.114)
IMAGE_SIZE = 32  # the side of every problem's images: MNIST-style 28x28 ones are padded up to it


class DataError(UserError, RuntimeError):
    """Dataset files are missing or damaged; the message names the path and the fix."""


@dataclass(frozen=True)
class Source:
    """A source dataset: where it lives, its channels, normalisation and paper batch size."""

    folder: str
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int
    class_names: tuple[str, ...] = tuple(str(d) for d in range(10))
    size: int = IMAGE_SIZE  # the side of the dataset's own (square) images

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


SOURCES = {
    "mnist": Source("MNIST", 1, (0.1307,), (0.3081,), 512, size=28),
    "fashion_mnist": Source("FashionMNIST", 1, (0.2860,), (0.3530,), 512,
                            ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                             "ankle boot"), size=28),
    "cifar10": Source("cifar-10-batches-py", 3, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 128,
                      ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")),
}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SPLITS = ("full", "dirichlet", "shard")  # ways a task's training set is cut into parts (TaskSpec.split)


@dataclass(frozen=True)
class InputFormat:
    """What an expert expects: channel count and the normalisation of its training data."""

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, source: str) -> "InputFormat":
        s = get_source(source)
        return cls(s.channels, s.mean, s.std)

    def as_dict(self) -> dict:
        return {"channels": self.channels, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "InputFormat":
        return cls(int(d["channels"]), tuple(d["mean"]), tuple(d["std"]))


@dataclass
class TaskData:
    """A task's split: uint8 images, local labels (index into ``classes``), and the source classes."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[int]
    source: str


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; choices: {', '.join(SOURCES)}")
    return SOURCES[name]


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    return Path(data_dir or os.environ.get(DATA_DIR_ENV, "./data")).expanduser()


# ---------------------------------------------------------------- loading

def load_source(name: str, split: str, data_dir: str | os.PathLike | None = None,
                download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of one split of a source dataset (uint8 ``[N,C,32,32]``, int64 ``[N]``)."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; choices: train, test")
    get_source(name)
    return _load_cached(name, split, str(data_root(data_dir).resolve()), download)


def load_task(task: TaskSpec, split: str, data_dir: str | os.PathLike | None = None,
              limit: int | None = None, download: bool = True) -> TaskData:
    """The images of ``task.classes`` (all classes when None) with local labels 0..len(classes)-1.

    On the training split a task with ``task.split`` other than ``full`` keeps only its part (see
    ``split_parts``); the test split stays whole, so every part is scored on the same test set.
    ``limit`` then keeps the first N images, so a smoke run's images all belong to its part."""
    classes = task_classes(task)
    check_split(task)
    images, labels = class_subset(*load_source(task.source, split, data_dir, download), classes)
    if split == "train" and task.split != "full":
        keep = split_parts(task, labels)[task.part]
        images, labels = images[keep], labels[keep]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return TaskData(images, labels, classes, task.source)


def task_classes(task: TaskSpec) -> list[int]:
    """The source classes a task learns, in local-label order; checked against its source."""
    n_classes = get_source(task.source).num_classes
    classes = list(range(n_classes)) if task.classes is None else list(task.classes)
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad or len(set(classes)) != len(classes) or not classes:
        raise DataError(f"task classes {classes} must be distinct ids in 0..{n_classes - 1} of {task.source}")
    return classes


def class_subset(images: torch.Tensor, labels: torch.Tensor,
                 classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the samples of ``classes`` (in dataset order) and relabel class ``classes[j]`` as ``j``."""
    size = max(int(labels.max()) + 1 if len(labels) else 0, max(classes) + 1)
    local = torch.full((size,), -1, dtype=torch.long)
    local[torch.tensor(classes, dtype=torch.long)] = torch.arange(len(classes))
    mapped = local[labels]
    keep = mapped >= 0
    return images[keep], mapped[keep]


@lru_cache(maxsize=None)
def _load_cached(name: str, split: str, root: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    root_path = Path(root)
    source = SOURCES[name]
    files = _source_files(name, split, root_path)
    if not all(f.exists() for f in files):
        _fetch(name, root_path, files, download)
        files = _source_files(name, split, root_path)
    signature = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    cache = root_path / ".moe_cache" / f"{name}_{split}.pt"
    if cache.is_file():
        try:
            cached = torch.load(cache, weights_only=True)
            if cached.get("signature") == signature:
                return cached["images"], cached["labels"]
        except Exception:  # a damaged cache is rebuilt from the source files
            pass
    if source.folder == "cifar-10-batches-py":
        images, labels = _read_cifar(files)
    else:
        images, labels = _read_idx(files)
    images = to_problem_size(images, name)  # MNIST-style 28x28 -> 32x32 by Pad(2), as the paper's transform
    try:
        atomic_torch_save({"signature": signature, "images": images, "labels": labels}, cache)
    except OSError:  # a read-only data root just goes without the disk cache
        pass
    return images, labels


def _source_files(name: str, split: str, root: Path) -> list[Path]:
    source = SOURCES[name]
    if source.folder == "cifar-10-batches-py":
        return [root / source.folder / f for f in CIFAR_FILES[split]]
    raw = root / source.folder / "raw"
    return [raw / f if (raw / f).exists() else raw / f"{f}.gz" for f in IDX_FILES[split]]


def _fetch(name: str, root: Path, files: list[Path], download: bool) -> None:
    missing = next(f for f in files if not f.exists())
    if download:
        try:
            _torchvision_download(name, root)
            return
        except Exception as err:  # no network, or a mirror refused: explain below
            first_line = (str(err).strip().splitlines() or [""])[0]
            reason = f"downloading with torchvision failed ({type(err).__name__}: {first_line})"
    else:
        reason = "downloading is turned off"
    raise DataError(
        f"{name} is missing: {missing} does not exist and {reason}. Provide the files in torchvision's "
        f"layout under {root}: offline, run `python data.py {root}` (it uses the mirror "
        f"{os.environ.get(MIRROR_ENV, DEFAULT_MIRROR)}), or point {DATA_DIR_ENV} / data_dir= at a "
        f"folder that has them.")


def _torchvision_download(name: str, root: Path) -> None:
    import torchvision.datasets as tvd

    dataset = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    for train in (True, False):
        dataset(str(root), train=train, download=True)


def _open_maybe_gz(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is damaged ({err}); delete it and run `python data.py {_root_of(path)}`") from None


def _root_of(path: Path) -> Path:
    return path.parent.parent.parent if path.parent.name == "raw" else path.parent.parent


def _read_idx(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    image_file, label_file = files
    images = _parse_idx(image_file, _open_maybe_gz(image_file), magic=2051, ndim=3)
    labels = _parse_idx(label_file, _open_maybe_gz(label_file), magic=2049, ndim=1)
    if len(images) != len(labels):
        raise DataError(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels; "
                        f"delete both and run `python data.py {_root_of(image_file)}`")
    # a copy: the parsed bytes are read-only, which torch.from_numpy warns about
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _parse_idx(path: Path, raw: bytes, magic: int, ndim: int) -> np.ndarray:
    header = 4 + 4 * ndim
    fix = f"delete it and run `python data.py {_root_of(path)}`"
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind (bad magic number); {fix}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or corrupt ({len(raw)} bytes, expected {expected}); {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_cifar(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for path in files:
        fix = f"delete it and run `python data.py {path.parent.parent}`"
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            # the official pickles have bytes keys, the offline rebuild str keys
            batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
            data = np.asarray(batch["data"], dtype=np.uint8)
            batch_labels = np.asarray(batch["labels"], dtype=np.int64)
        except Exception as err:  # unpickling damaged bytes can raise almost anything
            raise DataError(f"{path} is not a readable CIFAR-10 batch ({type(err).__name__}); {fix}") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
            raise DataError(f"{path} has data of shape {data.shape} for {len(batch_labels)} labels; {fix}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


# ---------------------------------------------------------------- splits into parts (fusion parents)

def check_split(task: TaskSpec, name: str = "") -> None:
    """Raise ConfigError, naming task ``name``, when the split fields of ``task`` do not fit together.

    Fields a split kind does not use must keep their defaults: a value that would be silently ignored
    is a mistake in the config."""
    where = f"task {name!r}" if name else f"a task of {task.source}"
    if task.split not in SPLITS:
        raise ConfigError(f"{where}: unknown split {task.split!r}; choices: {', '.join(SPLITS)}")
    if task.split == "full":
        if (task.parts, task.part, task.alpha, task.split_seed) != (1, 0, None, 0):
            raise ConfigError(f"{where}: parts, part, alpha and split_seed apply only to split: dirichlet "
                              f"or shard (this task has split: full)")
        return
    if task.parts < 1:
        raise ConfigError(f"{where}: parts must be at least 1, got {task.parts}")
    if not 0 <= task.part < task.parts:
        raise ConfigError(f"{where}: part {task.part} is out of range for parts={task.parts} "
                          f"(choose 0..{task.parts - 1})")
    if task.split == "dirichlet" and task.alpha is not None:
        if len(task.alpha) != task.parts:
            raise ConfigError(f"{where}: alpha has {len(task.alpha)} values but parts={task.parts}; give one "
                              f"concentration per part, or alpha: null for linspace(1, 5, parts)")
        if not all(a > 0 for a in task.alpha):
            raise ConfigError(f"{where}: alpha values must be positive, got {task.alpha}")
    if task.split == "shard":
        if task.alpha is not None or task.split_seed != 0:
            raise ConfigError(f"{where}: alpha and split_seed apply only to split: dirichlet (shard deals "
                              f"the classes into contiguous groups, without randomness)")
        n_classes = len(task_classes(task))
        if task.parts > n_classes:
            raise ConfigError(f"{where}: cannot shard {n_classes} classes into parts={task.parts} "
                              f"(some parts would get no class)")


def split_alpha(task: TaskSpec) -> list[float]:
    """The Dirichlet concentration per part: ``task.alpha``, or linspace(1, 5, parts) when it is None."""
    if task.alpha is not None:
        return [float(a) for a in task.alpha]
    return np.linspace(1.0, 5.0, task.parts).tolist()


def split_parts(task: TaskSpec, labels: torch.Tensor) -> list[torch.Tensor]:
    """Cut a task's training set into ``task.parts`` disjoint parts that together hold every sample.

    ``labels`` are the task's local training labels (as ``load_task`` makes them, before any limit);
    returns one ascending index tensor into them per part.

    - ``dirichlet``: for each class c, proportions p_c ~ Dirichlet(alpha) over the parts and a
      permutation of c's samples are drawn from a generator seeded by (source, split_seed, c), and the
      permuted samples go to the parts in consecutive chunks of those proportions. The seed names
      the source class, so a class is shared out alike whichever subset of classes a task keeps.
    - ``shard``: the classes are dealt into contiguous groups (``np.array_split``); part k keeps the
      samples of group k.
    - ``full``: one part, everything.
    """
    check_split(task)
    classes = task_classes(task)
    if task.split == "full":
        return [torch.arange(len(labels))]
    if task.split == "shard":
        groups = np.array_split(np.arange(len(classes)), task.parts)
        return [torch.nonzero(torch.isin(labels, torch.from_numpy(g))).flatten() for g in groups]
    alpha = split_alpha(task)
    chunks: list[list[np.ndarray]] = [[] for _ in range(task.parts)]
    for j, c in enumerate(classes):
        members = torch.nonzero(labels == j).flatten().numpy()
        rng = np.random.default_rng(derive_seed(task.source, task.split_seed, c))
        shares = rng.dirichlet(alpha)
        members = members[rng.permutation(len(members))]
        # cumulative cut points, so rounding never loses or repeats a sample
        bounds = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for k, chunk in enumerate(np.split(members, bounds)):
            chunks[k].append(chunk)
    return [torch.from_numpy(np.sort(np.concatenate(part))) for part in chunks]


def task_identity(name: str, task: TaskSpec) -> dict:
    """What an expert checkpoint records as its task (``meta["task"]``), compared when it is loaded.

    A task without a split keeps the identity checkpoints have always stored, so they stay valid;
    a split adds the fields that decide which samples the part holds (alpha resolved)."""
    check_split(task, name)
    identity = {"name": name, "source": task.source, "classes": task.classes}
    if task.split == "full":
        return identity
    identity.update(split=task.split, parts=task.parts, part=task.part)
    if task.split == "dirichlet":
        identity.update(alpha=split_alpha(task), split_seed=task.split_seed)
    return identity


# ---------------------------------------------------------------- input formats

def to_problem_size(images: torch.Tensor, source: str) -> torch.Tensor:
    """Images ``[N, C, H, W]`` (uint8, or [0,1] floats) of dataset ``source`` as the problems hold its images,
    IMAGE_SIZE square: an image of the source's own size is padded with zeros as its sets are (MNIST's
    ``Pad(2)``), one of IMAGE_SIZE is taken as is, and any other size is resized (antialiased) to the source's
    size first, so a digit keeps the scale and margin the experts learnt."""
    side = get_source(source).size
    if tuple(images.shape[-2:]) == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    if tuple(images.shape[-2:]) != (side, side):
        images = resize(images, [side, side], antialias=True)
    margin = (IMAGE_SIZE - side) // 2
    return F.pad(images, [margin] * 4)


def to_unit(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images to float pixels in [0, 1] (on ``device``, in torch's default float type)."""
    return images.to(device=device, dtype=torch.get_default_dtype()).div_(255.0)


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey <-> RGB on [0,1] pixels: grey repeats to three channels; RGB becomes luminance."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 3 and channels == 1:
        weights = torch.tensor(LUMINANCE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    raise ValueError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")


def normalise(x: torch.Tensor, fmt: InputFormat) -> torch.Tensor:
    mean = torch.tensor(fmt.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(fmt.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def prepare_input(x: torch.Tensor, fmt: InputFormat) -> torch.Tensor:
    """[0,1] images of any domain -> what an expert of format ``fmt`` takes."""
    return normalise(convert_channels(x, fmt.channels), fmt)


# ---------------------------------------------------------------- getting the files

def ensure_data(root: str | os.PathLike, sources: list[str] | None = None) -> None:
    """Make ``root`` hold ``sources`` (default: all): keep what is there, else mirror, else download."""
    root = data_root(root)
    for name in sources or list(SOURCES):
        files = [f for split in ("train", "test") for f in _source_files(name, split, root)]
        if all(f.exists() for f in files):
            continue
        mirror = Path(os.environ.get(MIRROR_ENV, DEFAULT_MIRROR))
        if mirror.is_file():
            print(f"laying out the offline datasets with {mirror} -> {root}", flush=True)
            subprocess.run([sys.executable, str(mirror), str(root)], check=True)
        else:
            _torchvision_download(name, root)
        if not all(f.exists() for f in files):
            _fetch(name, root, files, download=False)


USAGE = f"""python data.py [DATA_ROOT]

Make a data root ready for every dataset (MNIST, Fashion-MNIST, CIFAR-10): files already there are kept, else
the offline mirror lays them out (${MIRROR_ENV}, default {DEFAULT_MIRROR}), else torchvision downloads them.

  DATA_ROOT  (a folder; default ${DATA_DIR_ENV}, else ./data)  where the datasets go, in torchvision's layout"""


def prepare_command_line(argv: list[str]) -> None:
    """``python data.py [DATA_ROOT]``: ``-h``/``--help`` prints USAGE; a wrong argument or Ctrl-C ends with one line."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE)
        return
    if len(argv) > 1 or any(arg.startswith("-") for arg in argv):
        sys.exit(f"error: data.py takes one argument, the data root, got {' '.join(argv)}; see python data.py --help")
    root = data_root(argv[0] if argv else None)
    try:
        ensure_data(root)
    except UserError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: the datasets complete under {root} are kept; run `python data.py {root}` again "
                 f"to finish")
    print(f"data ready under {root}")


if __name__ == "__main__":
    prepare_command_line(sys.argv[1:])
