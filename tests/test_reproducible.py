"""The same model on any number of processes: per-sample draws, seeded inits, identical runs (issue 20 target 2)."""

from __future__ import annotations

import pytest
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


# ---------------------------------------------------------------------------------------------------- inits
def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _gates_after_inject(seed: int, global_seed: int) -> dict[str, torch.Tensor]:
    from mole import gate_parameters, inject_mole
    from mole.tiny import random_expert, tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet("sd15")
    experts = [random_expert(unet, "face", rank=2, seed=1), random_expert(unet, "hand", rank=2, seed=2)]
    torch.manual_seed(global_seed)
    inject_mole(unet, experts, seed=seed)
    names = {id(p): n for n, p in unet.named_parameters()}
    return {names[id(p)]: p.detach().clone() for p in gate_parameters(unet)}


def test_stage3_gate_init_is_a_function_of_the_run_seed():
    a, b, c = _gates_after_inject(3, 1), _gates_after_inject(3, 2), _gates_after_inject(4, 1)
    assert a.keys() == b.keys() == c.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)  # global RNG state does not enter
    assert all(not torch.equal(a[k], c[k]) for k in a)  # the run seed does, in every layer


@pytest.mark.parametrize("variant", ["official", "package"])
def test_instruct_mole_inits_are_seeded(variant):
    from mole.instruct import InstructConfig, InstructMoLE
    from mole.tiny import tiny_pixart

    def build(seed: int, global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        t = tiny_pixart()
        cfg = InstructConfig(variant=variant, num_experts=3, rank=2, top_k=2, condition_types=["pose"])
        torch.manual_seed(global_seed)
        im = InstructMoLE(t, cfg, text_dim=32, seed=seed)
        after = torch.rand(4)  # the global RNG moved on as without the seeded inits
        return {**_state(im), **{f"unet.{k}": v for k, v in _state(t).items() if "lora" in k}}, after

    (a, ra), (b, rb), (c, _) = build(5, 1), build(5, 2), build(6, 1)
    router = [k for k in a if k.startswith(("router.", "conditions."))]
    assert any("gates" in k for k in router) and (variant == "package" or any("resampler" in k for k in router))
    assert any("type_embedding" in k for k in router)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    changed = [k for k in router if a[k].std() > 0 and not torch.equal(a[k], c[k])]
    assert set(changed) == {k for k in router if a[k].std() > 0}  # every random init follows the seed
    assert not torch.equal(ra, rb)  # the global RNG was left where it was


def test_router_noise_is_per_sample_when_seeded():
    from mole.instruct import TopKGate

    gate = TopKGate(8, num_experts=4, top_k=2).train()
    h = torch.randn(4, 3, 8)  # 4 samples x 3 tokens
    gate.noise_seeds = [11, 12, 13, 14]
    torch.manual_seed(0)
    _, w_all, _ = gate(h)
    torch.manual_seed(1)
    parts = []
    for i in range(0, 4, 2):  # the same samples split over two processes
        gate.noise_seeds = [11, 12, 13, 14][i : i + 2]
        parts.append(gate(h[i : i + 2])[1])
    assert torch.equal(w_all, torch.cat(parts))
    gate.noise_seeds = None
    torch.manual_seed(0)
    _, w_global, _ = gate(h)
    assert not torch.equal(w_global, w_all)
    gate.noise_seeds = [1, 2, 3, 4, 5]  # 12 rows do not split over 5 samples
    with pytest.raises(ValueError, match="noise seeds"):
        gate(h)
