"""SNGAN discriminators for CIFAR-10 (Miyato et al. 2018): the ResNet (pfnet-research/
sngan_projection snresnet_32, ch=128; its 11 weights are the `sngan_cifar_d` set) and the
standard CNN (7 convolutions + 1 linear; benchmarks/compile_step.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OptimizedBlock(nn.Module):
    """First block: conv-relu-conv-pool, shortcut pool-conv1x1."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.sc = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.sc(F.avg_pool2d(x, 2))


class Block(nn.Module):
    """Pre-activation residual block, optionally downsampling (then with a 1x1 shortcut)."""

    def __init__(self, ch: int, downsample: bool):
        super().__init__()
        self.downsample = downsample
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.sc = nn.Conv2d(ch, ch, 1) if downsample else None

    def forward(self, x):
        h = self.c2(F.relu(self.c1(F.relu(x))))
        if self.downsample:
            return F.avg_pool2d(h, 2) + F.avg_pool2d(self.sc(x), 2)
        return h + x


class SNGANDiscriminator(nn.Module):
    """Unconditional SNGAN ResNet discriminator for 32x32 images (no SN applied here)."""

    def __init__(self, ch: int = 128):
        super().__init__()
        self.block1 = OptimizedBlock(3, ch)
        self.block2 = Block(ch, downsample=True)
        self.block3 = Block(ch, downsample=False)
        self.block4 = Block(ch, downsample=False)
        self.l5 = nn.Linear(ch, 1)

    def forward(self, x):
        h = self.block4(self.block3(self.block2(self.block1(x))))
        return self.l5(F.relu(h).sum(dim=(2, 3)))


class SNGANCNNDiscriminator(nn.Module):
    """The SNGAN "standard CNN" discriminator for 32x32 images (Miyato et al. 2018, table 3b):
    7 convolutions (3x3 stride 1, 4x4 stride 2, alternating; 64-128-256-512 channels),
    LeakyReLU 0.1, one linear layer (no SN applied here)."""

    def __init__(self):
        super().__init__()
        spec = [(3, 64, 3, 1), (64, 64, 4, 2), (64, 128, 3, 1), (128, 128, 4, 2), (128, 256, 3, 1),
                (256, 256, 4, 2), (256, 512, 3, 1)]
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, k, s, padding=1) for cin, cout, k, s in spec)
        self.l8 = nn.Linear(512 * 4 * 4, 1)

    def forward(self, x):
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
        return self.l8(x.flatten(1))


def hinge_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss."""
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
