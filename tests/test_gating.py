"""Gates and generators (archs/gates.py, archs/generator.py) and what a gate reads (gating.py).

docs/design.md section 4, "Gating networks" and "Universal gate". No data and no training script here:
tiny tensors only.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gating
from archs import build_model
from archs.gates import PAN, AgnosticPAN
from archs.generator import Discriminator, Generator
from common import load_model, save_checkpoint, state_digest
from gating import GATE_TYPES, gate_arch, gate_inputs, softmax_stats, vector_stats




def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def linear_shapes(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


# ---------------------------------------------------------------- gate architectures

@pytest.mark.parametrize("in_features", [120, 5])
def test_pan_layers_and_output(in_features):
    gate = PAN(in_features)
    # docs/design.md: PAN(in) = Linear(in,80) ReLU Linear(80,60) ReLU Linear(60,2)
    assert linear_shapes(gate) == [(in_features, 80), (80, 60), (60, 2)]
    assert [type(m) for m in gate.net] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert gate(rand(7, in_features)).shape == (7, 2)


def test_agnostic_pan_layers_and_output():
    gate = AgnosticPAN(3)
    # docs/design.md: AgnosticPAN(3) = Linear(3,80) ReLU Linear(80,50) ReLU Linear(50,20) ReLU Linear(20,2)
    assert linear_shapes(gate) == [(3, 80), (80, 50), (50, 20), (20, 2)]
    assert [type(m) for m in gate.net] == [nn.Linear, nn.ReLU] * 3 + [nn.Linear]
    assert gate(rand(7, 3)).shape == (7, 2)
    assert linear_shapes(AgnosticPAN()) == linear_shapes(gate)  # 3 inputs by default


def test_gates_build_through_the_registry():
    assert linear_shapes(build_model("pan", in_features=9))[0] == (9, 80)
    assert linear_shapes(build_model("agnostic_pan", in_features=3)) == [(3, 80), (80, 50), (50, 20), (20, 2)]


@pytest.mark.parametrize("make", [lambda: PAN(4), lambda: AgnosticPAN(4)], ids=["pan", "agnostic_pan"])
def test_fit_standardisation_zscores_the_training_inputs(make):
    gate = make()
    scale = torch.tensor([1.0, 100.0, 0.01, 1.0])
    shift = torch.tensor([5.0, -300.0, 0.2, 0.0])
    inputs = rand(256, 4, seed=1) * scale + shift
    inputs[:, 3] = 2.5  # a constant dimension (a ReLU unit that never fires, say)
    x = rand(5, 4, seed=2)

    # defaults leave inputs as they are
    assert torch.equal(gate.input_mean, torch.zeros(4)) and torch.equal(gate.input_std, torch.ones(4))
    torch.testing.assert_close(gate(x), gate.net(x))

    gate.fit_standardisation(inputs)
    torch.testing.assert_close(gate.input_mean, inputs.mean(dim=0))
    z = (inputs - gate.input_mean) / gate.input_std
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[:, :3].mean(dim=0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(z[:, :3].std(dim=0), torch.ones(3), atol=1e-4, rtol=0)
    # a constant dimension (dim 3) gets the floor, a tenth of the median std, so no single quiet unit
    # can dominate the gate at test time
    floor = 0.1 * inputs.std(dim=0).median()
    torch.testing.assert_close(gate.input_std[3], floor)
    assert torch.equal(z[:, 3], torch.zeros(256))  # the constant dimension stays finite (and at 0)
    # forward standardises with the fitted buffers
    torch.testing.assert_close(gate(inputs[:5]), gate.net(z[:5]))
    assert torch.isfinite(gate(inputs)).all()


def test_a_dimension_constant_in_training_is_not_blown_up_at_test_time():
    gate = PAN(3)
    inputs = rand(64, 3, seed=3)
    inputs[:, 2] = 0.0  # silent in training
    gate.fit_standardisation(inputs)
    unseen = torch.tensor([[0.0, 0.0, 0.5]])  # the unit fires on a new input
    standardised = (unseen - gate.input_mean) / gate.input_std
    assert standardised.abs().max() < 1e3


def test_gate_buffers_survive_a_checkpoint_round_trip(tmp_path):
    gate = PAN(6)
    gate.fit_standardisation(rand(50, 6, seed=4) * 3 + 1)
    path = tmp_path / "gate.pt"
    save_checkpoint(path, gate, "pan", {"in_features": 6}, {"lr": 0.01}, {"gate_type": "feature"})
    stored = torch.load(path, weights_only=True)
    assert {"input_mean", "input_std"} <= set(stored["state_dict"])
    loaded, ckpt = load_model(path, expect_arch="pan")
    assert isinstance(loaded, PAN) and not loaded.training
    assert ckpt["meta"] == {"gate_type": "feature", "digest": state_digest(gate.state_dict())}
    torch.testing.assert_close(loaded.input_mean, gate.input_mean, atol=0, rtol=0)
    torch.testing.assert_close(loaded.input_std, gate.input_std, atol=0, rtol=0)
    assert not torch.equal(loaded.input_std, torch.ones(6))
    x = rand(4, 6, seed=5)
    torch.testing.assert_close(loaded(x), gate.eval()(x), atol=0, rtol=0)


@pytest.mark.parametrize("make,dim", [(lambda: PAN(4), 4), (lambda: AgnosticPAN(3), 3)],
                         ids=["pan", "agnostic_pan"])
def test_gradient_steps_learn_a_separable_toy_set(make, dim):
    torch.manual_seed(0)
    gate = make()
    n = 64
    labels = torch.arange(n) % 2
    # two blobs around +-2, shifted by 10 so that the inputs need standardising
    inputs = rand(n, dim, seed=6) * 0.5 + (labels.float().unsqueeze(1) * 2 - 1) * 2.0 + 10.0
    gate.fit_standardisation(inputs)
    optimiser = torch.optim.SGD(gate.parameters(), lr=0.05, momentum=0.9)

    def loss() -> torch.Tensor:
        return F.cross_entropy(gate(inputs), labels)

    before = loss()
    optimiser.zero_grad()
    before.backward()
    optimiser.step()
    assert loss().item() < before.item()  # one step lowers the loss
    for _ in range(60):
        optimiser.zero_grad()
        step = loss()
        step.backward()
        optimiser.step()
    assert loss().item() < 0.1 * before.item()
    assert (gate(inputs).argmax(dim=1) == labels).all()
    # buffers are not parameters: training leaves them alone
    torch.testing.assert_close(gate.input_mean, inputs.mean(dim=0))


# ---------------------------------------------------------------- generator and discriminator

@pytest.mark.parametrize("width", [32, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_shapes_and_final_batch_norm(channels, width):
    torch.manual_seed(0)
    generator = Generator(latent_dim=100, out_channels=channels, width=width)
    assert generator.project.in_features == 100
    last = list(generator.body)[-1]
    assert isinstance(last, nn.BatchNorm2d) and not last.affine and last.num_features == channels
    assert isinstance(list(generator.body)[-2], nn.Tanh)
    assert [m.negative_slope for m in generator.body if isinstance(m, nn.LeakyReLU)] == [0.2, 0.2]
    assert [m.num_features for m in generator.body if isinstance(m, nn.BatchNorm2d)] == [width, width, width // 2,
                                                                                         channels]
    assert generator.project.out_features == width * 8 * 8
    convs = [m for m in generator.body if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(width, width), (width, width // 2),
                                                                (width // 2, channels)]
    out = generator.train()(rand(8, 100, seed=7))
    assert out.shape == (8, channels, 32, 32)
    # BatchNorm without affine parameters: each channel has batch mean 0 and variance ~1 in train mode
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(channels), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.var(dim=(0, 2, 3), unbiased=False), torch.ones(channels), atol=2e-2, rtol=0)
    with torch.no_grad():
        assert generator.eval()(rand(3, 100, seed=8)).shape == (3, channels, 32, 32)


def test_generator_other_sizes_and_registry():
    generator = build_model("generator", latent_dim=10, out_channels=3, img_size=16, width=8)
    assert generator.train()(rand(4, 10)).shape == (4, 3, 16, 16)
    for bad in (30, 33, 18):
        with pytest.raises(ValueError, match="multiple of 4"):
            Generator(img_size=bad)
    with pytest.raises(ValueError):
        build_model("generator", img_size=30)


@pytest.mark.parametrize("channels", [1, 3])
def test_discriminator_gives_one_logit_per_image(channels):
    torch.manual_seed(0)
    critic = Discriminator(in_channels=channels)
    out = critic(rand(5, channels, 32, 32, seed=9))
    assert out.shape == (5,)
    assert torch.isfinite(out).all()
    assert build_model("discriminator", in_channels=channels)(rand(2, channels, 32, 32)).shape == (2,)


# ---------------------------------------------------------------- what a gate reads

N = 6


def activations(k: int = 5, d: int = 120, seed: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    return rand(N, k, seed=seed) * 3, torch.relu(rand(N, d, seed=seed + 1))


@pytest.mark.parametrize("gate_type", GATE_TYPES)
def test_gate_input_shapes(gate_type):
    logits, features = activations()
    # the detector gate's second input is the vector of comparable detector scores (detector_stats.detector_vector),
    # which it reads as given
    expected = {"feature": (N, 120), "logits": (N, 5), "agnostic_logits": (N, 3),
                "agnostic_feature": (N, 3), "universal": (N, 3), "detectors": (N, 120)}
    assert set(expected) == set(GATE_TYPES)
    out = gate_inputs(gate_type, logits, features)
    assert out.shape == expected[gate_type]
    assert torch.isfinite(out).all()
    # a gate of the matching architecture reads them
    arch, kwargs = gate_arch(gate_type, out.shape[1])
    assert arch == ("pan" if gate_type in ("feature", "logits") else "agnostic_pan")
    assert kwargs == {"in_features": out.shape[1]}
    assert build_model(arch, **kwargs)(out).shape == (N, 2)


def test_gate_inputs_read_the_right_vector():
    logits, features = activations()
    assert torch.equal(gate_inputs("feature", logits, features), features)
    assert torch.equal(gate_inputs("logits", logits, features), logits)
    for gate_type, v in (("agnostic_logits", logits), ("agnostic_feature", features)):
        stats = gate_inputs(gate_type, logits, features)
        # mean, std, max of each row, in that order
        torch.testing.assert_close(stats[:, 0], v.mean(dim=1))
        torch.testing.assert_close(stats[:, 1], v.std(dim=1))
        torch.testing.assert_close(stats[:, 2], v.max(dim=1).values)
    torch.testing.assert_close(vector_stats(logits), gate_inputs("agnostic_logits", logits, features))
    # the universal gate reads the softmax only: features do not matter
    universal = gate_inputs("universal", logits, features)
    assert torch.equal(universal, gate_inputs("universal", logits, features * 7 + 1))
    torch.testing.assert_close(universal, softmax_stats(logits))


def manual_softmax_stats(logits: torch.Tensor) -> torch.Tensor:
    rows = []
    for row in logits.double().tolist():
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        probs = sorted((e / sum(exps) for e in exps), reverse=True)
        entropy = -sum(p * math.log(p) for p in probs if p > 0) / math.log(len(row))
        rows.append([probs[0], entropy, probs[0] - probs[1]])
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("k", [2, 5, 10, 100])
def test_softmax_stats_values_are_in_the_unit_interval(k):
    logits = rand(50, k, seed=k) * torch.logspace(-2, 2, 50).unsqueeze(1)  # from flat to peaked
    stats = softmax_stats(logits)
    assert stats.shape == (50, 3)
    torch.testing.assert_close(stats, manual_softmax_stats(logits), atol=1e-5, rtol=0)
    assert (stats >= -1e-6).all() and (stats <= 1 + 1e-6).all()
    assert (stats[:, 0] >= 1 / k - 1e-6).all()  # max probability is at least 1/K


def test_softmax_stats_do_not_depend_on_the_number_of_classes():
    def one_hot_like(k: int, cls: int) -> torch.Tensor:
        logits = torch.zeros(2, k)
        logits[:, cls] = 40.0
        return logits

    confident5, confident10 = softmax_stats(one_hot_like(5, 3)), softmax_stats(one_hot_like(10, 8))
    torch.testing.assert_close(confident5, torch.tensor([[1.0, 0.0, 1.0]] * 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(confident5, confident10, atol=1e-5, rtol=0)
    # an undecided expert: entropy / log K is 1 and the top-2 margin is 0 whatever K is
    flat5, flat10 = softmax_stats(torch.zeros(1, 5)), softmax_stats(torch.zeros(1, 10))
    torch.testing.assert_close(flat5[:, 1:], flat10[:, 1:])
    torch.testing.assert_close(flat5[0, 1:], torch.tensor([1.0, 0.0]))
    # a confident answer reads as more confident than a flat one, for either K
    for confident, flat in ((confident5, flat5), (confident10, flat10)):
        assert confident[0, 0] > flat[0, 0] and confident[0, 1] < flat[0, 1] and confident[0, 2] > flat[0, 2]
    # shifting all logits (the energy scale) leaves the statistics alone
    logits = rand(4, 7, seed=11)
    torch.testing.assert_close(softmax_stats(logits), softmax_stats(logits + 50.0), atol=1e-5, rtol=0)


def test_unknown_gate_type_lists_the_choices():
    logits, features = activations()
    with pytest.raises(ValueError) as err:
        gate_inputs("featur", logits, features)
    message = str(err.value)
    assert "featur" in message
    assert all(t in message for t in GATE_TYPES)


def test_in_domain_probability_is_class_one_of_the_softmax():
    torch.manual_seed(0)
    gate = PAN(5).eval()
    x = rand(23, 5, seed=12)
    p = gating.in_domain_probability(gate, x)
    assert p.shape == (23,)
    torch.testing.assert_close(p, gate(x).softmax(dim=1)[:, 1].detach())
    assert ((p >= 0) & (p <= 1)).all()
    torch.testing.assert_close(gating.in_domain_probability(gate, x, batch_size=4), p)  # batching changes nothing
