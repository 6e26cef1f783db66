"""Fusion parents trained elsewhere (docs/fusion_resnet.md, "Parents from files"): a state dict with its class path,
rebuilt as one of the networks fusion/ walks.

An expert given by file (expert_files.py) in a problem with shared labels is a fusion parent. Its class is found,
built and filled as for any state-dict expert, and must be a network fusion can walk:

- a chain of levels: the entry's ``levels`` name its Linear (and Conv2d) modules in the order the data meets them,
  hidden levels then the output layer (``pools`` the convolutions a 2x2 max-pool follows), ReLUs between them;
  Linear levels alone rebuild as an MLP (archs/mlp.py), convolutions then Linear levels as a VGG (archs/vgg.py:
  3x3 kernels, padding 1, stride 1). Without ``levels``, an MLP or VGG of archs/ is read by its own names;
- a ResNet of archs/resnet.py (its class path ``archs.resnet:ResNet`` with its ``model_kwargs``), taken as it is;
- another residual network of the same layout, through ``rename``: prefixes of its parameter names mapped to
  archs/resnet.py's; the depth, width, batch norm and biases are read from the renamed parameters' shapes.

The rebuilt parent reads the problem's 32x32 images in the source's own normalisation (an MLP crops ``crop``
pixels itself; nothing is resized), and must give the file's model's logits on a check batch. What does not fit
fails when the problem loads, in one line naming the level and its shape.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from archs.mlp import MLP
from archs.resnet import LAYOUTS, STAGE_WIDTHS, ResNet, stage_widths
from archs.vgg import POOL, VGG
from config import ExpertFile
from data import IMAGE_SIZE, InputFormat
from expert_files import ExpertFileError, file_kind, load_file_expert

CHECK_TOLERANCE = 1e-4  # relative: the rebuilt parent's logits against the file's model's, float32 both


def family_of(parent: nn.Module) -> str:
    """The registered arch a rebuilt parent is (archs/__init__.py): mlp, vgg or resnet."""
    return {MLP: "mlp", VGG: "vgg"}.get(type(parent), "resnet")


def _own_levels(net: nn.Module) -> tuple[list[str], list[str]]:
    """An MLP's or VGG's own level names and pooled convolutions."""
    if isinstance(net, MLP):
        return [f"layers.{i}" for i in range(len(net.layers))], []
    convs = [f"convs.{i}" for i in range(len(net.convs))]
    return convs + [f"linears.{i}" for i in range(len(net.linears))], [c for c, p in zip(convs, net.pool_after) if p]


def _modules(net: nn.Module, spec: ExpertFile, where: str) -> tuple[list[str], list[nn.Linear | nn.Conv2d]]:
    """The level names and modules, each checked to exist, to be a Linear or a 3x3 Conv2d, and to read what the
    level before it gives."""
    if spec.levels:
        names = list(spec.levels)
    elif isinstance(net, (MLP, VGG)):
        names = _own_levels(net)[0]
    else:
        raise ExpertFileError(f"{where}: {type(net).__name__} is not an MLP, VGG or ResNet of archs/; give levels: the "
                              f"names of its Linear (and Conv2d) modules in order, output layer last")
    found = dict(net.named_modules())
    modules = []
    for i, name in enumerate(names):
        module = found.get(name)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            choices = [n for n, m in found.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
            what = "is not a module of the model" if module is None else f"is a {type(module).__name__}"
            raise ExpertFileError(f"{where}: level {i} {name!r} {what}, not a Linear or Conv2d; its Linear and Conv2d "
                                  f"modules: {', '.join(choices)}")
        if isinstance(module, nn.Conv2d) and (module.kernel_size != (3, 3) or module.padding != (1, 1)
                                              or module.stride != (1, 1)):
            raise ExpertFileError(f"{where}: level {i} {name!r} is a {module.kernel_size} convolution with padding "
                                  f"{module.padding} and stride {module.stride}; a VGG-style level is 3x3, padding 1, "
                                  "stride 1")
        if isinstance(module, nn.Conv2d) and modules and isinstance(modules[-1], nn.Linear):
            raise ExpertFileError(f"{where}: level {i} {name!r} is a convolution after a Linear level; convolutions "
                                  "come first")
        modules.append(module)
    if len({m.bias is None for m in modules}) > 1:
        raise ExpertFileError(f"{where}: levels {names} mix layers with and without biases; fusion needs all or none")
    return names, modules


def _rebuilt(net: nn.Module, spec: ExpertFile, where: str) -> MLP | VGG:
    names, modules = _modules(net, spec, where)
    pools = list(spec.pools) if spec.levels else _own_levels(net)[1] if isinstance(net, (MLP, VGG)) else []
    bias = modules[0].bias is not None
    side = spec.size
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    if len(modules) < 2:
        raise ExpertFileError(f"{where}: levels {names} hold no hidden level; fusion aligns hidden levels, so a parent "
                              "needs at least two")
    if not convs:
        inputs = spec.channels * side * side
        template = MLP(spec.channels, len(spec.classes), [m.out_features for m in modules[:-1]], bias, IMAGE_SIZE,
                       spec.crop)
    else:
        if spec.crop or side != IMAGE_SIZE:
            raise ExpertFileError(f"{where}: a convolutional fusion parent reads the problem's {IMAGE_SIZE}x"
                                  f"{IMAGE_SIZE} images as they are: size must be {IMAGE_SIZE} and crop 0")
        inputs = spec.channels
        unknown = [p for p in pools if p not in names[:len(convs)]]
        if unknown:
            raise ExpertFileError(f"{where}: pools {unknown} are not convolution levels ({names[:len(convs)]})")
        layers: list[int | str] = []
        for name, conv in zip(names, convs):
            layers += [conv.out_channels, POOL] if name in pools else [conv.out_channels]
        template = VGG(spec.channels, len(spec.classes), layers, [m.out_features for m in modules[len(convs):-1]],
                       bias, IMAGE_SIZE)
    for i, (name, module) in enumerate(zip(names, modules)):
        given = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
        flatten = isinstance(module, nn.Linear) and i > 0 and isinstance(modules[i - 1], nn.Conv2d)
        expected = inputs * (template.positions if flatten else 1)
        if given != expected:
            source = f"level {i - 1} {names[i - 1]!r}" if i else f"the {spec.channels}x{side}x{side} input"
            raise ExpertFileError(f"{where}: level {i} {name!r} takes {given} inputs, but {source} gives {expected}")
        inputs = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
    if inputs != len(spec.classes):
        raise ExpertFileError(f"{where}: the last level {names[-1]!r} gives {inputs} outputs, but the entry lists "
                              f"{len(spec.classes)} classes")
    targets = list(template.layers) if isinstance(template, MLP) else [*template.convs, *template.linears]
    with torch.no_grad():
        for target, module in zip(targets, modules):
            target.weight.copy_(module.weight)
            if bias:
                target.bias.copy_(module.bias)
    return template


def _renamed(state: dict[str, torch.Tensor], rename: dict[str, str], where: str) -> tuple[dict, dict[str, str]]:
    """The file's parameters under archs/resnet.py's names (the longest matching prefix renames a name), and each
    new name's name in the file."""
    prefixes = sorted(rename, key=len, reverse=True)
    renamed, origin = {}, {}
    for name, value in state.items():
        prefix = next((p for p in prefixes if name == p or name.startswith(p + ".")), None)
        ours = name if prefix is None else rename[prefix] + name[len(prefix):]
        if ours in renamed:
            raise ExpertFileError(f"{where}: rename maps both {origin[ours]!r} and {name!r} to {ours!r}")
        renamed[ours], origin[ours] = value, name
    return renamed, origin


def _resnet_from_map(net: nn.Module, spec: ExpertFile, where: str) -> ResNet:
    """A residual network whose parameter names differ from archs/resnet.py's, rebuilt as a ResNet of that file
    through ``spec.rename``; its depth, width, batch norm and biases read from the renamed parameters."""
    state, origin = _renamed(net.state_dict(), spec.rename, where)
    names = ("archs/resnet.py names body.0 the stem convolution, body.1 its norm, body.3 on the blocks in order, "
             "fc the classifier")
    stem, fc = state.get("body.0.weight"), state.get("fc.weight")
    if stem is None or stem.dim() != 4 or fc is None or fc.dim() != 2:
        missing = "body.0.weight" if stem is None or stem.dim() != 4 else "fc.weight"
        raise ExpertFileError(f"{where}: after rename there is no {missing!r}; map the file's names onto ours "
                              f"({names}); the file's parameters: {', '.join(list(origin.values())[:12])}")
    blocks = 0
    while f"body.{3 + blocks}.conv1.weight" in state:
        blocks += 1
    depth = {sum(layout): d for d, layout in LAYOUTS.items()}.get(blocks)
    if depth is None:
        unplaced = [name for ours, name in origin.items() if not ours.startswith(("body.", "fc."))]
        raise ExpertFileError(f"{where}: after rename the blocks body.3 on number {blocks}; a ResNet of archs/resnet.py "
                              f"has {' or '.join(f'{sum(v)} (depth {d})' for d, v in LAYOUTS.items())}; the file's "
                              f"parameters placed nowhere: {', '.join(unplaced[:6]) or 'none'}")
    width = stem.shape[0] / STAGE_WIDTHS[0]
    try:
        stage_widths(width)
    except ValueError as err:
        raise ExpertFileError(f"{where}: its stem has {stem.shape[0]} channels: {err}") from None
    template = ResNet(stem.shape[1], fc.shape[0], depth, width, batch_norm="body.1.weight" in state,
                      bias="body.0.bias" in state)
    expected = template.state_dict()
    unfilled = [k for k in expected if k not in state]
    if unfilled:
        unplaced = [origin[k] for k in state if k not in expected]
        raise ExpertFileError(f"{where}: rename leaves {unfilled[0]!r} of a depth-{depth} ResNet unfilled"
                              f"{f' (and {len(unfilled) - 1} more)' if len(unfilled) > 1 else ''}; the file's "
                              f"parameters it places nowhere: {', '.join(unplaced[:6]) or 'none'}")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise ExpertFileError(f"{where}: the file's {origin[key]!r} (as {key!r}) is {tuple(state[key].shape)}, but "
                                  f"a depth-{depth} ResNet of width {width:g} needs {tuple(value.shape)}")
    extra = [origin[k] for k in state if k not in expected]
    if extra:
        raise ExpertFileError(f"{where}: rename places the file's {', '.join(extra[:6])} nowhere in a depth-{depth} "
                              f"ResNet ({names})")
    template.load_state_dict(state)
    return template


def check_format(spec: ExpertFile, source_format: InputFormat, where: str) -> None:
    """A fusion parent reads the problem's images in the source's normalisation, like every other parent."""
    same = spec.channels == source_format.channels and all(
        math.isclose(a, b, rel_tol=1e-6) for a, b in zip([*spec.mean, *spec.std], [*source_format.mean,
                                                                                   *source_format.std]))
    if not same:
        raise ExpertFileError(f"{where}: a fusion parent must read its source's format (channels "
                              f"{source_format.channels}, mean {list(source_format.mean)}, std "
                              f"{list(source_format.std)}), so that the parents fuse into one network; the entry says "
                              f"channels {spec.channels}, mean {spec.mean}, std {spec.std}")
    if spec.size + 2 * spec.crop != IMAGE_SIZE:
        raise ExpertFileError(f"{where}: a fusion parent reads the problem's {IMAGE_SIZE}x{IMAGE_SIZE} images without "
                              f"resizing: size + 2 x crop must be {IMAGE_SIZE}, not {spec.size} + 2 x {spec.crop}")


def load_fusion_parent(spec: ExpertFile, source_format: InputFormat, where: str,
                       device: torch.device | str = "cpu") -> nn.Module:
    """The fusion parent a state-dict file gives, checked, in eval mode on ``device``."""
    if file_kind(spec) != "state_dict":
        raise ExpertFileError(f"{where}: a fusion parent is walked module by module, so it must be a state dict with its "
                              f"class (model: package.module:Class); TorchScript and torch.export files cannot be")
    check_format(spec, source_format, where)
    expert = load_file_expert(spec, where)
    if spec.rename and spec.levels:
        raise ExpertFileError(f"{where}: give levels (a chain of Linear and Conv2d levels) or rename (a residual "
                              "network), not both")
    residual = bool(spec.rename) or isinstance(expert.net, ResNet)
    if residual and spec.crop:
        raise ExpertFileError(f"{where}: a ResNet fusion parent reads the problem's {IMAGE_SIZE}x{IMAGE_SIZE} "
                              "images as they are: crop must be 0")
    if spec.rename:
        parent = _resnet_from_map(expert.net, spec, where).eval()
    elif isinstance(expert.net, ResNet):
        parent = expert.net
    else:
        parent = _rebuilt(expert.net, spec, where).eval()
    x = torch.rand(3, spec.channels, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own, rebuilt = expert(x), parent(x)
    if not torch.allclose(own, rebuilt, rtol=CHECK_TOLERANCE, atol=CHECK_TOLERANCE * float(own.abs().max())):
        how = ("the renamed ResNet does not reproduce the model" if spec.rename else
               f"the levels {spec.levels or 'of its class'} (pools {spec.pools}) do not reproduce the model")
        check = ("check that its blocks compute archs/resnet.py's relu(bn2(conv2(relu(bn1(conv1(x))))) + "
                 "shortcut(x))" if spec.rename else
                 "check the order of levels, the pools and that ReLUs sit between levels")
        raise ExpertFileError(f"{where}: {how}: its logits differ by up to {float((own - rebuilt).abs().max()):.3g} "
                              f"on a check batch; {check}")
    return parent.to(device)
