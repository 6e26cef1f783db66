"""Knowledge distillation (Hinton et al. 2015) of a teacher into a student network: CLAFusion's compression use,
where the student starts from the teacher fused into the student's shape, against the same distillation from the
student's own weights or from scratch (the controls)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fusion.finetuning import finetune

TEACHER_CHUNK = 1024  # images per teacher pass when its logits on the whole training set are computed once


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float,
            temperature: float) -> Tensor:
    """alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy(student, labels),
    the KL and the cross-entropy averaged over the batch.

    T^2 keeps the soft term's gradient on the scale of the hard term's whatever the temperature (Hinton et al.)."""
    soft = F.kl_div(F.log_softmax(student_logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                    reduction="batchmean", log_target=True)
    return alpha * temperature ** 2 * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def teacher_logits(teacher: nn.Module, images: Tensor) -> Tensor:
    """The teacher's logits on every image, once: the teacher is frozen, so every epoch would compute the same."""
    with torch.no_grad():
        return torch.cat([teacher(chunk) for chunk in images.split(TEACHER_CHUNK)])


@dataclass(frozen=True)
class Distilled:
    """A distilled student and how many training images it was trained on (counted batch by batch, repeats
    included: epochs x the training set)."""

    network: nn.Module
    images_seen: int


def distil(student: nn.Module, teacher: nn.Module, images: Tensor, labels: Tensor, epochs: int, alpha: float,
           temperature: float, lr: float = 1e-2, batch_size: int = 64, momentum: float = 0.9,
           seed: int = 0) -> Distilled:
    """A copy of ``student`` after ``epochs`` epochs of SGD on ``kd_loss`` against ``teacher`` (never changed), with
    fine-tuning's optimiser and batch order (``finetuning.finetune``: one ``seed``, the same images in the same order
    whatever the student's start)."""
    targets = teacher_logits(teacher, images) if epochs else None
    seen = 0

    def loss(logits: Tensor, idx: Tensor) -> Tensor:
        nonlocal seen
        seen += len(idx)
        return kd_loss(logits, targets[idx], labels[idx], alpha, temperature)

    network = finetune(student, images, labels, epochs, lr, batch_size, momentum, seed, loss)
    return Distilled(network, seen)


def reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with fresh weights: every layer's own ``reset_parameters`` (PyTorch's default
    initialisation, the one archs/mlp.py, archs/vgg.py and archs/lenet.py use), drawn on the CPU from ``seed``, so the
    same weights on any device, without touching the global random state. A ResNet without batch norm also shrinks
    its branches at construction (archs/resnet.py); this copy does not."""
    param = next(model.parameters())
    fresh = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator alone: the CUDA ones stay as they are
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return fresh.to(param.device)
