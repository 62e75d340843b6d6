"""Tests written to kill real surviving mutants of the core (scripts/mutation.sh; tests/MUTANTS.md lists the rest).

Each test names the mutant class it kills; every expected value is a literal or written out independently of the code.
"""

from __future__ import annotations

import re

import pytest
import torch

from mole import LoraPair
from mole.config import GateInit, Gating, GlobalSource
from mole.layers import MoLEGates
from mole.training.loss import diffusion_loss, snr

# ---------------------------------------------------------------------------------------------------- training/loss

ALPHAS = torch.tensor([0.9, 0.8, 0.5, 0.2])  # SNR = a / (1 - a): 9, 4, 1, 0.25


def _pred_target():
    """(2, 2, 2, 3) latents; per-sample squared errors written out below."""
    target = torch.linspace(-1.0, 1.0, 24).reshape(2, 2, 2, 3)  # nonzero: pred + target differs from pred - target
    errors = torch.zeros(2, 2, 2, 3)
    errors[0] = torch.arange(12.0).reshape(2, 2, 3)  # errors 0..11: mean square = 506 / 12
    errors[1, 0] = -2.0  # six errors of -2, six of 0: mean square = 24 / 12 = 2
    return target + errors, target


def test_diffusion_loss_plain_mse_is_the_mean_of_per_sample_means():
    # kills: + for -, a power other than 2, a flatten / mean over the wrong dims, a sum for the mean
    pred, target = _pred_target()
    t = torch.tensor([1, 3])
    loss = diffusion_loss(pred, target, t, ALPHAS, "epsilon", None)
    torch.testing.assert_close(loss, torch.tensor((506 / 12 + 2.0) / 2))


@pytest.mark.parametrize(
    "prediction_type,weights",
    [
        ("epsilon", (2 / 4, 0.25 / 0.25)),  # min(SNR, 2) / SNR at SNR 4 and 0.25
        ("v_prediction", (2 / 5, 0.25 / 1.25)),  # min(SNR, 2) / (SNR + 1)
    ],
)
def test_diffusion_loss_min_snr_weights_each_sample(prediction_type, weights):
    # kills: the weighting skipped (is None inverted), / for *, the timesteps or the gamma not passed on
    pred, target = _pred_target()
    t = torch.tensor([1, 3])
    loss = diffusion_loss(pred, target, t, ALPHAS, prediction_type, 2.0)
    torch.testing.assert_close(loss, torch.tensor((506 / 12 * weights[0] + 2.0 * weights[1]) / 2))


def test_diffusion_loss_is_computed_in_fp32_for_half_inputs():
    # kills: the .float() dropped: 300^2 = 90000 overflows fp16 (max 65504) and the loss would be inf
    pred = torch.full((1, 4, 2, 2), 300.0, dtype=torch.float16)
    target = torch.zeros(1, 4, 2, 2, dtype=torch.float16)
    loss = diffusion_loss(pred, target, torch.tensor([0]), ALPHAS, "epsilon", None)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(90000.0))


def test_snr_follows_the_timesteps_device():
    # kills: alphas not moved to the timesteps' device (the scheduler's alphas stay on CPU, timesteps live on the
    # accelerator); the meta device stands in for a second device on a CPU-only machine
    t = torch.tensor([1, 3], device="meta")
    assert snr(ALPHAS, t).device.type == "meta"


# ---------------------------------------------------------------------------------------------------- layers/lora


def test_lora_pair_conv_flag_follows_the_factor_shapes_into_the_file():
    # kills: conv set from `and` / `!=` / a wrong ndim, or dropped: a 1x1-conv expert written back as 2-D factors
    # (a kohya file for a conv layer needs (r, c, 1, 1) / (o, r, 1, 1)), a Linear expert written as 4-D
    conv = LoraPair(torch.ones(2, 5, 1, 1), torch.ones(3, 2, 1, 1), alpha=2.0)
    assert conv.conv and conv.down.shape == (2, 5) and conv.up.shape == (3, 2)
    assert [tuple(f.shape) for f in conv.factors_for_file()] == [(2, 5, 1, 1), (3, 2, 1, 1)]
    linear = LoraPair(torch.ones(2, 5), torch.ones(3, 2), alpha=2.0)
    assert not linear.conv
    assert [tuple(f.shape) for f in linear.factors_for_file()] == [(2, 5), (3, 2)]


def test_lora_pair_delta_weight_is_b_a_alpha_over_r():
    # kills: / for * with the scale, in the Linear and the spatial (LoCon) branch
    down = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])  # (r=2, d_in=3)
    up = torch.tensor([[1.0, 0.0], [2.0, 1.0]])  # (d_out=2, r=2)
    pair = LoraPair(down, up, alpha=8.0)  # alpha / r = 4
    expected = torch.tensor([[1.0, 2.0, 0.0], [2.0, 5.0, -1.0]]) * 4.0  # B A written out
    torch.testing.assert_close(pair.delta_weight(), expected)
    spatial = LoraPair(down.reshape(2, 3, 1, 1).expand(2, 3, 3, 3).clone(), up, alpha=8.0)
    assert spatial.spatial
    torch.testing.assert_close(spatial.delta_weight(), expected[:, :, None, None].expand(2, 3, 3, 3))


def test_lora_pair_shape_errors_name_both_shapes():
    # kills: `or` -> `and` in the ndim check (a 3-D down with a 2-D up was accepted), and the shapes dropped from
    # the messages
    msg = "LoRA factors must be 2-D, 1x1 conv or (for down) a k x k conv kernel; got down (2, 5, 3), up (3, 2)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        LoraPair(torch.zeros(2, 5, 3), torch.zeros(3, 2), alpha=2.0)
    msg = "LoRA rank mismatch: down has rank 4 (shape (4, 8)) but up has rank 3 (shape (6, 3))"
    with pytest.raises(ValueError, match=re.escape(msg)):
        LoraPair(torch.zeros(4, 8), torch.zeros(6, 3), alpha=2.0)


def test_spatial_up_factor_is_refused_with_its_kernel_and_the_rule():
    msg = (
        "up (lora_B / lora_up) is a (3, 3) conv kernel; only the down factor (lora_down / lora_A) of a "
        "LoCon expert may be spatial, the up factor is 1x1"
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        LoraPair(torch.zeros(2, 4, 3, 3), torch.zeros(4, 2, 3, 3), alpha=2.0)


# ---------------------------------------------------------------------------------------------------- layers/gates


@pytest.mark.parametrize("source", [GlobalSource.INPUT, GlobalSource.EXPERT_OUTPUT])
def test_gates_are_created_in_the_requested_dtype(source):
    # kills: dtype / device not passed to the parameters (fp16 gates of an fp16 model would start as fp32)
    gates = MoLEGates(3, 6, 5, Gating.BOTH, source, GateInit.DEFAULT, dtype=torch.float16)
    shapes = {name: (tuple(p.shape), p.dtype) for name, p in gates.named_parameters()}
    dim = 6 if source is GlobalSource.INPUT else 5
    assert shapes == {
        "local_weight": ((3, 6), torch.float16),
        "local_bias": ((3,), torch.float16),
        "global_weight": ((3, dim), torch.float16),
        "global_bias": ((3,), torch.float16),
    }


def test_gates_repr_names_experts_gating_and_source():
    # kills: num_experts / global_source not kept (print(model) is how a user checks what was built)
    gates = MoLEGates(3, 6, 5, Gating.GLOBAL, GlobalSource.EXPERT_OUTPUT)
    assert gates.extra_repr() == "experts=3, gating=global, global_source=expert_output"
    assert gates.num_experts == 3 and gates.global_source is GlobalSource.EXPERT_OUTPUT
