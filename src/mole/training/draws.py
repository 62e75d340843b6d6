"""Per-sample random draws: the same model on any number of processes.

Every random draw of a training step (noise, noise offset, timestep, the VAE posterior sample) comes from a
torch.Generator of its own per sample, seeded by (run seed, stream, epoch, dataset index): the sample's place in
the global sample stream, never the process rank, the process count, the micro-batch it landed in or global RNG
state. So 1 process x 4 images and 2 processes x 2 images (or batch 2 vs batch 1 x 2 accumulation steps) draw the
same numbers for the same samples, and a resumed run replays them.

    noise, t = sample_noise(seed, keys, (c, h, w), num_timesteps, noise_offset)   keys: [(epoch, index), ...]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_M64 = (1 << 64) - 1

# streams: independent draws of one sample
NOISE = 1  # noise, noise offset, timestep
VAE = 2  # the VAE posterior sample of the sample's latent
PROBE = 3  # the fixed noise of the before / after probe
ROUTER = 4  # InstructMoLE's router logit noise (training)


def mix(*values: int) -> int:
    """splitmix64 over the integers: a 63-bit seed, the same in every process, machine and Python run (unlike
    hash() of strings). torch's CPU generator (mt19937) keeps its low 32 bits, which are as well mixed."""
    x = 0
    for v in values:
        x = (x + (int(v) & _M64) + 0x9E3779B97F4A7C15) & _M64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def sample_generators(seed: int, keys: Sequence[tuple[int, int]], stream: int) -> list[torch.Generator]:
    """One CPU generator per sample key (epoch, dataset index)."""
    return [torch.Generator().manual_seed(mix(seed, stream, epoch, index)) for epoch, index in keys]


def sample_noise(seed: int, keys: Sequence[tuple[int, int]], shape: Sequence[int], num_timesteps: int,
                 noise_offset: float = 0.0, stream: int = NOISE) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(noise (b, *shape) float32, timesteps (b,) int64) on the CPU, row i drawn from sample keys[i] alone:
    noise ~ N(0, I) (+ noise_offset * N(0, 1) per channel), t ~ U{0..num_timesteps-1}."""
    noises, ts = [], []
    for g in sample_generators(seed, keys, stream):
        n = torch.randn(tuple(shape), generator=g)
        if noise_offset:
            n = n + noise_offset * torch.randn(shape[0], *([1] * (len(shape) - 1)), generator=g)
        noises.append(n)
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
    return torch.stack(noises), torch.cat(ts)
