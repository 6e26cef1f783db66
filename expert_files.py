"""Experts trained elsewhere, given by file (docs/design.md section 3, "Experts from files"): load, check, wrap.

A problem entry gives such an expert as ``file:`` (config.ExpertFile), in one of three forms:

- TorchScript (``torch.jit.save``), read with ``torch.jit.load``. Its compiled code calls its submodules, so
  Python forward hooks never see them: a TorchScript expert gives logits only (no ``feature_layer``).
- a ``torch.export`` program (``.pt2``, ``torch.export.save``), read with ``torch.export.load`` and unflattened
  back into its module tree, where a forward hook on ``feature_layer`` reads the feature vector. Export it
  with a dynamic batch dimension.
- a state dict, with ``model: package.module:Class`` and ``model_kwargs``: the class is found in its module's
  source before any of that module's code runs (``import_class``), then imported and built, and the weights
  read with ``torch.load(weights_only=True)`` (a dict holding a ``state_dict`` entry, as this project's
  checkpoints do, works too).

``load_file_expert`` checks, before any work, that the file exists and reads as its form, that it is a
classifier (``[N, K]`` logits on a batch in its declared format), that K matches its class list, that its
input channels match the format, and that its feature layer exists; each failure is one ExpertFileError line.
``require`` says, at config load, when a rule needs what a file expert cannot give. A file's identity is the
digest of its bytes (``file_digest``): everything made from it is keyed by that digest.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import sys
import warnings
from functools import lru_cache
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torchvision.transforms.v2.functional import resize

from common import UserError
from config import ConfigError, ExpertFile, ProblemSpec

CHECK_BATCH = 3  # images in the batch every file expert is tried on when it loads
FEATURE_TYPES = ("feature", "agnostic_feature")  # gate types that read an expert's feature vector


class ExpertFileError(UserError, ValueError):
    """An expert file is missing, unreadable, or not the classifier its problem entry describes."""


def file_kind(spec: ExpertFile) -> str:
    """``state_dict`` when the entry names a class, ``export`` for a ``.pt2`` file, else ``torchscript``."""
    if spec.model:
        return "state_dict"
    return "export" if Path(spec.path).suffix == ".pt2" else "torchscript"


def file_digest(path: str | Path) -> str:
    """A short hash of a file's bytes (cached per file version): the identity of an expert given by file."""
    stat = Path(path).stat()
    return _digest(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=256)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the wrapper

class FileExpert(nn.Module):
    """A classifier loaded from a file, with the interface of this project's experts:
    ``forward(x, return_features=False)`` -> logits, or ``(logits, features)``.

    Inputs of another size than the file's lose ``crop`` border pixels and are resized (bilinear, antialiased:
    resizing commutes with the per-channel normalisation, so normalised images may come in). Features are the output of
    ``feature_layer``, flattened, read with a forward hook; without one they are ``[N, 0]`` (the rules that
    read features are refused at config load for such experts)."""

    def __init__(self, net: nn.Module, spec: ExpertFile, kind: str, where: str) -> None:
        super().__init__()
        self.net, self.kind, self.size, self.crop = net, kind, spec.size, spec.crop
        self.num_classes = len(spec.classes)
        self.feature_layer = spec.feature_layer
        self._features: torch.Tensor | None = None
        if spec.feature_layer:
            if kind == "torchscript":
                raise ExpertFileError(f"{where}: feature_layer {spec.feature_layer!r} cannot be read from a TorchScript "
                                      f"file (its compiled code calls submodules out of sight of forward hooks); save "
                                      f"the model with torch.export (.pt2) or as a state dict, or drop feature_layer")
            modules = dict(net.named_modules())
            if spec.feature_layer not in modules:
                names = [n for n in modules if n][:12]
                raise ExpertFileError(f"{where}: the model has no submodule {spec.feature_layer!r} for feature_layer; "
                                      f"its submodules: {', '.join(names)}")
            modules[spec.feature_layer].register_forward_hook(self._keep_features)

    def _keep_features(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._features = output[0] if isinstance(output, (tuple, list)) else output

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if tuple(x.shape[-2:]) != (self.size, self.size):
            if self.crop:
                x = x[..., self.crop:x.shape[-2] - self.crop, self.crop:x.shape[-1] - self.crop]
            if tuple(x.shape[-2:]) != (self.size, self.size):
                x = resize(x, [self.size, self.size], antialias=True)
        # contiguous: models written elsewhere may .view() their input, which a channels-last batch refuses
        logits = self.net(x.contiguous())
        if not return_features:
            return logits
        if self.feature_layer is None:
            return logits, logits.new_zeros(len(logits), 0)
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError(f"feature_layer {self.feature_layer!r} did not run in the model's forward")
        return logits, features.flatten(1)

    def class_weights(self) -> torch.Tensor:
        """``[K, D]``: the weights of the layer that produces the logits, taken as the last 2-d parameter with K
        rows (a classifier's head is registered last); model inversion reads them."""
        heads = [p for _, p in self.net.named_parameters() if p.dim() == 2 and p.shape[0] == self.num_classes]
        if not heads:
            raise ExpertFileError(f"the model has no 2-d weight with {self.num_classes} rows (a final linear layer)")
        return heads[-1]


# ---------------------------------------------------------------- loading the three forms

def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _load_torchscript(path: Path, spec: ExpertFile, where: str) -> nn.Module:
    try:
        with warnings.catch_warnings():  # torch deprecates TorchScript; users still have such files
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # torch raises several unrelated types for a file of another kind
        if _reads_as_state_dict(path):
            raise ExpertFileError(f"{where}: {path} holds a state dict, not TorchScript; name the class it fits with "
                                  f"model: package.module:Class (and model_kwargs)") from None
        raise ExpertFileError(f"{where}: {path} is not a readable TorchScript file ({_first_line(err)}); a "
                              f"torch.export program must end in .pt2, a state dict needs model: "
                              f"package.module:Class") from None


def _load_export(path: Path, spec: ExpertFile, where: str) -> nn.Module:
    try:
        program = torch.export.load(str(path))
    except Exception as err:  # torch raises several unrelated types for a damaged file
        raise ExpertFileError(f"{where}: {path} is not a readable torch.export program ({_first_line(err)})") from None
    # unflatten restores the module tree, so a forward hook can read the feature layer
    return torch.export.unflatten(program)


def _reads_as_state_dict(path: Path) -> bool:
    try:
        return isinstance(torch.load(path, map_location="cpu", weights_only=True), dict)
    except Exception:  # not a weights-only pickle at all
        return False


def import_class(dotted: str, where: str) -> type:
    """``package.module:Class`` -> the class (an nn.Module subclass). What can be checked without running any
    code comes first (the module is found, its source binds the name), so a typo never runs a module's code."""
    module_name, sep, name = dotted.partition(":")
    if not sep or not name.isidentifier() or not all(part.isidentifier() for part in module_name.split(".")):
        raise ExpertFileError(f"{where}: model={dotted!r} must be an import path package.module:Class")
    spec = module_spec(module_name)
    if spec is None:
        raise ExpertFileError(f"{where}: cannot find module {module_name!r} for model={dotted!r}; put its package "
                              f"on PYTHONPATH")
    check_source_binds(spec, name, dotted, where)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ExpertFileError(f"{where}: cannot import {module_name!r} for model={dotted!r} ({_first_line(err)}); "
                              f"put its package on PYTHONPATH") from None
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ExpertFileError(f"{where}: model={dotted!r}: {module_name} has no nn.Module class {name!r}")
    return cls


def module_spec(module_name: str) -> ModuleSpec | None:
    """Where ``module_name`` would be imported from, or None, found without running it or the packages above
    it (``importlib.util.find_spec`` imports those): each part is looked up by the import system's finders in
    the search path of the package found before it."""
    spec: ModuleSpec | None = None
    for depth in range(1, module_name.count(".") + 2):
        name = ".".join(module_name.split(".")[:depth])
        if name in sys.modules:  # imported already: its spec is known and nothing new runs
            spec = getattr(sys.modules[name], "__spec__", None)
        elif spec is not None and spec.submodule_search_locations is None:
            return None  # a module, not a package: nothing is found inside it
        else:
            spec = _find_spec(name, None if spec is None else spec.submodule_search_locations)
        if spec is None:
            return None
    return spec


def _find_spec(name: str, search: list[str] | None) -> ModuleSpec | None:
    """The first spec the import system's finders give for ``name`` in ``search`` (None: top level)."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        found = find(name, search) if find is not None else None
        if found is not None:
            return found
    return None


def check_source_binds(spec: ModuleSpec, name: str, dotted: str, where: str) -> None:
    """Refuse a module whose source binds no ``name`` at its top level (a class statement or an import: packages
    re-export their models). A module without Python source (compiled) is left to the import's check."""
    try:
        source = spec.loader.get_source(spec.name) if hasattr(spec.loader, "get_source") else None
    except (ImportError, OSError) as err:
        raise ExpertFileError(f"{where}: cannot read the source of {spec.name} for model={dotted!r} "
                              f"({_first_line(err)}); check the file's permissions") from None
    if source is None:
        return
    try:
        names = top_level_names(ast.parse(source))
    except SyntaxError as err:
        raise ExpertFileError(f"{where}: model={dotted!r}: {spec.origin} is not valid Python ({err.msg}, line "
                              f"{err.lineno}); fix the module") from None
    if name not in names:
        raise ExpertFileError(f"{where}: model={dotted!r}: {dotted.partition(':')[0]} has no nn.Module class "
                              f"{name!r} (its source {spec.origin} neither defines nor imports it by name at top "
                              f"level); name the module that defines the class, as package.module:Class")


def top_level_names(tree: ast.Module) -> set[str]:
    """The names a module's own top-level statements bind as classes or imports (``import *`` binds none that
    can be read without running it)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names if alias.name != "*")
    return names


def _load_state_dict(path: Path, spec: ExpertFile, where: str) -> nn.Module:
    cls = import_class(spec.model, where)
    try:
        net = cls(**spec.model_kwargs)
    except TypeError as err:
        raise ExpertFileError(f"{where}: cannot build {spec.model}(**{spec.model_kwargs}): {err}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a damaged or unsafe file
        raise ExpertFileError(f"{where}: {path} is not a state dict readable with weights_only=True "
                              f"({_first_line(err)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a checkpoint dict holding its weights under state_dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExpertFileError(f"{where}: {path} does not hold a state dict (a mapping of names to tensors)")
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that differ
        raise ExpertFileError(f"{where}: the weights in {path} do not fit {spec.model}(**{spec.model_kwargs}): "
                              f"{' '.join(str(err).split())[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ExpertFileError(f"{where}: the weights in {path} do not fit {spec.model}(**{spec.model_kwargs}): "
                              f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return net


LOADERS = {"torchscript": _load_torchscript, "export": _load_export, "state_dict": _load_state_dict}


def load_file_expert(spec: ExpertFile, where: str, device: torch.device | str = "cpu") -> FileExpert:
    """The expert of ``spec``, checked and in eval mode on ``device``; ``where`` names it in errors."""
    path = Path(spec.path)
    if not path.is_file():
        raise ExpertFileError(f"{where}: expert file {path} does not exist")
    if spec.crop < 0 or spec.size < 1 or spec.channels < 1:
        raise ExpertFileError(f"{where}: channels and size must be positive and crop at least 0")
    if len(spec.mean) != spec.channels or len(spec.std) != spec.channels:
        raise ExpertFileError(f"{where}: mean and std need one value per channel (channels: {spec.channels})")
    kind = file_kind(spec)
    expert = FileExpert(LOADERS[kind](path, spec, where), spec, kind, where).eval()
    _check_classifier(expert, spec, where)
    return expert.to(device)


def _input_width(net: nn.Module) -> tuple[int, int] | None:
    """``(ndim, inputs)`` of the model's first weight: a convolution's input channels, a linear layer's inputs."""
    first = next((p for p in net.parameters() if p.dim() in (2, 4)), None)
    return None if first is None else (first.dim(), first.shape[1])


def _check_classifier(expert: FileExpert, spec: ExpertFile, where: str) -> None:
    c, s = spec.channels, spec.size
    width = _input_width(expert.net)
    if width is not None and width[0] == 4 and width[1] != c:
        raise ExpertFileError(f"{where}: the model's first convolution takes {width[1]} input channels, but its format "
                              f"says channels: {c}")
    if width is not None and width[0] == 2 and width[1] not in (c * s * s, c):
        raise ExpertFileError(f"{where}: the model's first linear layer takes {width[1]} inputs, not channels x size x "
                              f"size = {c} x {s} x {s} = {c * s * s}; check channels and size")
    x = torch.rand(CHECK_BATCH, c, s, s)
    try:
        with torch.no_grad():
            out = expert(x, return_features=spec.feature_layer is not None)
    except Exception as err:  # whatever the foreign model raises on an input of the declared format
        hint = " (export it with a dynamic batch dimension)" if expert.kind == "export" else ""
        raise ExpertFileError(f"{where}: {path_of(spec)} fails on a batch of {c}x{s}x{s} images, its declared format"
                              f"{hint}: {_first_line(err)}") from None
    logits, features = out if spec.feature_layer is not None else (out, None)
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and len(logits) == CHECK_BATCH
            and logits.is_floating_point()):
        got = f"a {type(logits).__name__}" if not isinstance(logits, torch.Tensor) else \
            f"a {logits.dtype} tensor of shape {list(logits.shape)}"
        raise ExpertFileError(f"{where}: {path_of(spec)} is not a classifier: on {CHECK_BATCH} images it returns {got}, "
                              f"not [{CHECK_BATCH}, K] logits")
    if logits.shape[1] != len(spec.classes):
        raise ExpertFileError(f"{where}: {path_of(spec)} returns {logits.shape[1]} logits per image, but its entry "
                              f"lists {len(spec.classes)} classes")
    if features is not None and len(features) != CHECK_BATCH:
        raise ExpertFileError(f"{where}: feature_layer {spec.feature_layer!r} gives no [N, D] output per image")


def path_of(spec: ExpertFile) -> str:
    return str(Path(spec.path))


# ---------------------------------------------------------------- what rules need

def require(problem: str, spec: ProblemSpec, *, features: str = "", batchnorm: str = "",
            class_weights: str = "", penultimate: str = "") -> None:
    """Raise ConfigError when a file expert of ``problem`` cannot give what a rule needs: its feature vector,
    BatchNorm statistics, final-layer class weights, or the input of its final layer (the detectors' penultimate
    features, read with a hook); each argument, when given, names the rule."""
    for k, expert in enumerate(spec.experts):
        if expert.file is None:
            continue
        where = f"problem {problem!r}, expert {k} ({expert.file.path})"
        if penultimate and file_kind(expert.file) == "torchscript":
            raise ConfigError(f"{where}: {penultimate} reads the input of the expert's final layer, which forward "
                              f"hooks cannot see in TorchScript; save the model with torch.export or as a state "
                              f"dict, or use a detector that reads logits alone, without stats")
        if features and not expert.file.feature_layer:
            raise ConfigError(f"{where}: {features} reads the expert's feature vector, and this file expert names no "
                              f"feature_layer (a submodule of a torch.export or state-dict model); use a rule that "
                              f"reads logits only (universal, logits, agnostic_logits gates)")
        if not (batchnorm or class_weights):
            continue
        model = load_file_expert(expert.file, where)
        if batchnorm and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ConfigError(f"{where}: {batchnorm} matches BatchNorm statistics, and this file expert has no BatchNorm "
                              f"layer it can hook (only a state-dict model shows its layers as modules)")
        if class_weights:
            try:
                model.class_weights()
            except ExpertFileError as err:
                raise ConfigError(f"{where}: {class_weights} needs the final layer's class weights: {err}") from None
