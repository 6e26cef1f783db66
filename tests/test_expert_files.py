"""Experts from files (expert_files.py): a classifier defined outside archs/ (tests/external_models.TinyMLP),
trained here on a fake data root and saved as TorchScript, as a torch.export program and as a state dict,
combined with an expert of this project through logit rules, the universal gate (also ``gates_from`` another
problem), per-expert gates (one reading a feature layer) and the data-free synthesizers; and every check
that refuses a bad file or a rule the file cannot serve, before any work, in one line."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.transforms.v2.functional import resize

import data
import merge
import train_gan
import train_pan
import train_source_networks
from artifacts import Layout
from common import CheckpointError, save_checkpoint
from config import ConfigError, ExpertFile, GanConfig, MergeConfig, PanConfig, TaskSpec, TrainConfig, parse_args
from data import InputFormat, load_task, prepare_input, to_unit
from expert_files import ExpertFileError, FileExpert, file_digest, import_class, load_file_expert
from external_models import TinyMLP
from problems import build_problem
from test_problems import make_data_root

SEED = 1
EXPERT = ["expert.epochs=1", "expert.batch_size=16"]
GATE = ["gate.epochs=1", "gate.train_limit=60"]
MNIST = {"channels": 1, "size": 28, "mean": [0.1307], "std": [0.3081]}
DIGITS = ["5", "6", "7", "8", "9"]
FORMS = ("torchscript", "export", "state_dict")


def train_tiny(root: Path) -> TinyMLP:
    """TinyMLP on the fake root's digits 5-9 at 28x28 (the size its entry declares), a few full-batch steps."""
    train = load_task(TaskSpec("mnist", [5, 6, 7, 8, 9]), "train", root)
    x = resize(prepare_input(to_unit(train.images), InputFormat(1, (0.1307,), (0.3081,))), [28, 28], antialias=True)
    return fit_tiny(x, train.labels)


def fit_tiny(x: torch.Tensor, labels: torch.Tensor) -> TinyMLP:
    """TinyMLP fitted to normalised 28x28 images ``x`` by 60 full-batch Adam steps."""
    torch.manual_seed(0)
    model = TinyMLP()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def save_as(model: torch.nn.Module, form: str, folder: Path) -> dict:
    """Save ``model`` in one of the three forms; returns the ``file:`` entry that describes it."""
    folder.mkdir(parents=True, exist_ok=True)
    entry = {**MNIST, "classes": DIGITS}
    if form == "torchscript":
        path = folder / "tiny.ts"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.script(model).save(str(path))
    elif form == "export":
        path = folder / "tiny.pt2"
        program = torch.export.export(model, (torch.zeros(2, 1, 28, 28),),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, str(path))
        entry["feature_layer"] = "body"
    else:
        path = folder / "tiny_state.pt"
        torch.save(model.state_dict(), path)
        entry.update(model="external_models:TinyMLP", model_kwargs={"hidden": 32}, feature_layer="body")
    return {**entry, "path": str(path)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A fake data root, a LeNet5 expert of this project on digits 0-4, TinyMLP in the three forms."""
    base = tmp_path_factory.mktemp("files")
    root, ckpt = base / "data", base / "ckpt"
    data._load_cached.cache_clear()
    make_data_root(root, n_train=200, n_test=40, n_cifar=0)
    train_source_networks.main(parse_args(TrainConfig, [
        "dataset=first5_mnist", f"seeds=[{SEED}]", *EXPERT, "device=cpu", f"data_dir={root}", f"ckpt_dir={ckpt}",
        f"results_dir={base / 'results'}"]))
    tiny = train_tiny(root)
    entries = {form: save_as(tiny, form, base / form) for form in FORMS}
    yield {"base": base, "root": root, "ckpt": ckpt, "tiny": tiny, "entries": entries}
    data._load_cached.cache_clear()


def write_problem(path: Path, entry: dict, name: str = "mixed", extra: dict | None = None) -> Path:
    """A YAML file defining problem ``name``: this project's first5 expert and the file expert on last5."""
    problems = {name: {"experts": [{"task": "first5_mnist"}, {"task": "last5_mnist", "file": entry}]}}
    path.write_text(yaml.safe_dump({"problem": name, "problems": {**problems, **(extra or {})}}))
    return path


def args(env, results: Path, *extra: str) -> list[str]:
    return [*gan_args(env, results), f"data_dir={env['root']}", *GATE, *extra]


def gan_args(env, results: Path) -> list[str]:
    """The synthesis stage's settings: it reads no data and trains no gate."""
    return [f"seeds=[{SEED}]", f"ckpt_dir={env['ckpt']}", f"results_dir={results}", "device=cpu", *EXPERT]


# ---------------------------------------------------------------- the three forms run every kind of rule

@pytest.mark.parametrize("form", FORMS)
def test_a_file_expert_loads_in_each_form_and_matches_the_model(env, form):
    entry = ExpertFile(**env["entries"][form])
    expert = load_file_expert(entry, "test")
    assert isinstance(expert, FileExpert) and expert.kind == form
    x = torch.randn(4, 1, 32, 32)  # the problem's size: resized to the file's 28x28
    expected = env["tiny"](resize(x, [28, 28], antialias=True))
    logits, features = expert(x, return_features=True)
    torch.testing.assert_close(logits, expected)
    assert features.shape == ((4, 32) if entry.feature_layer else (4, 0))
    if entry.feature_layer:  # the hook reads the named submodule's output
        torch.testing.assert_close(features, env["tiny"].body(resize(x, [28, 28], antialias=True)))
    torch.testing.assert_close(expert.class_weights(), env["tiny"].head.weight)


def test_crop_gives_a_model_trained_on_28x28_originals_its_images_back(env):
    expert = load_file_expert(ExpertFile(**{**env["entries"]["export"], "crop": 2}), "test")
    x = torch.randn(4, 1, 32, 32)
    torch.testing.assert_close(expert(x), env["tiny"](x[..., 2:30, 2:30]))  # no resize left to do


@pytest.mark.parametrize("form", FORMS)
def test_rules_and_gates_run_on_a_file_expert(env, tmp_path, form):
    yaml_file = write_problem(tmp_path / "mixed.yaml", env["entries"][form])
    # a per-expert gate reading the feature layer where the form has one (TorchScript: logits only)
    per_expert = "logits" if form == "torchscript" else "feature"
    pan = train_pan.main(parse_args(PanConfig, [str(yaml_file), *args(env, tmp_path),
                                                f"gate_types=[universal,{per_expert}]", "regimes=[real]"]))
    assert pan["made"] == 3 and set(pan["membership_acc"]) == {"real/universal", f"real/{per_expert}"}
    strategies = (f"[naive,energy,{{name: gate_hard, gate: universal, regime: real}},"
                  f"{{name: gate_confident, gate: {per_expert}, regime: real}}]")
    summary = merge.main(parse_args(MergeConfig, [str(yaml_file), *args(env, tmp_path), f"strategies={strategies}"]))
    labels = ["naive", "energy", "gate_hard(gate=universal,regime=real)",
              f"gate_confident(gate={per_expert},regime=real)", "oracle"]
    assert list(summary["acc"]) == labels
    assert all(0 <= summary["acc"][label]["mean"] <= 1 for label in labels)
    rows = {r["strategy"]: r for r in merge.read_rows(summary["outputs"]["jsonl"])}
    assert rows["expert:last5_mnist"]["acc"] > 0.5  # the trained TinyMLP, resized inputs and all
    # a rerun reuses every row: the file's digest is the expert's identity
    again = merge.main(parse_args(MergeConfig, [str(yaml_file), *args(env, tmp_path), f"strategies={strategies}"]))
    assert again["made"] == 0


def test_the_universal_gate_of_another_problem_serves_a_file_expert(env, tmp_path):
    entry = env["entries"]["torchscript"]
    swapped = {"experts": [{"task": "last5_mnist", "file": entry}, {"task": "first5_mnist"}]}
    yaml_file = write_problem(tmp_path / "p.yaml", entry, extra={"swapped": swapped})
    train_pan.main(parse_args(PanConfig, [str(yaml_file), *args(env, tmp_path), "gate_types=[universal]",
                                          "regimes=[real]"]))
    strategy = "[{name: gate_hard, gate: universal, regime: real, gates_from: mixed}]"
    summary = merge.main(parse_args(MergeConfig, [str(yaml_file), *args(env, tmp_path), "problem=swapped",
                                                  f"strategies={strategy}"]))
    row = next(r for r in merge.read_rows(summary["outputs"]["jsonl"]) if r["strategy"].startswith("gate_hard"))
    assert row["gate_experts"]["last5_mnist"]["seen"]  # the same file, so the gate has seen this expert


def test_data_free_synthesizers_run_on_a_file_expert(env, tmp_path):
    yaml_file = write_problem(tmp_path / "p.yaml", env["entries"]["export"])
    summary = train_gan.main(parse_args(GanConfig, [
        str(yaml_file), *gan_args(env, tmp_path), "synthesizers=[dafl,inversion]",
        "dafl.epochs=1", "dafl.iters_per_epoch=2", "dafl.batch_size=8", "dafl.width=8", "dafl.images=16",
        "inversion.images=8", "inversion.steps=2", "inversion.batch_size=8", "eval_samples=8"]))
    assert summary["made"] == 6  # per expert: a generator, its set, an inversion set
    layout = Layout(parse_args(GanConfig, [str(yaml_file), f"ckpt_dir={env['ckpt']}", *EXPERT, "dafl.epochs=1",
                                           "dafl.iters_per_epoch=2", "dafl.batch_size=8", "dafl.width=8",
                                           "dafl.images=16"]))
    file_expert = build_problem("mixed", layout.problems["mixed"], layout.tasks, str(env["root"])).experts[1]
    assert layout.synthetic_path("dafl", file_expert, SEED).is_file()


def test_a_file_experts_identity_is_its_digest(env, tmp_path):
    entry = dict(env["entries"]["state_dict"])
    copy = tmp_path / "copy.pt"
    copy.write_bytes(Path(entry["path"]).read_bytes())
    yaml_file = write_problem(tmp_path / "p.yaml", {**entry, "path": str(copy)})
    layout = Layout(parse_args(PanConfig, [str(yaml_file), f"ckpt_dir={tmp_path}", *GATE]))
    before = layout.gate_path("mixed", "real", "universal", None, SEED)
    state = torch.load(copy, weights_only=True)
    state["head.bias"] += 1
    torch.save(state, copy)
    assert file_digest(copy) != file_digest(entry["path"])
    assert layout.gate_path("mixed", "real", "universal", None, SEED) != before  # new weights, new gates


def test_a_lenet5_saved_as_a_plain_state_dict_is_an_expert_by_file(env, tmp_path):
    """The issue's crash: a state dict given where a checkpoint belongs; by file, with its class, it works."""
    ckpt = torch.load(next((env["ckpt"] / "experts").glob("first5_mnist_*.pt")), weights_only=True)
    plain = tmp_path / "lenet_state.pt"
    torch.save(ckpt["state_dict"], plain)
    entry = {"path": str(plain), "channels": 1, "size": 32, "mean": [0.1307], "std": [0.3081],
             "classes": ["0", "1", "2", "3", "4"], "model": "archs.lenet:LeNet5",
             "model_kwargs": {"in_channels": 1, "num_classes": 5}, "feature_layer": "convs"}
    expert = load_file_expert(ExpertFile(**entry), "test")
    assert expert(torch.zeros(2, 1, 32, 32), return_features=True)[1].shape == (2, 120)


def test_a_checkpoint_without_meta_or_of_an_unknown_arch_says_what_to_do(tmp_path):
    from common import load_model

    bad = tmp_path / "x.pt"
    torch.save({"arch": "mystery_net", "arch_kwargs": {}, "state_dict": {}}, bad)
    with pytest.raises(CheckpointError, match="unknown arch 'mystery_net'.*given by file"):
        load_model(bad)


# ---------------------------------------------------------------- one clear line before any work

class NotAClassifier(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class RGBNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def scripted(model: torch.nn.Module, path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(path))
    return str(path)


def check(env, tmp_path, entry: dict) -> None:
    yaml_file = write_problem(tmp_path / "bad.yaml", entry)
    cfg = parse_args(MergeConfig, [str(yaml_file), *args(env, tmp_path), "strategies=[naive]"])
    build_problem("mixed", cfg.problems["mixed"], cfg.tasks, cfg.data_dir)


def test_each_bad_file_fails_in_one_line(env, tmp_path):
    good = env["entries"]["state_dict"]
    garbage = tmp_path / "garbage.ts"
    garbage.write_bytes(b"not a model")
    cases = [
        ({**good, "path": str(tmp_path / "nowhere.pt")}, ExpertFileError, "does not exist"),
        ({**env["entries"]["torchscript"], "path": str(garbage)}, ExpertFileError, "not a readable TorchScript file"),
        ({**good, "model": None, "model_kwargs": {}, "feature_layer": None}, ExpertFileError,
         "holds a state dict, not TorchScript"),
        ({**good, "model": "external_models.TinyMLP"}, ExpertFileError, "package.module:Class"),
        ({**good, "model": "external_models:Missing"}, ExpertFileError, "no nn.Module class 'Missing'"),
        ({**good, "model_kwargs": {"hidden": 16}}, ExpertFileError, "do not fit external_models:TinyMLP"),
        ({**good, "classes": DIGITS[:4]}, ConfigError, "lists 4 classes, but its task 'last5_mnist'"),
        ({**good, "feature_layer": "nope"}, ExpertFileError, "no submodule 'nope'.*body"),
        ({**env["entries"]["torchscript"], "feature_layer": "body"}, ExpertFileError, "cannot be read from a TorchScript"),
        ({**good, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}, ExpertFileError,
         "first linear layer takes 784 inputs, not channels x size x size = 3 x 28 x 28"),
        ({**good, "mean": [0.1, 0.2]}, ExpertFileError, "one value per channel"),
        ({**MNIST, "size": 32, "classes": DIGITS, "path": scripted(NotAClassifier(), tmp_path / "nc.ts")},
         ExpertFileError, "is not a classifier: on 3 images it returns a tuple"),
        ({**MNIST, "size": 32, "classes": DIGITS, "path": scripted(RGBNet(), tmp_path / "rgb.ts")},
         ExpertFileError, "first convolution takes 3 input channels, but its format says channels: 1"),
    ]
    for entry, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            check(env, tmp_path, entry)
        assert "\n" not in str(caught.value), str(caught.value)


SIDE_EFFECT = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nraise RuntimeError('must not run')\n"


def test_a_class_path_is_checked_before_its_module_runs(tmp_path, monkeypatch):
    """A module (or a package above it) whose import has side effects does not run when its source lacks the
    class; each refusal is one line. A class its package re-exports by an import is found."""
    marker = tmp_path / "ran.txt"
    code = SIDE_EFFECT.format(marker=str(marker))
    (tmp_path / "noisy_models.py").write_text(code + "class Other:\n    pass\n")
    package = tmp_path / "noisy_package"
    package.mkdir()
    (package / "__init__.py").write_text(code)
    (package / "models.py").write_text(code)
    (tmp_path / "plain_models.py").write_text("class NotAModule:\n    pass\n")
    exporter = tmp_path / "exporting_package"
    exporter.mkdir()
    (exporter / "__init__.py").write_text("from .nets import Net\n")
    (exporter / "nets.py").write_text("import torch.nn as nn\n\n\nclass Net(nn.Module):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("plain_models", "exporting_package", "exporting_package.nets"):  # imported below: forget after
        monkeypatch.delitem(sys.modules, name, raising=False)
    cases = [("noisy_models:FashionCNN", r"no nn.Module class 'FashionCNN' \(its source .*noisy_models.py neither"),
             ("noisy_package.models:FashionCNN", "noisy_package.models has no nn.Module class 'FashionCNN'"),
             ("noisy_package.absent:Net", "cannot find module 'noisy_package.absent'.*PYTHONPATH"),
             ("plain_models:NotAModule", "plain_models has no nn.Module class 'NotAModule'$"),
             ("noisy_models:Fashion CNN", "must be an import path")]
    for dotted, message in cases:
        with pytest.raises(ExpertFileError, match=message) as caught:
            import_class(dotted, "test")
        assert "\n" not in str(caught.value)
    assert not marker.exists()
    assert not {"noisy_models", "noisy_package", "noisy_package.models"} & set(sys.modules)
    assert import_class("exporting_package:Net", "test").__name__ == "Net"


def test_a_width_that_differs_from_the_class_list_fails(env, tmp_path):
    entry = {**env["entries"]["torchscript"], "classes": DIGITS + ["extra"]}
    other = {"experts": [{"task": "first5_mnist"}, {"task": "mnist", "file": entry}]}
    yaml_file = write_problem(tmp_path / "p.yaml", env["entries"]["torchscript"], extra={"wide": other})
    cfg = parse_args(MergeConfig, [str(yaml_file), *args(env, tmp_path)])
    with pytest.raises(ConfigError, match="lists 6 classes, but its task 'mnist'.*has 10"):
        build_problem("wide", cfg.problems["wide"], cfg.tasks, cfg.data_dir)
    entry = {**entry, "classes": [str(d) for d in range(10)]}
    with pytest.raises(ExpertFileError, match="returns 5 logits per image, but its entry lists 10 classes"):
        load_file_expert(ExpertFile(**entry), "test")


def test_rules_that_need_what_a_file_cannot_give_fail_at_config_load(env, tmp_path, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("work started before the config was refused")

    monkeypatch.setattr(merge, "build_problem", no_work)
    monkeypatch.setattr(train_pan, "build_problem", no_work)
    yaml_file = write_problem(tmp_path / "p.yaml", env["entries"]["torchscript"])  # logits only
    with pytest.raises(ConfigError, match="strategy gate_hard.*reads the expert's feature vector.*no feature_layer"):
        merge.main(parse_args(MergeConfig, [str(yaml_file), *args(env, tmp_path),
                                            "strategies=[{name: gate_hard, gate: feature, regime: real}]"]))
    with pytest.raises(ConfigError, match="gate type 'agnostic_feature' reads the expert's feature vector"):
        train_pan.main(parse_args(PanConfig, [str(yaml_file), *args(env, tmp_path), "gate_types=[agnostic_feature]"]))
    with pytest.raises(ConfigError, match="synthesizer 'dafl' reads the expert's feature vector"):
        train_gan.main(parse_args(GanConfig, [str(yaml_file), *gan_args(env, tmp_path)]))
    both = tmp_path / "q.yaml"  # two experts by file, so that the check of this project's archs passes
    both.write_text(yaml.safe_dump({"problem": "files", "problems": {"files": {"experts": [
        {"task": "last5_mnist", "file": env["entries"]["export"]},
        {"task": "first5_mnist", "file": env["entries"]["state_dict"]}]}}}))
    with pytest.raises(ConfigError, match="expert 0 .*synthesizer 'deepinversion' matches BatchNorm statistics"):
        train_gan.main(parse_args(GanConfig, [str(both), *gan_args(env, tmp_path),
                                              "synthesizers=[deepinversion]"]))
    shared = {"shared_labels": True, "experts": [{"task": "last5_mnist"}, {"task": "last5_mnist",
                                                                            "file": env["entries"]["export"]}]}
    cfg = parse_args(MergeConfig, [str(write_problem(tmp_path / "s.yaml", env["entries"]["export"],
                                                     extra={"shared": shared})), *args(env, tmp_path)])
    # a fusion parent by file must be a state dict fusion can walk (tests/test_parent_files.py)
    with pytest.raises(ExpertFileError, match="fusion parent .* must be a state dict"):
        build_problem("shared", cfg.problems["shared"], cfg.tasks, cfg.data_dir)


def test_a_project_checkpoint_dict_is_read_as_a_state_dict(env, tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, env["tiny"], "tiny", {}, {}, {})
    entry = {**env["entries"]["state_dict"], "path": str(path)}
    assert load_file_expert(ExpertFile(**entry), "test").num_classes == 5
