"""Synthesizers: the registry of data-free image makers, the stored image sets they write, and their quality.

A synthesizer makes, for one expert and seed, a set of images from that expert alone (docs/design.md section 4,
"Synthesizers"); the gate stage reads the sets through ``synthesizer=NAME``. Its settings are the config
section of the same name (config.DaflTraining, InversionSettings, DeepInversionSettings), typed and checked
when the config loads. A *mixture* ``a+b`` pools the sets of its synthesizers (the gates read both).

A stored set is ``{"images": uint8 [N, C, 32, 32], "meta": {...}}``: 8-bit pixels, like real images, read
with ``torch.load(weights_only=True)``; its ``meta["digest"]`` names the images exactly.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.utils import save_image

import config
from common import UserError, atomic_torch_save, state_digest
from data import InputFormat, prepare_input

GRID_SAMPLES = 64


@dataclass(frozen=True)
class Synthesizer:
    name: str
    summary: str
    needs_batchnorm: bool = False  # it matches BatchNorm statistics, so its experts must have BatchNorm layers

    @property
    def section(self) -> str:
        """The config section holding its settings."""
        return self.name

    def settings(self, cfg) -> object:
        return getattr(cfg, self.section)


SYNTHESIZERS = {s.name: s for s in (
    Synthesizer("dafl", "a generator trained from noise against the expert (DAFL)"),
    Synthesizer("inversion", "class-conditional model inversion on pixels (data impressions)"),
    Synthesizer("deepinversion", "model inversion matching the expert's BatchNorm statistics (DeepInversion)",
                needs_batchnorm=True),
)}
assert set(SYNTHESIZERS) == set(config.SYNTHESIS_SECTIONS)


def components(name: str) -> list[str]:
    """The synthesizers of ``name`` (one, or the parts of a mixture ``a+b``); unknown names are ConfigErrors."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in SYNTHESIZERS]
    if unknown or len(set(parts)) != len(parts):
        raise config.ConfigError(f"synthesizer {name!r}: {'unknown ' + repr(unknown[0]) if unknown else 'a part twice'}; "
                                 f"choices: {', '.join(SYNTHESIZERS)} or mixtures of them joined by '+' "
                                 f"(e.g. dafl+inversion)")
    return parts


def check_experts(name: str, archs: list[str], arch_kwargs: list[dict]) -> None:
    """Raise ConfigError before any work when a synthesizer cannot run on these experts (BatchNorm needed)."""
    from archs import build_model

    for part in components(name):
        if not SYNTHESIZERS[part].needs_batchnorm:
            continue
        for arch, kwargs in zip(archs, arch_kwargs):
            model = build_model(arch, **kwargs)
            if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                raise config.ConfigError(f"synthesizer {part!r} matches BatchNorm statistics, and experts of arch "
                                         f"{arch!r} have no BatchNorm layer; use inversion or dafl for them")


# ---------------------------------------------------------------- stored sets

def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0,1] float images -> 8-bit pixels, as real images are stored."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def save_set(path: Path, images: torch.Tensor, meta: dict) -> str:
    """Write a set of uint8 images atomically; returns (and stores in meta) the digest of the images."""
    digest = state_digest({"images": images})
    atomic_torch_save({"images": images, "meta": {**meta, "digest": digest}}, path)
    return digest


def load_set(path: Path, hint: str = "") -> tuple[torch.Tensor, dict]:
    if not path.is_file():
        raise UserError(f"synthetic image set {path} does not exist" + (f"; create it with: {hint}" if hint else ""))
    stored = torch.load(path, map_location="cpu", weights_only=True)
    return stored["images"], stored["meta"]


# ---------------------------------------------------------------- quality without real data

@torch.no_grad()
def sample_quality(expert: nn.Module, fmt: InputFormat, images: torch.Tensor,
                   other_expert: nn.Module | None) -> dict:
    """Class balance and confidence of the expert on samples ([0,1] images), and the realism score: how often
    an expert of another seed (trained on real data, used only for evaluation) agrees with its labels."""
    logits = expert(prepare_input(images, fmt))
    probs = logits.softmax(dim=1)
    labels = probs.argmax(dim=1)
    share = torch.bincount(labels, minlength=probs.shape[1]).float() / len(labels)
    entropy = -(share[share > 0] * share[share > 0].log()).sum().item()
    quality = {"class_share": share.tolist(), "balance": entropy / math.log(probs.shape[1]),
               "mean_confidence": probs.max(dim=1).values.mean().item(), "cross_seed_agreement": None}
    if other_expert is not None:
        other = other_expert(prepare_input(images, fmt)).argmax(dim=1)
        quality["cross_seed_agreement"] = (other == labels).float().mean().item()
    return quality


def png_grid(images: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    save_image(images, buffer, format="png", nrow=8, padding=1)
    return buffer.getvalue()
