"""The same model on any number of processes: per-sample draws, seeded inits, identical runs (issue 20 target 2)."""

from __future__ import annotations

import torch

from mole.data import StepBatchSampler
from mole.training.draws import NOISE, VAE, mix, sample_generators, sample_noise


def _keys(sampler: StepBatchSampler, micro_step: int) -> list[tuple[int, int]]:
    return [(epoch, index) for index, epoch in sampler.batch(micro_step)]


def test_draws_of_a_step_do_not_depend_on_the_split_over_processes_or_micro_batches():
    n, seed, shape = 10, 3, (4, 8, 8)
    one = StepBatchSampler(n, 4, 1, 0, seed)
    two = [StepBatchSampler(n, 2, 2, r, seed) for r in range(2)]
    accum = StepBatchSampler(n, 1, 1, 0, seed)  # batch 1, 4 micro-steps per optimizer step
    for step in range(4):  # crosses an epoch boundary (10 samples, 4 per step)
        keys = _keys(one, step)
        assert keys == _keys(two[0], step) + _keys(two[1], step)
        assert keys == [k for m in range(4 * step, 4 * step + 4) for k in _keys(accum, m)]
        noise, t = sample_noise(seed, keys, shape, 1000, noise_offset=0.1)
        assert noise.shape == (4, *shape) and t.shape == (4,)
        parts = [sample_noise(seed, _keys(s, step), shape, 1000, noise_offset=0.1) for s in two]
        assert torch.equal(noise, torch.cat([p[0] for p in parts])) and torch.equal(t, torch.cat([p[1] for p in parts]))
        singles = [sample_noise(seed, [k], shape, 1000, noise_offset=0.1) for k in keys]
        assert torch.equal(noise, torch.cat([p[0] for p in singles]))
        assert torch.equal(t, torch.cat([p[1] for p in singles]))


def test_draws_are_keyed_by_seed_and_sample_not_by_global_rng():
    keys = [(0, 1), (0, 2), (1, 1)]
    torch.manual_seed(0)
    a = sample_noise(5, keys, (2, 4, 4), 1000)
    torch.manual_seed(1)
    b = sample_noise(5, keys, (2, 4, 4), 1000)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # every sample, epoch and seed gets its own noise; the same image in the next epoch gets new noise
    c = sample_noise(6, keys, (2, 4, 4), 1000)
    rows = torch.cat([a[0], c[0]]).flatten(1)
    assert torch.cdist(rows, rows).add(torch.eye(6) * 1e9).min() > 1.0
    assert a[1].unique().numel() == 3 and 0 <= int(a[1].min()) and int(a[1].max()) < 1000
    # noise and the VAE posterior sample are separate streams
    g_noise, g_vae = sample_generators(5, keys[:1], NOISE)[0], sample_generators(5, keys[:1], VAE)[0]
    assert not torch.equal(torch.randn(8, generator=g_noise), torch.randn(8, generator=g_vae))
    assert mix(1, 2) != mix(2, 1) and mix(0) != mix(0, 0) and 0 <= mix(2**70, -1) < 2**63
