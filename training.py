"""Training loops shared by the stages, and the resumable state that lets a killed run continue.

A long run saves its state (model, optimiser, random generator, epoch, log) atomically at every epoch end,
beside the checkpoint it will write, so a kill (or Ctrl-C) loses at most the epoch in progress. A rerun of the
same work (the same ``key``: its recipe and upstream digests) says so, continues from there and ends with the
weights an uninterrupted run would have ended with; a state of other work is ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import atomic_torch_save, fast_memory_format, make_generator, progress

@dataclass
class Resume:
    """Where one run keeps its resumable state, and what run it belongs to."""

    path: Path
    key: str

    @classmethod
    def beside(cls, checkpoint: Path, key: str) -> "Resume":
        return cls(checkpoint.with_name(checkpoint.stem + ".resume.pt"), key)

    def epochs_done(self) -> int | None:
        """How many epochs the saved state of this run holds, or None when there is none: a stage says "resumed"
        rather than "no checkpoint" for such work."""
        state = self.load()
        return None if state is None else len(state["log"])

    def load(self) -> dict | None:
        """The saved state of this run, or None (none saved, or saved by other work, or unreadable)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged state only costs the work since the run started
            return None
        return state if isinstance(state, dict) and state.get("key") == self.key else None

    def save(self, state: dict[str, Any]) -> None:
        atomic_torch_save({**state, "key": self.key}, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class Saver:
    """One run's model, optimiser and random generator: restored from a saved state when there is one, and
    saved at every epoch end with the run's per-epoch log."""

    def __init__(self, resume: Resume | None, model: nn.Module, optimiser: torch.optim.Optimizer,
                 rng: torch.Generator) -> None:
        self.resume, self.model, self.optimiser, self.rng = resume, model, optimiser, rng

    def restore(self) -> list:
        """The log of the epochs already done (empty when starting afresh), after loading their state."""
        saved = self.resume.load() if self.resume else None
        if saved is None:
            return []
        self.model.load_state_dict(saved["model"])
        self.optimiser.load_state_dict(saved["optimiser"])
        self.rng.set_state(saved["rng"])
        announce_resume(self.resume, len(saved["log"]))
        return list(saved["log"])

    def epoch_done(self, log: list, epochs: int) -> None:
        if self.resume is None or len(log) == epochs:  # after the last epoch the caller writes the checkpoint
            return
        self.resume.save({"model": self.model.state_dict(), "optimiser": self.optimiser.state_dict(),
                          "rng": self.rng.get_state(), "log": log})


RESUMED = "resumed from its last saved epoch"  # why a stage makes work that a kill or Ctrl-C interrupted


def why_made(why: str, resume: Resume) -> str:
    """Why a stage makes an artifact (artifacts.check_reuse's reason), told more exactly: work that has no
    checkpoint yet but a saved resume point is resumed, not started afresh."""
    return RESUMED if why == "no checkpoint" and resume.epochs_done() is not None else why


def announce_resume(resume: Resume, epochs: int) -> None:
    """A resumed run says so (a kill or Ctrl-C earlier saved it), before it goes on."""
    print(f"resuming after epoch {epochs} from {resume.path}", flush=True)


def epoch_entry(epoch: int, loss: float, correct: float, n: int) -> dict:
    """One epoch of a classifier's training history: its mean loss and accuracy over the epoch's batches."""
    return {"epoch": epoch, "loss": loss, "acc": correct / max(n, 1)}


def train_classifier(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, epochs: int,
                     lr: float, momentum: float, weight_decay: float, batch_size: int, seed: int,
                     desc: str = "epochs", class_weight: torch.Tensor | None = None,
                     resume: Resume | None = None) -> list[dict]:
    """SGD with cross-entropy on pre-normalised ``inputs``; returns the training history, one entry per epoch:
    the mean loss and the accuracy over that epoch's batches (``epoch_entry``).

    Batches are slices of a permutation drawn per epoch from a generator seeded by ``seed``. With
    ``resume``, the state is saved at epoch ends and a rerun continues from the last one saved."""
    if inputs.dim() == 4:  # channels-last trains LeNet about 15% faster on CPU; others keep the default format
        model.to(memory_format=fast_memory_format(model))
        inputs = inputs.contiguous(memory_format=fast_memory_format(model))
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    order = make_generator(seed, "cpu")
    saver = Saver(resume, model, optimiser, order)
    history: list[dict] = saver.restore()
    model.train()
    for epoch in progress(range(len(history), epochs), desc=desc, leave=False, initial=len(history), total=epochs,
                          unit="epoch"):
        perm = torch.randperm(len(inputs), generator=order).to(inputs.device)
        total = torch.zeros(2, device=inputs.device)  # summed loss, correct predictions: one host sync per epoch
        for start in range(0, len(inputs), batch_size):
            batch = perm[start:start + batch_size]
            out = model(inputs[batch])
            loss = F.cross_entropy(out, labels[batch], weight=class_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += torch.stack([loss.detach() * len(batch), (out.detach().argmax(1) == labels[batch]).sum().to(total.dtype)])
        loss_sum, correct = total.tolist()
        history.append(epoch_entry(epoch, loss_sum / len(inputs), correct, len(inputs)))
        saver.epoch_done(history, epochs)
    model.eval()
    return history


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096) -> float:
    model.eval()
    correct = sum((model(inputs[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(inputs), batch_size))
    return correct / max(len(inputs), 1)


# ---------------------------------------------------------------- many seeds at once (stacked.py)

def train_classifiers(models: list[nn.Module], inputs: torch.Tensor | list[torch.Tensor],
                      labels: torch.Tensor | list[torch.Tensor], *, epochs: int, lr: float, momentum: float,
                      weight_decay: float, batch_size: int, seeds: list[int], desc: str = "epochs",
                      class_weights: list[torch.Tensor | None] | None = None,
                      resumes: list[Resume | None] | None = None) -> list[list[dict]]:
    """``train_classifier`` for many models of one architecture at once: model i is trained exactly as
    ``train_classifier`` would train it alone with ``seeds[i]`` (its own initialisation, permutation of the
    data, class weights and resumable state), within floating-point tolerance, in one stacked network
    (stacked.py). ``inputs`` and ``labels`` are shared by all models, or given per model (lists of one length).
    Models without a stacked form, or resumed at different epochs, are trained one group at a time."""
    from stacked import stack, stackable, unstack_into

    count = len(models)
    class_weights = class_weights or [None] * count
    resumes = resumes or [None] * count
    per_model = isinstance(inputs, list)
    saved = [r.load() if r else None for r in resumes]
    done = [len(s["log"]) if s else 0 for s in saved]
    if not stackable(models) or len(set(done)) > 1:
        groups = [[i] for i in range(count)] if not stackable(models) else \
            [[i for i in range(count) if done[i] == d] for d in sorted(set(done))]
        losses: list[list[dict]] = [[] for _ in range(count)]
        for group in groups:
            if len(group) == 1 and not stackable(models):
                i = group[0]
                losses[i] = train_classifier(models[i], inputs[i] if per_model else inputs,
                                             labels[i] if per_model else labels, epochs=epochs, lr=lr,
                                             momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
                                             seed=seeds[i], desc=desc, class_weight=class_weights[i],
                                             resume=resumes[i])
                continue
            part = train_classifiers([models[i] for i in group], [inputs[i] for i in group] if per_model else inputs,
                                     [labels[i] for i in group] if per_model else labels, epochs=epochs, lr=lr,
                                     momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
                                     seeds=[seeds[i] for i in group], desc=desc,
                                     class_weights=[class_weights[i] for i in group],
                                     resumes=[resumes[i] for i in group])
            for i, log in zip(group, part):
                losses[i] = log
        return losses
    orders = [make_generator(seed, "cpu") for seed in seeds]
    saver = StackedSaver(resumes, models, orders)
    logs = saver.restore()
    network = stack(models)
    optimiser = torch.optim.SGD(network.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    saver.restore_optimiser(optimiser)
    data = torch.stack(inputs) if per_model else inputs
    targets = torch.stack(labels) if per_model else labels
    n = data.shape[1] if per_model else len(data)
    rows = torch.arange(count, device=data.device).unsqueeze(1)
    given = [w for w in class_weights if w is not None]
    weights = torch.stack([w if w is not None else torch.ones_like(given[0]) for w in class_weights]) if given else None
    network.train()
    for epoch in progress(range(done[0], epochs), desc=desc, leave=False, initial=done[0], total=epochs, unit="epoch"):
        perms = torch.stack([torch.randperm(n, generator=order) for order in orders]).to(data.device)
        totals = torch.zeros(2, count, device=data.device)  # per seed: summed loss, correct predictions
        for start in range(0, n, batch_size):
            index = perms[:, start:start + batch_size]
            x, y = (data[rows, index], targets[rows, index]) if per_model else (data[index], targets[index])
            out = network(x)
            per_seed = stacked_cross_entropy(out, y, weights)
            optimiser.zero_grad(set_to_none=True)
            per_seed.sum().backward()  # each seed's slice of the gradient is its own loss's gradient
            optimiser.step()
            totals += torch.stack([per_seed.detach() * index.shape[1], (out.detach().argmax(2) == y).sum(1).to(totals.dtype)])
        for log, loss_sum, correct in zip(logs, *totals.tolist()):
            log.append(epoch_entry(epoch, loss_sum / n, correct, n))
        saver.epoch_done(network, optimiser, logs, epochs)
    unstack_into(network, models)
    for model in models:
        model.eval()
    return logs


def stacked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Each model's mean cross-entropy, ``[S]``, from ``logits [S, B, K]`` and ``labels [S, B]``: with class
    ``weights [S, K]``, the weighted mean ``F.cross_entropy(weight=...)`` computes, in one pass for all models."""
    nll = -logits.log_softmax(dim=2).gather(2, labels.unsqueeze(2)).squeeze(2)
    if weights is None:
        return nll.mean(dim=1)
    w = weights.gather(1, labels)
    return (w * nll).sum(dim=1) / w.sum(dim=1)


class StackedSaver:
    """``Saver`` for models trained as one stacked network: each model's state goes to its own resume file
    in the single-model format, so a killed stacked run may go on stacked or one model at a time."""

    def __init__(self, resumes: list[Resume | None], models: list[nn.Module], rngs: list[torch.Generator]) -> None:
        self.resumes, self.models, self.rngs = resumes, models, rngs
        self.saved: list[dict | None] = [r.load() if r else None for r in resumes]

    def restore(self) -> list[list]:
        """Every model's log of finished epochs, after loading its weights and random state (call before
        stacking: the stack copies the weights)."""
        logs: list[list] = []
        for resume, model, rng, state in zip(self.resumes, self.models, self.rngs, self.saved):
            if state is not None:
                model.load_state_dict(state["model"])
                rng.set_state(state["rng"])
                announce_resume(resume, len(state["log"]))
            logs.append(list(state["log"]) if state else [])
        return logs

    def restore_optimiser(self, optimiser: torch.optim.Optimizer) -> None:
        if self.saved[0] is not None:
            optimiser.load_state_dict(stacked_optimiser_state(self.models, [s["optimiser"] for s in self.saved],
                                                              optimiser))

    def epoch_done(self, network: nn.Module, optimiser: torch.optim.Optimizer, logs: list[list], epochs: int) -> None:
        from stacked import unstack_into

        if not any(self.resumes) or len(logs[0]) == epochs:
            return
        unstack_into(network, self.models)
        for resume, model, rng, log, state in zip(self.resumes, self.models, self.rngs, logs,
                                                  split_optimiser_state(self.models, network, optimiser)):
            if resume is not None:
                resume.save({"model": model.state_dict(), "optimiser": state, "rng": rng.get_state(), "log": log})


def _holding(model: nn.Module, tensors: list[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose parameters hold ``tensors`` (in parameter order), to stack or unstack
    optimiser state the way the parameters themselves are stacked."""
    import copy

    holder = copy.deepcopy(model)
    with torch.no_grad():
        for parameter, tensor in zip(holder.parameters(), tensors):
            parameter.copy_(tensor)
    return holder


def state_keys(state: dict[int, dict]) -> list[str]:
    """What an optimiser keeps per parameter (``momentum_buffer``, Adam's moments and step), read from its
    first parameter's entry; none at all for SGD without momentum, which keeps no state."""
    return list(next(iter(state.values()), {}))


def split_optimiser_state(models: list[nn.Module], network: nn.Module, optimiser: torch.optim.Optimizer) -> list[dict]:
    """The stacked optimiser's state as one single-model state dict per model (the format ``train_classifier``
    saves), so a resumed run may go on stacked or alone."""
    from stacked import stack

    full = optimiser.state_dict()
    count = len(list(network.parameters()))
    names = [name for name, _ in models[0].named_parameters()]
    per_model: list[dict] = [{} for _ in models]
    for key in state_keys(full["state"]):
        values = [full["state"][j][key] for j in range(count)]
        if values[0].dim() == 0:  # a step count, the same for all models
            for state in per_model:
                state[key] = [value.clone() for value in values]  # one tensor each: optimisers count in place
            continue
        with torch.no_grad():
            shadow = stack(models)
            for p, value in zip(shadow.parameters(), values):
                p.copy_(value)
            for state, unstacked in zip(per_model, shadow.unstack()):
                state[key] = [unstacked[name] for name in names]
    group = {**full["param_groups"][0], "params": list(range(len(names)))}
    return [{"state": {j: {key: value if not isinstance(value, list) else value[j] for key, value in state.items()}
                       for j in range(len(names)) if state}, "param_groups": [group]} for state in per_model]


def stacked_optimiser_state(models: list[nn.Module], states: list[dict], optimiser: torch.optim.Optimizer) -> dict:
    """The inverse of ``split_optimiser_state``: single-model optimiser states -> the stacked optimiser's."""
    from stacked import stack

    stacked_state: dict[int, dict] = {}
    for key in state_keys(states[0]["state"]):
        if states[0]["state"][0][key].dim() == 0:  # a step count: one tensor each, optimisers count in place
            for j in range(len(list(optimiser.param_groups[0]["params"]))):
                stacked_state.setdefault(j, {})[key] = states[0]["state"][0][key].clone()
            continue
        holders = [_holding(m, [s["state"][j][key] for j in range(len(s["state"]))]) for m, s in zip(models, states)]
        for j, p in enumerate(stack(holders).parameters()):
            stacked_state.setdefault(j, {})[key] = p.detach().clone()
    full = optimiser.state_dict()
    return {"state": stacked_state, "param_groups": full["param_groups"]}
