"""common.py: checkpoints, atomic files, seeds, result rows."""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import common
from archs import ARCHS, build_model
from common import (CheckpointError, atomic_write_bytes, atomic_write_text, derive_seed, load_model, mean_std,
                    read_checkpoint, read_rows, save_checkpoint, write_rows)

HINT = "python train_source_networks.py dataset=mnist seeds=[1]"


def make_model(arch: str = "lenet5", seed: int = 0, **kwargs) -> tuple[torch.nn.Module, dict]:
    kwargs = {"in_channels": 1, "num_classes": 5, **kwargs}
    torch.manual_seed(seed)
    model = build_model(arch, **kwargs)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, kwargs["in_channels"], 32, 32))  # moves BatchNorm running statistics off their init
    return model.eval(), kwargs


def inputs(channels: int = 1) -> torch.Tensor:
    return torch.randn(3, channels, 32, 32, generator=torch.Generator().manual_seed(1))


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_gives_identical_outputs(tmp_path, arch):
    model, kwargs = make_model(arch)
    path = tmp_path / "ckpts" / f"{arch}.pt"
    save_checkpoint(path, model, arch, kwargs, config={"lr": 0.01, "dir": Path("x")},
                    meta={"acc": np.float32(0.5), "pair": (1, 2), "nested": {3: "three"}})
    loaded, ckpt = load_model(path, expect_arch=arch)
    assert not loaded.training
    assert loaded is not model
    with torch.no_grad():
        assert torch.equal(loaded(inputs()), model(inputs()))
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"arch", "arch_kwargs", "state_dict", "config", "meta"}
    assert raw["arch"] == arch and raw["arch_kwargs"] == kwargs
    assert raw["config"] == {"lr": 0.01, "dir": "x"}
    assert raw["meta"] == {"acc": 0.5, "pair": [1, 2], "nested": {"3": "three"},
                           "digest": common.state_digest(model.state_dict())}
    assert type(raw["meta"]["acc"]) is float
    assert ckpt["meta"] == raw["meta"]
    for key, value in model.state_dict().items():
        assert torch.equal(raw["state_dict"][key], value)


def test_wrong_arch(tmp_path):
    model, kwargs = make_model("lenet5")
    path = tmp_path / "a.pt"
    save_checkpoint(path, model, "lenet5", kwargs, {}, {})
    with pytest.raises(CheckpointError) as err:
        load_model(path, expect_arch="resnet18")
    assert "'lenet5'" in str(err.value) and "'resnet18'" in str(err.value)


def test_weights_that_do_not_fit(tmp_path):
    model, _ = make_model("lenet5", num_classes=10)
    path = tmp_path / "a.pt"
    save_checkpoint(path, model, "lenet5", {"in_channels": 1, "num_classes": 5}, {}, {})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_damaged_file_is_unreadable(tmp_path, damage):
    path = tmp_path / "a.pt"
    if damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        model, kwargs = make_model()
        save_checkpoint(path, model, "lenet5", kwargs, {}, {})
        whole = path.read_bytes()
        path.write_bytes(whole[:len(whole) // 2] if damage == "truncated" else b"")
    with pytest.raises(CheckpointError) as err:
        load_model(path, hint=HINT)
    assert str(path) in str(err.value) and "unreadable" in str(err.value) and HINT in str(err.value)


def test_missing_file_gives_the_hint(tmp_path):
    path = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError) as err:
        load_model(path, hint=HINT)
    assert str(path) in str(err.value) and "does not exist" in str(err.value) and HINT in str(err.value)


@pytest.mark.parametrize("obj", [{"state_dict": {}}, torch.zeros(3), [1, 2]], ids=["dict", "tensor", "list"])
def test_not_a_checkpoint(tmp_path, obj):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_checkpoint(path)


def test_checkpoint_error_is_catchable_as_runtime_error():
    assert issubclass(CheckpointError, RuntimeError)


# ---------------------------------------------------------------- atomic writes

def test_atomic_writes_leave_no_temp_files(tmp_path):
    folder = tmp_path / "new" / "deeper"
    atomic_write_text(folder / "a.txt", "hello")
    atomic_write_bytes(folder / "b.bin", b"\x00\x01")
    model, kwargs = make_model()
    save_checkpoint(folder / "c.pt", model, "lenet5", kwargs, {}, {})
    save_checkpoint(folder / "c.pt", model, "lenet5", kwargs, {"again": True}, {})  # overwrite
    assert files_in(folder) == ["a.txt", "b.bin", "c.pt"]
    assert (folder / "a.txt").read_text() == "hello" and (folder / "b.bin").read_bytes() == b"\x00\x01"
    assert read_checkpoint(folder / "c.pt")["config"] == {"again": True}


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    old, kwargs = make_model(seed=0)
    path = tmp_path / "model.pt"
    save_checkpoint(path, old, "lenet5", kwargs, {"version": 1}, {})
    text = tmp_path / "notes.txt"
    atomic_write_text(text, "old")

    def broken_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", broken_replace)
    new, _ = make_model(seed=1)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, new, "lenet5", kwargs, {"version": 2}, {})
    with pytest.raises(OSError, match="simulated"):
        atomic_write_text(text, "new")
    monkeypatch.undo()
    assert files_in(tmp_path) == ["model.pt", "notes.txt"]  # temp files cleaned up
    assert text.read_text() == "old"
    loaded, ckpt = load_model(path)
    assert ckpt["config"] == {"version": 1}
    with torch.no_grad():
        assert torch.equal(loaded(inputs()), old(inputs()))


def test_interrupted_write_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "x")
    monkeypatch.undo()
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------- seeds

def test_derive_seed_is_stable():
    # fixed values of int.from_bytes(sha256("/".join(parts)).digest()[:8], "little") >> 1
    assert derive_seed(770597, "mnist", "lenet5", "init") == 7036891020424884925
    assert derive_seed("a") == 7304431660483791845
    assert derive_seed(0) == 2033344993903900207
    text = "1/mnist/order"
    assert derive_seed(1, "mnist", "order") == int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def test_derive_seed_separates_parts():
    seeds = {derive_seed(1, "mnist", "init"), derive_seed(2, "mnist", "init"), derive_seed(1, "cifar10", "init"),
             derive_seed(1, "mnist", "order"), derive_seed(1, "mnist"), derive_seed("mnist", 1, "init")}
    assert len(seeds) == 6
    assert all(0 <= s < 2 ** 63 for s in seeds)
    torch.manual_seed(max(seeds))  # usable as a torch seed


def test_seed_everything_repeats_draws():
    common.seed_everything(derive_seed(5, "x"))
    a = (torch.rand(3), np.random.rand(3))
    common.seed_everything(derive_seed(5, "x"))
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# ---------------------------------------------------------------- result rows

def test_write_rows_jsonl_and_csv(tmp_path):
    config = {"lr": 0.01, "seeds": [1, 2], "tasks": {"mnist": {"source": "mnist", "classes": None}}}
    rows = [{"task": "mnist", "seed": 1, "test_acc": 0.5, "routing": {"counts": [3, 4], "acc": 0.9},
             "config": config},
            {"task": "mnist", "seed": 2, "test_acc": 0.75, "routing": {"counts": [5, 2], "acc": 0.8},
             "config": config, "extra": "x"}]
    paths = write_rows(tmp_path / "out" / "experts", rows)
    assert paths == {"jsonl": str(tmp_path / "out" / "experts.jsonl"), "csv": str(tmp_path / "out" / "experts.csv")}
    assert read_rows(paths["jsonl"]) == rows
    assert [json.loads(line) for line in Path(paths["jsonl"]).read_text().splitlines()] == rows
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2
    assert [r["seed"] for r in table] == ["1", "2"]
    assert [float(r["test_acc"]) for r in table] == [0.5, 0.75]
    # nested metrics are flattened to dotted columns, lists JSON-encoded
    assert [float(r["routing.acc"]) for r in table] == [0.9, 0.8]
    assert json.loads(table[0]["routing.counts"]) == [3, 4]
    # every row's config survives in the CSV (one JSON column or flattened columns)
    if "config" in table[0]:
        assert json.loads(table[1]["config"]) == config
    else:
        assert float(table[1]["config.lr"]) == 0.01
    assert table[0]["extra"] == "" and table[1]["extra"] == "x"
    assert files_in(tmp_path / "out") == ["experts.csv", "experts.jsonl"]


def test_rows_keep_float32_digits_of_measurements_and_configs_exactly(tmp_path):
    config = {"lr": 0.123456789012, "seeds": [1]}
    row = {"acc": 0.9990543723106384, "history": [{"loss": 0.32029114583333335}], "config": config,
           "key": {"ridge": 0.1000000000001}}
    write_rows(tmp_path / "t", [row])
    common.append_row(tmp_path / "u.jsonl", row)
    for back in (read_rows(tmp_path / "t.jsonl")[0], read_rows(tmp_path / "u.jsonl")[0]):
        assert back["acc"] == 0.9990544 and back["history"][0]["loss"] == 0.3202911
        assert back["config"] == config and back["key"] == row["key"]


def test_read_rows_of_a_missing_file(tmp_path):
    assert read_rows(tmp_path / "none.jsonl") == []


def test_mean_std():
    assert mean_std([0.25]) == (0.25, 0.0)
    mean, std = mean_std(iter([1.0, 2.0, 3.0]))
    assert mean == pytest.approx(2.0) and std == pytest.approx(1.0)  # sample std (ddof=1)


def test_state_digest_names_the_weights_exactly():
    model, _ = make_model("lenet5")
    state = model.state_dict()
    digest = common.state_digest(state)
    assert digest == common.state_digest({k: v.clone() for k, v in state.items()})  # the values, not the objects
    nudged = {k: v.clone() for k, v in state.items()}
    first = next(k for k, v in nudged.items() if v.is_floating_point())
    nudged[first].view(-1)[0] += 1e-6
    assert common.state_digest(nudged) != digest
    renamed = {("x" + k if k == first else k): v for k, v in state.items()}
    assert common.state_digest(renamed) != digest
    assert common.state_digest({"n": torch.tensor(3)}) != common.state_digest({"n": torch.tensor(4)})  # 0-d tensors


def test_append_row_keeps_finished_rows_and_read_rows_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    common.append_row(path, {"a": 1})
    common.append_row(path, {"a": 2})
    assert read_rows(path) == [{"a": 1}, {"a": 2}]
    with open(path, "a") as f:
        f.write('{"a": 3, "b"')  # a crash in the middle of a write
    assert read_rows(path) == [{"a": 1}, {"a": 2}]
    common.append_row(path, {"a": 4})  # the next row starts on a line of its own
    assert read_rows(path)[-1] == {"a": 4} and len(read_rows(path)) == 3
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(common.UserError, match="line 2"):
        read_rows(path)


def test_compact_png_keeps_the_picture_in_fewer_bytes():
    import io

    from PIL import Image

    from common import compact_png

    generator = torch.Generator().manual_seed(0)
    gradient = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=generator).numpy()
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="png")
    small = compact_png(buffer.getvalue())
    assert len(small) < len(buffer.getvalue())
    back = torch.tensor(list(Image.open(io.BytesIO(small)).convert("RGB").getdata())).reshape(64, 64, 3)
    assert (back.float() - torch.from_numpy(gradient).float()).abs().mean() <= 40
