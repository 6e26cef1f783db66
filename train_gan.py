"""Data-free synthesis: per synthesizer, one stored set of images per expert per seed, made from that expert alone.

    python train_gan.py problem=disjoint_mnist seeds=[770597] synthesizers=[dafl,inversion] experiments/gan_cpu.yaml

Synthesizers (synthesis.SYNTHESIZERS; settings in the sections of the same name):
- ``dafl``: a generator trained from noise against the frozen expert (DAFL: it classifies the samples
  confidently, spread over its classes, with strong feature activations); the set is drawn from it.
- ``inversion``: class-conditional model inversion on pixels (data impressions).
- ``deepinversion``: model inversion matching the expert's BatchNorm statistics (experts with batch norm).
No real image is read. Per set: the images (checkpoints/synthetic/...), a PNG grid of the first 64, and
quality figures measured without real data: the class balance of the expert's predictions on the images,
its mean confidence, and the realism score: how often an expert of another seed (trained on real data, used
for evaluation only) agrees with this expert's labels. File names carry the key of each recipe; a killed
run continues from its last saved epoch (DAFL) or batch of images (inversions).
"""
from __future__ import annotations

import cli
import config

ARGS = cli.arguments(__name__, __doc__, config.GanConfig)  # --help and bad arguments answer before torch loads

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from artifacts import (ExpertId, Layout, check_reuse, digest_of, experts_of, made_meanwhile, recipe_key,  # noqa: E402
                       tally)
from common import (atomic_write_bytes, compact_png, derive_seed, load_model, mean_std, print_summary,  # noqa: E402
                    progress, resolve_device, save_checkpoint, seed_everything, write_rows)
from dafl import build_generator, sample_images, train_generator, train_generators  # noqa: E402
from data import InputFormat, to_unit  # noqa: E402
from expert_files import require  # noqa: E402
from inversion import data_impressions, deep_inversion  # noqa: E402
from problems import load_expert  # noqa: E402
from stacked import stackable  # noqa: E402
from synthesis import GRID_SAMPLES, check_experts, components, png_grid, sample_quality, save_set, to_uint8  # noqa: E402
from training import Resume, why_made  # noqa: E402


INVERSIONS = {"inversion": data_impressions, "deepinversion": deep_inversion}


def other_seed_expert(layout: Layout, expert: ExpertId, seed: int) -> Path | None:
    """An expert of the same recipe but another seed, to check that samples carry the class this expert
    gives them rather than exploiting its particular weights (evaluation only)."""
    if expert.file is not None:  # one file serves every seed
        return None
    mine = layout.expert_path(expert, seed)
    stem = mine.name.rsplit("_seed", 1)[0]
    others = sorted(p for p in mine.parent.glob(f"{stem}_seed*.pt") if p != mine)
    return others[0] if others else None


def dafl_generators(cfg: config.GanConfig, experts: list[ExpertId], seeds: list[int],
                    device: torch.device) -> dict[tuple[ExpertId, int], tuple[nn.Module, dict, str]]:
    """The DAFL generator of every (expert, seed), its row, and why it was trained (or "reused"). With
    ``dafl.stack_seeds`` resolved to true the ones to train are trained together, one stacked generator against
    one stacked expert per architecture and shape (every seed, and experts of one shape such as disjoint_mnist's
    two), each pair from its own initialisation and noise as it would train alone."""
    layout = Layout(cfg)
    stack_seeds = layout.stacked("generators")
    out, todo = {}, []
    for expert in experts:
        for seed in seeds:
            path, recipe = layout.generator_path(expert, seed), layout.generator_recipe(expert)
            upstream = {"expert": layout.expert_digest(expert, seed)}
            reuse = check_reuse(path, recipe, upstream, cfg.force)
            if reuse.reused:
                out[(expert, seed)] = (load_model(path, expect_arch="generator", device=device)[0],
                                       reuse.meta["row"], reuse.why)
                continue
            model, fmt = load_expert(layout, expert, seed, device, cfg.tasks[expert.task])
            seed_everything(derive_seed(seed, expert.task, expert.arch, "generator"), cfg.deterministic)
            todo.append({"expert": expert, "seed": seed, "path": path, "recipe": recipe, "upstream": upstream,
                         "why": why_made(reuse.why, Resume.beside(path, recipe_key(recipe) + upstream["expert"])),
                         "model": model, "fmt": fmt,
                         "generator": build_generator(cfg.dafl, fmt.channels)[0].to(device),
                         "noise": derive_seed(seed, f"{expert.task} seed {seed}", "noise")})
    groups: dict[tuple, list[dict]] = {}
    for job in todo:  # one stack per shape of expert and generator
        shape = tuple((k, tuple(v.shape)) for k, v in [*job["model"].state_dict().items(),
                                                        *job["generator"].state_dict().items()])
        together = stack_seeds and stackable([job["model"]])  # experts given by file train alone
        groups.setdefault((type(job["model"]), shape) if together else (id(job),), []).append(job)
    for group in groups.values():
        resumes = [Resume.beside(j["path"], recipe_key(j["recipe"]) + j["upstream"]["expert"]) for j in group]
        desc = f"{len(group)} generator(s)"
        start = time.perf_counter()
        stacked = stack_seeds and stackable([j["model"] for j in group])
        if stacked:
            logs = train_generators([j["model"] for j in group], [j["generator"] for j in group], cfg.dafl,
                                    [j["noise"] for j in group], device, desc, resumes)
        else:
            logs = [train_generator(j["model"], j["generator"], cfg.dafl, j["noise"], device, desc, r)
                    for j, r in zip(group, resumes)]
        train_time = (time.perf_counter() - start) / len(group)  # per generator: stacked ones share the time
        for job, log, resume in zip(group, logs, resumes):
            row = {"generator": str(job["path"]), "final_loss": log[-1] if log else None, "history": log,
                   "generator_train_time_s": train_time, "stacked_generators": len(group) if stacked else 1}
            other = None if cfg.force else made_meanwhile(job["path"], job["recipe"], job["upstream"])
            if other is None:
                save_checkpoint(job["path"], job["generator"], "generator",
                                build_generator(cfg.dafl, job["fmt"].channels)[1], config.to_dict(cfg),
                                {"task": job["expert"].task, "expert_arch": job["expert"].arch,
                                 "input_format": job["fmt"].as_dict(), "recipe": job["recipe"],
                                 "upstream": job["upstream"], "log": log, "row": row})
            else:  # another worker made it meanwhile: its generator is the one every reader sees
                job["generator"], row = load_model(job["path"], expect_arch="generator", device=device)[0], other["row"]
            resume.clear()
            out[(job["expert"], job["seed"])] = (job["generator"], row, job["why"])
    return out


def inverted_images(cfg: config.GanConfig, synthesizer: str, expert: ExpertId, seed: int, model: nn.Module,
                    fmt: InputFormat, device: torch.device, resume: Resume) -> torch.Tensor:
    """The inversion's images as uint8, made a batch at a time; finished batches survive a kill."""
    settings = getattr(cfg, synthesizer)
    saved = resume.load()
    batches: list[torch.Tensor] = list(saved["log"]) if saved else []
    sizes = [min(settings.batch_size, settings.images - start) for start in range(0, settings.images,
                                                                                   settings.batch_size)]
    for b in progress(range(len(batches), len(sizes)), desc=f"{synthesizer} {expert.task} seed {seed}", leave=False,
                      initial=len(batches), total=len(sizes)):
        images = INVERSIONS[synthesizer](model, fmt, settings, sizes[b], derive_seed(seed, expert.task, synthesizer, b),
                                         device)
        batches.append(to_uint8(images))
        if b < len(sizes) - 1:
            resume.save({"log": batches})
    return torch.cat(batches)


def make_set(cfg: config.GanConfig, synthesizer: str, expert: ExpertId, seed: int, device: torch.device,
             dafl: tuple[nn.Module, dict, str] | None = None) -> list[tuple[dict, str]]:
    """The stored set of ``synthesizer`` for ``expert`` and ``seed``: made, or reused; DAFL's is drawn from
    ``dafl`` = (generator, its row, why it was made), whose (row, why) come first. Returns (row, why) pairs."""
    layout = Layout(cfg)
    path = layout.synthetic_path(synthesizer, expert, seed)
    expert_file = layout.expert_path(expert, seed)
    model, fmt = load_expert(layout, expert, seed, device, cfg.tasks[expert.task])
    recipe = layout.synthetic_recipe(synthesizer, expert)
    grid = Path(cfg.results_dir) / "gan" / synthesizer / f"{path.stem}.png"
    done = []
    generator = None
    if synthesizer == "dafl":
        generator, generator_row, why = dafl
        done.append(({"kind": "generator", **generator_row}, why))
        upstream = {"generator": digest_of(layout.generator_path(expert, seed))}
    else:
        upstream = {"expert": layout.expert_digest(expert, seed)}
    reuse = check_reuse(path, recipe, upstream, cfg.force)
    if reuse.reused:
        if not grid.is_file():  # results moved or deleted: draw the grid again from the stored set
            images = torch.load(path, weights_only=True)["images"]
            atomic_write_bytes(grid, compact_png(png_grid(images[:GRID_SAMPLES].float() / 255)))
        return done + [({**reuse.meta["row"], "grid": str(grid), "resumed": True}, reuse.why)]
    seed_everything(derive_seed(seed, expert.task, synthesizer), cfg.deterministic)
    start = time.perf_counter()
    if generator is not None:
        pixels = sample_images(generator, fmt, cfg.dafl.images, derive_seed(seed, expert.task, "synthetic set"),
                               device, batch_size=cfg.dafl.batch_size, mode=cfg.dafl.sample_mode)
        images = to_uint8(pixels)
    else:
        resume = Resume.beside(path, recipe_key(recipe) + upstream["expert"])
        images = inverted_images(cfg, synthesizer, expert, seed, model, fmt, device, resume)
    make_time = time.perf_counter() - start
    scored = to_unit(images[:cfg.eval_samples], device)
    other_path = other_seed_expert(layout, expert, seed)
    other = load_model(other_path, device=device)[0] if other_path else None
    quality = sample_quality(model, fmt, scored, other)
    atomic_write_bytes(grid, compact_png(png_grid(scored[:GRID_SAMPLES].cpu())))
    generator_time = done[0][0]["generator_train_time_s"] if done and done[0][1] != "reused" else 0.0
    generator_fields = {k: v for k, v in done[0][0].items() if k != "kind"} if done else {}
    row = {"kind": "set", "synthesizer": synthesizer, "task": expert.task, "arch": expert.arch, **generator_fields,
           **({"arch_kwargs": expert.arch_kwargs} if expert.arch_kwargs else {}), "seed": seed, "images": len(images),
           "expert_checkpoint": str(expert_file), **quality, "other_expert": str(other_path) if other_path else None,
           "train_time_s": make_time + generator_time, "device": str(device), "grid": str(grid), "set": str(path),
           "resumed": False}
    other = None if cfg.force else made_meanwhile(path, recipe, upstream)
    if other is None:
        save_set(path, images, {"synthesizer": synthesizer, "task": expert.task, "input_format": fmt.as_dict(),
                                "recipe": recipe, "upstream": upstream, "row": row})
    if generator is None:
        resume.clear()
    return done + [(row if other is None else {**other["row"], "resumed": True}, reuse.why)]


def main(cfg: config.GanConfig) -> dict:
    config.check(cfg)
    config.check_names(cfg)
    synthesizers = list(dict.fromkeys(part for name in cfg.synthesizers for part in components(name)))
    spec = cfg.problems[cfg.problem]
    trained_here = [e for e in spec.experts if e.file is None]
    for name in synthesizers:
        check_experts(name, [e.arch for e in trained_here], [e.arch_kwargs for e in trained_here])
    needs = {"dafl": "features", "inversion": "class_weights", "deepinversion": "batchnorm"}
    for name in synthesizers:  # what a synthesizer needs of an expert given by file
        require(cfg.problem, spec, **{needs[name]: f"synthesizer {name!r}"})
    layout = Layout(cfg)
    experts = list(dict.fromkeys(experts_of(spec)))  # one checkpoint named twice: one set
    tasks = [e.task for e in experts]
    names = [e.task if tasks.count(e.task) == 1 else e.tag for e in experts]
    if (error := layout.missing_error([layout.wanted_expert(e, s) for e in experts for s in cfg.seeds])) is not None:
        raise error
    config.print_config(cfg)
    device = resolve_device(cfg.device)
    made: dict[tuple[int, str], list[dict]] = {}
    reasons = []
    generators = dafl_generators(cfg, experts, cfg.seeds, device) if "dafl" in synthesizers else {}
    for name, expert in zip(progress(names, desc=f"{cfg.problem} synthesis"), experts):
        for seed in cfg.seeds:
            for synthesizer in synthesizers:
                for row, why in make_set(cfg, synthesizer, expert, seed, device, generators.get((expert, seed))):
                    made.setdefault((seed, name), []).append({**row, "name": name})
                    reasons.append(why)
    rows = [row for seed in cfg.seeds for name in names for row in made[(seed, name)]]
    stem = Path(cfg.results_dir) / "gan" / cfg.problem
    sets = [r for r in rows if r["kind"] == "set"]
    outputs = write_rows(stem, [{**r, **config.row_config(cfg)} for r in sets])
    outputs["config"] = str(stem.with_name(stem.name + ".config.yaml"))
    config.save(cfg, outputs["config"])
    summary = {"problem": cfg.problem, "seeds": cfg.seeds, "synthesizers": synthesizers, "outputs": outputs,
               **tally(reasons)}
    for synthesizer in synthesizers:
        for name in names:  # the task, with the arch tag where experts share a task
            group = [r for r in sets if r["name"] == name and r["synthesizer"] == synthesizer]
            summary[f"{synthesizer}/{name}"] = {key: mean_std(r[key] for r in group)[0]
                                                for key in ("balance", "mean_confidence")}
    print_summary(summary)
    return summary


if __name__ == "__main__":
    cli.run(main, ARGS)
