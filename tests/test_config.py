"""config.py: dataclass defaults < YAML files < command-line key=value, with type coercion and clear errors."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

import config
from config import ConfigError, MergeConfig, PanConfig, TaskSpec, TrainConfig, describe, parse_args, save, to_dict

# docs/design.md section 3: the original seed list.
DESIGN_SEEDS = [770597, 600522, 416719, 306890, 201746, 156886, 929271, 247945, 5028, 436287]


# ---------------------------------------------------------------- defaults

def test_defaults_are_the_papers():
    cfg = parse_args(TrainConfig, [])
    assert cfg.seeds == DESIGN_SEEDS
    assert cfg.expert.lr == 0.01 and isinstance(cfg.expert.lr, float)
    assert cfg.expert.momentum == 0.9
    assert cfg.expert.weight_decay == 0.0
    assert cfg.expert.epochs == 10
    assert cfg.expert.batch_size is None  # the source's paper default (512 MNIST / 128 CIFAR)
    assert cfg.dataset == "mnist" and cfg.arch == "lenet5"
    assert cfg.device == "auto" and cfg.deterministic is False and cfg.force is False
    assert cfg.tasks["first5_mnist"] == TaskSpec("mnist", [0, 1, 2, 3, 4])
    assert cfg.tasks["last5_mnist"] == TaskSpec("mnist", [5, 6, 7, 8, 9])
    assert cfg.tasks["mnist"] == TaskSpec("mnist", None)
    assert cfg.tasks["cifar10"] == TaskSpec("cifar10", None)
    assert cfg == TrainConfig()


def test_default_data_dir_follows_env(monkeypatch):
    monkeypatch.setenv(config.DATA_DIR_ENV, "/somewhere/data")
    assert parse_args(TrainConfig, []).data_dir == "/somewhere/data"
    monkeypatch.delenv(config.DATA_DIR_ENV)
    assert parse_args(TrainConfig, []).data_dir == "./data"


def test_defaults_are_not_shared_between_configs():
    a = parse_args(TrainConfig, ["tasks.mnist.classes=[1,2]"])
    a.seeds.append(1)
    a.tasks["extra"] = TaskSpec("mnist")
    b = TrainConfig()
    assert b.seeds == DESIGN_SEEDS
    assert "extra" not in b.tasks
    assert b.tasks["mnist"].classes is None


# ---------------------------------------------------------------- coercion

@pytest.mark.parametrize("arg, key, expected, type_", [
    ("expert.lr=1", "expert.lr", 1.0, float),
    ("expert.lr=1e-3", "expert.lr", 0.001, float),  # YAML 1.1 reads 1e-3 as a string; it must still become a float
    ("expert.lr=0.5", "expert.lr", 0.5, float),
    ("expert.epochs=2", "expert.epochs", 2, int),
    ("expert.epochs=2.0", "expert.epochs", 2, int),
    ("seeds=[0,1]", "seeds", [0, 1], list),
    ("seeds=7", "seeds", [7], list),
    ("deterministic=true", "deterministic", True, bool),
    ("deterministic=false", "deterministic", False, bool),
    ("expert.batch_size=null", "expert.batch_size", None, type(None)),
    ("expert.batch_size=64", "expert.batch_size", 64, int),
    ("arch=resnet18", "arch", "resnet18", str),
    ("ckpt_dir=123", "ckpt_dir", "123", str),
])
def test_key_value_coercion(arg, key, expected, type_):
    value = parse_args(TrainConfig, [arg])
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type_
    if isinstance(value, list):
        assert all(type(v) is int for v in value)


def test_bool_accepts_one():
    assert parse_args(TrainConfig, ["deterministic=1"]).deterministic is True


def test_large_int_keeps_precision():
    assert parse_args(TrainConfig, ["seeds=[9007199254740993]"]).seeds == [9007199254740993]


# ---------------------------------------------------------------- YAML then command line

def test_yaml_then_command_line(tmp_path):
    first = tmp_path / "a.yaml"
    first.write_text("expert: {lr: 0.5, epochs: 3}\nseeds: [4, 5]\narch: lenet5_half\n")
    second = tmp_path / "b.yml"
    second.write_text("expert:\n  epochs: 4\n")
    cfg = parse_args(TrainConfig, [str(first), "expert.lr=0.1", str(second)])
    assert cfg.expert.lr == 0.1  # command line beats the YAML
    assert cfg.expert.epochs == 4  # files apply in order, key by key within a section
    assert cfg.seeds == [4, 5]
    assert cfg.arch == "lenet5_half"
    assert cfg.expert.momentum == 0.9  # untouched default
    # a key=value before a file is overridden by that file
    assert parse_args(TrainConfig, ["expert.epochs=9", str(second)]).expert.epochs == 4


def test_yaml_values_are_coerced(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("expert: {lr: 1, batch_size: '32'}\ntasks:\n  pair: {source: mnist, classes: [3, 7]}\n")
    cfg = parse_args(TrainConfig, [str(path)])
    assert cfg.expert.lr == 1.0 and isinstance(cfg.expert.lr, float)
    assert cfg.expert.batch_size == 32
    assert cfg.tasks["pair"] == TaskSpec("mnist", [3, 7])
    assert cfg.tasks["mnist"] == TaskSpec("mnist")  # defaults kept beside the new task


def test_empty_yaml_changes_nothing(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert parse_args(TrainConfig, [str(path)]) == TrainConfig()


# ---------------------------------------------------------------- nested keys

def test_new_task_from_dotted_keys():
    cfg = parse_args(TrainConfig, ["tasks.my_task.source=mnist", "tasks.my_task.classes=[0,2]"])
    assert cfg.tasks["my_task"] == TaskSpec("mnist", [0, 2])
    assert isinstance(cfg.tasks["my_task"], TaskSpec)
    assert set(TrainConfig().tasks) < set(cfg.tasks)


def test_existing_task_is_modified_in_place():
    cfg = parse_args(TrainConfig, ["tasks.mnist.classes=[1,2]"])
    assert cfg.tasks["mnist"] == TaskSpec("mnist", [1, 2])
    assert cfg.tasks["first5_mnist"] == TaskSpec("mnist", [0, 1, 2, 3, 4])
    cfg = parse_args(TrainConfig, ["tasks.first5_mnist.source=fashion_mnist"])
    assert cfg.tasks["first5_mnist"] == TaskSpec("fashion_mnist", [0, 1, 2, 3, 4])


def test_task_classes_null_means_all():
    cfg = parse_args(TrainConfig, ["tasks.first5_mnist.classes=null"])
    assert cfg.tasks["first5_mnist"].classes is None


def test_tasks_default_to_no_split():
    assert TaskSpec("mnist") == TaskSpec("mnist", None, "full", 1, 0, None, 0)


def test_split_task_from_yaml(tmp_path):
    path = tmp_path / "parents.yaml"
    path.write_text("tasks:\n  p: {source: mnist, split: dirichlet, parts: 2, part: 1, alpha: [1, 3]}\n"
                    "  s: {source: mnist, classes: [0, 1, 2], split: shard, parts: 3}\n")
    cfg = parse_args(TrainConfig, [str(path), "tasks.p.split_seed=4"])
    assert cfg.tasks["p"] == TaskSpec("mnist", None, "dirichlet", 2, 1, [1.0, 3.0], 4)
    assert cfg.tasks["s"] == TaskSpec("mnist", [0, 1, 2], "shard", 3, 0, None, 0)


def test_arch_kwargs_are_a_mapping_of_plain_values():
    assert TrainConfig().arch_kwargs == {}
    cfg = parse_args(TrainConfig, ["arch=mlp", "arch_kwargs={widths: [400, 200, 100], bias: false}"])
    assert cfg.arch_kwargs == {"widths": [400, 200, 100], "bias": False}
    # like every mapping, a later value merges into the earlier one key by key
    again = parse_args(TrainConfig, ["arch_kwargs={widths: [400], bias: false}", "arch_kwargs.widths=[8, 4]"])
    assert again.arch_kwargs == {"widths": [8, 4], "bias": False}
    cfg.arch_kwargs["widths"].append(1)
    assert TrainConfig().arch_kwargs == {}
    with pytest.raises(ConfigError) as err:
        parse_args(TrainConfig, ["arch_kwargs=[400]"])
    assert "arch_kwargs" in str(err.value) and "mapping" in str(err.value)


# ---------------------------------------------------------------- errors

def test_unknown_key_suggests_nearest_in_a_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'expert.epoch'; did you mean 'epochs'"):
        parse_args(TrainConfig, ["expert.epoch=3"])


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError) as err:
        parse_args(TrainConfig, ["datset=mnist"])
    message = str(err.value)
    assert "'datset'" in message
    assert "did you mean 'dataset'" in message


def test_unknown_key_without_close_match_lists_keys():
    with pytest.raises(ConfigError) as err:
        parse_args(TrainConfig, ["zzzzzz=1"])
    assert "did you mean" not in str(err.value)
    assert "dataset" in str(err.value) and "seeds" in str(err.value)


def test_unknown_nested_key():
    with pytest.raises(ConfigError) as err:
        parse_args(TrainConfig, ["tasks.mnist.clases=[1]"])
    assert "tasks.mnist.clases" in str(err.value)
    assert "did you mean 'classes'" in str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("expert: {epochz: 3}\n")
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        parse_args(TrainConfig, [str(path)])


@pytest.mark.parametrize("arg, words", [
    ("expert.epochs=abc", ["expert.epochs", "number", "abc"]),
    ("expert.epochs=1.5", ["expert.epochs", "integer", "1.5"]),
    ("expert.lr=[1,2]", ["expert.lr"]),
    ("seeds=[1,x]", ["seeds[1]", "x"]),
    ("deterministic=maybe", ["deterministic", "true or false"]),
    ("tasks=3", ["tasks", "mapping"]),
    ("tasks.mnist.classes=[a]", ["tasks.mnist.classes[0]"]),
    ("arch=[a,b]", ["arch", "string"]),
    ("expert.epochs=true", ["expert.epochs", "number"]),
])
def test_wrong_types_name_the_key(arg, words):
    with pytest.raises(ConfigError) as err:
        parse_args(TrainConfig, [arg])
    for word in words:
        assert word in str(err.value)


def test_new_task_needs_a_source():
    with pytest.raises(ConfigError) as err:
        parse_args(TrainConfig, ["tasks.my_task.classes=[0,2]"])
    assert "tasks.my_task" in str(err.value) and "source" in str(err.value)


def test_missing_yaml_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        parse_args(TrainConfig, [str(missing)])
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        parse_args(TrainConfig, [str(path)])


def test_argument_that_is_not_key_value():
    with pytest.raises(ConfigError) as err:
        parse_args(TrainConfig, ["mnist"])
    assert "'mnist'" in str(err.value) and "key=value" in str(err.value)


def test_unparsable_value():
    with pytest.raises(ConfigError) as err:
        parse_args(TrainConfig, ["seeds=[1,2"])
    assert "seeds" in str(err.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- describe / save

def test_describe_is_the_resolved_config_as_yaml():
    cfg = parse_args(TrainConfig, ["expert.lr=0.2", "tasks.pair.source=mnist", "tasks.pair.classes=[3,7]"])
    loaded = yaml.safe_load(describe(cfg))
    assert loaded == to_dict(cfg)
    assert loaded["expert"]["lr"] == 0.2
    assert loaded["tasks"]["pair"] == {"source": "mnist", "classes": [3, 7], "split": "full", "parts": 1, "part": 0,
                                       "alpha": None, "split_seed": 0}


def test_save_round_trip(tmp_path):
    cfg = parse_args(TrainConfig, ["expert.lr=1e-3", "expert.epochs=3", "seeds=[0,1]", "expert.batch_size=null",
                                   "deterministic=true",
                                   "tasks.pair.source=mnist", "tasks.pair.classes=[3,7]",
                                   "tasks.mnist.classes=[1,2]", "dataset=pair", "data_dir=/x/y",
                                   "tasks.part.source=mnist", "tasks.part.split=shard", "tasks.part.parts=2",
                                   "arch=mlp", "arch_kwargs={widths: [4], bias: false}"])
    path = tmp_path / "sub" / "run.config.yaml"
    save(cfg, path)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["run.config.yaml"]  # no temp file left behind
    again = parse_args(TrainConfig, [str(path)])
    # everything round-trips but the machine's paths, which the reading machine's defaults fill (issue 27)
    assert again == dataclasses.replace(cfg, data_dir=TrainConfig().data_dir)
    assert config.portable(config.to_dict(again)) == config.portable(config.to_dict(cfg))
    assert again.yaml_files == [str(path)]  # only says where it was read


# ---------------------------------------------------------------- ranges, checked at load

@pytest.mark.parametrize("cls, arg, words", [
    (TrainConfig, "expert.epochs=-1", "expert.epochs=-1 is out of range: it must be at least 1"),
    (TrainConfig, "expert.epochs=0", "at least 1"),
    (TrainConfig, "expert.lr=0", "expert.lr=0.0 is out of range: it must be greater than 0"),
    (TrainConfig, "expert.momentum=1", "in [0, 1)"),
    (TrainConfig, "expert.batch_size=0", "expert.batch_size=0 is out of range"),
    (TrainConfig, "expert.train_limit=-5", "expert.train_limit=-5 is out of range"),
    (TrainConfig, "test_limit=-1", "test_limit=-1 is out of range"),
    (TrainConfig, "seeds=[]", "seeds is empty"),
    (TrainConfig, "seeds=[1,1]", "lists a seed twice"),
    (TrainConfig, "device=gpu", "device='gpu' is not a device; choices: auto, cpu, cuda, cuda:N"),
    (config.MergeConfig, "batch_size=0", "batch_size=0 is out of range"),
    (config.MergeConfig, "fusion_samples=0", "fusion_samples=0 is out of range"),
    (config.MergeConfig, "gate.noise_samples=0", "gate.noise_samples=0 is out of range"),
    (config.GanConfig, "dafl.batch_size=1", "at least 2"),
    (config.GanConfig, "dafl.width=1", "dafl.width=1 is out of range"),
    (config.PanConfig, "gate.epochs=-3", "gate.epochs=-3 is out of range"),
    (config.ReproduceConfig, "expert.epochs=-1", "expert.epochs=-1 is out of range"),
])
def test_out_of_range_values_fail_at_load_with_one_line(cls, arg, words):
    with pytest.raises(ConfigError) as err:
        parse_args(cls, [arg])
    assert words in str(err.value) and "\n" not in str(err.value)


def test_limits_may_stay_unset():
    cfg = parse_args(TrainConfig, ["expert.train_limit=null", "test_limit=null"])
    assert cfg.expert.train_limit is None and cfg.test_limit is None


def test_cuda_without_cuda_is_refused_at_load(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device=cuda was asked for but CUDA is not available here; use device=cpu"):
        parse_args(TrainConfig, ["device=cuda"])
    assert parse_args(TrainConfig, ["device=auto"]).device == "auto"


def test_check_catches_configs_built_in_code():
    cfg = dataclasses.replace(TrainConfig(), seeds=[])
    with pytest.raises(ConfigError, match="seeds is empty"):
        config.check(cfg)
    bad_task = parse_args(config.MergeConfig, [])
    bad_task.gate.batch_size = -1
    with pytest.raises(ConfigError, match="gate.batch_size=-1"):
        config.check(bad_task)


# ---------------------------------------------------------------- what a run prints

def test_a_run_prints_only_what_differs_from_the_defaults():
    cfg = parse_args(TrainConfig, ["expert.epochs=2", "seeds=[1]", "tasks.pair.source=mnist",
                                   "tasks.pair.classes=[3,7]", "tasks.mnist.classes=[1,2]"])
    text = config.describe_changes(cfg)
    printed = yaml.safe_load(text)
    assert printed == {"seeds": [1], "expert": {"epochs": 2},
                       "tasks": {"mnist": {"classes": [1, 2]}, "pair": {"source": "mnist", "classes": [3, 7],
                                                                         "split": "full", "parts": 1, "part": 0,
                                                                         "alpha": None, "split_seed": 0}}}
    assert "first5_mnist" not in text and "disjoint_mnist" not in text  # no pages of default tables
    assert "defaults of config.py" in text.splitlines()[0]
    assert config.describe_changes(TrainConfig()).strip().endswith("the defaults of config.py")


@pytest.mark.parametrize("config_class, key, homes", [
    (TrainConfig, "epochs", ["expert.epochs"]),
    (TrainConfig, "lr", ["expert.lr"]),
    (TrainConfig, "batch_size", ["expert.batch_size"]),
    (TrainConfig, "train_limit", ["expert.train_limit"]),
    (TrainConfig, "stack_seeds", ["expert.stack_seeds"]),
    (MergeConfig, "epochs", ["expert.epochs", "dafl.epochs", "gate.epochs"]),
    (PanConfig, "noise_samples", ["gate.noise_samples"]),
])
def test_a_flat_key_that_lives_in_a_section_names_the_nested_keys(config_class, key, homes):
    """The paper's scripts took ``--epochs``; here it is a section's key: the message names every home."""
    with pytest.raises(ConfigError) as err:
        parse_args(config_class, [f"{key}=3"])
    message = str(err.value)
    assert "\n" not in message
    for home in homes:
        assert repr(home) in message


def test_stack_seeds_takes_auto_true_false_and_yaml_booleans():
    assert TrainConfig().expert.stack_seeds == "auto"
    assert parse_args(TrainConfig, ["expert.stack_seeds=false"]).expert.stack_seeds == "false"
    assert parse_args(PanConfig, ["gate.stack_seeds=True"]).gate.stack_seeds == "true"
    with pytest.raises(ConfigError, match="expert.stack_seeds='sometimes' is not one of auto, true, false"):
        parse_args(TrainConfig, ["expert.stack_seeds=sometimes"])


def test_machine_paths_stay_out_of_digests_and_saved_configs(tmp_path):
    here = config.parse_args(config.MergeConfig, ["data_dir=/a/data", "ckpt_dir=/a/ckpt", "results_dir=/a/out"])
    there = config.parse_args(config.MergeConfig, ["data_dir=/b/data", "ckpt_dir=/b/ckpt", "results_dir=/b/out"])
    assert config.digest(here) == config.digest(there)
    config.save(here, tmp_path / "c.yaml")
    assert "/a/" not in (tmp_path / "c.yaml").read_text()
    assert "/a/" not in str(config.row_config(here))
    assert config.digest(here) != config.digest(config.parse_args(config.MergeConfig, ["test_limit=5"]))
