"""detectors.py: what an expert shows (hooks on every arch), every formula against pytorch-ood's on the same
logits, features and models (skipped where pytorch-ood is not installed), identities that need no reference,
statistics (fitted, shipped, saved), and routing between two tiny experts by calibrated scores."""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import detectors
from archs import build_model
from data import convert_channels
from detectors import DETECTORS, ExpertView, calibrate, fit_statistics, observe, score, shipped_statistics, standardise

OOD_MISSING = ("pytorch-ood is not installed: the detectors run on our own code, and these tests compare them with "
               "it (pip install -r requirements.txt)")


@pytest.fixture(scope="module")
def ood():
    """pytorch-ood's detectors, the reference; the test skips (with the reason) where it is not installed."""
    return pytest.importorskip("pytorch_ood.detector", reason=OOD_MISSING)


# ---------------------------------------------------------------- helpers

def view_of(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> ExpertView:
    """A view made of features and a final layer only (the detectors that read features or logits need no more)."""
    return ExpertView(F.linear(features, weight, bias), features, weight, bias,
                      input_moments=torch.zeros(len(features), 1, 2))


def relu_features(n: int = 400, dim: int = 12, classes: int = 3, seed: int = 0):
    """ReLU-like features with class structure, full rank, their labels, and a final layer that reads them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = 2 * torch.rand(classes, dim, generator=g)
    features = (centres[labels] + torch.randn(n, dim, generator=g)).relu() + 0.01 * torch.rand(n, dim, generator=g)
    weight, bias = torch.randn(classes, dim, generator=g), torch.randn(classes, generator=g)
    return features, labels, weight, bias


def as_maps(features: torch.Tensor) -> torch.Tensor:
    """pytorch-ood's activation-shaping detectors read feature maps: [N, D] as [N, D, 1, 1]."""
    return features[:, :, None, None]


def close(ours: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    torch.testing.assert_close(ours.double(), reference.double().to(ours.device), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- what an expert shows

ARCH_CASES = [("lenet5", 1, 84), ("mlp", 1, None), ("vgg", 3, None), ("resnet18", 3, 512)]


@pytest.mark.parametrize("arch,channels,dim", ARCH_CASES)
def test_observe_reads_the_input_of_the_last_linear_on_every_arch(arch, channels, dim):
    torch.manual_seed(0)
    model = build_model(arch, in_channels=channels, num_classes=4).eval()
    x = torch.randn(6, channels, 32, 32)
    view = observe(model, x.split(4))
    with torch.no_grad():
        logits, returned = model(x, return_features=True)
    close(view.logits, logits)
    close(F.linear(view.features, view.weight, view.bias), logits)
    assert view.features.shape[1] == (dim or returned.shape[1])
    if arch != "lenet5":  # LeNet5's feature vector is the 120-d conv output, two layers before the logits
        close(view.features, returned)
    assert (view.bn_moments is not None) == (arch == "resnet18")
    assert view.input_moments.shape == (6, channels, 2)
    assert not any(m._forward_hooks for m in model.modules()), "observe left a hook behind"
    assert view.inputs is None and view.model is None


def test_observe_keeps_inputs_and_model_only_when_asked():
    model = build_model("lenet5", in_channels=1, num_classes=3).eval()
    x = torch.randn(5, 1, 32, 32)
    view = observe(model, [x], keep_inputs=True, input_std=[0.3])
    assert torch.equal(view.inputs, x) and view.model is model
    assert view.input_std.tolist() == pytest.approx([0.3])
    part = view.subset(torch.tensor([4, 1]))
    assert torch.equal(part.inputs, x[[4, 1]]) and torch.equal(part.logits, view.logits[[4, 1]])
    assert part.model is model and part.weight is view.weight


def test_observe_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="eval mode"):
        observe(build_model("lenet5").train(), [torch.randn(2, 1, 32, 32)])
    squashed = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).eval()  # its output is not its last Linear's
    with pytest.raises(ValueError, match="output is not its last nn.Linear"):
        observe(squashed, [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="no nn.Linear"):
        observe(nn.Sequential(nn.Flatten()).eval(), [torch.randn(2, 4)])
    assert not any(m._forward_hooks for m in squashed.modules())


def test_channel_moments_give_a_gaussian_distance_exactly():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, 5, 5, generator=g) * 2 + 1
    mean, variance = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 4.0, 0.25])
    direct = ((x - mean.view(1, 3, 1, 1)).square() / variance.view(1, 3, 1, 1)).mean(dim=(1, 2, 3))
    close(detectors.gaussian_distance(detectors.channel_moments(x), mean, variance), direct)


# ---------------------------------------------------------------- per-sample detectors against pytorch-ood

@pytest.fixture(scope="module")
def logits_view():
    features, _, weight, bias = relu_features(n=64, dim=10, classes=6, seed=2)
    return view_of(features, 0.3 * weight, bias)  # logits of a few units: every probability above 1e-7


def test_softmax_energy_and_max_logit_match_pytorch_ood(ood, logits_view):
    logits = logits_view.logits
    close(score("max_softmax", logits_view), -ood.MaxSoftmax.score(logits))
    close(score("energy", logits_view), -ood.EnergyBased.score(logits))
    close(score("max_logit", logits_view), -ood.MaxLogit.score(logits))


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_gen_matches_pytorch_ood(ood, logits_view, gamma):
    # pytorch-ood averages over the classes where the paper sums, and clamps probabilities to 1e-7 (inactive here)
    assert logits_view.logits.softmax(dim=1).min() > 1e-6
    reference = ood.GEN.score(logits_view.logits, gamma=gamma)
    close(score("gen", logits_view, gamma=gamma), -logits_view.logits.shape[1] * reference)


@pytest.mark.parametrize("temperature,epsilon", [(1000.0, 0.0014), (2.0, 0.02)])
def test_odin_matches_pytorch_ood(ood, temperature, epsilon):
    # the published defaults, and a setting where the step moves the scores by far more than the tolerance
    torch.manual_seed(3)
    model = build_model("lenet5", in_channels=3, num_classes=5).eval()
    x = torch.randn(12, 3, 32, 32)
    std = [0.2023, 0.1994, 0.2010]
    view = observe(model, [x], keep_inputs=True, input_std=std)
    reference = ood.ODIN(model, eps=epsilon, temperature=temperature, norm_std=std).predict(x)
    ours = score("odin", view, temperature=temperature, epsilon=epsilon, batch_size=5)
    close(ours, -reference, rtol=1e-5, atol=1e-7)
    assert not any(p.grad is not None for p in model.parameters()), "ODIN left gradients on the expert"


def head_of(weight: torch.Tensor, bias: torch.Tensor):
    return lambda maps: F.linear(maps.flatten(1), weight, bias)


def test_ash_s_and_scale_match_pytorch_ood(ood):
    # 14 activations: 90% of them is 12.6 and 85% 11.9, so rounding (not truncating) decides how many survive
    features, _, weight, bias = relu_features(n=50, dim=14, seed=4)
    view = view_of(features, weight, bias)
    ash = ood.ASH(backbone=None, head=head_of(weight, bias), variant="ash-s", percentile=0.9)
    close(score("ash", view), -ash.predict_feature_maps(as_maps(features)))
    scaled = ood.SCALE(backbone=None, head=head_of(weight, bias), percentile=0.85)
    close(score("scale", view), -scaled.predict_feature_maps(as_maps(features)))


# ---------------------------------------------------------------- statistics-based detectors against pytorch-ood

@pytest.fixture(scope="module")
def fitted():
    """Features of a source to fit on and of test inputs from the same and other distributions."""
    features, labels, weight, bias = relu_features(n=600, dim=12, classes=3, seed=5)
    test, _, _, _ = relu_features(n=80, dim=12, classes=3, seed=6)
    test = torch.cat([test, 3 * torch.rand(40, 12)])
    source = view_of(features, weight, bias)
    return source, labels, view_of(test, weight, bias)


def test_react_matches_pytorch_ood(ood, fitted):
    source, labels, test = fitted
    reference = ood.ReAct(backbone=None, head=head_of(source.weight, source.bias), percentile=0.9)
    reference.fit_feature_maps(as_maps(source.features), labels)
    stats = fit_statistics(source, labels)
    assert stats["react_threshold"].item() == pytest.approx(reference.threshold, rel=1e-6)
    close(score("react", test, stats), -reference.predict_feature_maps(as_maps(test.features)))


def test_mahalanobis_matches_pytorch_ood(ood, fitted):
    source, labels, test = fitted
    stats = fit_statistics(source, labels, shrinkage=0.0)
    reference = ood.Mahalanobis(None).fit_features(source.features, labels)
    # pytorch-ood's covariance is the sum of outer products, N times the paper's, and it scores half the distance
    close(score("mahalanobis", test, stats), -2 * len(source) * reference.predict_features(test.features), rtol=1e-3)


def test_relative_mahalanobis_matches_pytorch_ood(ood, fitted):
    source, labels, test = fitted
    stats = fit_statistics(source, labels, shrinkage=0.0)
    reference = ood.RMD(None).fit_features(source.features, labels)
    close(score("relative_mahalanobis", test, stats), -len(source) * reference.predict_features(test.features),
          rtol=1e-3, atol=1e-3)


def test_knn_matches_pytorch_ood(ood, fitted):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed: pytorch-ood's KNN, the reference, needs it")
    source, labels, test = fitted
    stats = fit_statistics(source, labels)
    assert len(stats["knn_bank"]) == len(source)  # the default bank bound keeps all 600
    reference = ood.KNN(None, k=7).fit_features(source.features, labels)
    close(score("knn", test, stats, k=7), -reference.predict_features(test.features), atol=1e-4)


def test_vim_matches_pytorch_ood(ood, fitted):
    source, labels, test = fitted
    stats = fit_statistics(source, labels, vim_dim=5)
    reference = ood.ViM(None, d=5, w=source.weight, b=source.bias).fit_features(source.features, labels)
    assert stats["vim_alpha"].item() == pytest.approx(reference.alpha, rel=1e-4)
    close(score("vim", test, stats), -reference.predict_features(test.features), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- identities that need no reference

def test_per_sample_identities(logits_view):
    logits, view = logits_view.logits, logits_view
    p = logits.softmax(dim=1)
    close(score("gen", view, gamma=0.3), -(p.pow(0.3) * (1 - p).pow(0.3)).sum(dim=1))
    keep_all = view.features * torch.e  # nothing pruned: the sums agree and every activation grows by e^1
    close(score("ash", view, percentile=0.0), F.linear(keep_all, view.weight, view.bias).logsumexp(dim=1))
    close(score("scale", view, percentile=0.0), F.linear(keep_all, view.weight, view.bias).logsumexp(dim=1))
    close(score("react", view, {"react_threshold": torch.tensor(1e9)}), logits.logsumexp(dim=1))


def test_odin_without_a_step_is_the_tempered_max_softmax():
    torch.manual_seed(7)
    model = build_model("lenet5", in_channels=1, num_classes=4).eval()
    view = observe(model, [torch.randn(9, 1, 32, 32)], keep_inputs=True)
    close(score("odin", view, epsilon=0.0, temperature=10.0), (view.logits / 10).softmax(dim=1).max(dim=1).values)
    stepped = score("odin", view, epsilon=0.01, temperature=10.0)
    assert (stepped >= (view.logits / 10).softmax(dim=1).max(dim=1).values - 1e-6).float().mean() > 0.8


def test_distance_detectors_on_hand_made_statistics():
    centres = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 2.0]])
    view = view_of(z, torch.eye(2), torch.zeros(2))
    stats = {"class_means": centres, "precision": torch.eye(2), "background_mean": torch.zeros(2),
             "background_precision": torch.eye(2) / 4}
    close(score("mahalanobis", view, stats), -torch.tensor([0.0, 1.0, 8.0]))
    close(score("relative_mahalanobis", view, stats), torch.tensor([0.25, 0.0, 13 / 4]) - torch.tensor([0.0, 1.0, 8.0]))
    bank = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), dim=1)
    nearest = score("knn", view_of(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.eye(2), torch.zeros(2)),
                    {"knn_bank": bank}, k=1)
    close(nearest, torch.tensor([0.0, -1.0]))  # in the bank; a zero vector is 1 from every unit vector


# ---------------------------------------------------------------- statistics

def test_statistics_save_and_load_as_plain_tensors(tmp_path, fitted):
    source, labels, test = fitted
    stats = fit_statistics(source)  # no labels: the expert's own predictions
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in stats.values())
    torch.save(stats, tmp_path / "stats.pt")
    loaded = torch.load(tmp_path / "stats.pt", weights_only=True)
    for name in DETECTORS:
        if name not in ("odin", "bn_gaussian"):
            close(score(name, test, loaded), score(name, test, stats))


def test_class_statistics_follow_the_predictions_without_labels(fitted):
    source, labels, _ = fitted
    predicted = source.logits.argmax(dim=1)
    means = torch.stack([source.features[predicted == c].mean(dim=0) for c in predicted.unique()])
    close(fit_statistics(source)["class_means"], means)
    only_two = fit_statistics(source, labels.clamp(max=1))  # a class that never occurs gets no mean
    assert len(only_two["class_means"]) == 2


def test_knn_bank_is_bounded_and_seeded(fitted):
    source, labels, _ = fitted
    bank = fit_statistics(source, labels, knn_bank=50, seed=1)["knn_bank"]
    assert bank.shape == (50, 12) and torch.allclose(bank.norm(dim=1), torch.ones(50))
    assert torch.equal(bank, fit_statistics(source, labels, knn_bank=50, seed=1)["knn_bank"])
    assert not torch.equal(bank, fit_statistics(source, labels, knn_bank=50, seed=2)["knn_bank"])


def test_fitted_input_gaussian_is_the_per_channel_gaussian_of_every_pixel():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, 3, 8, 8, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 0.3
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2)).eval()
    stats = fit_statistics(observe(model, [x]))
    close(stats["input_mean"], x.mean(dim=(0, 2, 3)))
    close(stats["input_var"], x.var(dim=(0, 2, 3), unbiased=False))


class TinyBatchNormNet(nn.Module):
    """conv -> batch norm (cumulative running statistics) -> ReLU -> pool -> Linear -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=None)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.norm(self.conv(x)).relu(), 2))


def test_shipped_batch_norm_statistics_describe_the_training_activations():
    torch.manual_seed(9)
    model, x = TinyBatchNormNet(), torch.rand(30, 1, 10, 10)
    model.train()(x)  # one batch with momentum None: the running statistics are that batch's, variance unbiased
    model.eval()
    shipped = shipped_statistics(model)
    assert sorted(shipped) == ["bn_mean", "bn_var", "input_mean", "input_var"]
    view = observe(model, x.split(7))
    fitted = fit_statistics(view)
    values = 30 * 8 * 8  # every activation of a channel counts, over inputs and positions
    close(fitted["bn_mean"], shipped["bn_mean"])
    close(fitted["bn_var"] * values / (values - 1), shipped["bn_var"])
    # on the inputs that made the statistics, the mean squared standardised distance is 1, less the unbiasing
    assert score("bn_gaussian", view, shipped).mean().item() == pytest.approx(-(values - 1) / values, rel=1e-4)
    assert sorted(shipped_statistics(build_model("lenet5"))) == ["input_mean", "input_var"]
    with pytest.raises(ValueError, match="has none"):
        score("bn_gaussian", observe(build_model("lenet5").eval(), [torch.randn(2, 1, 32, 32)]), shipped)


def sparse_grey(n: int, g: torch.Generator) -> torch.Tensor:
    """MNIST-like [0,1] images: black, with a few bright strokes."""
    return (torch.rand(n, 1, 32, 32, generator=g) > 0.88).float()


def colour_photos(n: int, g: torch.Generator) -> torch.Tensor:
    """CIFAR-like [0,1] images: smooth colour fields around mid-grey."""
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 0.7 + 0.15
    return F.interpolate(coarse, size=32, mode="bilinear", align_corners=False)


def test_shipped_input_gaussian_tells_grey_digits_from_colour_photos():
    """Data-free: each expert's normalisation alone routes grey sparse images and colour photos apart."""
    g = torch.Generator().manual_seed(10)
    train = [sparse_grey(300, g), colour_photos(300, g)]
    test = [sparse_grey(100, g), colour_photos(100, g)]
    scores = []
    for images in train:
        channels = images.shape[1]
        mean, std = images.mean(dim=(0, 2, 3)).view(1, -1, 1, 1), images.std(dim=(0, 2, 3)).view(1, -1, 1, 1)
        model = build_model("lenet5", in_channels=channels, num_classes=2).eval()
        view = observe(model, [(convert_channels(x, channels) - mean) / std for x in test])
        scores.append(score("input_gaussian", view, shipped_statistics(model)))
    domain = torch.arange(200) // 100
    # a per-image statistic, uncalibrated: a dim greyish photo sits near the digits' normalisation
    assert (torch.stack(scores, dim=1).argmax(dim=1) == domain).float().mean() > 0.9


# ---------------------------------------------------------------- scores comparable across experts

def test_standardisations():
    calibration = calibrate(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    close(standardise(torch.tensor([2.5, 4.0]), calibration), torch.tensor([0.0, 1.5]) / torch.tensor(1.6667).sqrt())
    close(standardise(torch.tensor([0.0, 2.0, 2.5, 9.0]), calibration, "rank"), torch.tensor([0.0, 0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match="choices: zscore, rank"):
        standardise(torch.zeros(1), calibration, "minmax")


def blobs(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Domain A, [0,1] grey images: a dark field with a bright square whose corner is the class (3 classes)."""
    labels = torch.arange(n) % 3
    images = 0.15 * torch.rand(n, 1, 32, 32, generator=g)
    for c in range(3):  # a loop over classes, not samples
        images[labels == c, :, 4 + 8 * c:12 + 8 * c, 4 + 8 * c:12 + 8 * c] = 1.0
    return images, labels


def stripes(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Domain B, [0,1] grey images: mid-grey stripes whose orientation is the class (3 classes), with noise."""
    labels = torch.arange(n) % 3
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    waves = torch.stack([rows, cols, rows + cols])[labels]  # horizontal, vertical, diagonal
    phase = 6.28 * torch.rand(n, 1, 1, generator=g)
    images = 0.5 + 0.3 * torch.sin(waves * 0.8 + phase) + 0.1 * torch.randn(n, 32, 32, generator=g)
    return images.clamp(0, 1).unsqueeze(1), labels


def train_expert(images: torch.Tensor, labels: torch.Tensor, seed: int):
    """A LeNet5 on one domain, its inputs normalised with that domain's mean and std; a few SGD steps."""
    torch.manual_seed(seed)
    model, mean, std = build_model("lenet5", in_channels=1, num_classes=3), images.mean(), images.std()
    prepared = (images - mean) / std
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(60):
        batch = torch.randint(0, len(images), (64,))
        optimiser.zero_grad()
        F.cross_entropy(model(prepared[batch]), labels[batch]).backward()
        optimiser.step()
    return model.eval(), (lambda x: (x - mean) / std)


@pytest.fixture(scope="module")
def two_experts():
    """Two experts on two synthetic domains, their training images, and test images of both domains."""
    g = torch.Generator().manual_seed(11)
    train = [blobs(300, g), stripes(300, g)]
    experts = [train_expert(images, labels, seed) for seed, (images, labels) in enumerate(train)]
    test = torch.cat([blobs(100, g)[0], stripes(100, g)[0]])
    return experts, train, test, torch.arange(200) // 100


@pytest.mark.parametrize("name", ["mahalanobis", "relative_mahalanobis", "knn", "vim", "input_gaussian"])
@pytest.mark.parametrize("method", ["zscore", "rank"])
def test_statistics_of_each_experts_training_data_route_its_images_to_it(two_experts, name, method):
    """Fit on part of each expert's own training images, calibrate on the rest; the argmax of the standardised
    scores over the experts sends each test image to the expert of its domain."""
    experts, train, test, domain = two_experts
    columns = []
    for (model, prepare), (images, labels) in zip(experts, train):
        fit_part, calibration_part = detectors.split_source(observe(model, [prepare(images)]), holdout=0.3)
        stats = fit_statistics(fit_part, knn_bank=150)
        calibration = calibrate(score(name, calibration_part, stats))
        columns.append(standardise(score(name, observe(model, [prepare(test)]), stats), calibration, method))
    routed = torch.stack(columns, dim=1).argmax(dim=1)
    assert (routed == domain).float().mean() > 0.95


def test_score_says_what_is_missing(fitted):
    source, _, test = fitted
    with pytest.raises(ValueError, match="did you mean 'mahalanobis'"):
        score("mahalanobis2", test)
    with pytest.raises(ValueError, match=r"needs the statistics \['knn_bank'\]"):
        score("knn", test, shipped_statistics(build_model("lenet5")))
    with pytest.raises(ValueError, match="keep_inputs=True"):
        score("odin", test)
    with pytest.raises(ValueError, match="no parameter"):
        score("energy", test, temperature=2.0)
    with pytest.raises(ValueError, match="k must be at least 1"):
        score("knn", test, fit_statistics(source, knn_bank=5), k=0)
    # a bank smaller than k (a few-shot source): the distance to its farthest member
    small = fit_statistics(source, knn_bank=5)
    assert torch.equal(score("knn", test, small, k=6), score("knn", test, small, k=5))


def test_registry_declares_what_each_detector_reads():
    per_sample = {"max_softmax", "energy", "max_logit", "gen", "odin", "ash", "scale"}
    assert {name for name, d in DETECTORS.items() if not d.statistics} == per_sample
    assert [name for name, d in DETECTORS.items() if d.reads_inputs] == ["odin"]
    assert DETECTORS["odin"].params == {"temperature": (float, 1000.0), "epsilon": (float, 0.0014),
                                        "batch_size": (int, 512)}
    assert DETECTORS["ash"].params["percentile"] == (float, 0.9)


def test_fitting_a_lenet5_on_five_thousand_images_takes_under_five_seconds():
    torch.manual_seed(12)
    model, x = build_model("lenet5", in_channels=1, num_classes=5).eval(), torch.randn(5000, 1, 32, 32)
    start = time.perf_counter()
    fit_statistics(observe(model, x.split(1000)))
    assert time.perf_counter() - start < 5.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_every_detector_scores_the_same_on_the_gpu():
    torch.manual_seed(13)
    model, x = TinyBatchNormNet().eval(), torch.rand(64, 1, 10, 10)
    cpu = observe(model, [x], keep_inputs=True, input_std=[0.3])
    gpu = observe(copy.deepcopy(model).cuda(), [x.cuda()], keep_inputs=True, input_std=[0.3])
    stats = fit_statistics(gpu)
    assert all(v.device.type == "cpu" for v in stats.values())
    for name in DETECTORS:
        close(score(name, gpu, stats).cpu(), score(name, cpu, fit_statistics(cpu)), rtol=1e-3, atol=1e-3)
