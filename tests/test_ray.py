"""launcher=ray (experiments/ray_launcher.py): the same rows as the local launcher, a killed step retried to the
same rows, racing workers leaving one valid file; and the dependency graph both launchers read. A local Ray
cluster of 2 CPUs, as on this project's machines and in CI."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import config
from common import UserError, read_rows
from conftest import build_fake_root
from test_reproduce import reproduce, stable, tiny_config

ray = pytest.importorskip("ray", reason="Ray is not installed (requirements-ray.txt; make test installs it)")

TINY = dict(problems={"disjoint_mnist": {"pan": ["gate_types=[feature,universal]", "regimes=[real,synthetic]"]}},
            tables={"logit_rules_disjoint_mnist": [], "gates_disjoint_mnist": [
                "strategies=[naive, {name: gate_hard, gate: [feature, universal], regime: [real, synthetic]}]"]},
            scaling={}, seeds=[1, 2], deterministic=True, synthesizers=["dafl"])


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (starting one takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_fake_root(tmp_path_factory.mktemp("ray") / "data", squares=True, n_mnist_train=200, n_mnist_test=60,
                           n_cifar=0).root


def rows_of(results) -> dict[str, list[dict]]:
    """Every table's rows without what says how they were run (times; how many seeds were evaluated together)."""
    return {table: [{k: v for k, v in stable(r, results.parent).items() if k != "stacked_seeds"}
                    for r in read_rows(results / "merge" / f"{table}.jsonl")] for table in TINY["tables"]}


def test_the_graph_orders_every_step_after_what_it_reads():
    cfg = reproduce.load_config(["profile=cpu"])
    steps = reproduce.plan(cfg)
    graph = reproduce.dependencies(cfg, steps)
    index = {(s.stage, s.label): i for i, s in enumerate(steps)}
    assert graph[index[("experts", "first5_mnist lenet5")]] == set()
    assert graph[index[("generators", "disjoint_mnist")]] == {index[("experts", "first5_mnist lenet5")],
                                                              index[("experts", "last5_mnist lenet5")]}
    assert index[("generators", "disjoint_mnist")] in graph[index[("gates", "disjoint_mnist")]]
    # a table reads its problem's gates and those of the problem its universal rules take them from
    universal = graph[index[("merge", "universal_disjoint_mnist")]]
    assert {index[("gates", "disjoint_mnist")], index[("gates", "mnist_cifar10")]} <= universal
    assert all(j < i for i, needs in enumerate(graph) for j in needs)  # the plan's order already respects it


def test_seeds_split_into_tasks():
    from experiments.ray_launcher import seed_groups

    assert seed_groups([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert seed_groups([1, 2, 3], None) == [[1, 2, 3]]


def test_ray_gives_the_local_launchers_rows(cluster, root, tmp_path):
    local = tiny_config(root, tmp_path / "local", **TINY)
    reproduce.main(local)
    distributed = tiny_config(root, tmp_path / "ray", **TINY, launcher="ray", seeds_per_task=1)
    summary = reproduce.main(distributed)
    assert rows_of(tmp_path / "ray" / "results") == rows_of(tmp_path / "local" / "results")
    timings = read_rows(tmp_path / "ray" / "results" / "timings.jsonl")
    steps = reproduce.plan(distributed)
    assert len(timings) == 3 * len(steps)  # per step: a task for each seed, and the one of all seeds
    assert (tmp_path / "ray" / "results" / "logs" / "experts_first5_mnist_lenet5.log").is_file()
    assert summary["steps"] == len(steps)


def test_a_killed_step_is_retried_and_resumes_to_the_same_rows(cluster, root, tmp_path):
    killed = "experts first5_mnist lenet5"
    reproduce.main(tiny_config(root, tmp_path / "local", **TINY))
    epochs = dict(TINY, expert=config.ExpertTraining(epochs=3, train_limit=120))
    reproduce.main(tiny_config(root, tmp_path / "plain", **epochs))
    reproduce.main(tiny_config(root, tmp_path / "ray", **epochs, launcher="ray", fault_injection=killed))
    marker = tmp_path / "ray" / "results" / "logs" / "experts_first5_mnist_lenet5.fault"
    assert marker.is_file()  # the worker died once, after its first resume save; Ray ran the step again
    assert rows_of(tmp_path / "ray" / "results") == rows_of(tmp_path / "plain" / "results")


def test_two_workers_racing_for_one_artifact_leave_one_valid_file(cluster, root, tmp_path):
    import train_source_networks
    from common import read_checkpoint

    @ray.remote(num_cpus=1)
    def train(ckpt: str) -> dict:
        args = ["dataset=first5_mnist", "seeds=[1]", "expert.epochs=2", "expert.train_limit=120", "device=cpu",
                f"data_dir={root}", f"ckpt_dir={ckpt}", f"results_dir={ckpt}/results"]
        return train_source_networks.main(config.parse_args(config.TrainConfig, args))

    ckpt = str(tmp_path / "ckpt")
    first, second = ray.get([train.remote(ckpt), train.remote(ckpt)])
    files = sorted((tmp_path / "ckpt" / "experts").glob("*.pt"))
    assert len(files) == 1 and read_checkpoint(files[0])["meta"]["digest"]  # one complete, readable file
    assert first["test_acc"] == second["test_acc"]  # both report the file that stayed
    stored = torch.load(files[0], weights_only=True)["meta"]["row"]["test_acc"]
    assert first["test_acc"]["1"] == stored


def test_a_user_error_in_a_worker_is_one_line_naming_the_step(cluster, root, tmp_path):
    bad = dataclasses.replace(tiny_config(root, tmp_path, **TINY, launcher="ray"), data_dir=str(tmp_path / "none"))
    with pytest.raises(UserError) as err:
        reproduce.main(bad)
    message = str(err.value)  # either expert step may fail first: they run side by side
    assert message.startswith("experts step '") and "mnist is missing" in message and "Traceback" not in message


def test_the_local_launcher_needs_no_ray():
    source = (reproduce.REPO / "experiments" / "reproduce.py").read_text()
    assert "import ray" not in source.replace("from experiments.ray_launcher import run_graph", "")
    assert json.loads(json.dumps(config.to_dict(config.ReproduceConfig())))["launcher"] == "local"
