"""Shared plumbing for the scripts: seeds, devices, atomic files, checkpoints, result rows, progress."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from archs import build_model
from errors import UserError

T = TypeVar("T")


# ---------------------------------------------------------------- seeds and devices

def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (Python's ``hash()`` changes between processes)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto``: cuda when available, else cpu. Names are checked when the config loads (config.check_device)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------- atomic files

# oneDNN's kernels for a 1x1 convolution's weight gradient fail in channels-last when it has few channels (issue 27):
# on AVX2 a ResNet's 4 -> 8 projection shortcut at width 1/16 hangs or aborts; on AVX-512 the stride-2 8 -> 16 one at
# width 1/8 (and 12 -> 24) corrupts the heap whenever the batch is odd (3, 9, 63 images: the last batch of a split
# whose size is not a multiple of the batch size; the cpu profile's run died so), while 16 -> 32 and wider passed
NARROWEST_CHANNELS_LAST = 16


def fast_memory_format(model: torch.nn.Module) -> torch.memory_format:
    """The memory format a model runs in: channels-last for the architectures that declare it (``channels_last =
    True``: LeNet5, VGG and ResNet, each measured faster so on CPU, bench/bench_memory_format.py), unless a 1x1
    convolution has fewer than NARROWEST_CHANNELS_LAST input or output channels, where oneDNN's weight gradient
    hangs (AVX2) or corrupts memory on odd batches (AVX-512); the default format everywhere else."""
    if not getattr(model, "channels_last", False):
        return torch.contiguous_format
    pointwise = [min(c.in_channels, c.out_channels) for c in model.modules()
                 if isinstance(c, torch.nn.Conv2d) and c.kernel_size == (1, 1)]
    return torch.channels_last if min(pointwise, default=NARROWEST_CHANNELS_LAST) >= NARROWEST_CHANNELS_LAST \
        else torch.contiguous_format


@cache
def source_commit() -> str:
    """The git commit of the code that runs (12 hex digits), with ``+edited`` when tracked files other than the
    results and the pages differ from it, or ``unknown`` outside a git checkout: every merge row records it, and a
    report names the commits its rows were made at (issue 27: every committed number from one command at one
    commit)."""
    repo = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10)
        # the code and the experiment files only: a run rewrites the committed results (and pages quote them)
        edited = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)results", ":(exclude)docs", ":(exclude)README.md"], cwd=repo,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+edited" if edited.stdout.strip() else "")


def compact_png(png: bytes) -> bytes:
    """The same picture with an adaptive 128-colour palette: figures and sample grids are a few flat colours or
    small images, so this keeps them readable at a third to a quarter of the bytes (committed results stay small;
    128 rather than 256 colours saves another tenth, with no visible loss on the curves and sample grids)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    buffer = io.BytesIO()
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename, so no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; results are for everyone
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------- checkpoints

class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable or of the wrong kind; the message says what to do."""


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A short hash of a model's weights (names, dtypes, shapes and values): the identity of one trained
    instance, which downstream artifacts record so that a retrained upstream file makes them stale."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, arch: str,
                    arch_kwargs: dict, config: dict, meta: dict) -> str:
    """One dict of tensors and plain types, readable with ``torch.load(weights_only=True)``; the weights'
    digest goes into ``meta["digest"]`` and is returned."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    digest = state_digest(state)
    atomic_torch_save({"arch": arch, "arch_kwargs": arch_kwargs, "state_dict": state,
                       "config": _plain(config), "meta": _plain({**meta, "digest": digest})}, path)
    return digest


def read_checkpoint(path: str | os.PathLike, hint: str = "") -> dict:
    """Load a checkpoint dict; a missing or corrupt file raises CheckpointError (``hint`` says how to make one)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" + (f"; create it with: {hint}" if hint else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(err).__name__}); delete it and rerun"
            + (f": {hint}" if hint else "")) from None
    missing = {"arch", "arch_kwargs", "state_dict"} - set(ckpt) if isinstance(ckpt, dict) else {"all keys"}
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this project (missing {sorted(missing)})")
    return ckpt


def load_model(path: str | os.PathLike, expect_arch: str | None = None, hint: str = "",
               device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model a checkpoint describes; returns ``(model in eval mode, checkpoint dict)``."""
    ckpt = read_checkpoint(path, hint)
    if expect_arch is not None and ckpt["arch"] != expect_arch:
        raise CheckpointError(f"{path} holds a {ckpt['arch']!r} model, expected {expect_arch!r}")
    try:
        model = build_model(ckpt["arch"], **ckpt["arch_kwargs"])
    except ValueError as err:  # an arch archs/ does not register, or arguments it does not take
        raise CheckpointError(f"{path}: {err}; a model trained elsewhere is given by file instead (README, "
                              f"\"Experts from files\")") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit a {ckpt['arch']!r} model: {err}") from None
    return model.to(device).eval(), ckpt


def _plain(obj: Any) -> Any:
    """Keep only the plain types that ``weights_only`` loading accepts."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (np.generic,)):
        return obj.item()
    return str(obj)


# ---------------------------------------------------------------- result rows

UNROUNDED_KEYS = ("config", "key")  # what a row was made with stays exactly as given


def _float32_digits(value: Any) -> Any:
    """``value`` with every float cut to 7 significant digits: the measurements are float32 computations, which
    carry no more, and the float64 digits beyond them only made the committed rows a tenth larger."""
    if isinstance(value, float):
        return float(f"{value:.7g}")
    if isinstance(value, list):
        return [_float32_digits(v) for v in value]
    if isinstance(value, dict):
        return {k: _float32_digits(v) for k, v in value.items()}
    return value


def _stored_row(row: dict) -> dict:
    return {k: v if k in UNROUNDED_KEYS else _float32_digits(v) for k, v in row.items()}


def configs_path(jsonl: str | os.PathLike) -> Path:
    """Where a table's row configs are kept once each: ``STEM.configs.json`` (digest -> config) beside ``STEM.jsonl``."""
    jsonl = Path(jsonl)
    return jsonl.with_name(jsonl.name.removesuffix(".jsonl") + ".configs.json")


def write_rows(stem: str | os.PathLike, rows: list[dict]) -> dict[str, str]:
    """Write ``rows`` as ``stem.jsonl`` (full, nested) and ``stem.csv`` (flattened); atomic, returns paths.

    A row's ``config`` (what its run set differently from the defaults) is the same for every row of a run, so a
    row that has a ``config_digest`` keeps only that in the JSON lines, and each digest's config is written once
    to ``configs_path`` (``read_rows`` puts it back); the CSV keeps it in every row."""
    stem = Path(stem)
    rows = [_stored_row(r) for r in rows]
    jsonl = stem.with_name(stem.name + ".jsonl")  # not with_suffix: names may hold dots
    configs: dict[str, Any] = {}
    stored = []
    for row in rows:
        digest, config = row.get("config_digest"), row.get("config")
        if isinstance(config, dict) and isinstance(digest, str) and configs.setdefault(digest, config) == config:
            stored.append({k: v for k, v in row.items() if k != "config"})
        else:  # no digest, or one digest named two configs: the row keeps its own
            stored.append(row)
    sidecar = configs_path(jsonl)
    if configs:
        atomic_write_text(sidecar, json.dumps(configs, indent=1, default=str) + "\n")
    atomic_write_text(jsonl, "".join(json.dumps(r, default=str) + "\n" for r in stored))
    if not configs and sidecar.is_file() and not any("config_digest" in r and "config" not in r for r in stored):
        sidecar.unlink()  # left by an earlier write of this table: no row reads it now
    # the config stays one JSON column in the CSV rather than dozens of flattened ones
    flat = [_flatten({k: json.dumps(v) if k == "config" else v for k, v in r.items()}) for r in rows]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    csv_path = stem.with_name(stem.name + ".csv")
    atomic_write_text(csv_path, buffer.getvalue())
    return {"jsonl": str(jsonl), "csv": str(csv_path)}


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file ([] when missing). A last line cut short by an interrupted append is
    skipped; a damaged line elsewhere is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path}: line {i + 1} is not JSON; delete the file to recompute its rows") from None
    sidecar = configs_path(path)
    if path.name.endswith(".jsonl") and sidecar.is_file():  # the configs write_rows kept once per table
        configs = json.loads(sidecar.read_text())
        rows = [{**r, "config": configs[r["config_digest"]]} if "config" not in r and r.get("config_digest") in configs
                else r for r in rows]
    return rows


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Add one row to a JSON-lines file as soon as it exists, so an interrupted run keeps it. One short
    write of a whole line; a last line cut short by a crash is skipped by ``read_rows`` and dropped here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with open(path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line torn by a crash: drop it before adding to the file
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
    with open(path, "a") as f:
        f.write(json.dumps(_stored_row(row), default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _flatten(row: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = json.dumps(v) if isinstance(v, list) else v
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(list(values), dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def print_summary(summary: dict) -> None:
    """The last line a script prints: one line of JSON."""
    print(json.dumps(summary, default=str), flush=True)


# ---------------------------------------------------------------- progress

_inner_bars_hidden = False
LONG_LOOP = 20  # items: a longer loop (epochs of a long training, a folder of images) writes a line at most ...
LINE_INTERVAL_S = 10.0  # ... this often where no terminal is, so a log file stays readable
NARROWEST_BAR = 10  # columns: a terminal narrower than this (a zero-size one) shows no bar


def progress(iterable: Iterable[T], outer: bool = False, **kwargs: Any) -> tqdm | ProgressLines:
    """A tqdm bar on a terminal; where stderr is no terminal (a file, a pipe) or one too narrow to draw in, one line
    per finished item with its time (``ProgressLines``). Silent in CI. Inside ``hidden_inner_progress()``, where a
    driver shows one bar of its own, a loop that is not ``outer`` draws no bar and writes at most a line every
    LINE_INTERVAL_S seconds (the driver writes its own line when its step is done)."""
    hidden = _inner_bars_hidden and not outer
    if os.environ.get("CI"):
        return tqdm(iterable, disable=True, **kwargs)
    if terminal_width() >= NARROWEST_BAR:
        return tqdm(iterable, disable=hidden, dynamic_ncols=True, **kwargs)
    return ProgressLines(iterable, hidden=hidden, **kwargs)


def terminal_width() -> int:
    """The columns of the terminal stderr writes to; 0 when it is no terminal."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else 0
    except (OSError, ValueError, AttributeError):  # stderr replaced by an object without a file descriptor
        return 0


class ProgressLines:
    """Progress as lines on stderr, for logs and pipes: ``DESC: N/TOTAL UNIT done in S s (T s in all): POSTFIX`` for
    each finished item; a loop of more than LONG_LOOP items (or one hidden by a driver) writes at most one line
    every LINE_INTERVAL_S seconds, and a long loop its last item always. Takes the tqdm calls the project makes
    (iteration, ``update``, ``set_postfix_str``, use as a context manager)."""

    def __init__(self, iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None,
                 initial: int = 0, unit: str = "it", hidden: bool = False, **_: Any) -> None:
        self.iterable, self.desc, self.unit, self.n, self.postfix = iterable, desc, unit, initial, ""
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.hidden = hidden
        self.sparse = hidden or (self.total or 0) > LONG_LOOP
        self.start = self.item_start = self.last_line = time.perf_counter()

    def __iter__(self) -> Iterator[T]:
        for item in self.iterable:
            self.item_start = time.perf_counter()
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        now = time.perf_counter()
        self.n += n
        last = self.total is not None and self.n >= self.total
        if not self.sparse or now - self.last_line >= LINE_INTERVAL_S or (last and not self.hidden):
            of = f"/{self.total}" if self.total is not None else ""
            line = (f"{self.desc or 'progress'}: {self.n}{of} {self.unit} done in {now - self.item_start:.1f} s "
                    f"({now - self.start:.0f} s in all)" + (f": {self.postfix}" if self.postfix else ""))
            print(line, file=sys.stderr, flush=True)
            self.last_line = now
        self.item_start = now

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        """Nothing to clear: every line is final."""

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextmanager
def hidden_inner_progress() -> Iterator[None]:
    """Silence the stage scripts' own bars, and thin their lines, while a driver runs them."""
    global _inner_bars_hidden
    previous, _inner_bars_hidden = _inner_bars_hidden, True
    try:
        yield
    finally:
        _inner_bars_hidden = previous
