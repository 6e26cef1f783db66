"""Synthesizers on tiny models: DAFL as its reference defines it, data impressions, DeepInversion, the registry,
stored sets, and the diagnostics that say whether a synthetic set looks like real data to its expert."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import config
import dafl
import diagnostics
import inversion
import synthesis
from archs import build_model
from config import ConfigError, DaflTraining, DeepInversionSettings, InversionSettings
from data import InputFormat

MNIST = InputFormat.of("mnist")
CPU = torch.device("cpu")


class TinyExpert(nn.Module):
    """A small conv classifier with an optional BatchNorm, returning (logits, features) on request."""

    def __init__(self, classes: int = 3, batchnorm: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), *( [nn.BatchNorm2d(4)] if batchnorm else []),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(16, classes)

    def forward(self, x, return_features=False):
        features = self.body(x)
        logits = self.head(features)
        return (logits, features) if return_features else logits


# ---------------------------------------------------------------- DAFL as the reference defines it

def test_dafl_information_entropy_is_in_log_base_10_by_default():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]])
    features = torch.zeros(4, 2)
    mean = logits.softmax(dim=1).mean(dim=0)
    natural = (mean * mean.log()).sum().item()
    _, parts = dafl.dafl_loss(logits, features, 0.0, 1.0, 0.0)
    assert parts["info_entropy"] == pytest.approx(natural / math.log(10), abs=1e-6)
    _, parts_e = dafl.dafl_loss(logits, features, 0.0, 1.0, 0.0, entropy_base=math.e)
    assert parts_e["info_entropy"] == pytest.approx(natural, abs=1e-6)
    assert DaflTraining().ie_weight == 5.0 and DaflTraining().entropy_base == 10.0  # the reference's 5 x log10


def test_the_generator_uses_the_references_batchnorm_eps():
    generator, kwargs = dafl.build_generator(DaflTraining(width=8), channels=1)
    eps = [m.eps for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    assert eps == [1e-5, 0.8, 0.8, 1e-5] and kwargs["bn_eps"] == 0.8  # after the two inner convolutions only


def trained_generator(width: int = 8) -> nn.Module:
    generator, _ = dafl.build_generator(DaflTraining(width=width, latent_dim=10), channels=1)
    generator.train()(torch.randn(32, 10))  # moves the running statistics away from their defaults
    return generator


def test_samples_are_drawn_with_batch_statistics_in_whole_batches():
    generator = trained_generator()
    images = dafl.sample_images(generator, MNIST, 10, seed=3, device=CPU, batch_size=4)
    assert images.shape == (10, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert generator.training  # its mode is restored
    again = dafl.sample_images(generator, MNIST, 10, seed=3, device=CPU, batch_size=4)
    assert torch.equal(images, again)  # deterministic: batch statistics do not depend on running statistics
    # the last (cut) batch was drawn whole: the first 8 match a draw of 12
    torch.testing.assert_close(dafl.sample_images(generator, MNIST, 12, seed=3, device=CPU, batch_size=4)[:10], images)
    eval_mode = dafl.sample_images(generator, MNIST, 10, seed=3, device=CPU, batch_size=4, mode="eval")
    assert not torch.allclose(eval_mode, images)
    with torch.no_grad():  # train mode is what the generator computes on a batch of the training size
        z = torch.randn(4, 10, generator=torch.Generator().manual_seed(3))
        expected = (generator.train()(z) * 0.3081 + 0.1307).clamp(0, 1)
    torch.testing.assert_close(images[:4], expected)


def test_dafl_settings_are_checked_at_load():
    with pytest.raises(ConfigError, match="dafl.sample_mode='batch' is not one of train, eval"):
        config.parse_args(config.GanConfig, ["dafl.sample_mode=batch"])
    with pytest.raises(ConfigError, match="dafl.entropy_base=1.0 is out of range"):
        config.parse_args(config.GanConfig, ["dafl.entropy_base=1"])


# ---------------------------------------------------------------- data impressions

def test_class_similarity_is_row_normalised_cosine_similarity():
    model = TinyExpert()
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[1.0] + [0.0] * 15, [1.0, 1.0] + [0.0] * 14, [-1.0] + [0.0] * 15]))
    similarity = inversion.class_similarity(model)
    assert torch.allclose(similarity.diagonal(), torch.ones(3))
    assert similarity.min() >= 0 and similarity.max() <= 1
    assert similarity[0, 1] > similarity[0, 2] and similarity[0, 2] == 0  # opposite weights: least similar


def test_dirichlet_targets_are_distributions_balanced_over_classes_and_betas():
    similarity = torch.tensor([[1.0, 0.5, 0.0], [0.2, 1.0, 0.0], [0.0, 0.3, 1.0]])
    targets, classes = inversion.dirichlet_targets(similarity, 300, [1.0, 0.1], seed=4)
    assert targets.shape == (300, 3) and torch.allclose(targets.sum(dim=1), torch.ones(300), atol=1e-5)
    assert torch.bincount(classes).tolist() == [100, 100, 100]
    own = targets[torch.arange(300), classes]
    assert own.mean() > 0.5  # a target leans to its own class
    again, _ = inversion.dirichlet_targets(similarity, 300, [1.0, 0.1], seed=4)
    assert torch.equal(targets, again)
    # the small concentration (second half) gives peakier targets
    assert targets[150:].max(dim=1).values.mean() > targets[:150].max(dim=1).values.mean()


def test_data_impressions_are_pixels_the_expert_gives_their_target_class():
    model = TinyExpert(seed=1)
    with torch.no_grad():  # a random tiny net's logits barely move on [0,1] images: give it a wider range
        model.head.weight.mul_(30)
    settings = InversionSettings(steps=60, lr=0.1, tv_weight=0.0, l2_weight=0.0, jitter=1, temperature=1.0)
    images = inversion.data_impressions(model, MNIST, settings, 30, seed=2, device=CPU)
    assert images.shape == (30, 1, 32, 32) and images.min() >= 0 and images.max() <= 1
    targets, _ = inversion.dirichlet_targets(inversion.class_similarity(model), 30, settings.betas, seed=2)
    start = torch.sigmoid(torch.randn(30, 1, 32, 32, generator=torch.Generator().manual_seed(2)))  # where it began
    with torch.no_grad():
        logits, before = (model((x - 0.1307) / 0.3081) for x in (images, start))
    soft_ce = [-(targets * o.log_softmax(dim=1)).sum(dim=1).mean().item() for o in (logits, before)]
    assert soft_ce[0] < soft_ce[1] - 0.2  # the expert's softmax moved to the targets
    assert (logits.argmax(dim=1) == targets.argmax(dim=1)).float().mean() > 0.6  # chance: 1/3
    assert torch.equal(images, inversion.data_impressions(model, MNIST, settings, 30, seed=2, device=CPU))
    # the priors make smoother, darker images
    smooth = inversion.data_impressions(model, MNIST, InversionSettings(steps=60, tv_weight=5, l2_weight=0.1), 30,
                                        seed=2, device=CPU)
    assert inversion.total_variation(smooth) < inversion.total_variation(images) and smooth.mean() < images.mean()


def test_deep_inversion_pulls_batch_statistics_to_the_running_ones():
    model = TinyExpert(batchnorm=True, seed=2)
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(64, 1, 32, 32) * 0.5 + 1.0)  # running statistics of some input distribution
    model.eval()
    bn = inversion.batchnorm_layers(model)[0]

    def distance(images: torch.Tensor) -> float:
        captured = []
        handle = bn.register_forward_hook(lambda m, i, o: captured.append(i[0]))
        with torch.no_grad():
            model((images - 0.1307) / 0.3081)
        handle.remove()
        x = captured[0]
        return ((x.mean(dim=(0, 2, 3)) - bn.running_mean).norm() + (x.var(dim=(0, 2, 3)) - bn.running_var).norm()).item()

    plain = inversion.deep_inversion(model, MNIST, DeepInversionSettings(steps=60, bn_weight=0.0), 32, 3, CPU)
    matched = inversion.deep_inversion(model, MNIST, DeepInversionSettings(steps=60, bn_weight=1.0), 32, 3, CPU)
    assert distance(matched) < distance(plain)
    assert not bn._forward_hooks  # the hooks are removed
    with pytest.raises(ValueError, match="no BatchNorm"):
        inversion.deep_inversion(TinyExpert(), MNIST, DeepInversionSettings(steps=1), 4, 0, CPU)


# ---------------------------------------------------------------- the registry and stored sets

def test_synthesizer_names_and_mixtures_are_checked():
    assert synthesis.components("dafl+inversion") == ["dafl", "inversion"]
    for bad, words in (("gan", "unknown 'gan'"), ("dafl+dafl", "a part twice"), ("dafl+nope", "unknown 'nope'")):
        with pytest.raises(ConfigError, match=words):
            synthesis.components(bad)
    assert set(synthesis.SYNTHESIZERS) == set(config.SYNTHESIS_SECTIONS)


def test_deepinversion_needs_experts_with_batchnorm_before_any_work():
    with pytest.raises(ConfigError, match="no BatchNorm layer"):
        synthesis.check_experts("dafl+deepinversion", ["lenet5", "lenet5"], [{}, {}])
    synthesis.check_experts("deepinversion", ["resnet18"], [{}])
    synthesis.check_experts("inversion", ["lenet5"], [{}])


def test_a_stored_set_round_trips_with_the_digest_of_its_images(tmp_path):
    images = synthesis.to_uint8(torch.rand(5, 1, 32, 32))
    digest = synthesis.save_set(tmp_path / "s.pt", images, {"synthesizer": "inversion"})
    loaded, meta = synthesis.load_set(tmp_path / "s.pt")
    assert torch.equal(loaded, images) and loaded.dtype == torch.uint8
    assert meta == {"synthesizer": "inversion", "digest": digest}
    other = images.clone()
    other[0, 0, 0, 0] ^= 1
    assert synthesis.save_set(tmp_path / "t.pt", other, {}) != digest
    with pytest.raises(Exception, match="create it with: make it"):
        synthesis.load_set(tmp_path / "missing.pt", hint="make it")


def test_quality_is_measured_without_real_data():
    model = build_model("lenet5", in_channels=1, num_classes=5)
    images = torch.rand(40, 1, 32, 32)
    quality = synthesis.sample_quality(model, MNIST, images, model)
    assert quality["cross_seed_agreement"] == 1.0  # an expert agrees with itself
    assert 0 <= quality["balance"] <= 1 and sum(quality["class_share"]) == pytest.approx(1.0)


# ---------------------------------------------------------------- diagnostics

def test_frechet_distance_is_zero_for_one_set_and_the_squared_shift_for_a_moved_one():
    torch.manual_seed(0)
    a = torch.randn(2000, 3)
    assert diagnostics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert diagnostics.frechet_distance(a, a + torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(4.0, rel=1e-3)
    wide = diagnostics.frechet_distance(a, 2 * a)  # same mean, double std: sum over dims of (1 - 2)^2 ~ 3
    assert wide == pytest.approx(3.0, rel=0.1)


def test_msp_histograms_and_set_diagnostics():
    confident = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    unsure = torch.zeros(3, 2)
    assert diagnostics.msp_histogram(confident)[-1] == 1.0
    assert sum(diagnostics.msp_histogram(unsure)) == pytest.approx(1.0)
    features = torch.randn(5, 4)
    row = diagnostics.set_diagnostics((confident, features[:2]), (torch.cat([confident, unsure]), features),
                                      torch.tensor([True, True, False, False, False]))
    assert row["mean_msp"]["real_in"] > row["mean_msp"]["real_out"] == pytest.approx(0.5)
    assert set(row["msp_histogram"]) == {"synthetic", "real_in", "real_out"}
