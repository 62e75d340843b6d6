"""Tests written to kill real surviving mutants of the core (scripts/mutation.sh; tests/MUTANTS.md lists the rest).

Each test names the mutant class it kills; every expected value is a literal or written out independently of the code.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from mole import LoraPair, MoLEConfig, MoLELayer
from mole.config import GateInit, Gating, GlobalSource
from mole.layers import MoLEGates, is_pointwise, layer_dims
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


# ---------------------------------------------------------------------------------------------------- layers/mole_layer


def _pair(d_in=8, d_out=6, rank=2, alpha=4.0):
    return LoraPair(torch.ones(rank, d_in), torch.ones(d_out, rank), alpha)


@pytest.mark.parametrize(
    "conv,pointwise",
    [
        (nn.Conv2d(4, 5, 1), True),
        (nn.Conv2d(4, 5, 1, padding="valid"), True),
        (nn.Conv2d(4, 5, 3), False),
        (nn.Conv2d(4, 5, (1, 3)), False),
        (nn.Conv2d(4, 5, 1, stride=(1, 2)), False),
        (nn.Conv2d(4, 4, 1, groups=2), False),
        (nn.Conv2d(4, 5, 1, dilation=(1, 2)), False),
        (nn.Conv2d(4, 5, 1, padding=(0, 1)), False),
    ],
)
def test_is_pointwise_needs_every_condition(conv, pointwise):
    # kills: an `and` turned `or`, a tuple compared with the wrong value: a conv that mixes pixels treated as 1x1
    assert is_pointwise(conv) is pointwise
    assert layer_dims(conv) == (conv.in_channels, conv.out_channels)


def test_wrap_errors_name_the_path_the_reason_and_the_fix():
    # kills: the messages losing the path, the offending settings or the fix (a user must know what to change)
    cases = [
        (
            nn.Conv2d(4, 4, 1, groups=2, padding_mode="reflect"),
            "module 'blk.c' is a Conv2d with groups=2, padding_mode='reflect'; MoLE wraps ungrouped, zero-padded "
            "convolutions only. Remove it from the targets.",
        ),
        (
            nn.Embedding(4, 4),
            "module 'blk.c' is a torch.nn.modules.sparse.Embedding; MoLE wraps torch.nn.Linear and torch.nn.Conv2d "
            "only. Remove it from the targets.",
        ),
        (
            nn.Conv2d(4, 4, 3, padding=1),
            "layer 'blk.c': a Conv2d with kernel_size=(3, 3), stride=(1, 1), padding=(1, 1) is spatial; MoLELayer "
            "wraps Linear and pointwise convs, SpatialMoLELayer the others (mole.layers.mole_layer_for picks)",
        ),
    ]
    for module, msg in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
            MoLELayer(module, ["face"], {"face": _pair(4, 4)}, MoLEConfig(), path="blk.c")


def test_a_peft_layer_is_refused_with_the_unload_hint():
    peft_linear = type("Linear", (nn.Linear,), {"__module__": "peft.tuners.lora.layer"})(8, 6)
    msg = (
        "module 'q' is a peft.tuners.lora.layer.Linear (a peft LoRA layer: call unload_lora() / unload() first); "
        "MoLE wraps torch.nn.Linear and torch.nn.Conv2d only. Remove it from the targets."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        MoLELayer(peft_linear, ["face"], {"face": _pair()}, MoLEConfig(), path="q")


@pytest.mark.parametrize(
    "names,experts,msg",
    [
        ([], {}, "layer 'q': a MoLE layer needs at least one expert name"),
        (["face"], {"face": _pair(), "hand": _pair()},
         "layer 'q': experts ['hand'] are not among the layer's expert names ['face']"),
        (["face", "hand"], {"face": None},
         "layer 'q': none of the experts ['face', 'hand'] has weights for this layer"),
        (["face"], {"face": _pair(d_in=9, d_out=7)},
         "layer 'q': expert 'face' has shape (in 9, out 7) but the base layer is (in 8, out 6); "
         "the expert was trained for another model"),
    ],
)  # fmt: skip
def test_expert_set_errors_name_the_layer_and_the_experts(names, experts, msg):
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        MoLELayer(nn.Linear(8, 6), names, experts, MoLEConfig(), path="q")


def test_expert_kernel_mismatch_names_both_kernels():
    locon = LoraPair(torch.ones(2, 4, 3, 3), torch.ones(5, 2), 2.0)
    msg = (
        "layer 'q': expert 'face' has a (3, 3) down kernel but the base layer's kernel is (1, 1); "
        "the expert was trained for another model"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        MoLELayer(nn.Conv2d(4, 5, 1), ["face"], {"face": locon}, MoLEConfig(), path="q")


def test_layer_conveniences_read_the_base_and_the_experts():
    base = nn.Linear(8, 6)
    layer = MoLELayer(base, ["face", "hand"], {"hand": _pair(rank=3, alpha=6.0)}, MoLEConfig(gating="local"), path="q")
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.num_experts == 2 and layer.ranks == (0, 3) and layer.alphas == (0.0, 6.0)
    assert layer.extra_repr() == "experts=[face(r=0), hand(r=3)], gating=local, fused=True"
    assert layer.expert("face") is None
    hand = layer.expert("hand")
    assert hand.rank == 3 and hand.alpha == 6.0 and not hand.conv
    with pytest.raises(KeyError, match=re.escape("layer 'q' has no expert 'eye'; experts are ['face', 'hand']")):
        layer.expert("eye")


def test_input_shape_errors_name_the_layer_and_the_shape():
    conv = MoLELayer(nn.Conv2d(4, 5, 1), ["face"], {"face": _pair(4, 5)}, MoLEConfig(), path="q")
    with pytest.raises(ValueError, match=re.escape("layer 'q': a Conv2d input must be (b, c, h, w), got (2, 4, 3)")):
        conv(torch.zeros(2, 4, 3))
    lin = MoLELayer(nn.Linear(8, 6), ["face"], {"face": _pair()}, MoLEConfig(), path="q")
    with pytest.raises(ValueError, match=re.escape("layer 'q': input must have a batch axis, got shape (8,)")):
        lin(torch.zeros(8))


class _Gates:
    """A recorder that keeps what the layer reports: (local, global) per call."""

    def __init__(self):
        self.calls = []

    def record(self, layer, local, glob, x):
        self.calls.append((local, glob))


@pytest.mark.parametrize("gating", ["global", "local"])
def test_both_paths_report_the_same_gates_with_an_expert_missing_here(gating):
    # kills, in forward_naive: the global gate of an expert without weights here left as None (its gate is
    # sigmoid(bias) alone: no output to pool), and local gates stacked when the layer has none
    torch.manual_seed(0)
    cfg = MoLEConfig(gating=gating, global_source="expert_output")
    layer = MoLELayer(nn.Linear(8, 6), ["face", "hand"], {"face": _pair()}, cfg, path="q")
    with torch.no_grad():
        for p in layer.gates.parameters():
            p.normal_()
    x = torch.randn(2, 5, 8)
    layer.recorder = _Gates()
    for fused in (True, False):
        layer.fused = fused
        layer(x)
    (fused_local, fused_glob), (naive_local, naive_glob) = layer.recorder.calls
    if gating == "global":
        assert fused_local is None and naive_local is None
        torch.testing.assert_close(naive_glob[:, 1], torch.sigmoid(layer.gates.global_bias[1]).expand(2))
        torch.testing.assert_close(naive_glob, fused_glob)
    else:
        assert fused_glob is None and naive_glob is None
        torch.testing.assert_close(naive_local, fused_local)


def test_naive_path_tracks_the_same_output_cosines_as_the_fused_path():
    # kills: the ungated outputs stacked on the wrong axis before the (b, e, e) Gram matrix in forward_naive
    torch.manual_seed(0)
    pairs = {n: LoraPair(torch.randn(2, 8), torch.randn(6, 2), 2.0) for n in ("a", "b", "c")}
    layer = MoLELayer(nn.Linear(8, 6), list(pairs), pairs, MoLEConfig(gating="none"), path="q")
    layer.track_orthogonality = True
    x = torch.randn(2, 5, 8)
    outs = [(x @ p.down.T @ p.up.T * p.scale).flatten(1) for p in pairs.values()]  # (b, n*o), literal E_i(X)
    expected = torch.stack([torch.stack([(outs[i] * outs[j]).sum(1) for j in range(3)], 1) for i in range(3)], 1)
    for fused in (True, False):
        layer.fused = fused
        layer(x)
        torch.testing.assert_close(layer.last_inner, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "gating,d,ranks,tokens,kernel",
    [
        ("global", 24, (8, 8), 64, "merged_per_sample"),  # one coefficient per sample, many tokens
        ("local", 4, (4, 4), 16, "dense_experts"),  # e d o = 32 < R (d + o) = 64: the dense stack is cheaper
    ],
)
def test_inference_runs_the_cheapest_kernel(monkeypatch, gating, d, ranks, tokens, kernel):
    # kills: the kernel choice dropped (every input on the rank-R path: same values, more multiply-adds)
    from mole.layers import mole_layer

    calls = []
    real = getattr(mole_layer, kernel)
    monkeypatch.setattr(mole_layer, kernel, lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    pairs = {f"e{i}": LoraPair(torch.randn(r, d), torch.randn(d, r), 2.0) for i, r in enumerate(ranks)}
    layer = MoLELayer(nn.Linear(d, d), list(pairs), pairs, MoLEConfig(gating=gating), path="q")
    x = torch.randn(2, tokens, d)
    with torch.no_grad():
        fast = layer(x)
        layer.fused = False
        torch.testing.assert_close(fast, layer(x), rtol=1e-4, atol=1e-5)
    assert len(calls) == 1


def test_routing_is_reported_as_the_global_gate_when_the_layer_has_none():
    # kills: the router's per-sample weights not reported in place of a missing global gate (mole inspect of an
    # InstructMoLE model would show no expert weights)
    torch.manual_seed(0)
    pairs = {n: LoraPair(torch.randn(2, 8), torch.randn(6, 2), 2.0) for n in ("a", "b")}
    layer = MoLELayer(nn.Linear(8, 6), list(pairs), pairs, MoLEConfig(gating="none"), path="q")
    w = torch.tensor([[0.7, 0.3], [0.1, 0.9]])
    layer.routing = w
    layer.recorder = _Gates()
    with torch.no_grad():
        layer(torch.randn(2, 5, 8))  # the fast path
        layer.track_orthogonality = True
        layer(torch.randn(2, 5, 8))  # the stacked path
    assert [glob.tolist() for _, glob in layer.recorder.calls] == [w.tolist(), w.tolist()]


# ---------------------------------------------------------------------------------------------------- layers/fused


def test_low_rank_mix_gives_a_shared_coefficient_its_gradient():
    # kills: the gradient of a coefficient shared by the whole batch (shape (1, 1, e)) dropped in the backward
    from mole.layers.fused import LowRankMix

    torch.manual_seed(0)
    x = torch.randn(3, 4, 5)
    A, B = torch.randn(4, 5), torch.randn(6, 4)  # two experts of rank 2
    owner = torch.tensor([0, 0, 1, 1])
    coef = torch.tensor([[[0.5, 2.0]]], requires_grad=True)
    LowRankMix.apply(None, x, A, B, coef, owner, 2, False).sum().backward()
    ref = coef.detach().clone().requires_grad_(True)
    h = x @ A.T  # (b, n, R), the literal formula: sum_i coef_i B_i A_i x
    y = (h[..., :2] * ref[..., :1]) @ B[:, :2].T + (h[..., 2:] * ref[..., 1:]) @ B[:, 2:].T
    y.sum().backward()
    torch.testing.assert_close(coef.grad, ref.grad)


def test_dense_kernel_without_a_base_bias():
    # kills: the base output read from the wrong slot of the dense stack when the base has no bias
    from mole.layers import mole_layer

    calls = []
    real = mole_layer.dense_experts
    torch.manual_seed(0)
    pairs = {f"e{i}": LoraPair(torch.randn(4, 4), torch.randn(4, 4), 2.0) for i in range(2)}
    layer = MoLELayer(nn.Linear(4, 4, bias=False), list(pairs), pairs, MoLEConfig(gating="local"), path="q")
    x = torch.randn(2, 16, 4)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(mole_layer, "dense_experts", lambda *a: calls.append(1) or real(*a))
        fast = layer(x)
        layer.fused = False
        torch.testing.assert_close(fast, layer(x), rtol=1e-4, atol=1e-5)
    assert calls == [1]
