"""Train gating networks (PANs): per expert, gate type, data regime and seed; plus the universal gate.

    python train_pan.py problem=disjoint_mnist regimes=[synthetic] seeds=[770597]

A gate reads its (frozen) expert's activations and says whether the input belongs to that expert.
Regimes (docs/design.md section 4, "The data question"):
- ``real``: the real training images of every expert; target = the image's own domain (the original
  code's setting, an upper bound). On a problem with shared labels (fusion parents) each parent's real
  images are its own task's training split (its part of a split, e.g. its shard), as the trainer loads it;
- ``synthetic`` (data-free): positives are the expert's activations on its own synthetic images (the set its
  synthesizer made from it alone: train_gan.py), negatives its activations on the other experts' synthetic
  images and on noise; optionally also on augmented copies of the synthetic images (``gate.augment_copies``);
- ``noise``: positives from the synthetic set, negatives noise only (ablation).
The data-free regimes train one set of gates per entry of ``synthesizers`` (a synthesizer, or a mixture
``a+b`` whose sets are pooled).
The ``universal`` gate is one gate per problem and seed, trained on softmax statistics pooled over
all the problem's experts, so it can later be used unchanged on experts it never saw.
A gate's file name carries the key of its recipe (section ``gate``, its regime and type, the recipes of
the experts and synthetic sets it reads: artifacts.py); it records the digests of the expert and set
files it was trained on, is retrained when one of them was retrained since, and those digests decide
later whether an evaluated expert is one the gate has seen.
Every gate's membership accuracy is measured on the real combined test set. With shared labels a test
image belongs to the parent that owns its class (``Problem.owner_domain``: the most training images of
it), as for the oracle in merge.py.
"""
from __future__ import annotations

import cli
import config

ARGS = cli.arguments(__name__, __doc__, config.PanConfig)  # --help and bad arguments answer before torch loads

import functools  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from archs import build_model  # noqa: E402
from artifacts import Layout, check_reuse, digest_of, made_meanwhile, recipe_key, tally  # noqa: E402
from common import (derive_seed, load_model, make_generator, print_summary,  # noqa: E402
                    progress, resolve_device, save_checkpoint, seed_everything, write_rows)
from data import load_task, to_unit  # noqa: E402
from diagnostics import set_diagnostics  # noqa: E402
from expert_files import FEATURE_TYPES, require  # noqa: E402
from gating import (GATE_TYPES, SHARED_GATES, check_regime, gate_arch, gate_inputs, in_domain_probability,  # noqa: E402
                    is_real, real_images)
from detector_stats import StoredStatistics, detector_vector, expert_views, stored_statistics  # noqa: E402
from problems import Problem, build_problem, expert_activations, run_experts, test_batches  # noqa: E402
from sources import parse_source  # noqa: E402
from synthesis import components, load_set  # noqa: E402
from training import Resume, train_classifiers  # noqa: E402


@dataclass
class ImageSet:
    """Training images of one origin: expert ``source``'s real or synthetic images, or noise (-1)."""

    images: torch.Tensor  # uint8 (real, synthetic) or [0,1] float (noise, augmented copies)
    source: int
    kind: str


def real_sets(cfg: config.PanConfig, problem: Problem, regime: str = "real") -> list[ImageSet]:
    """Each expert's task's training images (only its part when the task splits its source): the first
    ``gate.train_limit`` of them, or N for the few-shot regime ``real:N``."""
    limit = real_images(regime, cfg.gate.train_limit)
    return [ImageSet(load_task(problem.specs[t], "train", cfg.data_dir, limit).images, k, "real")
            for k, t in enumerate(problem.tasks)]


def synthetic_sets(cfg: config.PanConfig, problem: Problem, seed: int, synthesizer: str, channels: int,
                   device: torch.device) -> list[ImageSet]:
    """Each expert's stored synthetic images (a mixture pools its synthesizers' sets) and their augmented
    copies, plus uniform noise of ``channels`` channels; no real training image is read."""
    layout, sets = Layout(cfg), []
    for k, expert in enumerate(problem.experts):
        parts = [load_set(layout.synthetic_path(part, expert, seed),
                          hint=layout.gan_command(problem.name, [seed], [part]))[0] for part in components(synthesizer)]
        images = torch.cat(parts)
        sets.append(ImageSet(images, k, "synthetic"))
        for copy in range(cfg.gate.augment_copies):
            sets.append(ImageSet(augmented(images, derive_seed(seed, expert.task, "augment", copy), device), k,
                                 "augmented"))
    noise = torch.rand(cfg.gate.noise_samples, channels, 32, 32, generator=make_generator(derive_seed(seed, "noise")))
    sets.append(ImageSet(noise.to(device), -1, "noise"))
    return sets


def augmented(images: torch.Tensor, seed: int, device: torch.device, shift: int = 3,
              noise: float = 0.05) -> torch.Tensor:
    """One augmented copy of uint8 images, as [0,1] pixels: each image shifted by up to ``shift`` pixels
    (zeros fill in) and given Gaussian pixel noise of std ``noise``, so a gate cannot key on a synthetic
    image's exact position or texture."""
    generator = make_generator(seed, device)
    x = to_unit(images, device)
    dx, dy = (torch.randint(-shift, shift + 1, (len(x),), generator=generator, device=device) for _ in range(2))
    theta = torch.zeros(len(x), 2, 3, device=device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = -2 * dx / x.shape[3], -2 * dy / x.shape[2]
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    moved = torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return (moved + noise * torch.randn(x.shape, generator=generator, device=device)).clamp(0, 1)


def uses(regime: str, expert: int, image_set: ImageSet) -> bool:
    """Whether gate ``expert`` of ``regime`` trains on ``image_set``."""
    if regime == "noise":
        return image_set.source in (expert, -1)
    return True


def activations_on(sets: list[ImageSet], models, formats, device, batch_size: int = 1024):
    """acts[k][s] = expert k's (logits, features) on image set s."""
    acts = [[] for _ in models]
    for image_set in sets:
        batches = (to_unit(image_set.images[i:i + batch_size], device) if image_set.images.dtype == torch.uint8
                   else image_set.images[i:i + batch_size].to(device)
                   for i in range(0, len(image_set.images), batch_size))
        for k, pair in enumerate(run_experts(models, formats, batches, features=True)):
            acts[k].append(pair)
    return acts


def unit_batches(image_set: ImageSet, device: torch.device, batch_size: int = 1024):
    """An image set as [0,1] batches on ``device`` (uint8 sets are converted a batch at a time)."""
    return ((to_unit(x, device) if x.dtype == torch.uint8 else x.to(device))
            for x in image_set.images.split(batch_size))


def detector_activations(batch_sets: list, models, formats, stored: list[StoredStatistics], device):
    """acts[k][s] = expert k's (logits, comparable detector scores) on batch set s (a callable giving [0,1]
    batches): what the detector gate reads, every score standardised on the expert's own ``stored`` source."""
    acts = [[] for _ in models]
    for batches in batch_sets:
        for k, view in enumerate(expert_views(models, formats, batches)):
            acts[k].append((view.logits, detector_vector(view, stored[k], models[k], formats[k], device)))
    return acts


def training_data(gate_type: str, regime: str, experts: list[int], sets: list[ImageSet],
                  acts) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate inputs and in-domain targets, pooled over ``experts`` (one for a per-expert gate)."""
    inputs, targets = [], []
    for k in experts:
        for s, image_set in enumerate(sets):
            if uses(regime, k, image_set):
                logits, features = acts[k][s]
                inputs.append(gate_inputs(gate_type, logits, features))
                targets.append(torch.full((len(logits),), int(image_set.source == k), dtype=torch.long))
    return torch.cat(inputs), torch.cat(targets).to(inputs[0].device)


def membership(gate, gate_type: str, test_acts, domain: torch.Tensor, k: int) -> dict:
    """Gate k's in/out accuracy on the real combined test set (in = the sample is expert k's)."""
    logits, features = test_acts[k]
    says_in = in_domain_probability(gate, gate_inputs(gate_type, logits, features)).cpu() > 0.5
    is_in = domain == k
    return {"membership_acc": (says_in == is_in).float().mean().item(),
            "true_positive_rate": says_in[is_in].float().mean().item(),
            "true_negative_rate": (~says_in[~is_in]).float().mean().item()}


@dataclass
class PendingGate:
    """A gate to train: where it goes, what made it, and its training data."""

    problem: str
    seed: int
    regime: str
    synthesizer: str
    gate_type: str
    experts: list[int]  # the experts it serves (one, or all for the universal gate)
    path: Path
    recipe: dict
    upstream: dict[str, str]
    inputs: torch.Tensor
    targets: torch.Tensor

    def build(self, cfg: config.PanConfig) -> tuple[nn.Module, str, dict, torch.Tensor | None]:
        """The untrained gate (its own initialisation and input standardisation) and its class weights."""
        arch, kwargs = gate_arch(self.gate_type, self.inputs.shape[1])
        seed_everything(self.init_seed, cfg.deterministic)
        gate = build_model(arch, **kwargs).to(self.inputs.device)
        if cfg.gate.standardise_inputs:
            gate.fit_standardisation(self.inputs)
        counts = torch.bincount(self.targets, minlength=2).float().clamp(min=1)
        return gate, arch, kwargs, (counts.sum() / (2 * counts)) if cfg.gate.balance_classes else None

    @property
    def init_seed(self) -> int:
        return derive_seed(self.seed, self.problem, self.regime, self.gate_type, *self.experts)


def train_gates(cfg: config.PanConfig, pending: list[PendingGate]) -> list[tuple[nn.Module, str, dict, list[dict],
                                                                                 float]]:
    """Train the pending gates: where ``gate.stack_seeds`` resolves to stacking, every group of one architecture,
    width and amount of data as one stacked network (each gate as it would train alone); returns (gate, arch, kwargs, training history,
    train time per gate) in the order given."""
    built = [gate.build(cfg) for gate in pending]
    stacked = Layout(cfg).stacked("gates")
    settings = dict(epochs=cfg.gate.epochs, lr=cfg.gate.lr, momentum=cfg.gate.momentum, weight_decay=0.0,
                    batch_size=cfg.gate.batch_size)
    groups: dict[tuple, list[int]] = {}
    for i, (gate, arch, kwargs, _) in enumerate(built):
        key = (arch, tuple(sorted(kwargs.items())), len(pending[i].inputs)) if stacked else (i,)
        groups.setdefault(key, []).append(i)
    out: list = [None] * len(pending)
    for members in progress(list(groups.values()), desc="gates", leave=False):
        start = time.perf_counter()
        losses = train_classifiers(
            [built[i][0] for i in members], [pending[i].inputs for i in members], [pending[i].targets for i in members],
            seeds=[derive_seed(pending[i].init_seed, "order") for i in members],
            class_weights=[built[i][3] for i in members], desc=f"{len(members)} gates",
            resumes=[Resume.beside(pending[i].path, recipe_key(pending[i].recipe) + str(pending[i].upstream))
                     for i in members], **settings)
        per_gate = (time.perf_counter() - start) / len(members)
        for i, log in zip(members, losses):
            out[i] = (built[i][0], built[i][1], built[i][2], log, per_gate)
    return out


def membership_truth(cfg: config.PanConfig, problem: Problem, seed: int) -> torch.Tensor:
    """The expert each combined test sample belongs to: its own domain, or with shared labels the parent
    that owns its class (recorded in the experts' checkpoints)."""
    if problem.shared_labels:
        return problem.owner_domain(problem.class_counts(Layout(cfg), seed, cfg.data_dir))
    return problem.domain


def synthesis_rows(cfg: config.PanConfig, problem: Problem, seed: int, synthesizer: str, models, formats,
                   test_acts, domain: torch.Tensor, device: torch.device) -> list[dict]:
    """Per expert: how its synthetic set compares with real test images in its own eyes (diagnostics.py)."""
    layout, rows = Layout(cfg), []
    for k, (name, expert) in enumerate(zip(problem.names, problem.experts)):
        images = torch.cat([load_set(layout.synthetic_path(part, expert, seed))[0] for part in components(synthesizer)])
        batches = (to_unit(images[i:i + 1024], device) for i in range(0, len(images), 1024))
        on_own_set = run_experts([models[k]], [formats[k]], batches, features=True)[0]
        rows.append({"problem": problem.name, "seed": seed, "synthesizer": synthesizer, "expert": name,
                     **set_diagnostics(on_own_set, test_acts[k], domain == k)})
    return rows


def upstream_files(layout: Layout, problem: Problem, regime: str, seed: int, synthesizer: str) -> dict[str, str]:
    """``expert:TAG`` (and, data-free, ``set:SYNTHESIZER:TAG``) -> digest of every file a gate of ``regime`` reads."""
    digests = {f"expert:{e.tag}": layout.expert_digest(e, seed) for e in problem.experts}
    if not is_real(regime):
        digests.update({f"set:{part}:{e.tag}": digest_of(layout.synthetic_path(part, e, seed))
                        for part in components(synthesizer) for e in problem.experts})
    return digests


def detector_upstream(layout: Layout, problem: Problem, gate_type: str, gate: config.GateTraining,
                      seed: int) -> dict[str, str]:
    """The detector gate also reads its statistics source's sets (its scores are standardised on them)."""
    source = parse_source(gate.detector_stats, "gate.detector_stats")
    if gate_type != "detectors" or source.kind != "synthetic":
        return {}
    return {f"stats:{part}:{e.tag}": digest_of(layout.synthetic_path(part, e, seed))
            for part in components(source.synthesizer) for e in problem.experts}


def train_regime(cfg: config.PanConfig, problem: Problem, regime: str, synthesizer: str,
                 experts_of_seed: dict[int, tuple[list, list]], test_activations, domains: dict[int, torch.Tensor],
                 device: torch.device, statistics=None) -> tuple[list[dict], list[str]]:
    """All gates of one regime (for the data-free regimes: of one synthesizer) for every seed, and why each
    was made (or "reused"). Image sets and activations are built only for a seed with a gate missing; the
    missing gates of all seeds are then trained together (``train_gates``). ``test_activations(seed, gate_type)``
    gives the experts' activations on the real combined test set (for the detector gate: their comparable
    detector scores, standardised on the sources ``statistics(seed)`` gives), ``domains[seed]`` the expert each
    of its samples belongs to."""
    layout = Layout(cfg)
    jobs = []  # (gate_type, experts the gate serves, the one it serves or None for the universal gate)
    for gate_type in cfg.gate_types:
        if gate_type in SHARED_GATES:
            jobs.append((gate_type, list(range(len(problem.tasks))), None))
        else:
            jobs += [(gate_type, [k], k) for k in range(len(problem.tasks))]
    rows: dict[tuple, list[dict]] = {}
    reasons, pending = [], []
    for seed, (models, formats) in experts_of_seed.items():
        upstream = upstream_files(layout, problem, regime, seed, synthesizer)
        sets = acts = detector_acts = None
        for gate_type, experts, serves in jobs:
            path = layout.gate_path(problem.name, regime, gate_type, serves, seed, synthesizer)
            recipe = layout.gate_recipe(problem.name, regime, gate_type, serves, synthesizer)
            reuse = check_reuse(path, recipe, upstream | detector_upstream(layout, problem, gate_type, cfg.gate, seed),
                                cfg.force)
            reasons.append(reuse.why)
            if reuse.reused:
                stored = reuse.meta["row"]
                if any(r.get("test_limit", "unknown") != cfg.test_limit for r in stored):  # another test subset
                    gate = load_model(path, device=device)[0]
                    # a gate's rows follow its experts' order
                    stored = [{**r, **membership(gate, gate_type, test_activations(seed, gate_type), domains[seed], k),
                               "test_limit": cfg.test_limit} for r, k in zip(stored, experts)]
                rows[(seed, gate_type, serves)] = [{**r, "resumed": True} for r in stored]
                continue
            if sets is None:
                sets = (real_sets(cfg, problem, regime) if is_real(regime)
                        else synthetic_sets(cfg, problem, seed, synthesizer, max(f.channels for f in formats),
                                            device))
            if gate_type == "detectors":
                if detector_acts is None:
                    detector_acts = detector_activations([functools.partial(unit_batches, s, device) for s in sets],
                                                         models, formats, statistics(seed), device)
                inputs, targets = training_data(gate_type, regime, experts, sets, detector_acts)
            else:
                acts = acts or activations_on(sets, models, formats, device)
                inputs, targets = training_data(gate_type, regime, experts, sets, acts)
            pending.append(PendingGate(problem.name, seed, regime, synthesizer, gate_type, experts, path, recipe,
                                       upstream | detector_upstream(layout, problem, gate_type, cfg.gate, seed),
                                       inputs, targets))
    for gate, (model, arch, kwargs, history, train_time) in zip(pending, train_gates(cfg, pending) if pending else []):
        counts = torch.bincount(gate.targets, minlength=2)
        base = {"problem": problem.name, "regime": regime, "gate_type": gate.gate_type, "seed": gate.seed,
                "synthesizer": None if is_real(regime) else synthesizer,
                "train_positives": int(counts[1]), "train_negatives": int(counts[0]),
                "final_loss": history[-1]["loss"] if history else None, "history": history, "train_time_s": train_time,
                "checkpoint": str(gate.path), "device": str(device), "test_limit": cfg.test_limit, "resumed": False}
        gate_rows = [{**base, "expert": problem.tasks[k], "arch": problem.archs[k],
                      **({"arch_kwargs": problem.arch_kwargs[k]} if problem.arch_kwargs[k] else {}),
                      **membership(model, gate.gate_type, test_activations(gate.seed, gate.gate_type), domains[gate.seed],
                                   k)}
                     for k in gate.experts]
        meta = {"problem": problem.name, "regime": regime, "gate_type": gate.gate_type, "synthesizer": synthesizer,
                "experts": [problem.tasks[k] for k in gate.experts], "recipe": gate.recipe,
                "upstream": gate.upstream, "row": gate_rows}
        other = None if cfg.force else made_meanwhile(gate.path, gate.recipe, gate.upstream)
        if other is None:
            save_checkpoint(gate.path, model, arch, kwargs, config.to_dict(cfg), meta)
        else:  # another worker made it meanwhile: its rows describe the gate every reader sees
            gate_rows = [{**r, "resumed": True} for r in other["row"]]
        Resume.beside(gate.path, "").clear()
        rows[(gate.seed, gate.gate_type, None if gate.gate_type in SHARED_GATES else gate.experts[0])] = gate_rows
    order = [(seed, gate_type, serves) for seed in experts_of_seed for gate_type, _, serves in jobs]
    return [row for key in order for row in rows[key]], reasons


def main(cfg: config.PanConfig) -> dict:
    config.check(cfg)
    config.check_names(cfg)
    unknown = [v for v in cfg.gate_types if v not in GATE_TYPES]
    if unknown:
        raise config.ConfigError(f"unknown gate_types {unknown}; choices: {', '.join(GATE_TYPES)}")
    for regime in cfg.regimes:
        check_regime(regime, "regimes")
    for name in cfg.synthesizers:
        components(name)
    for gate_type in set(cfg.gate_types) & set(FEATURE_TYPES):
        require(cfg.problem, cfg.problems[cfg.problem], features=f"gate type {gate_type!r}")
    source = parse_source(cfg.gate.detector_stats, "gate.detector_stats")
    if "detectors" in cfg.gate_types:
        require(cfg.problem, cfg.problems[cfg.problem], penultimate="gate type 'detectors'")
    config.print_config(cfg)
    device = resolve_device(cfg.device)
    problem = build_problem(cfg.problem, cfg.problems[cfg.problem], cfg.tasks, cfg.data_dir, cfg.test_limit)
    layout = Layout(cfg)
    wanted = problem.wanted_experts(layout, cfg.seeds)
    if not all(is_real(r) for r in cfg.regimes):
        wanted += [layout.wanted_set(cfg.problem, part, e, s) for s in cfg.seeds for name in cfg.synthesizers
                   for part in components(name) for e in problem.experts]
    if "detectors" in cfg.gate_types and source.kind == "synthetic":  # the sets its scores are standardised on
        wanted += [layout.wanted_set(cfg.problem, part, e, s) for s in cfg.seeds
                   for part in components(source.synthesizer) for e in problem.experts]
    if (error := layout.missing_error(wanted)) is not None:
        raise error
    experts_of_seed = {seed: problem.load_experts(layout, seed, device) for seed in cfg.seeds}
    plain = functools.cache(lambda seed: expert_activations(problem, *experts_of_seed[seed], device))

    @functools.cache
    def statistics(seed: int) -> list[StoredStatistics]:
        models, formats = experts_of_seed[seed]
        return [stored_statistics(layout, source, e, problem.specs[e.task], seed, m, f, cfg.data_dir, device)
                for e, m, f in zip(problem.experts, models, formats)]

    test_batches_of = functools.partial(test_batches, problem, device, 1024)
    detector_test = functools.cache(lambda seed: [acts for [acts] in detector_activations(
        [test_batches_of], *experts_of_seed[seed], statistics(seed), device)])

    def test_activations(seed: int, gate_type: str = ""):
        return detector_test(seed) if gate_type == "detectors" else plain(seed)
    domains = {seed: membership_truth(cfg, problem, seed) for seed in cfg.seeds}
    rows, reasons, diagnostics = [], [], []
    data_free = [r for r in cfg.regimes if not is_real(r)]
    for regime in progress(cfg.regimes, desc=f"{cfg.problem} gates"):
        for synthesizer in ["dafl"] if is_real(regime) else cfg.synthesizers:
            regime_rows, regime_reasons = train_regime(cfg, problem, regime, synthesizer, experts_of_seed,
                                                       test_activations, domains, device, statistics)
            rows += regime_rows
            reasons += regime_reasons
    for seed in cfg.seeds:
        for synthesizer in cfg.synthesizers if data_free else []:
            diagnostics += synthesis_rows(cfg, problem, seed, synthesizer, *experts_of_seed[seed],
                                          test_activations(seed), domains[seed], device)
    stem = Path(cfg.results_dir) / "gates" / cfg.problem
    if diagnostics:
        write_rows(stem.with_name(f"{cfg.problem}_synthesis"), diagnostics)
    outputs = write_rows(stem, [{**r, **config.row_config(cfg)} for r in rows])
    outputs["config"] = str(stem.with_name(stem.name + ".config.yaml"))
    config.save(cfg, outputs["config"])
    membership_acc = {}
    for r in rows:
        regime = r["regime"] if r.get("synthesizer") is None else f"{r['regime']}_{r['synthesizer']}"
        membership_acc.setdefault(f"{regime}/{r['gate_type']}", []).append(r["membership_acc"])
    summary = {"problem": cfg.problem, "seeds": cfg.seeds, "outputs": outputs,
               "membership_acc": {k: sum(v) / len(v) for k, v in membership_acc.items()}, **tally(reasons)}
    print_summary(summary)
    return summary


if __name__ == "__main__":
    cli.run(main, ARGS)
