"""A small SN-GAN on a 2-D mixture of 8 Gaussians, on the CPU in about a minute.

Hinge loss (as in Miyato et al. 2018), a spectrally normalized MLP discriminator,
sigma of every layer logged with ``sn_kernels.sigmas``.  Writes a PNG with the
samples and the sigma traces, and checks at the end that every layer's normalized
weight has spectral norm ~1 (by SVD).

    python examples/sngan_toy.py [--steps 3000] [--out examples/sngan_toy.png]
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch import nn

import sn_kernels


def real_batch(n: int, gen: torch.Generator) -> torch.Tensor:
    """8 Gaussians on a circle of radius 2, std 0.05."""
    k = torch.randint(0, 8, (n,), generator=gen)
    angle = k.float() * (2 * math.pi / 8)
    centers = torch.stack([angle.cos(), angle.sin()], dim=1) * 2
    return centers + 0.05 * torch.randn(n, 2, generator=gen)


def progress(step: int, total: int, text: str) -> None:
    filled = int(30 * step / total)
    sys.stdout.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {step}/{total} {text}")
    sys.stdout.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default="examples/sngan_toy.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.05, help="largest accepted | |W/sigma|_2 - 1 |")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    G = nn.Sequential(nn.Linear(2, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))
    D = nn.Sequential(nn.Linear(2, 128), nn.LeakyReLU(0.1), nn.Linear(128, 128), nn.LeakyReLU(0.1),
                      nn.Linear(128, 1))
    sn_kernels.apply_spectral_norm(D)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.9))

    trace_steps, sigma_trace, ratio_trace = [], {}, {}
    t0 = time.time()
    for step in range(1, args.steps + 1):
        real = real_batch(args.batch, gen)
        fake = G(torch.randn(args.batch, 2, generator=gen))
        opt_d.zero_grad()
        loss_d = torch.relu(1 - D(real)).mean() + torch.relu(1 + D(fake.detach())).mean()
        loss_d.backward()
        opt_d.step()

        opt_g.zero_grad()
        loss_g = -D(fake).mean()
        loss_g.backward()
        opt_g.step()

        if step % 25 == 0 or step == args.steps:  # log every 25 steps
            trace_steps.append(step)
            for name, sigma in sn_kernels.sigmas(D).items():
                sigma_trace.setdefault(name, []).append(sigma.item())
                w = dict(D.named_parameters())[name + "_orig"].detach()
                # spectral norm of the normalized weight W/sigma: should stay near 1
                ratio_trace.setdefault(name, []).append((torch.linalg.matrix_norm(w, ord=2) / sigma).item())
            progress(step, args.steps, f"loss_d {loss_d.item():.3f} loss_g {loss_g.item():.3f} "
                                       f"{time.time() - t0:.0f}s")
    print()

    with torch.no_grad():
        D.eval()
        worst = 0.0
        for name, module in ((n, m) for n, m in D.named_modules() if sn_kernels.is_spectral_normalized(m)):
            D(torch.zeros(1, 2))  # eval forward sets module.weight = W / sigma without updating u, v
            norm = torch.linalg.matrix_norm(module.weight.detach().double(), ord=2).item()
            worst = max(worst, abs(norm - 1))
            print(f"layer {name}: |W/sigma|_2 = {norm:.5f} (SVD)")
        samples = G(torch.randn(2000, 2, generator=gen))
    plot(args.out, real_batch(2000, gen), samples, trace_steps, sigma_trace, ratio_trace)
    print(f"wrote {args.out}; worst deviation of |W/sigma|_2 from 1: {worst:.2e}")
    return 0 if worst < args.tolerance else 1


def plot(path, real, fake, steps, sigma_trace, ratio_trace):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].scatter(real[:, 0], real[:, 1], s=2, alpha=0.4, label="real")
    axes[0].scatter(fake[:, 0], fake[:, 1], s=2, alpha=0.4, label="generated")
    axes[0].set_title("8 Gaussians: samples")
    axes[0].legend(markerscale=5)
    axes[0].set_aspect("equal")
    for name, ys in sigma_trace.items():
        axes[1].plot(steps, ys, label=name)
    axes[1].set_title("sigma estimate per layer (sn_kernels.sigmas)")
    axes[1].set_xlabel("step")
    axes[1].legend()
    for name, ys in ratio_trace.items():
        axes[2].plot(steps, ys, label=name)
    axes[2].axhline(1, color="k", lw=0.5)
    axes[2].set_ylim(0.9, 1.1)
    axes[2].set_title("|W / sigma|_2 by SVD")
    axes[2].set_xlabel("step")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
