"""Where every artifact lives and what it is keyed by (docs/design.md section 6); the one module that knows.

An artifact (an expert, a generator, a gate checkpoint) is made by a *recipe*: its settings with the
defaults filled in, plus the keys of the recipes of the artifacts it was made from. A short hash of the
recipe (its *key*) is part of the file name, so artifacts of different settings live side by side and
going back to an earlier setting finds its files again. A checkpoint also stores the *digest* of its
weights; a downstream checkpoint stores the digests of the upstream files it read, and is remade when
one of them was remade since (same recipe, other weights), never reused against weights it did not see.

    checkpoints/experts/TASK_ARCHTAG_KEY_seedS.pt
    checkpoints/generators/TASK_ARCHTAG_KEY_seedS.pt             (DAFL's generators)
    checkpoints/synthetic/SYNTHESIZER/TASK_ARCHTAG_KEY_seedS.pt  (stored synthetic image sets)
    checkpoints/gates/PROBLEM/REGIME/GATE_TYPE/TASK_ARCHTAG_KEY_seedS.pt   (the universal gate: universal_KEY_seedS.pt)
    checkpoints/statistics/SOURCE/TASK_ARCHTAG_KEY_seedS.pt      (detectors' statistics: sources.py)

The data-free regimes' gate folders name their synthesizer: ``synthetic_dafl``, ``noise_inversion``, ...

Cached result rows (merge.py) are keyed the same way, plus the source of the code that computes them
(``code_digest``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

import config
from common import CheckpointError, read_checkpoint
from data import get_source, task_identity
from expert_files import file_digest
from sources import Source
from stacked import resolve_stacking
from synthesis import components

KEY_LENGTH = 8
# the source that makes each synthesizer's images: part of its sets' recipes (and the generator's), so changed
# synthesis code makes new sets, whose new digests make the gates and rows that read them stale in turn
SYNTHESIS_CODE = {"dafl": ("dafl.py", "archs/generator.py", "synthesis.py"),
                  "inversion": ("inversion.py", "synthesis.py"), "deepinversion": ("inversion.py", "synthesis.py")}
STATISTICS_CODE = ("detectors.py", "detector_stats.py")  # what fits a detector's statistics on a source
REPO = Path(__file__).resolve().parent
DRAWING = ("images", "sample_mode")  # how a set is drawn from a DAFL generator, not how it is trained


def recipe_key(recipe: dict) -> str:
    """A short stable hash of a recipe (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:KEY_LENGTH]


def arch_tag(arch: str, arch_kwargs: dict | None = None) -> str:
    """The arch part of a file name: ``arch`` alone without extra arguments, else ``arch-`` and 8 hex digits
    of a hash of the arguments, so MLPs of different shapes trained on one task sit side by side."""
    if not arch_kwargs:
        return arch
    digest = hashlib.sha256(json.dumps(arch_kwargs, sort_keys=True).encode()).hexdigest()
    return f"{arch}-{digest[:8]}"


def section_args(name: str, section: Any) -> list[str]:
    """``name.key=value`` for every field of a settings section that differs from its default (values in
    JSON, which YAML reads back): what a command needs to name the same section."""
    default = type(section)()
    return [f"{name}.{f.name}={json.dumps(getattr(section, f.name))}" for f in dataclasses.fields(section)
            if getattr(section, f.name) != getattr(default, f.name)]


# ---------------------------------------------------------------- digests of stored weights

def digest_of(path: Path) -> str:
    """The digest of a checkpoint's weights, as its ``meta["digest"]`` stores it (cached per file version)."""
    stat = path.stat()
    return _digest(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4096)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    return stored_meta(Path(path))["digest"]


def stored_meta(path: Path) -> dict:
    """The ``meta`` of a stored artifact (a model checkpoint or a synthetic image set), with its digest."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises several unrelated types for a damaged file
        stored = None
    if not isinstance(stored, dict) or "digest" not in stored.get("meta", {}):
        read_checkpoint(path)  # raises the error that says what is wrong with a damaged file
        raise CheckpointError(f"{path} was not written by this project's stages (no digest); delete it and rerun")
    return stored["meta"]


def code_digest(files: tuple[str, ...]) -> str:
    """A short hash of the source of ``files`` (paths relative to the repository): the code that computes a
    cached result row or makes a synthetic set, so it is made again when that code changes. Read once per
    process: the code that runs is the code imported when the process started, whatever is edited since."""
    return _code_digest(REPO, tuple(sorted(files)))


@lru_cache(maxsize=256)
def _code_digest(repo: Path, names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + (repo / name).read_bytes() + b"\0")
    return h.hexdigest()[:KEY_LENGTH]


# ---------------------------------------------------------------- reuse

@dataclass
class Reuse:
    """Whether a stored checkpoint can stand for this run, and why not when it cannot."""

    meta: dict | None  # the stored meta when it can be reused
    why: str  # "reused", or the reason it must be made: "no checkpoint", "force=true", "upstream retrained", ...

    @property
    def reused(self) -> bool:
        return self.meta is not None


def check_reuse(path: Path, recipe: dict, upstream: dict[str, str], force: bool) -> Reuse:
    """Reuse the checkpoint at ``path`` only when it was made from ``recipe`` and from upstream files whose
    digests equal ``upstream`` (name -> digest) now."""
    if force:
        return Reuse(None, "force=true")
    if not path.exists():
        return Reuse(None, "no checkpoint")
    meta = stored_meta(path)
    if meta.get("recipe") != recipe:
        return Reuse(None, "stored recipe differs")
    if meta.get("upstream") != upstream:
        return Reuse(None, "upstream retrained")
    return Reuse(meta, "reused")


def made_meanwhile(path: Path, recipe: dict, upstream: dict[str, str]) -> dict | None:
    """The reuse check after the work: the meta of a complete artifact of this recipe and upstream digests that
    another worker wrote at ``path`` while this one worked, or None. A worker that finds one drops its own result
    for it, so racing workers leave one file (written atomically: never torn) and every reader sees one digest."""
    return check_reuse(path, recipe, upstream, force=False).meta if path.exists() else None


def tally(reasons: list[str]) -> dict:
    """A stage's summary of its work: how many items were reused, how many made, and why."""
    made = [r for r in reasons if r != "reused"]
    return {"reused": len(reasons) - len(made), "made": len(made),
            "why_made": {why: made.count(why) for why in dict.fromkeys(made)}}


# ---------------------------------------------------------------- artifacts that are not there

@dataclass
class Wanted:
    """An artifact a stage needs: where it should be, the recipe it would be made by, the settings section that
    sets that recipe (``expert``, ``dafl``, ``inversion``, ``deepinversion``, ``gate``), and the command that
    makes it."""

    path: Path
    recipe: dict
    section: str
    command: str

    @property
    def stem(self) -> str:
        """The name without its recipe key: ``TAG_seedS`` (artifacts of other settings share it)."""
        tag, _, seed = self.path.stem.rpartition("_seed")
        return f"{tag.rpartition('_')[0]}_seed{seed}"


def as_yaml_line(overrides: list[str]) -> str:
    """``expert.epochs=2 gate.epochs=3`` as the YAML a user adds to a file: ``{expert: {epochs: 2}, gate: ...}``."""
    import yaml

    nested: dict = {}
    for override in overrides:
        key, _, text = override.partition("=")
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = yaml.safe_load(text)
    return yaml.safe_dump(nested, default_flow_style=True, sort_keys=False).strip()


# ---------------------------------------------------------------- the layout

@dataclass(frozen=True)
class ExpertId:
    """One expert of a problem as the layout names it: task, arch and the arch's extra arguments; or, for an
    expert given by file, its task and the file (named by the digest of its bytes)."""

    task: str
    arch: str
    arch_kwargs: dict
    file: config.ExpertFile | None = None

    @property
    def tag(self) -> str:
        if self.file is not None:
            return f"{self.task}_file-{file_digest(self.file.path)[:KEY_LENGTH]}"
        return f"{self.task}_{arch_tag(self.arch, self.arch_kwargs)}"

    def __hash__(self) -> int:
        return hash(self.tag)


def experts_of(spec: config.ProblemSpec) -> list[ExpertId]:
    return [ExpertId(e.task, "file" if e.file else e.arch, dict(e.arch_kwargs), e.file) for e in spec.experts]


class Layout:
    """Paths, recipes and re-creation commands of every checkpoint under one ``ckpt_dir``, for the settings
    sections of one config (a stage config, or the pipeline's)."""

    def __init__(self, cfg: Any) -> None:
        self.ckpt_dir = Path(cfg.ckpt_dir)
        self.tasks: dict[str, config.TaskSpec] = cfg.tasks
        self.problems: dict[str, config.ProblemSpec] = getattr(cfg, "problems", {})
        self.expert_training: config.ExpertTraining = cfg.expert
        self.synthesis = {name: getattr(cfg, name, None) for name in config.SYNTHESIS_SECTIONS}
        self.gate: config.GateTraining | None = getattr(cfg, "gate", None)
        self.statistics: config.StatisticsSettings | None = getattr(cfg, "statistics", None)
        self.device: str = getattr(cfg, "device", "auto")
        # the YAML files the config was read from: a command that makes a missing artifact repeats them, so it finds
        # the user's own tasks, problems and settings
        self.files: list[str] = list(getattr(cfg, "yaml_files", []))
        self._recipes: dict[str, dict] = {}  # key -> every recipe this layout computed (alternatives() reads them)

    def _known(self, recipe: dict) -> dict:
        self._recipes[recipe_key(recipe)] = recipe
        return recipe

    def script(self, name: str) -> str:
        """``python NAME`` and the YAML files this config was read from: the start of a command that makes an
        artifact."""
        return " ".join(["python", name, *map(shlex.quote, self.files)])

    def stacked(self, stage: str) -> bool:
        """Whether ``stage`` (experts, generators or gates) trains its seeds as one stacked network here: its
        section's ``stack_seeds`` resolved for this config's device. The two paths end at weights equal only
        within float tolerance, so the resolved path is part of every trained artifact's recipe."""
        section = {"experts": self.expert_training, "generators": self.synthesis["dafl"], "gates": self.gate}[stage]
        return resolve_stacking(self._need(section, stage).stack_seeds, stage, self.device)

    # ------------------------------------------------------------ experts

    def expert_recipe(self, expert: ExpertId) -> dict:
        task = self.tasks[expert.task]
        if expert.file is not None:  # trained elsewhere: its bytes and how it is read, no training settings
            return self._known({"task": task_identity(expert.task, task), "file": file_digest(expert.file.path),
                                **{k: v for k, v in dataclasses.asdict(expert.file).items() if k != "path"}})
        training = dataclasses.asdict(self.expert_training)
        training["batch_size"] = training["batch_size"] or get_source(task.source).batch_size
        training["stack_seeds"] = self.stacked("experts")
        return self._known({"task": task_identity(expert.task, task), "arch": expert.arch,
                            "arch_kwargs": expert.arch_kwargs, **training})

    def expert_path(self, expert: ExpertId, seed: int) -> Path:
        """Where the expert's weights are: its checkpoint, or the file it was given by (the same for every seed)."""
        if expert.file is not None:
            return Path(expert.file.path)
        key = recipe_key(self.expert_recipe(expert))
        return self.ckpt_dir / "experts" / f"{expert.tag}_{key}_seed{seed}.pt"

    def expert_digest(self, expert: ExpertId, seed: int) -> str:
        """The identity of the expert's weights, which downstream artifacts record: its checkpoint's stored
        digest, or the digest of the bytes of its file."""
        if expert.file is not None:
            return file_digest(expert.file.path)
        return digest_of(self.expert_path(expert, seed))

    def expert_command(self, expert: ExpertId, seeds: list[int]) -> str:
        if expert.file is not None:
            return f"(nothing to train: the expert is the file {expert.file.path})"
        extra = f" arch_kwargs='{json.dumps(expert.arch_kwargs)}'" if expert.arch_kwargs else ""
        settings = "".join(f" {a}" for a in section_args("expert", self.expert_training))
        return (f"{self.script('train_source_networks.py')} dataset={expert.task} arch={expert.arch}{extra} "
                f"seeds=[{','.join(map(str, seeds))}]{settings}")

    # ------------------------------------------------------------ generators and synthetic sets

    def generator_recipe(self, expert: ExpertId) -> dict:
        """DAFL's generator: its training settings (not how many images are drawn from it, nor how)."""
        dafl = {**dataclasses.asdict(self._need(self.synthesis["dafl"], "dafl")),
                "stack_seeds": self.stacked("generators")}
        return self._known({"synthesizer": "dafl", **{k: v for k, v in dafl.items() if k not in DRAWING},
                            "code": code_digest(SYNTHESIS_CODE["dafl"]),
                            "expert": recipe_key(self.expert_recipe(expert))})

    def generator_path(self, expert: ExpertId, seed: int) -> Path:
        key = recipe_key(self.generator_recipe(expert))
        return self.ckpt_dir / "generators" / f"{expert.tag}_{key}_seed{seed}.pt"

    def synthetic_recipe(self, synthesizer: str, expert: ExpertId) -> dict:
        """A stored image set of one synthesizer (not a mixture): its settings and what it was made from."""
        settings = dataclasses.asdict(self._need(self.synthesis[synthesizer], synthesizer))
        if synthesizer == "dafl":
            return self._known({"synthesizer": "dafl", **{k: settings[k] for k in DRAWING},
                                "code": code_digest(SYNTHESIS_CODE["dafl"]),
                                "generator": recipe_key(self.generator_recipe(expert))})
        return self._known({"synthesizer": synthesizer, **settings, "code": code_digest(SYNTHESIS_CODE[synthesizer]),
                            "expert": recipe_key(self.expert_recipe(expert))})

    def synthetic_path(self, synthesizer: str, expert: ExpertId, seed: int) -> Path:
        key = recipe_key(self.synthetic_recipe(synthesizer, expert))
        return self.ckpt_dir / "synthetic" / synthesizer / f"{expert.tag}_{key}_seed{seed}.pt"

    def gan_command(self, problem: str, seeds: list[int], synthesizers: list[str]) -> str:
        settings = [*section_args("expert", self.expert_training),
                    *(arg for name in synthesizers for arg in section_args(name, self.synthesis[name]))]
        return " ".join([self.script("train_gan.py"), f"problem={problem}", f"seeds=[{','.join(map(str, seeds))}]",
                         f"synthesizers=[{','.join(synthesizers)}]", *settings])

    # ------------------------------------------------------------ gates

    def gate_recipe(self, problem: str, regime: str, gate_type: str, serves: int | None,
                    synthesizer: str = "dafl") -> dict:
        """A gate of ``problem``'s expert ``serves`` (None: the universal gate, serving all of them); the
        data-free regimes read the sets of ``synthesizer`` (one, or a mixture ``a+b``)."""
        gate = {**dataclasses.asdict(self._need(self.gate, "gate")), "stack_seeds": self.stacked("gates")}
        real = regime == "real" or regime.startswith("real:")  # real:N: few-shot, the first N images of each task
        data_keys = ("train_limit",) if real else ("noise_samples", "augment_copies")
        unused = {"train_limit", "noise_samples", "augment_copies"} - set(data_keys)
        if gate_type != "detectors":  # only the detector gate reads scores standardised on a statistics source
            unused.add("detector_stats")
        experts = experts_of(self.problems[problem])
        recipe = {**{k: v for k, v in gate.items() if k not in unused}, "regime": regime, "gate_type": gate_type,
                  "serves": serves, "experts": [recipe_key(self.expert_recipe(e)) for e in experts]}
        if regime.startswith("real:"):
            recipe["train_limit"] = int(regime.partition(":")[2])
        if not real:
            recipe["synthesizer"] = synthesizer
            recipe["sets"] = [recipe_key(self.synthetic_recipe(part, e)) for part in synthesizer.split("+")
                              for e in experts]
        return recipe

    def gate_path(self, problem: str, regime: str, gate_type: str, serves: int | None, seed: int,
                  synthesizer: str = "dafl") -> Path:
        key = recipe_key(self.gate_recipe(problem, regime, gate_type, serves, synthesizer))
        stem = "universal" if serves is None else experts_of(self.problems[problem])[serves].tag
        folder = regime.replace(":", "_") if regime.startswith("real") else f"{regime}_{synthesizer}"
        return self.ckpt_dir / "gates" / problem / folder / gate_type / f"{stem}_{key}_seed{seed}.pt"

    def gate_paths(self, problem: str, regime: str, gate_type: str, seed: int, synthesizer: str = "dafl") -> list[Path]:
        """The gate file of each expert of ``problem`` (the universal gate: one file, once per expert)."""
        n = len(self.problems[problem].experts)
        if gate_type in ("universal", "detectors"):  # one gate serves every expert (gating.SHARED_GATES)
            return [self.gate_path(problem, regime, gate_type, None, seed, synthesizer)] * n
        return [self.gate_path(problem, regime, gate_type, k, seed, synthesizer) for k in range(n)]

    def gate_command(self, problem: str, regime: str, gate_type: str, seed: int, synthesizer: str = "dafl") -> str:
        settings = [*section_args("expert", self.expert_training), *section_args("gate", self.gate)]
        words = [self.script("train_pan.py"), f"problem={problem}", f"regimes=[{regime}]", f"gate_types=[{gate_type}]",
                 f"seeds=[{seed}]"]
        if not regime.startswith("real"):
            words.append(f"synthesizers=[{synthesizer}]")
            settings += [arg for part in synthesizer.split("+") for arg in section_args(part, self.synthesis[part])]
        return " ".join(words + settings)

    # ------------------------------------------------------------ detectors' statistics

    def stats_recipe(self, source: Source, expert: ExpertId) -> dict:
        """The statistics of ``source`` for ``expert``: the fitting settings (none for a shipped source: nothing is
        fitted), the code that fits them, and what they were made from (the expert; a synthetic source's sets)."""
        settings = {} if source.kind == "shipped" else dataclasses.asdict(self._need(self.statistics, "statistics"))
        recipe = {"source": source.label, **settings, "code": code_digest(STATISTICS_CODE),
                  "expert": recipe_key(self.expert_recipe(expert))}
        if source.kind == "synthetic":
            recipe["sets"] = [recipe_key(self.synthetic_recipe(part, expert)) for part in components(source.synthesizer)]
        return self._known(recipe)

    def stats_path(self, source: Source, expert: ExpertId, seed: int) -> Path:
        key = recipe_key(self.stats_recipe(source, expert))
        return self.ckpt_dir / "statistics" / source.folder / f"{expert.tag}_{key}_seed{seed}.pt"

    # ------------------------------------------------------------ artifacts that are not there

    def wanted_expert(self, expert: ExpertId, seed: int) -> Wanted:
        return Wanted(self.expert_path(expert, seed), self.expert_recipe(expert), "expert",
                      self.expert_command(expert, [seed]))

    def wanted_set(self, problem: str, synthesizer: str, expert: ExpertId, seed: int) -> Wanted:
        return Wanted(self.synthetic_path(synthesizer, expert, seed), self.synthetic_recipe(synthesizer, expert),
                      synthesizer, self.gan_command(problem, [seed], [synthesizer]))

    def wanted_gate(self, problem: str, regime: str, gate_type: str, serves: int | None, seed: int,
                    synthesizer: str = "dafl") -> Wanted:
        return Wanted(self.gate_path(problem, regime, gate_type, serves, seed, synthesizer),
                      self.gate_recipe(problem, regime, gate_type, serves, synthesizer), "gate",
                      self.gate_command(problem, regime, gate_type, seed, synthesizer))

    def alternative(self, wanted: Wanted) -> tuple[Path, list[str]] | None:
        """An artifact beside ``wanted.path`` of the same task, arch and seed (or gate) made under other settings
        that ``key=value`` overrides of the settings sections select, and those overrides (the fewest first);
        None when there is none."""
        if "file" in wanted.recipe:  # an expert given by file has no settings to change
            return None
        found = []
        for path in sorted(wanted.path.parent.glob(wanted.stem.replace("_seed", "_" + "?" * KEY_LENGTH + "_seed")
                                                   + ".pt")):
            try:
                stored = stored_meta(path).get("recipe")
            except CheckpointError:
                continue
            overrides = self._overrides(stored, wanted.recipe, wanted.section) if stored else None
            if overrides:
                found.append((len(overrides), -path.stat().st_mtime, path, overrides))
        return (found[0][2], found[0][3]) if (found := sorted(found)) else None

    def _overrides(self, stored: dict, wanted: dict, section: str) -> list[str] | None:
        """The ``section.key=value`` overrides under which this layout would compute ``stored`` instead of
        ``wanted`` (upstream recipes, named by key, compared in turn); None when no override of the settings
        sections gets there (another task, arch or problem)."""
        fields = {f.name for f in dataclasses.fields(config.SECTIONS[section])}
        out: list[str] = []
        for name in dict.fromkeys([*wanted, *stored]):
            mine, theirs = wanted.get(name), stored.get(name)
            if mine == theirs:
                continue
            if name in fields:
                out.append(f"{section}.{name}={json.dumps(theirs)}")
            elif name in ("expert", "generator", "experts", "sets") and type(mine) is type(theirs):
                pairs = zip(mine, theirs) if isinstance(mine, list) and len(mine) == len(theirs) else [(mine, theirs)]
                for want_key, have_key in pairs:
                    if want_key == have_key:
                        continue
                    upstream = self._upstream(want_key, have_key)
                    if upstream is None:
                        return None
                    out += upstream
            else:
                return None
        return list(dict.fromkeys(out))

    def _upstream(self, want_key: str, have_key: str) -> list[str] | None:
        """Overrides that turn the upstream recipe of key ``want_key`` (computed by this layout) into the one of
        ``have_key`` (a stored artifact's upstream, read from any file of that key under ``ckpt_dir``)."""
        wanted = self._recipes.get(want_key)
        files = next(iter(self.ckpt_dir.rglob(f"*_{have_key}_seed*.pt")), None) if wanted else None
        if files is None:
            return None
        stored = stored_meta(files).get("recipe") or {}
        # an upstream recipe is an expert's (no synthesizer) or a synthesizer's (a DAFL generator or any set)
        return self._overrides(stored, wanted, wanted.get("synthesizer") or "expert")

    def missing_commands(self, wanted: list[Wanted]) -> list[str]:
        """The commands that make every needed artifact not on disk, each once, in the order of the stages (experts,
        synthetic sets, gates): what ``missing_error`` names, to run."""
        commands = dict.fromkeys(w.command for w in wanted if not w.path.exists() and "file" not in w.recipe)
        order = [self.script(name) for name in ("train_source_networks.py", "train_gan.py", "train_pan.py")]
        return sorted(commands, key=lambda c: next((i for i, start in enumerate(order) if c.startswith(start)), 3))

    def missing_error(self, wanted: list[Wanted]) -> CheckpointError | None:
        """One error for every needed artifact not on disk (None when all are there): when each of them exists
        under other settings that the same overrides select, one line naming those settings, the overrides to
        pass and the YAML to add; otherwise the commands that make them, with any alternative beside its own."""
        missing = list({w.path: w for w in wanted if not w.path.exists()}.values())
        if not missing:
            return None
        alternatives = [self.alternative(w) for w in missing]
        overrides = {tuple(a[1]) for a in alternatives if a}
        if all(alternatives) and len(overrides) == 1:
            chosen = list(overrides.pop())
            names = sorted({w.stem for w in missing})
            listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            kind = {"expert": "expert checkpoint", "gate": "gate"}.get(missing[0].section,
                                                                       f"{missing[0].section} image set")
            return CheckpointError(
                f"no {kind} under the current settings in {self.ckpt_dir} for {listed}, but "
                f"the same made with {' '.join(chosen)} is there ({alternatives[0][0].name}): pass "
                f"{' '.join(chosen)} to use it (in a YAML file: {as_yaml_line(chosen)}), or make new ones with: "
                + "; ".join(dict.fromkeys(w.command for w in missing)))
        lines = [w.command + (f"   # or use {a[0].name}, made with {' '.join(a[1])}" if a else "")
                 for w, a in zip(missing, alternatives)]
        return CheckpointError(f"checkpoints are missing under {self.ckpt_dir}; create them with:\n  "
                               + "\n  ".join(dict.fromkeys(lines)))

    @staticmethod
    def _need(section: Any, name: str) -> Any:
        if section is None:
            raise ValueError(f"this config has no `{name}` section")
        return section
