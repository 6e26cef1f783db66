"""Shared plumbing for the scripts: seeds, devices, atomic files, checkpoints, result rows, progress."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
from tqdm import tqdm

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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was asked for but CUDA is not available; use device=cpu")
    return torch.device(name)


# ---------------------------------------------------------------- atomic files

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

class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or of the wrong kind; the message says what to do."""


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, arch: str,
                    arch_kwargs: dict, config: dict, meta: dict) -> None:
    """One dict of tensors and plain types, readable with ``torch.load(weights_only=True)``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"arch": arch, "arch_kwargs": arch_kwargs, "state_dict": state,
                       "config": _plain(config), "meta": _plain(meta)}, path)


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
    from archs import build_model

    ckpt = read_checkpoint(path, hint)
    if expect_arch is not None and ckpt["arch"] != expect_arch:
        raise CheckpointError(f"{path} holds a {ckpt['arch']!r} model, expected {expect_arch!r}")
    model = build_model(ckpt["arch"], **ckpt["arch_kwargs"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit a {ckpt['arch']!r} model: {err}") from None
    return model.to(device).eval(), ckpt


def reuse_checkpoint(path: Path, settings: dict, force: bool, replace_stale: bool = False) -> dict | None:
    """The stored result row when ``path`` already holds this exact training run, else None.

    A checkpoint made with other settings (or from other upstream checkpoints) is an error, so a
    changed config never silently overwrites work, unless ``replace_stale``: then it is retrained
    (the pipeline's choice after an upstream stage was redone)."""
    if force or not path.exists():
        return None
    ckpt = read_checkpoint(path)
    stored = ckpt.get("meta", {}).get("settings")
    if stored != settings:
        if replace_stale:
            return None
        changed = sorted(k for k in settings if stored is None or stored.get(k) != settings[k])
        raise CheckpointError(
            f"{path} was trained with other settings ({', '.join(changed)} differ); pass force=true or "
            f"replace_stale=true to retrain it, or ckpt_dir=... to keep both")
    return ckpt["meta"]["row"]


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

def write_rows(stem: str | os.PathLike, rows: list[dict]) -> dict[str, str]:
    """Write ``rows`` as ``stem.jsonl`` (full, nested) and ``stem.csv`` (flattened); atomic, returns paths."""
    stem = Path(stem)
    jsonl = stem.with_name(stem.name + ".jsonl")  # not with_suffix: names may hold dots
    atomic_write_text(jsonl, "".join(json.dumps(r, default=str) + "\n" for r in rows))
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
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def progress(iterable: Iterable[T], outer: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar, silent in CI, when stderr is not a terminal, and (unless ``outer``) inside
    ``hidden_inner_progress()``, where a driver shows one bar of its own."""
    quiet = bool(os.environ.get("CI")) or not sys.stderr.isatty() or (_inner_bars_hidden and not outer)
    return tqdm(iterable, disable=quiet, dynamic_ncols=True, **kwargs)


@contextmanager
def hidden_inner_progress() -> Iterator[None]:
    """Silence the stage scripts' own bars while a driver runs them."""
    global _inner_bars_hidden
    previous, _inner_bars_hidden = _inner_bars_hidden, True
    try:
        yield
    finally:
        _inner_bars_hidden = previous


# ---------------------------------------------------------------- command line

def cli(main: Callable[[Any], dict], config_class: type, load: Callable[[], Any] | None = None) -> None:
    """Run a script's ``main`` on the command-line config (``load()`` builds it, if given); known user
    errors exit with one clear line."""
    from config import ConfigError, parse_args
    from data import DataError

    try:
        main(load() if load else parse_args(config_class))
    except (ConfigError, DataError, CheckpointError) as err:
        sys.exit(f"error: {err}")
