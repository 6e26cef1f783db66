"""Image generator (DAFL, Chen et al. 2019) and a DCGAN-style discriminator, for any channel count."""
from __future__ import annotations

import torch
import torch.nn as nn


class Generator(nn.Module):
    """Noise -> image in the expert's normalised input space.

    Linear(latent -> 128*s*s), BN, upsample, conv3x3 128, BN, LeakyReLU 0.2, upsample, conv3x3 64, BN,
    LeakyReLU, conv3x3 -> C, tanh, BN(affine=False); s = img_size / 4. ``width`` scales the channels
    (128 and 64 in the original) for cheaper CPU profiles. The two BN layers after the convolutions use
    ``bn_eps`` (DAFL's reference: 0.8, which keeps its batch statistics from amplifying noise).
    """

    def __init__(self, latent_dim: int = 100, out_channels: int = 1, img_size: int = 32,
                 width: int = 128, bn_eps: float = 1e-5) -> None:
        super().__init__()
        if img_size % 4:
            raise ValueError(f"img_size must be a multiple of 4, got {img_size}")
        self.latent_dim = latent_dim
        self.init_size = img_size // 4
        self.width = width
        self.project = nn.Linear(latent_dim, width * self.init_size ** 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width, eps=bn_eps), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2, eps=bn_eps), nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, out_channels, 3, padding=1), nn.Tanh(),
            nn.BatchNorm2d(out_channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(len(z), self.width, self.init_size, self.init_size)
        return self.body(x)


class Discriminator(nn.Module):
    """DCGAN-style critic for the real-data GAN option: strided convs C -> 64 -> 128 -> 256, then a logit."""

    def __init__(self, in_channels: int = 1, img_size: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 64, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 4, 2, 1), nn.BatchNorm2d(128), nn.LeakyReLU(0.2),
            nn.Conv2d(128, 256, 4, 2, 1), nn.BatchNorm2d(256), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(256 * (img_size // 8) ** 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)
