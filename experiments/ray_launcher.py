"""The pipeline's steps as Ray tasks (``launcher=ray``; docs/pipeline.md, "Beyond one machine").

Every step of the profile's graph (reproduce.dependencies) is submitted at once as a Ray task whose arguments
include the results of the steps it reads: Ray starts it when they are done, on any worker with its resources
free (one GPU on a cluster that has GPUs, else ``cpus_per_task`` CPUs). With ``seeds_per_task`` a step's seeds
are split into tasks of that many, and one last task of all its seeds, which finds their work done, writes the
step's complete rows. Nothing here schedules, queues or talks to workers: Ray does.

Workers share the checkpoint and results folders (one machine, or a shared file system): every artifact is
written atomically and checked again after its work (a worker that finds it made meanwhile keeps the first),
so two workers making the same artifact leave one complete file. A worker that dies mid-step is retried by Ray
(``max_retries``) and continues from the step's resume files.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import ray
import torch

REPO = Path(__file__).resolve().parent.parent
MAX_RETRIES = 3  # a worker that dies (killed, out of memory, a lost node) is retried this often


def execute(settings: dict, step: dict, seeds: list[int], log: str, threads: int, *upstream: dict) -> dict:
    """One step for ``seeds`` in a worker: the same code as the local launcher (steps.run_step) on ``threads``
    CPU threads (set here: Ray's own default depends on the worker); its output goes to its own log.
    ``upstream`` (the results of the steps it reads) only orders it after them."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    torch.set_num_threads(threads)
    import config
    from common import hidden_inner_progress
    from experiments import steps

    cfg = config.apply_overrides(config.ReproduceConfig(), settings)
    work = steps.Step(**step)
    start = time.perf_counter()
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out, contextlib.redirect_stdout(out), hidden_inner_progress():
        if cfg.fault_injection == f"{work.stage} {work.label}":
            die_after_first_resume_save(Path(log).with_suffix(".fault"))
        summary = steps.run_step(work, cfg, seeds, cfg.force)
    return {"step": step, "seeds": seeds, "wall_s": time.perf_counter() - start, "made": summary.get("made", 1)}


def die_after_first_resume_save(marker: Path) -> None:
    """Fault injection (tests): the first time, the worker process exits at once after the step's first resume
    state is saved, as a killed worker would; the marker makes the retry run normally."""
    if marker.exists():
        return
    import training

    marker.write_text("killed once\n")
    save = training.Resume.save

    def save_then_die(self, state):
        save(self, state)
        os._exit(1)

    training.Resume.save = save_then_die


def seed_groups(seeds: list[int], size: int | None) -> list[list[int]]:
    """``seeds`` in tasks of ``size`` (all in one when None or larger)."""
    size = size or len(seeds)
    return [seeds[i:i + size] for i in range(0, len(seeds), size)]


def log_name(results: Path, step, seeds: list[int], everyone: bool) -> str:
    label = f"{step.stage}_{step.label}".replace(" ", "_").replace("/", "_")
    return str(results / "logs" / (label + ("" if everyone else f"_seeds{'-'.join(map(str, seeds))}") + ".log"))


def result_of(ref) -> dict:
    """A finished task's result; a step that failed with a problem the user can fix (UserError, which names its
    step) is raised as that one line, as the local launcher raises it, not as Ray's wrapped traceback."""
    from common import UserError

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, UserError):
            raise err.cause from None
        raise


def run_graph(cfg, steps: list, graph: list[set[int]]) -> list[dict]:
    """Every step of ``steps`` as Ray tasks ordered by ``graph``; one progress bar over the whole graph (steps
    done / started / waiting, and the time left); returns a timing row per task, as the local launcher does."""
    import config
    from common import progress, resolve_device
    from experiments.steps import timing_row

    start = time.perf_counter()
    if not ray.is_initialized():  # a cluster started by the caller (a test, a notebook) is used as it is
        ray.init(address=cfg.ray_address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False)
    print(f"ray: started in {time.perf_counter() - start:.1f} s; resources {ray.cluster_resources()}", flush=True)
    # a task computes on as many threads as it reserves CPUs, so tasks never share a core; by default as many as
    # this process would (launcher=local's rows, to the last digit)
    threads = max(1, int(cfg.cpus_per_task)) if cfg.cpus_per_task else torch.get_num_threads()
    resources = {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) else {"num_cpus": cfg.cpus_per_task or threads}
    # workers import the project from the repository (a shared path on a cluster), quiet bars as here
    environment = {"env_vars": {"PYTHONPATH": str(REPO), "CI": os.environ.get("CI", "")}}
    task = ray.remote(max_retries=MAX_RETRIES)(execute).options(runtime_env=environment, **resources)
    settings = config.to_dict(cfg)
    results = Path(cfg.results_dir)
    done_refs: list = []  # per step, the task whose completion means the step is done
    tasks: list[tuple[int, list[int]]] = []  # per submitted task: its step and seeds
    refs = []
    for i, step in enumerate(steps):
        after = [done_refs[j] for j in sorted(graph[i])]
        payload = {"stage": step.stage, "label": step.label, "args": step.args, "fusion": step.fusion}
        groups = seed_groups(cfg.seeds, cfg.seeds_per_task)
        parts = [task.remote(settings, payload, group, log_name(results, step, group, False), threads, *after)
                 for group in groups] if len(groups) > 1 else []
        final = task.remote(settings, payload, cfg.seeds, log_name(results, step, cfg.seeds, True), threads, *after,
                            *parts)
        refs += [*parts, final]
        tasks += [*((i, g) for g in groups if len(groups) > 1), (i, cfg.seeds)]
        done_refs.append(final)
    device = str(resolve_device(cfg.device))
    finished, timings = set(), []
    step_of = {ref: i for i, ref in enumerate(done_refs)}
    remaining = list(refs)
    with progress(range(len(steps)), outer=True, desc="reproduce (ray)", unit="step") as bar:
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1, timeout=2.0)
            for ref in ready:
                result = result_of(ref)
                timings.append(timing_row(steps[tasks[refs.index(ref)][0]], result["seeds"], result["wall_s"],
                                          {"made": result["made"]}, device))
                if ref in step_of:
                    finished.add(step_of[ref])
                    bar.update(1)
            started = sum(1 for i in range(len(steps)) if i not in finished and graph[i] <= finished)
            bar.set_postfix_str(f"done {len(finished)} / started {started} / "
                                f"waiting {len(steps) - len(finished) - started}")
    return timings
