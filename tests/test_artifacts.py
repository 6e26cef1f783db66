"""artifacts.py: file names keyed by recipe, reuse only against unchanged upstream files, code digests."""
from __future__ import annotations

import re

import pytest
import torch

import artifacts
from artifacts import ExpertId, Layout, check_reuse, code_digest, recipe_key, section_args, tally
from common import save_checkpoint
from config import DaflTraining, ExpertTraining, GateTraining, MergeConfig, parse_args

FIRST5 = ExpertId("first5_mnist", "lenet5", {})
LAST5 = ExpertId("last5_mnist", "lenet5", {})


def layout(tmp_path, *args: str) -> Layout:
    return Layout(parse_args(MergeConfig, [f"ckpt_dir={tmp_path}", *args]))


# ---------------------------------------------------------------- experts

def test_expert_names_carry_task_arch_recipe_key_and_seed(tmp_path):
    path = layout(tmp_path).expert_path(FIRST5, 7)
    assert path.parent == tmp_path / "experts"
    assert re.fullmatch(r"first5_mnist_lenet5_[0-9a-f]{8}_seed7\.pt", path.name)
    assert layout(tmp_path).expert_path(FIRST5, 8).name == path.name.replace("seed7", "seed8")


@pytest.mark.parametrize("arg", ["expert.epochs=3", "expert.lr=0.1", "expert.momentum=0.5", "expert.weight_decay=0.1",
                                 "expert.batch_size=64", "expert.train_limit=100", "tasks.first5_mnist.classes=[0,1]"])
def test_every_expert_setting_changes_its_file(tmp_path, arg):
    assert layout(tmp_path, arg).expert_path(FIRST5, 7) != layout(tmp_path).expert_path(FIRST5, 7)


def test_the_recipe_fills_in_defaults(tmp_path):
    """batch_size null means the source's paper batch (512 for MNIST): both spell the same recipe."""
    assert layout(tmp_path, "expert.batch_size=512").expert_path(FIRST5, 7) == layout(tmp_path).expert_path(FIRST5, 7)
    assert layout(tmp_path).expert_recipe(FIRST5)["batch_size"] == 512


def test_arch_kwargs_change_the_tag_and_the_key(tmp_path):
    mlp = ExpertId("mnist", "mlp", {"widths": [16]})
    other = ExpertId("mnist", "mlp", {"widths": [32]})
    a, b = layout(tmp_path).expert_path(mlp, 1), layout(tmp_path).expert_path(other, 1)
    assert a.name.startswith("mnist_mlp-") and a != b


def test_the_expert_command_repeats_the_non_default_settings(tmp_path):
    command = layout(tmp_path, "expert.epochs=2", "expert.lr=0.05").expert_command(FIRST5, [1, 2])
    assert command == ("python train_source_networks.py dataset=first5_mnist arch=lenet5 seeds=[1,2] "
                       "expert.epochs=2 expert.lr=0.05")
    assert parse_args(MergeConfig, command.split()[4:]).expert == ExpertTraining(epochs=2, lr=0.05)


# ---------------------------------------------------------------- generators and gates

def test_generators_follow_their_expert_and_their_own_settings(tmp_path):
    base = layout(tmp_path).generator_path(FIRST5, 1)
    assert base.parent == tmp_path / "generators" and base.name.startswith("first5_mnist_lenet5_")
    assert layout(tmp_path, "dafl.epochs=3").generator_path(FIRST5, 1) != base
    assert layout(tmp_path, "expert.epochs=3").generator_path(FIRST5, 1) != base  # a new expert, a new generator
    assert layout(tmp_path, "gate.epochs=3").generator_path(FIRST5, 1) == base
    # how many images are drawn from it, and how, is the set's business, not the generator's
    assert layout(tmp_path, "dafl.images=5", "dafl.sample_mode=eval").generator_path(FIRST5, 1) == base


def test_synthetic_sets_follow_their_synthesizer_settings_and_upstream(tmp_path):
    def path(synthesizer, *args):
        return layout(tmp_path, *args).synthetic_path(synthesizer, FIRST5, 1)

    assert path("dafl").parent == tmp_path / "synthetic" / "dafl"
    assert path("inversion").parent == tmp_path / "synthetic" / "inversion"
    assert path("dafl", "dafl.images=5") != path("dafl") and path("dafl", "dafl.epochs=3") != path("dafl")
    assert path("inversion", "inversion.steps=5") != path("inversion")
    assert path("inversion", "dafl.epochs=3") == path("inversion")
    assert path("inversion", "expert.epochs=3") != path("inversion")


def test_gate_keys_hold_exactly_what_each_regime_reads(tmp_path):
    def path(regime, *args, gate_type="feature", serves=0, synthesizer="dafl"):
        return layout(tmp_path, *args).gate_path("disjoint_mnist", regime, gate_type, serves, 1, synthesizer)

    for regime in ("real", "synthetic", "noise"):
        assert path(regime, "gate.epochs=3") != path(regime)
        assert path(regime, "expert.epochs=3") != path(regime)
    # data-free gates read the generators and their sample counts; real gates read real images
    assert path("real", "dafl.epochs=3") == path("real")
    assert path("synthetic", "dafl.epochs=3") != path("synthetic")
    assert path("real", "gate.noise_samples=5") == path("real")
    assert path("synthetic", "gate.noise_samples=5") != path("synthetic")
    assert path("synthetic", "dafl.images=5") != path("synthetic")  # the set it reads is another one
    assert path("synthetic", "inversion.steps=5") == path("synthetic")  # a synthesizer it does not read
    assert path("synthetic", "inversion.steps=5", synthesizer="inversion") != path("synthetic", synthesizer="inversion")
    assert path("synthetic", synthesizer="inversion").parent.parent.name == "synthetic_inversion"
    assert path("synthetic", "gate.train_limit=5") == path("synthetic")
    assert path("real", "gate.train_limit=5") != path("real")
    # one gate per expert, one universal gate per problem
    assert path("real", serves=1).name.startswith("last5_mnist_lenet5_")
    universal = layout(tmp_path).gate_paths("disjoint_mnist", "real", "universal", 1)
    assert len(set(universal)) == 1 and universal[0].name.startswith("universal_")
    assert len(set(layout(tmp_path).gate_paths("disjoint_mnist", "real", "logits", 1))) == 2
    assert layout(tmp_path).gate_path("mnist_cifar10", "real", "universal", None, 1) != universal[0]


def test_the_gate_command_names_the_sections_it_reads(tmp_path):
    cfg = layout(tmp_path, "expert.epochs=2", "dafl.width=8", "gate.epochs=3")
    assert cfg.gate_command("disjoint_mnist", "real", "feature", 7) == (
        "python train_pan.py problem=disjoint_mnist regimes=[real] gate_types=[feature] seeds=[7] "
        "expert.epochs=2 gate.epochs=3")
    assert cfg.gate_command("disjoint_mnist", "synthetic", "feature", 7).endswith(
        "synthesizers=[dafl] expert.epochs=2 gate.epochs=3 dafl.width=8")


def test_section_args_round_trip():
    section = DaflTraining(epochs=3, width=8, lr=1e-3)
    args = section_args("dafl", section)
    assert args == ["dafl.epochs=3", "dafl.lr=0.001", "dafl.width=8"]
    assert parse_args(MergeConfig, args).dafl == section
    assert section_args("gate", GateTraining()) == []


# ---------------------------------------------------------------- reuse

def test_reuse_needs_the_same_recipe_and_upstream_weights(tmp_path):
    path = tmp_path / "a.pt"
    recipe, upstream = {"epochs": 2}, {"expert:x": "abc"}
    assert check_reuse(path, recipe, upstream, force=False).why == "no checkpoint"
    save_checkpoint(path, torch.nn.Linear(2, 2), "linear", {}, {},
                    {"recipe": recipe, "upstream": upstream, "row": {"acc": 0.5}})
    reuse = check_reuse(path, recipe, upstream, force=False)
    assert reuse.reused and reuse.meta["row"] == {"acc": 0.5} and reuse.why == "reused"
    assert check_reuse(path, recipe, upstream, force=True).why == "force=true"
    assert check_reuse(path, recipe, {"expert:x": "def"}, force=False).why == "upstream retrained"
    assert check_reuse(path, {"epochs": 3}, upstream, force=False).why == "stored recipe differs"


def test_tally_counts_and_explains():
    assert tally(["reused", "no checkpoint", "reused", "upstream retrained", "no checkpoint"]) == {
        "reused": 2, "made": 3, "why_made": {"no checkpoint": 2, "upstream retrained": 1}}


def test_digest_of_reads_the_stored_digest_and_follows_rewrites(tmp_path):
    path = tmp_path / "m.pt"
    first = save_checkpoint(path, torch.nn.Linear(2, 2), "linear", {}, {}, {})
    assert artifacts.digest_of(path) == first
    second = save_checkpoint(path, torch.nn.Linear(3, 2), "linear", {}, {}, {})
    assert first != second and artifacts.digest_of(path) == second


def test_code_digest_changes_with_the_source(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "REPO", tmp_path)
    (tmp_path / "rule.py").write_text("x = 1\n")
    (tmp_path / "base.py").write_text("y = 1\n")
    first = code_digest(("rule.py", "base.py"))
    assert code_digest(("base.py", "rule.py")) == first  # order does not matter
    (tmp_path / "rule.py").write_text("x = 2\n")
    # within one process the digest is that of the code imported at its start: an edit during a run changes nothing
    assert code_digest(("rule.py", "base.py")) == first
    artifacts._code_digest.cache_clear()  # the next process reads the edited source
    assert code_digest(("rule.py", "base.py")) != first


def test_recipe_key_is_stable_and_short():
    assert recipe_key({"b": 1, "a": [1, 2]}) == recipe_key({"a": [1, 2], "b": 1})
    assert len(recipe_key({})) == artifacts.KEY_LENGTH


# ---------------------------------------------------------------- artifacts made under other settings

def store(lay: Layout, path, recipe: dict, upstream: dict | None = None) -> None:
    """A stored artifact with the meta a stage writes: its recipe, upstream digests and weights' digest."""
    save_checkpoint(path, torch.nn.Linear(2, 2), "mlp", {}, {}, {"recipe": recipe, "upstream": upstream or {}})


def test_a_missing_expert_made_under_other_settings_names_the_overrides_in_one_line(tmp_path):
    other = layout(tmp_path, "expert.epochs=2", "expert.stack_seeds=true")
    for seed in (1, 2):
        store(other, other.expert_path(FIRST5, seed), other.expert_recipe(FIRST5))
    current = layout(tmp_path, "device=cpu", "expert.stack_seeds=false")
    error = current.missing_error([current.wanted_expert(FIRST5, s) for s in (1, 2)])
    message = str(error)
    assert "\n" not in message
    assert "expert.epochs=2 expert.stack_seeds=true" in message
    assert "{expert: {epochs: 2, stack_seeds: true}}" in message
    assert "python train_source_networks.py dataset=first5_mnist" in message
    # the overrides it names find the stored files
    fixed = layout(tmp_path, "device=cpu", "expert.stack_seeds=false", "expert.epochs=2", "expert.stack_seeds=true")
    assert fixed.missing_error([fixed.wanted_expert(FIRST5, s) for s in (1, 2)]) is None


def test_a_missing_gate_names_its_own_and_its_experts_settings(tmp_path):
    other = layout(tmp_path, "expert.epochs=2", "gate.epochs=3")
    for expert in (FIRST5, LAST5):
        store(other, other.expert_path(expert, 1), other.expert_recipe(expert))
    store(other, other.gate_path("disjoint_mnist", "real", "feature", 0, 1),
          other.gate_recipe("disjoint_mnist", "real", "feature", 0))
    current = layout(tmp_path)
    message = str(current.missing_error([current.wanted_gate("disjoint_mnist", "real", "feature", 0, 1)]))
    assert "gate.epochs=3" in message and "expert.epochs=2" in message and "\n" not in message


def test_without_an_alternative_the_error_lists_the_commands(tmp_path):
    other = layout(tmp_path, "tasks.first5_mnist.classes=[0,1]")  # another task: no setting of a section reaches it
    store(other, other.expert_path(FIRST5, 1), other.expert_recipe(FIRST5))
    current = layout(tmp_path)
    message = str(current.missing_error([current.wanted_expert(FIRST5, 1), current.wanted_expert(LAST5, 1)]))
    assert message.startswith("checkpoints are missing under")
    assert "dataset=first5_mnist" in message and "dataset=last5_mnist" in message and "made with" not in message
    assert current.missing_error([]) is None


def test_synthesis_code_is_part_of_every_set_and_generator_recipe(tmp_path, monkeypatch):
    """Changed synthesis code makes new sets (and generators); the gates and rows reading them follow by digest."""
    lay = layout(tmp_path)
    before = (lay.synthetic_path("inversion", FIRST5, 1), lay.synthetic_path("dafl", FIRST5, 1),
              lay.generator_path(FIRST5, 1))
    monkeypatch.setitem(artifacts.SYNTHESIS_CODE, "inversion", ("inversion.py",))
    monkeypatch.setitem(artifacts.SYNTHESIS_CODE, "dafl", ("dafl.py",))
    after = (lay.synthetic_path("inversion", FIRST5, 1), lay.synthetic_path("dafl", FIRST5, 1),
             lay.generator_path(FIRST5, 1))
    assert all(a != b for a, b in zip(before, after))


def test_rows_of_rules_that_read_synthetic_sets_are_keyed_by_the_synthesis_code():
    from strategies import REGISTRY

    for name in ("calibrated", "gate_hard", "gate_confident", "gate_soft"):
        assert {"synthesis.py", "dafl.py", "inversion.py"} <= set(REGISTRY[name].code), name
