import math

import pytest
import torch
import torch.nn.functional as nnf

import augments
from augments import AUGMENTS, TTA_SETTINGS, apply_augment, augment_params, make_passes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RANDOM_AUGMENTS = ["gaussian", "poisson", "random_resized_crop"]
DETERMINISTIC_AUGMENTS = [name for name in AUGMENTS if name not in RANDOM_AUGMENTS]
# Number of augmented copies per setting, as documented in docs/design.md section 4.
EXPECTED_COPIES = {
    "sharpen_1": 1,
    "sharpen_sweep": 5,
    "gaussian_1": 1,
    "gaussian_5": 5,
    "gaussian_sweep": 6,
    "poisson_1": 1,
    "poisson_5": 5,
    "poisson_sweep": 6,
    "flips": 2,
    "random_resized_crop": 1,
}


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def images(n: int = 4, c: int = 3, size: int = 32, seed: int = 0, device: str = "cpu",
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=gen(seed)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list(AUGMENTS))
def test_keeps_shape_dtype_device(name, channels, dtype, device):
    x = images(c=channels, device=device, dtype=dtype)
    before = x.clone()
    out = apply_augment(name, x, gen(1, device))
    assert out.shape == x.shape
    assert out.dtype == dtype
    assert out.device == x.device
    assert torch.equal(x, before), "augmentations must not modify their input"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(AUGMENTS))
def test_same_seed_same_output(name, device):
    x = images(device=device)
    first = apply_augment(name, x, gen(7, device))
    assert torch.equal(first, apply_augment(name, x, gen(7, device)))


@pytest.mark.parametrize("name", RANDOM_AUGMENTS)
def test_different_seed_different_output(name):
    x = images()
    assert not torch.equal(apply_augment(name, x, gen(7)), apply_augment(name, x, gen(8)))


@pytest.mark.parametrize("name", DETERMINISTIC_AUGMENTS)
def test_deterministic_augments_ignore_seed(name):
    x = images()
    assert torch.equal(apply_augment(name, x, gen(7)), apply_augment(name, x, gen(8)))


def test_identity_returns_input():
    x = images()
    assert apply_augment("identity", x, gen(0)) is x


def test_sharpen_alpha_zero_is_identity():
    x = images()
    assert torch.equal(augments.sharpen(x, gen(0), alpha=0.0), x)


def test_sharpen_alpha_is_honoured():
    x = images()
    change = {a: (augments.sharpen(x, gen(0), alpha=a) - x).abs().mean().item() for a in (0.1, 0.9)}
    assert change[0.1] > 0
    assert change[0.9] > change[0.1]


def test_sharpen_is_linear_in_alpha_without_clamping():
    # Low-contrast image: nothing reaches the clamp, so the change scales exactly with alpha.
    x = 0.5 + 0.02 * (images() - 0.5)
    change = {a: (augments.sharpen(x, gen(0), alpha=a) - x).abs().mean().item() for a in (0.1, 0.9)}
    assert change[0.9] / change[0.1] == pytest.approx(9.0, rel=1e-3)


def test_sharpen_keeps_constant_image():
    x = torch.full((2, 3, 8, 8), 0.37)
    assert torch.allclose(augments.sharpen(x, gen(0), alpha=0.9), x, atol=1e-6)


def test_sharpen_matches_reference_kernel():
    # Reference: explicit 3x3 neighbourhood sum over a reflect-padded image, kernel built from
    # the imgaug formula (1 - a) * K_identity + a * K_effect.
    x = images(n=2, c=3, size=6)
    alpha = 0.3
    k_identity = torch.zeros(3, 3)
    k_identity[1, 1] = 1.0
    k_effect = torch.full((3, 3), -1.0)
    k_effect[1, 1] = 9.0
    kernel = (1 - alpha) * k_identity + alpha * k_effect
    padded = nnf.pad(x, (1, 1, 1, 1), mode="reflect")
    expected = sum(kernel[i, j] * padded[:, :, i:i + 6, j:j + 6]
                   for i in range(3) for j in range(3))
    expected = expected.clamp(0, 1)
    assert torch.allclose(augments.sharpen(x, gen(0), alpha=alpha), expected, atol=1e-6)


@pytest.mark.parametrize("std", [0.3, 1.0])
def test_gaussian_std(std):
    x = images(n=64)
    noise = augments.gaussian(x, gen(3), std=std) - x
    assert abs(noise.std().item() - std) < 0.02 * std
    assert abs(noise.mean().item()) < 0.01 * std


def test_gaussian_is_not_clamped():
    x = images()
    out = augments.gaussian(x, gen(3), std=1.0)
    assert out.min() < 0 and out.max() > 1


@pytest.mark.parametrize("rate", [0.05, 0.5, 1.0])
def test_poisson_adds_clamped_counts(rate):
    x = images(n=64)
    added = augments.poisson(x, gen(4), rate=rate) - x
    # Integer counts clamped to [0, 1] are 0 or 1 (up to float rounding of x + 1 - x).
    assert torch.all((added.abs() < 1e-6) | ((added - 1).abs() < 1e-6))
    assert abs(added.mean().item() - (1 - math.exp(-rate))) < 0.01


def test_flips_match_torch_flip():
    x = images()
    hflipped = apply_augment("hflip", x, gen(0))
    vflipped = apply_augment("vflip", x, gen(0))
    assert torch.equal(hflipped, torch.flip(x, dims=[3]))
    assert torch.equal(vflipped, torch.flip(x, dims=[2]))
    assert not torch.equal(hflipped, vflipped)


@pytest.mark.parametrize("name", ["hflip", "vflip"])
def test_flips_are_involutions(name):
    x = images()
    once = apply_augment(name, x, gen(0))
    assert not torch.equal(once, x)
    assert torch.equal(apply_augment(name, once, gen(0)), x)


def test_random_resized_crop_full_scale_is_identity():
    x = images()
    out = augments.random_resized_crop(x, gen(5), size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(out, x, atol=1e-5)


def test_random_resized_crop_box_lands_on_pixels():
    # A quarter-area square crop of an 8x8 image is a 4x4 window; resized to 4x4 it must
    # reproduce that window's pixels exactly, at some integer offset.
    x = images(n=16, size=8)
    out = augments.random_resized_crop(x, gen(5), size=4, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    assert out.shape == (16, 3, 4, 4)
    offsets = set()
    for n in range(16):
        matches = [(i, j) for i in range(5) for j in range(5)
                   if torch.allclose(out[n], x[n, :, i:i + 4, j:j + 4], atol=1e-5)]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1, "crop positions should vary across the batch"


def test_random_resized_crop_differs_per_image():
    x = images(n=1).expand(8, -1, -1, -1)
    out = augments.random_resized_crop(x, gen(6))
    flat = out.flatten(1)
    distinct = torch.cdist(flat, flat) > 1e-3
    off_diagonal = ~torch.eye(8, dtype=torch.bool)
    assert torch.all(distinct[off_diagonal])


def test_settings_are_the_ten_documented():
    assert set(TTA_SETTINGS) == set(EXPECTED_COPIES)
    assert [p["alpha"] for _, p in TTA_SETTINGS["sharpen_sweep"]] == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert [p["std"] for _, p in TTA_SETTINGS["gaussian_sweep"]] == [0.05, 0.1, 0.3, 0.5, 0.7, 1.0]
    assert [p["rate"] for _, p in TTA_SETTINGS["poisson_sweep"]] == [0.05, 0.1, 0.3, 0.5, 0.7, 1.0]


@pytest.mark.parametrize("setting", list(EXPECTED_COPIES))
def test_make_passes_count_and_order(setting):
    x = images(n=2)
    passes = make_passes(setting, x, gen(0))
    assert len(passes) == 1 + EXPECTED_COPIES[setting]
    assert passes[0] is x
    for p in passes:
        assert p.shape == x.shape
    for p in passes[1:]:
        assert not torch.equal(p, x)


@pytest.mark.parametrize("setting", ["gaussian_5", "poisson_5"])
def test_repeated_copies_get_different_noise(setting):
    passes = make_passes(setting, images(n=2), gen(0))[1:]
    for a in range(len(passes)):
        for b in range(a + 1, len(passes)):
            assert not torch.equal(passes[a], passes[b])


def test_make_passes_is_deterministic():
    x = images(n=2)
    first = make_passes("poisson_sweep", x, gen(9))
    second = make_passes("poisson_sweep", x, gen(9))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_augment_params():
    assert augment_params("identity") == {}
    assert augment_params("sharpen") == {"alpha": 0.5}
    assert augment_params("random_resized_crop") == {
        "size": 32, "scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)}


def test_unknown_augmentation_lists_choices():
    with pytest.raises(ValueError, match="blur") as err:
        apply_augment("blur", images(), gen(0))
    assert all(name in str(err.value) for name in AUGMENTS)
    with pytest.raises(ValueError, match="sharpen"):
        augment_params("blur")


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ValueError, match="std") as err:
        apply_augment("sharpen", images(), gen(0), std=1.0)
    assert "alpha" in str(err.value)


def test_unknown_setting_lists_choices():
    with pytest.raises(ValueError, match="nope") as err:
        make_passes("nope", images(), gen(0))
    assert all(name in str(err.value) for name in TTA_SETTINGS)


@pytest.mark.parametrize("name, params", [
    ("sharpen", {"alpha": -0.1}),
    ("sharpen", {"alpha": 1.5}),
    ("gaussian", {"std": -1.0}),
    ("poisson", {"rate": -0.5}),
    ("random_resized_crop", {"scale": (0.9, 0.1)}),
    ("random_resized_crop", {"ratio": (0.0, 1.0)}),
])
def test_invalid_values_raise(name, params):
    with pytest.raises(ValueError, match=name):
        apply_augment(name, images(), gen(0), **params)


# ---------------------------------------------------------------- noise in normalised units (as the original)

@pytest.mark.parametrize("unit", [(0.3081,), (0.2023, 0.1994, 0.2010)])
def test_gaussian_noise_is_sized_in_the_sources_normalised_units(unit):
    x = torch.full((200, len(unit), 32, 32), 0.5)
    noisy = apply_augment("gaussian", x, gen(3), unit, std=1.0)
    per_channel = (noisy - x).std(dim=(0, 2, 3))
    torch.testing.assert_close(per_channel, torch.tensor(unit), rtol=0.01, atol=0)
    # in the normalised space the expert reads, the noise has std 1: the original's gaussian_1
    normalised = (noisy - x) / torch.tensor(unit).view(1, -1, 1, 1)
    assert normalised.std().item() == pytest.approx(1.0, rel=0.01)
    half = apply_augment("gaussian", x, gen(3), unit, std=0.5)
    torch.testing.assert_close(half - x, 0.5 * (noisy - x))


@pytest.mark.parametrize("unit", [(0.3081,), (0.2023, 0.1994, 0.2010)])
def test_poisson_step_is_one_normalised_unit(unit):
    x = torch.zeros(50, len(unit), 32, 32)
    noisy = apply_augment("poisson", x, gen(4), unit, rate=0.5)
    for c, size in enumerate(unit):
        steps = noisy[:, c].unique()
        torch.testing.assert_close(steps, torch.tensor([0.0, size]))
    share = (noisy > 0).float().mean().item()
    assert share == pytest.approx(1 - math.exp(-0.5), abs=0.01)


def test_noise_without_a_unit_is_in_pixels_and_a_wrong_unit_is_refused():
    x = torch.zeros(100, 1, 32, 32)
    assert (apply_augment("gaussian", x, gen(1), std=1.0)).std().item() == pytest.approx(1.0, rel=0.02)
    with pytest.raises(ValueError, match="channel std"):
        apply_augment("gaussian", x, gen(1), (0.2, 0.2, 0.2), std=1.0)
    assert "unit" not in augment_params("gaussian")  # not a setting a TTA table could set
