"""Test-time augmentations as batched tensor ops, and the paper's ten multi-pass settings.

Every augmentation takes a float batch ``x`` of [0,1] images, shape [N, C, H, W], and a
``torch.Generator`` on x's device, and returns a tensor of the same shape on the same device
(``identity`` returns x itself; ``random_resized_crop`` returns size x size images).
Augmentations are applied before any per-expert normalisation, so every expert sees the same image.

The noises are sized in the image's own *normalised* units, as the original added them to normalised
tensors: ``unit`` is the per-channel std of the image's source dataset (MNIST 0.3081, CIFAR-10 about 0.2),
so Gaussian noise of std s adds s x unit_c on [0,1] pixels of channel c, and the Poisson step is unit_c.
"""

import inspect
import math
from typing import Any, Callable

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf
from torch import Tensor


def identity(x: Tensor, generator: torch.Generator) -> Tensor:
    """Return x unchanged (the same tensor, not a copy)."""
    return x


def sharpen(x: Tensor, generator: torch.Generator, alpha: float = 0.5) -> Tensor:
    """imgaug-style sharpening (lightness 1), blended with the identity by ``alpha``.

    The kernel is (1-alpha)*K_identity + alpha*K_effect with
    K_effect = [[-1,-1,-1],[-1,9,-1],[-1,-1,-1]], applied per channel with reflect padding
    (imgaug convolves with OpenCV's default border, which is reflect-101, i.e. torch's "reflect"),
    then clamped to [0,1]. The original code ignored alpha; here alpha=0 returns x.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"sharpen: alpha must be in [0, 1], got {alpha}")
    # (1-a)*I + a*E == I + a*(E - I), and E - I (8 in the centre, -1 around) is 9*x minus the 3x3 box
    # sum: a box filter (avg_pool2d) is exact, keeps alpha=0 exact, and is several times faster on
    # CPU than a depthwise convolution.
    padded = nnf.pad(x, (1, 1, 1, 1), mode="reflect")
    detail = 9.0 * (x - nnf.avg_pool2d(padded, kernel_size=3, stride=1))
    return (x + alpha * detail).clamp(0.0, 1.0)


def _channel_unit(x: Tensor, unit: tuple[float, ...] | None) -> Tensor | float:
    """The size of one normalised unit per channel of x, as [1, C, 1, 1] (None: one pixel unit)."""
    if unit is None:
        return 1.0
    if len(unit) != x.shape[1]:
        raise ValueError(f"noise unit has {len(unit)} channel std(s) for {x.shape[1]}-channel images")
    return torch.tensor(unit, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)


def gaussian(x: Tensor, generator: torch.Generator, std: float = 1.0,
             unit: tuple[float, ...] | None = None) -> Tensor:
    """Add N(0, std^2) noise per pixel in normalised units, without clamping (as the original).

    ``unit``: the per-channel std of the image's source; the noise on [0,1] pixels of channel c has std
    std x unit[c], which is std in the source's normalised units (None: pixel units)."""
    if std < 0:
        raise ValueError(f"gaussian: std must be >= 0, got {std}")
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + (std * _channel_unit(x, unit)) * noise


def poisson(x: Tensor, generator: torch.Generator, rate: float = 0.5,
            unit: tuple[float, ...] | None = None) -> Tensor:
    """Add clamp(Poisson(rate), 0, 1) per pixel in normalised units, without clamping the result (as the
    original): a step of unit[c] on [0,1] pixels of channel c (None: a step of 1).

    Poisson samples are integers, so each pixel gets +1 with probability 1 - exp(-rate), else 0;
    drawing that Bernoulli directly is the same distribution and much cheaper than torch.poisson.
    """
    if rate < 0:
        raise ValueError(f"poisson: rate must be >= 0, got {rate}")
    uniform = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + (uniform < -math.expm1(-rate)).to(x.dtype) * _channel_unit(x, unit)


def hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Flip left-right."""
    return tvf.horizontal_flip(x)


def vflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Flip top-bottom."""
    return tvf.vertical_flip(x)


def random_resized_crop(
    x: Tensor,
    generator: torch.Generator,
    size: int = 32,
    scale: tuple = (0.08, 1.0),
    ratio: tuple = (3 / 4, 4 / 3),
) -> Tensor:
    """A different random crop per image, resized bilinearly to size x size.

    Crop boxes are sampled like torchvision's RandomResizedCrop: area fraction uniform in
    ``scale``, aspect ratio log-uniform in ``ratio``, integer width/height, position uniform.
    Output shape is [N, C, size, size] (the input shape when size equals H = W).
    """
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"random_resized_crop: need 0 < scale[0] <= scale[1], got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"random_resized_crop: need 0 < ratio[0] <= ratio[1], got {ratio}")
    n, c, height, width = x.shape

    def uniform(low: float, high: float) -> Tensor:
        u = torch.rand(n, generator=generator, dtype=x.dtype, device=x.device)
        return low + (high - low) * u

    area = height * width * uniform(scale[0], scale[1])
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    # torchvision redraws up to 10 times when a box does not fit, then falls back to a centre
    # crop. Clipping the box to the image instead keeps this one vectorised draw per image; it
    # only shifts the distribution for large areas at extreme aspect ratios.
    crop_w = torch.sqrt(area * aspect).round().clamp(1, width)
    crop_h = torch.sqrt(area / aspect).round().clamp(1, height)
    # The clamp guards against u * (k + 1) rounding up to k + 1 in low precision.
    left = torch.floor(uniform(0.0, 1.0) * (width - crop_w + 1)).clamp(max=width - crop_w)
    top = torch.floor(uniform(0.0, 1.0) * (height - crop_h + 1)).clamp(max=height - crop_h)

    # Map output coordinates in [-1, 1] to the crop box in the input's normalised coordinates
    # (align_corners=False: -1 and 1 are the outer pixel edges), so the box edges land exactly
    # on pixel edges and an integer box of the output size reproduces its pixels.
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = crop_w / width
    theta[:, 0, 2] = (2 * left + crop_w) / width - 1
    theta[:, 1, 1] = crop_h / height
    theta[:, 1, 2] = (2 * top + crop_h) / height - 1
    grid = nnf.affine_grid(theta, [n, c, size, size], align_corners=False)
    return nnf.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


AUGMENTS: dict[str, Callable[..., Tensor]] = {
    "identity": identity,
    "sharpen": sharpen,
    "gaussian": gaussian,
    "poisson": poisson,
    "hflip": hflip,
    "vflip": vflip,
    "random_resized_crop": random_resized_crop,
}


def _lookup(name: str, table: dict[str, Any], kind: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choices: {', '.join(sorted(table))}")
    return table[name]


def augment_params(name: str) -> dict[str, Any]:
    """Keyword parameters of augmentation ``name`` and their defaults (not x, generator or the noise unit)."""
    fn = _lookup(name, AUGMENTS, "augmentation")
    params = list(inspect.signature(fn).parameters.values())[2:]
    return {p.name: p.default for p in params if p.name != "unit"}


def apply_augment(name: str, x: Tensor, generator: torch.Generator, unit: tuple[float, ...] | None = None,
                  **params: Any) -> Tensor:
    """Apply augmentation ``name`` to x, checking that every keyword is one it accepts. ``unit`` (the
    per-channel std of x's source dataset) sizes the noises in normalised units; others ignore it."""
    fn = _lookup(name, AUGMENTS, "augmentation")
    valid = augment_params(name)
    for key in params:
        if key not in valid:
            choices = ", ".join(valid) or "none"
            raise ValueError(
                f"unknown parameter {key!r} for augmentation {name!r}; valid: {choices}"
            )
    if "unit" in inspect.signature(fn).parameters:
        params["unit"] = unit
    return fn(x, generator, **params)


# Each setting lists the augmented copies made in addition to the original pass (pass 0).
TTA_SETTINGS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "sharpen_1": [("sharpen", {"alpha": 0.5})],
    "sharpen_sweep": [("sharpen", {"alpha": a}) for a in (0.1, 0.3, 0.5, 0.7, 0.9)],
    "gaussian_1": [("gaussian", {"std": 1.0})],
    "gaussian_5": [("gaussian", {"std": 1.0}) for _ in range(5)],
    "gaussian_sweep": [("gaussian", {"std": s}) for s in (0.05, 0.1, 0.3, 0.5, 0.7, 1.0)],
    "poisson_1": [("poisson", {"rate": 0.5})],
    "poisson_5": [("poisson", {"rate": 0.5}) for _ in range(5)],
    "poisson_sweep": [("poisson", {"rate": r}) for r in (0.05, 0.1, 0.3, 0.5, 0.7, 1.0)],
    "flips": [("hflip", {}), ("vflip", {})],
    "random_resized_crop": [("random_resized_crop", {"size": 32})],
}


def make_passes(setting: str, x: Tensor, generator: torch.Generator,
                unit: tuple[float, ...] | None = None) -> list[Tensor]:
    """[x] followed by the setting's augmented copies, in order (noises in units of ``unit``).

    Copies draw from ``generator`` one after another, so repeated entries get different noise.
    """
    copies = _lookup(setting, TTA_SETTINGS, "TTA setting")
    return [x] + [apply_augment(name, x, generator, unit, **params) for name, params in copies]
