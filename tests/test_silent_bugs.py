"""Tests for bug classes that once passed every other test (issue 27). References are literal, not the package's."""

from __future__ import annotations

import math

import pytest
import torch

from mole.config import Gating, GlobalSource
from mole.layers import MoLEGates


def test_gate_default_init_is_uniform_within_one_over_sqrt_fan_in():
    # bug targeted: bound 1/fan_in (or 1/d_out) instead of 1/sqrt(fan_in)
    torch.manual_seed(0)
    fan_in, experts = 1024, 64
    gates = MoLEGates(experts, fan_in, 512, Gating.BOTH, GlobalSource.INPUT)
    bound = 1.0 / math.sqrt(fan_in)  # = 1/32; 1/fan_in would be 1/1024
    for w in (gates.local_weight, gates.global_weight):
        assert w.shape == (experts, fan_in)
        assert w.abs().max().item() <= bound
        assert w.abs().max().item() > 0.99 * bound  # 65536 draws reach the bound
        # U(-b, b) has std b/sqrt(3); 65536 samples: relative error of the std ~ 0.3 %
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.02 * bound / math.sqrt(3)
    for b in (gates.local_bias, gates.global_bias):
        assert b.abs().max().item() <= bound
        assert b.abs().max().item() > 0.5 * bound  # 64 draws: P(all within half the bound) = 2^-64


def test_kohya_writer_keys_and_shapes_read_literally(tmp_path):
    # bug targeted: lora_down / lora_up swapped in the kohya writer. The second reader is safetensors itself:
    # kohya's lora_down.weight is A (rank, d_in), lora_up.weight is B (d_out, rank), alpha a scalar.
    from safetensors.torch import load_file

    from mole import ExpertWeights, LoraPair, save_expert

    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, 24, generator=g), torch.randn(40, 4, generator=g)
    expert = ExpertWeights("face", {"down_blocks.0.attn.to_q": LoraPair(down, up, alpha=2.0)})
    sd = load_file(str(save_expert(expert, tmp_path / "face.safetensors", fmt="kohya")))
    flat = "lora_unet_down_blocks_0_attn_to_q"
    assert set(sd) == {f"{flat}.lora_down.weight", f"{flat}.lora_up.weight", f"{flat}.alpha"}
    assert sd[f"{flat}.lora_down.weight"].shape == (4, 24) and sd[f"{flat}.lora_up.weight"].shape == (40, 4)
    torch.testing.assert_close(sd[f"{flat}.lora_down.weight"].float(), down)
    torch.testing.assert_close(sd[f"{flat}.lora_up.weight"].float(), up)
    assert float(sd[f"{flat}.alpha"]) == 2.0
    # the delta a kohya reader builds, up @ down * alpha / rank, written out literally
    delta = sd[f"{flat}.lora_up.weight"].float() @ sd[f"{flat}.lora_down.weight"].float() * (2.0 / 4)
    torch.testing.assert_close(delta, up @ down * 0.5)


@pytest.mark.parametrize("rank", [4, 9])  # 9: r / 2 != sqrt(r), so alpha * r * 0.5 fails too
def test_peft_rslora_adapter_file_matches_peft_output(tmp_path, rank):
    # bug targeted: rsLoRA read with the wrong scale (peft's is alpha / sqrt(r)). Reference: peft's own model output.
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from mole import MoLEConfig, inject_mole, load_expert

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20))
    ref = get_peft_model(
        nn.Sequential(nn.Linear(12, 20)), LoraConfig(r=rank, lora_alpha=8, target_modules=["0"], use_rslora=True)
    )
    ref.base_model.model[0].base_layer.load_state_dict(base[0].state_dict())
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    ref.save_pretrained(tmp_path / "adapter")
    x = torch.randn(3, 12)
    expected = ref(x)
    expert = load_expert(tmp_path / "adapter", "face")
    inject_mole(base, [expert], MoLEConfig(gating="none", targets=["0"]))
    torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-6)
    # the adapter is not a no-op (peft scale 8/sqrt(r): 4 at r=4; a reader using alpha/r or alpha/r^1.5 fails above)
    delta = (expected - ref.base_model.model[0].base_layer(x)).detach()
    assert delta.abs().max() > 0
