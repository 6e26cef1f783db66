"""Classify your own images with a mixture of a problem's experts.

    python predict.py problem=disjoint_mnist seed=770597 rule=naive inputs=my_digits/
    python predict.py experiments/my_problem.yaml rule="gate_hard(gate=universal,regime=real)" inputs=batch.pt
    python predict.py profile=quick problem=mnist_cifar10 rule=energy inputs=my_images/   # after make reproduce

``profile=`` names the pipeline profile that made the checkpoints (quick, cpu, paper, or its YAML file): its
settings sections and ckpt_dir select them, as the pipeline's own stages do (other arguments override it).

``inputs`` is a folder of PNG/JPEG images (sorted by name), one such image, or a tensor file
(``torch.save`` of ``[N, C, H, W]`` uint8 pixels or [0,1] floats; read with ``weights_only=True``). When grey
and colour images are mixed, grey ones repeat their channel. Every expert sees an image as merge.py shows it the
combined test set (problem_images): an image of the size of one of the problem's datasets (28x28 for MNIST and
Fashion-MNIST) is padded to 32x32 as that dataset's images are (data.to_problem_size), a 32x32 image is taken
as is, any other size is resized (antialiased) as the first expert's dataset takes it; then each expert gets
it in its own input format (a file expert crops and resizes), so a crop: 2 expert sees a 28x28 digit's pixels.
The experts of ``seed`` (checkpoints of this project or files: README, "Experts from files") run in batches
on ``device``, and ``rule`` picks per image: any rule a merge table may pick, reading what it reads in merge.py
(runners.py): a logit rule such as naive or energy, a detector with its statistics (``stats=synthetic:NAME``,
``shipped`` or ``real:N``: stored ones, else fitted and stored as merge.py does), ``calibrated`` on the stored
synthetic sets, or a gate rule with its gates (``gate=detectors`` too). Refused in one line before any work: the
oracle (it reads each image's true domain), the multi-pass rules (their noises are sized in the units of each
image's own dataset, which a user's image does not name) and the fusion rules (they build one network from fusion
parents). One line per image: the file, the global class name, the chosen expert and its confidence (the
chosen expert's softmax probability of its top class), tab-separated; ``output=FILE.csv`` also writes them.
``predict`` does the same for a tensor of images in Python.
"""
from __future__ import annotations

import cli
import config

ARGS = cli.arguments(__name__, __doc__, config.PredictConfig)  # --help and bad arguments answer before torch loads

import csv  # noqa: E402
import io  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torchvision.io import ImageReadMode, decode_image, read_file  # noqa: E402

from artifacts import Layout  # noqa: E402
from common import UserError, atomic_write_text, print_summary, progress, resolve_device  # noqa: E402
from data import get_source, to_problem_size  # noqa: E402
from expert_files import FEATURE_TYPES, require  # noqa: E402
from gating import gate_runner, wanted_gates  # noqa: E402
from problems import Problem, describe_problem, expert_class_counts, run_experts  # noqa: E402
from runners import (check_detectors, detector_gate_inputs, detector_runner, sets_read, synthesizer_of,  # noqa: E402
                     synthetic_runner)
from strategies import (NO_EXPERT, REGISTRY, MergeInputs, StrategyCall, check_class_counts,  # noqa: E402
                        parse_strategies, with_gate_statistics)
from synthesis import components  # noqa: E402


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Prediction:
    name: str  # the image file, or ``FILE[i]`` for image i of a tensor file
    class_id: int  # global class id
    class_name: str
    expert: str  # the expert the rule trusted (its name in result rows)
    confidence: float  # that expert's softmax probability of its top class


def check_rule(cfg: config.PredictConfig) -> StrategyCall:
    """The rule, if predict can run it on a user's images, with the detector gate's statistics source filled in
    (strategies.with_gate_statistics); else a one-line ConfigError saying why."""
    calls = with_gate_statistics(parse_strategies([cfg.rule]), cfg.gate.detector_stats)
    if len(calls) != 1:
        raise config.ConfigError(f"rule={cfg.rule!r} names {len(calls)} strategies; predict takes one")
    call = calls[0]
    reason = ("reads the true domain of each sample, which a user's image does not have" if call.name == "oracle"
              else "runs augmented passes whose noises are sized in the units of each image's own dataset, which a "
                   "user's image does not name" if call.param("setting") is not None
              else "fits its router on the selection half of a problem's combined test set (merge.py)"
              if call.param("inputs") is not None
              else "builds one network from fusion parents (problems with shared_labels)"
              if REGISTRY[call.name].fusion is not None else "")
    if reason:
        raise config.ConfigError(f"rule {call.label} {reason}; predict takes every other rule (logit rules, "
                                 f"detectors, calibrated, gate rules)")
    spec = cfg.problems[cfg.problem]
    check_class_counts(call, cfg.problem, expert_class_counts(cfg.problem, spec, cfg.tasks))
    check_detectors([call], cfg.problem, spec, cfg.tasks)
    if call.param("gate") in FEATURE_TYPES:
        require(cfg.problem, spec, features=f"rule {call.label}")
    return call


def load_mixture(cfg: config.PredictConfig) -> tuple[Problem, StrategyCall]:
    """The problem (its experts and labels, no test set) and the rule, checked; every file they need exists."""
    config.check(cfg)
    config.check_names(cfg)
    call = check_rule(cfg)
    problem = describe_problem(cfg.problem, cfg.problems[cfg.problem], cfg.tasks)
    layout = Layout(cfg)
    wanted = problem.wanted_experts(layout, [cfg.seed])
    if call.param("regime") is not None:
        gates_from = call.param("gates_from") or ""
        if gates_from and gates_from not in cfg.problems:
            raise config.ConfigError(f"rule {call.label}: gates_from={gates_from!r} is not a problem")
        wanted += wanted_gates(layout, problem, call.param("gate"), call.param("regime"), gates_from, cfg.seed,
                               synthesizer_of(call))
    if (sets := sets_read(call, cfg.gate)) is not None:  # a calibration's, a synthetic statistics source's
        wanted += [layout.wanted_set(cfg.problem, part, e, cfg.seed) for part in components(sets)
                   for e in problem.experts]
    if (error := layout.missing_error(wanted)) is not None:
        raise error
    return problem, call


def predict(cfg: config.PredictConfig, images: torch.Tensor | list[torch.Tensor],
            names: list[str] | None = None) -> list[Prediction]:
    """Classify ``images`` with the mixture ``cfg`` describes: ``[N, C, H, W]``, or a list of ``[C, H, W]`` images
    of any sizes; uint8 pixels or [0,1] floats, 1 or 3 channels. ``names`` label the predictions (default: their
    index)."""
    problem, call = load_mixture(cfg)
    device = resolve_device(cfg.device)
    x = problem_images(images, [problem.specs[task].source for task in problem.tasks])
    layout = Layout(cfg)
    models, formats = problem.load_experts(layout, cfg.seed, device)
    starts = range(0, len(x), cfg.batch_size)
    activations = run_experts(models, formats, (x[i:i + cfg.batch_size].to(device)
                                                for i in progress(starts, desc="predict", total=len(starts))),
                              features=True)
    logits = [lo for lo, _ in activations]
    # what a detector, a calibration or the detector gate reads, made as merge.py makes it, on these images
    scorer = detector_runner(layout, problem, models, formats, logits, cfg.seed, device,
                             lambda: (x[i:i + cfg.batch_size].to(device) for i in starts), cfg.data_dir)
    inputs = MergeInputs(logits, problem.label_maps,
                         run_gates=gate_runner(layout, problem, activations, cfg.seed, device,
                                               detector_gate_inputs(scorer, logits, cfg.gate.detector_stats)),
                         run_synthetic=synthetic_runner(layout, problem, models, formats, cfg.seed, device),
                         run_detector=scorer)
    decision = call(inputs)
    top = torch.stack([lo.softmax(dim=1).max(dim=1).values for lo in logits], dim=1)
    chosen = decision.expert.to(top.device)
    confidence = top.gather(1, chosen.clamp(min=0).unsqueeze(1)).squeeze(1).where(chosen != NO_EXPERT, torch.nan)
    expert_names = problem.names
    names = names or [str(i) for i in range(len(chosen))]
    return [Prediction(name, c, problem.class_names[c], expert_names[e] if e != NO_EXPERT else "", p)
            for name, c, e, p in zip(names, decision.pred.tolist(), chosen.tolist(), confidence.tolist())]


def problem_images(images: torch.Tensor | list[torch.Tensor], sources: list[str]) -> torch.Tensor:
    """``images`` (as ``predict`` takes them) as one [0,1] ``[N, C, 32, 32]`` tensor that every expert sees, as
    merge.py shows every expert the combined test set: an image of the size of one of the problem's datasets
    (``sources``; 28x28 for MNIST and Fashion-MNIST) is brought to 32x32 as that dataset's images are
    (data.to_problem_size: padded), a 32x32 image is taken as is, and any other size as the first expert's
    dataset takes it (resized to its size, then padded). Grey images among colour ones repeat their channel."""
    if isinstance(images, torch.Tensor):
        parts = [as_unit_images(images, "images")]
    elif images:
        parts = [as_unit_images(image.unsqueeze(0), f"image {i}") for i, image in enumerate(images)]
    else:
        raise UserError("images: the list is empty; give at least one image")
    channels = max(part.shape[1] for part in parts)
    parts = [part.expand(-1, channels, -1, -1) for part in parts]
    by_size = {get_source(source).size: source for source in reversed(sources)}  # the first expert's wins a tie
    return torch.cat([to_problem_size(part, by_size.get(part.shape[-1], sources[0])) for part in parts])


def as_unit_images(images: torch.Tensor, where: str) -> torch.Tensor:
    """``[N, C, H, W]`` (or grey ``[N, H, W]``) uint8 or [0,1] float images -> float [0,1], at their own size."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3) or not len(images):
        raise UserError(f"{where}: expected images [N, C, H, W] with 1 or 3 channels, got shape {list(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255
    if images.is_floating_point():
        if images.min() < 0 or images.max() > 1:
            raise UserError(f"{where}: float images must hold [0,1] pixels, got values in "
                            f"[{images.min().item():.3g}, {images.max().item():.3g}]")
        return images.float()
    raise UserError(f"{where}: images must be uint8 or float, got {images.dtype}")


def read_inputs(path: str) -> tuple[list[str], torch.Tensor | list[torch.Tensor]]:
    """The images at ``path`` and their names: a folder's or one image file's as a list of [0,1] ``[C, H, W]``
    images at their own sizes, a tensor file's as [0,1] ``[N, C, H, W]``."""
    source = Path(path)
    if not path or not source.exists():
        raise UserError(f"inputs={path!r} does not exist; give a folder of PNG/JPEG images, an image or a tensor file")
    if source.is_dir() or source.suffix.lower() in IMAGE_SUFFIXES:
        files = ([source] if source.is_file() else
                 sorted(f for f in source.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        if not files:
            raise UserError(f"{source} holds no PNG or JPEG image")
        return [str(f) for f in files], [read_image(f) for f in progress(files, desc="reading images")]
    try:
        tensor = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a file of another kind
        raise UserError(f"{source} is neither a PNG/JPEG image nor a tensor file ({type(err).__name__})") from None
    if not isinstance(tensor, torch.Tensor):
        raise UserError(f"{source} holds a {type(tensor).__name__}, not a tensor of images")
    x = as_unit_images(tensor, str(source))
    return [f"{source.name}[{i}]" for i in range(len(x))], x


def read_image(path: Path) -> torch.Tensor:
    """One PNG/JPEG file as [0,1] ``[C, H, W]``: grey or RGB (an alpha channel is dropped)."""
    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.UNCHANGED)
    except RuntimeError as err:
        raise UserError(f"cannot decode {path} as an image ({str(err).strip().splitlines()[0]})") from None
    image = image[:1] if image.shape[0] == 2 else image[:3]  # grey+alpha -> grey, RGBA -> RGB
    return as_unit_images(image.unsqueeze(0), str(path))[0]


def main(cfg: config.PredictConfig) -> dict:
    _, call = load_mixture(cfg)  # refuse a bad problem, rule or missing checkpoint before reading any image
    config.print_config(cfg)
    names, images = read_inputs(cfg.inputs)
    predictions = predict(cfg, images, names)
    for p in predictions:
        print(f"{p.name}\t{p.class_name}\t{p.expert}\t{p.confidence:.4f}")
    outputs = {}
    if cfg.output:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(asdict(predictions[0])))
        writer.writeheader()
        writer.writerows(asdict(p) for p in predictions)
        atomic_write_text(cfg.output, buffer.getvalue())
        outputs["csv"] = cfg.output
    counts: dict[str, int] = {}
    for p in predictions:
        counts[p.expert] = counts.get(p.expert, 0) + 1
    summary = {"problem": cfg.problem, "seed": cfg.seed, "rule": call.label,
               "images": len(predictions), "routing_counts": counts, "outputs": outputs}
    print_summary(summary)
    return summary


if __name__ == "__main__":
    cli.run(main, ARGS)
