"""stacked.py and training.train_classifiers: many seeds as one network, equal to each seed on its own."""
from __future__ import annotations

import copy

import pytest
import torch

import training
from archs import build_model
from stacked import stack, stackable, unstack_into

ARCHS = [("lenet5", {"in_channels": 1, "num_classes": 5}), ("lenet5_half", {"in_channels": 3, "num_classes": 10}),
         ("mlp", {"in_channels": 1, "num_classes": 10, "widths": [16, 8]}),
         ("pan", {"in_features": 12}), ("agnostic_pan", {"in_features": 3}),
         ("generator", {"latent_dim": 10, "out_channels": 3, "width": 8, "bn_eps": 0.8})]


def models_of(arch: str, kwargs: dict, count: int = 3) -> list[torch.nn.Module]:
    out = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = build_model(arch, **kwargs)
        if hasattr(model, "fit_standardisation"):
            model.fit_standardisation(torch.randn(40, kwargs["in_features"]) * (seed + 1) + seed)
        out.append(model)
    return out


def inputs_for(arch: str, kwargs: dict, count: int, batch: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if arch == "generator":
        return torch.randn(count, batch, kwargs["latent_dim"], generator=g)
    if arch in ("pan", "agnostic_pan"):
        return torch.randn(count, batch, kwargs["in_features"], generator=g)
    return torch.randn(count, batch, kwargs["in_channels"], 32, 32, generator=g)


@pytest.mark.parametrize("arch, kwargs", ARCHS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_stack_computes_every_model_on_its_own_batch(arch, kwargs, mode):
    models = models_of(arch, kwargs)
    x = inputs_for(arch, kwargs, len(models))
    network = stack(models).train(mode == "train")
    reference = [copy.deepcopy(m).train(mode == "train") for m in models]
    out = network(x)
    for i, model in enumerate(reference):
        torch.testing.assert_close(out[i], model(x[i]), atol=1e-5, rtol=1e-4)
    # batch statistics and running statistics move per seed, as they would alone
    unstack_into(network, models)
    for model, alone in zip(models, reference):
        for (name, a), b in zip(model.state_dict().items(), alone.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_stacked_experts_also_return_their_features():
    models = models_of("lenet5", {"in_channels": 1, "num_classes": 5})
    x = inputs_for("lenet5", {"in_channels": 1}, 3)
    logits, features = stack(models)(x, return_features=True)
    for i, m in enumerate(models):
        expected = m(x[i], return_features=True)
        torch.testing.assert_close(logits[i], expected[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(features[i], expected[1], atol=1e-5, rtol=1e-4)


def test_only_one_architecture_of_one_shape_stacks():
    assert not stackable([build_model("lenet5"), build_model("lenet5_half")])
    assert not stackable([build_model("mlp", widths=[4]), build_model("mlp", widths=[5])])
    assert not stackable([build_model("resnet18")])
    with pytest.raises(TypeError, match="cannot stack"):
        stack([build_model("pan", in_features=3), build_model("agnostic_pan", in_features=3)])


def snapshot(models) -> list[dict]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]


def assert_same_weights(a: list[torch.nn.Module], b: list[torch.nn.Module], atol: float = 2e-5) -> None:
    for x, y in zip(a, b):
        for (name, u), v in zip(x.state_dict().items(), y.state_dict().values()):
            torch.testing.assert_close(u, v, atol=atol, rtol=1e-4, msg=name)


def train_alone(models, inputs, labels, seeds, weights=None, **kw):
    losses = []
    for i, model in enumerate(models):
        losses.append(training.train_classifier(
            model, inputs[i] if isinstance(inputs, list) else inputs, labels[i] if isinstance(labels, list) else labels,
            seed=seeds[i], class_weight=weights[i] if weights else None, **kw))
    return losses


def curves(histories: list[list[dict]]) -> list[float]:
    """Every model's per-epoch loss and accuracy, in one flat list."""
    return [entry[key] for history in histories for entry in history for key in ("loss", "acc")]


SETTINGS = {"epochs": 3, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.001, "batch_size": 16}


def test_stacked_experts_train_as_each_would_alone():
    models = models_of("lenet5", {"in_channels": 1, "num_classes": 5})
    alone = copy.deepcopy(models)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 1, 32, 32, generator=g), torch.randint(0, 5, (50,), generator=g)
    seeds = [11, 12, 13]
    together = training.train_classifiers(models, x, y, seeds=seeds, **SETTINGS)
    separate = train_alone(alone, x, y, seeds, **SETTINGS)
    assert_same_weights(models, alone)
    assert curves(together) == pytest.approx(curves(separate), abs=1e-5)
    assert not any(m.training for m in models)


def test_stacked_gates_train_on_their_own_data_and_class_weights():
    models = models_of("pan", {"in_features": 12})
    alone = copy.deepcopy(models)
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(40, 12, generator=g) for _ in models]
    ys = [torch.randint(0, 2, (40,), generator=g) for _ in models]
    weights = [torch.tensor([1.0, w]) for w in (1.0, 2.0, 3.0)]
    seeds = [1, 2, 3]
    together = training.train_classifiers(models, xs, ys, seeds=seeds, class_weights=weights, **SETTINGS)
    separate = train_alone(alone, xs, ys, seeds, weights, **SETTINGS)
    assert_same_weights(models, alone)
    assert curves(together) == pytest.approx(curves(separate), abs=1e-5)


@pytest.mark.parametrize("momentum", [0.9, 0.0])  # without momentum SGD keeps no state to save or restore
def test_a_stacked_run_resumes_alone_or_stacked_to_the_same_weights(tmp_path, monkeypatch, momentum):
    settings = {**SETTINGS, "momentum": momentum}
    models = models_of("mlp", {"in_channels": 1, "num_classes": 10, "widths": [16, 8]})
    start = snapshot(models)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 1, 32, 32, generator=g), torch.randint(0, 10, (40,), generator=g)
    seeds = [1, 2, 3]
    whole = copy.deepcopy(models)
    training.train_classifiers(whole, x, y, seeds=seeds, **settings)
    resumes = [training.Resume(tmp_path / f"{i}.resume.pt", "k") for i in range(3)]
    original = training.Resume.save
    saves = []

    def killed_after_the_first_epoch(self, state):
        original(self, state)
        saves.append(1)
        if len(saves) == 3:  # every model's state of epoch 1 is on disk
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(training.Resume, "save", killed_after_the_first_epoch)
        with pytest.raises(KeyboardInterrupt):
            training.train_classifiers(models, x, y, seeds=seeds, resumes=resumes, **settings)
    # model 0 goes on alone, models 1 and 2 stacked: both end where the uninterrupted run ended
    fresh = [build_model("mlp", in_channels=1, num_classes=10, widths=[16, 8]) for _ in range(3)]
    for model, state in zip(fresh, start):
        model.load_state_dict(state)
    training.train_classifier(fresh[0], x, y, seed=seeds[0], resume=resumes[0], **settings)
    training.train_classifiers(fresh[1:], x, y, seeds=seeds[1:], resumes=resumes[1:], **settings)
    assert_same_weights(fresh, whole)


def test_models_without_a_stacked_form_train_one_at_a_time():
    torch.manual_seed(0)
    models = [build_model("resnet18", in_channels=1, num_classes=2) for _ in range(2)]
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])
    losses = training.train_classifiers(models, x, y, seeds=[1, 2], **{**SETTINGS, "epochs": 1, "batch_size": 4})
    assert [len(log) for log in losses] == [1, 1]


def test_auto_stacking_follows_the_measured_table_and_explicit_settings_win():
    from stacked import AUTO_STACKING, resolve_stacking

    for stage, by_device in AUTO_STACKING.items():
        assert resolve_stacking("auto", stage, "cpu") is by_device["cpu"]
        assert resolve_stacking("auto", stage, torch.device("cuda", 0)) is by_device["cuda"]
        assert resolve_stacking("true", stage, "cpu") is True
        assert resolve_stacking("false", stage, "cuda") is False


def test_the_resolved_stacking_path_is_part_of_every_trained_recipe(tmp_path):
    """Stacked and one-by-one training end at weights equal only within float tolerance: their artifacts are
    keyed apart, so a changed stack_seeds never reuses an artifact made the other way."""
    from artifacts import ExpertId, Layout
    from config import MergeConfig, parse_args

    expert = ExpertId("first5_mnist", "lenet5", {})
    paths = {}
    for setting in ("true", "false"):
        layout = Layout(parse_args(MergeConfig, [f"ckpt_dir={tmp_path}", "device=cpu",
                                                 f"expert.stack_seeds={setting}", f"dafl.stack_seeds={setting}",
                                                 f"gate.stack_seeds={setting}"]))
        paths[setting] = (layout.expert_path(expert, 1), layout.generator_path(expert, 1),
                          layout.gate_path("disjoint_mnist", "real", "feature", 0, 1))
    assert all(a != b for a, b in zip(paths["true"], paths["false"]))
    auto = Layout(parse_args(MergeConfig, [f"ckpt_dir={tmp_path}", "device=cpu"]))
    assert auto.expert_path(expert, 1) == paths["true" if auto.stacked("experts") else "false"][0]
