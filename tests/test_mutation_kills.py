"""Tests written to kill real surviving mutants of the core (scripts/mutation.sh; tests/MUTANTS.md lists the rest).

Each test names the mutant class it kills; every expected value is a literal or written out independently of the code.
"""

from __future__ import annotations

import copy
import re
import zlib

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


def _stage_model(base, pairs, cfg, recipe, seed=0):
    """base in bf16 with the experts injected, then a stage's fp32 recipe on top (src/mole/training/stages.py):
    'gates': the gates trained in fp32 (stage 3); 'router': also an fp32 router's weights (stage 4, InstructMoLE);
    'experts': fp32 expert factors, frozen. The gates are set to random values (still in their dtype)."""
    from mole import ExpertWeights, gate_parameters, inject_mole
    from mole.inject import expert_parameters

    model = nn.Sequential(base.to(torch.bfloat16))
    experts = [ExpertWeights(n, {"0": p}) for n, p in pairs.items()]
    inject_mole(model, experts, cfg, seed=seed)
    for p in gate_parameters(model) if recipe in ("gates", "router") else expert_parameters(model):
        p.data = p.data.float()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model[0].gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _linear_literal(layer, pairs, x, routing=None):
    """F(X) + sum_i r_i g_i E_i(X * s_i) in fp32 from the layer's weights, E_i = B_i A_i alpha_i / r_i written out."""
    tokens = x.float()
    base, gates = layer.base, layer.gates
    out = tokens @ base.weight.float().t() + base.bias.float()
    for i, name in enumerate(layer.expert_names):
        pair = pairs[name]
        a, b = pair.down.to(torch.bfloat16).float(), pair.up.to(torch.bfloat16).float()  # as the bf16 base holds them
        s = torch.ones(tokens.shape[:2])
        g = torch.ones(tokens.shape[0])
        if layer.gating in (Gating.LOCAL, Gating.BOTH):
            s = torch.sigmoid(tokens @ gates.local_weight[i].float() + gates.local_bias[i].float())
        if layer.gating in (Gating.GLOBAL, Gating.BOTH):
            g = torch.sigmoid(tokens.mean(1) @ gates.global_weight[i].float() + gates.global_bias[i].float())
        if routing is not None:
            g = g * routing[:, i]
        out = out + ((tokens * s[..., None]) @ a.t() @ b.t()) * (pair.alpha / pair.rank) * g[:, None, None]
    return out


@pytest.mark.parametrize("gating", ["both", "global", "local", "none"])
@pytest.mark.parametrize("recipe", ["gates", "router", "experts"])
def test_bf16_linear_layer_with_fp32_gates_router_or_experts_is_the_literal_formula(gating, recipe):
    # kills: the casts to the input's dtype dropped (`dtype = None` in _coefficients: an fp32 gate projection or
    # coefficient meets bf16 tokens, RuntimeError), the merged kernel given fp32 factors (`lora_B.to(None)`)
    torch.manual_seed(0)
    d, ranks, n = 24, (8, 8), 64  # global gating at 64 tokens runs the merged kernel (one coefficient per sample)
    g = torch.Generator().manual_seed(3)
    pairs = {f"e{i}": LoraPair(torch.randn(r, d, generator=g) * 0.3, torch.randn(d, r, generator=g) * 0.3,
                               alpha=2.0 + i) for i, r in enumerate(ranks)}  # fmt: skip
    model = _stage_model(nn.Linear(d, d), pairs, MoLEConfig(gating=gating, targets=["0"]), recipe)
    layer = model[0]
    routing = torch.tensor([[0.7, 0.3], [0.2, 1.1]]) if recipe == "router" else None
    layer.routing = routing
    x = torch.randn(2, n, d).bfloat16()
    want = _linear_literal(layer, pairs, x, routing)
    for fused in (True, False):
        layer.fused = fused
        for grad in (False, True):  # inference kernels, and the training path (the gates require grad)
            with torch.set_grad_enabled(grad):
                y = model(x)
            assert y.dtype == torch.bfloat16, (fused, grad)
            torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=3e-2)


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


# ---------------------------------------------------------------------------------------------------- formats/kohya


@pytest.mark.parametrize(
    "sgm,lpb,diffusers",
    [
        ("input_blocks_0_0_conv", 2, "input_blocks_0_0_conv"),  # conv_in: no SGM block, passes through
        ("input_blocks_1_0_in_layers_2", 2, "down_blocks_0_resnets_0_conv1"),
        ("input_blocks_2_0_out_layers_3", 2, "down_blocks_0_resnets_1_conv2"),
        ("input_blocks_4_0_emb_layers_1", 2, "down_blocks_1_resnets_0_time_emb_proj"),
        ("input_blocks_4_0_skip_connection", 2, "down_blocks_1_resnets_0_conv_shortcut"),
        ("input_blocks_1_0_in_layers_0", 2, "input_blocks_1_0_in_layers_0"),  # a norm: no diffusers LoRA target
        ("input_blocks_2_1_proj_in", 2, "down_blocks_0_attentions_1_proj_in"),
        ("input_blocks_1_2_proj_in", 2, "input_blocks_1_2_proj_in"),  # no third submodule in a down layer
        ("input_blocks_3_0_op", 2, "down_blocks_0_downsamplers_0_conv"),
        ("input_blocks_6_0_op", 2, "down_blocks_1_downsamplers_0_conv"),
        ("input_blocks_3_1_op", 2, "input_blocks_3_1_op"),  # the downsampler slot holds only 0_op
        ("input_blocks_3_0_conv", 2, "input_blocks_3_0_conv"),
        ("input_blocks_2_0_op", 1, "down_blocks_0_downsamplers_0_conv"),  # layers_per_block 1: every 2nd slot
        ("input_blocks_3_1_proj_in", 1, "down_blocks_1_attentions_0_proj_in"),
        ("output_blocks_0_0_in_layers_2", 2, "up_blocks_0_resnets_0_conv1"),
        ("output_blocks_3_0_in_layers_2", 2, "up_blocks_1_resnets_0_conv1"),
        ("output_blocks_4_1_proj_in", 2, "up_blocks_1_attentions_1_proj_in"),
        ("output_blocks_2_2_conv", 2, "up_blocks_0_upsamplers_0_conv"),
        ("output_blocks_5_1_conv", 2, "up_blocks_1_upsamplers_0_conv"),  # a block without attention
        ("output_blocks_0_0_conv", 2, "output_blocks_0_0_conv"),  # sub 0 "conv" is no upsampler
        ("output_blocks_1_3_proj_in", 2, "output_blocks_1_3_proj_in"),
        ("output_blocks_3_0_in_layers_2", 1, "up_blocks_1_resnets_1_conv1"),
        ("middle_block_0_in_layers_2", 2, "mid_block_resnets_0_conv1"),
        ("middle_block_2_out_layers_3", 2, "mid_block_resnets_1_conv2"),
        ("middle_block_1_proj_in", 2, "mid_block_attentions_0_proj_in"),
        ("middle_block_3_in_layers_2", 2, "middle_block_3_in_layers_2"),  # the mid block has submodules 0, 1, 2
        ("middle_block_0_in_layers_0", 2, "middle_block_0_in_layers_0"),
        ("down_blocks_0_attentions_0_proj_in", 2, "down_blocks_0_attentions_0_proj_in"),  # SD1.5 names pass through
    ],
)
def test_sgm_names_map_to_diffusers_block_by_block(sgm, lpb, diffusers):
    # kills: an off-by-one in the slot arithmetic (n - 1, per = lpb + 1), the downsampler / upsampler tests, a
    # resnet submodule mapped to the wrong attribute, the mid block's sub // 2, and regex edits
    from mole.formats.kohya import sgm_to_diffusers

    assert sgm_to_diffusers(sgm, layers_per_block=lpb) == diffusers


class _FakeSdxl(nn.Module):
    """Only what diffusers_to_sgm reads: config.layers_per_block and whether each up block has attentions."""

    def __init__(self, config, up_attentions=(False, True)):
        super().__init__()
        self.config = config
        self.up_blocks = nn.ModuleList()
        for has in up_attentions:
            block = nn.Module()
            block.attentions = nn.ModuleList([nn.Identity()]) if has else None
            self.up_blocks.append(block)


class _Config:
    def __init__(self, layers_per_block):
        self.layers_per_block = layers_per_block


@pytest.mark.parametrize(
    "path,sgm",
    [
        ("down_blocks.1.resnets.0.conv1", "input_blocks_4_0_in_layers_2"),
        ("down_blocks.0.resnets.1.conv2", "input_blocks_2_0_out_layers_3"),
        ("down_blocks.0.resnets.0.time_emb_proj", "input_blocks_1_0_emb_layers_1"),
        ("up_blocks.1.resnets.2.conv_shortcut", "output_blocks_5_0_skip_connection"),
        (
            "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
            "input_blocks_2_1_transformer_blocks_0_attn1_to_q",
        ),
        ("up_blocks.0.attentions.2.proj_out", "output_blocks_2_1_proj_out"),
        ("down_blocks.1.downsamplers.0.conv", "input_blocks_6_0_op"),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks_2_1_conv"),  # up block 0 has no attention: slot 1
        ("up_blocks.1.upsamplers.0.conv", "output_blocks_5_2_conv"),  # after the attention: slot 2
        ("mid_block.attentions.0.transformer_blocks.1.attn2.to_k", "middle_block_1_transformer_blocks_1_attn2_to_k"),
        ("mid_block.resnets.0.conv2", "middle_block_0_out_layers_3"),
        ("mid_block.resnets.1.time_emb_proj", "middle_block_2_emb_layers_1"),
        ("time_embedding.linear_1", "time_embedding_linear_1"),
    ],
)
def test_diffusers_paths_map_to_sgm_names(path, sgm):
    # kills: the slot arithmetic (1 + block * per + j, block * per + j), the upsampler's slot, the mid block's 2 * k
    from mole.formats.kohya import diffusers_to_sgm

    assert diffusers_to_sgm(path, _FakeSdxl(_Config(2))) == sgm


@pytest.mark.parametrize(
    "config,sgm",
    [
        ({"layers_per_block": 1}, "input_blocks_3_0_in_layers_2"),  # a dict config (diffusers' FrozenDict)
        (_Config(1), "input_blocks_3_0_in_layers_2"),
        (None, "input_blocks_4_0_in_layers_2"),  # no config: SDXL's 2
        (_Config([2, 2, 2]), "input_blocks_4_0_in_layers_2"),  # not an int: 2
        ("absent", "input_blocks_4_0_in_layers_2"),  # no config attribute at all: 2
    ],
)
def test_diffusers_to_sgm_reads_layers_per_block(config, sgm):
    from mole.formats.kohya import diffusers_to_sgm

    model = _FakeSdxl(config)
    if config == "absent":
        del model.config
    assert diffusers_to_sgm("down_blocks.1.resnets.0.conv1", model) == sgm


def test_diffusers_to_sgm_upsampler_of_a_block_without_an_attentions_attribute():
    from mole.formats.kohya import diffusers_to_sgm

    model = _FakeSdxl(_Config(2))
    del model.up_blocks[0].attentions
    assert diffusers_to_sgm("up_blocks.0.upsamplers.0.conv", model) == "output_blocks_2_1_conv"


def test_diffusers_to_sgm_refuses_a_resnet_submodule_with_no_sgm_name():
    from mole.formats.kohya import diffusers_to_sgm

    msg = "module 'down_blocks.0.resnets.0.norm1': resnet submodule 'norm1' has no SGM name"
    with pytest.raises(ValueError, match=re.escape(msg)):
        diffusers_to_sgm("down_blocks.0.resnets.0.norm1", _FakeSdxl(_Config(2)))
    with pytest.raises(ValueError, match=re.escape("'mid_block.resnets.0.nonlinearity'")):
        diffusers_to_sgm("mid_block.resnets.0.nonlinearity", _FakeSdxl(_Config(2)))


def test_kohya_lookup_holds_both_layouts_past_a_module_with_no_sgm_name():
    # kills: `break` for `continue` after a module with no SGM name, and the isinstance filter dropping a kind
    from mole.formats.kohya import kohya_lookup

    model = _FakeSdxl(_Config(1))  # not the default 2: the model's own layers_per_block must be read
    model.down_blocks = nn.ModuleList([nn.Module()])
    sampler = nn.Module()
    sampler.conv = nn.Conv2d(2, 2, 3)
    model.down_blocks[0].downsamplers = nn.ModuleList([sampler])
    resnet = nn.Module()
    resnet.conv1 = nn.Conv2d(2, 2, 3)
    resnet.odd = nn.Linear(2, 2)  # a Linear in a resnet that SGM has no name for: skipped, not fatal
    attention = nn.Module()
    attention.proj_in = nn.Linear(2, 2)
    model.down_blocks[0].resnets = nn.ModuleList([resnet])
    model.down_blocks[0].attentions = nn.ModuleList([attention])
    lookup = kohya_lookup(model)
    assert lookup["input_blocks_1_0_in_layers_2"] == "down_blocks.0.resnets.0.conv1"
    assert lookup["input_blocks_1_1_proj_in"] == "down_blocks.0.attentions.0.proj_in"
    assert lookup["down_blocks_0_resnets_0_conv1"] == "down_blocks.0.resnets.0.conv1"
    assert lookup["down_blocks_0_resnets_0_odd"] == "down_blocks.0.resnets.0.odd"
    assert lookup["input_blocks_2_0_op"] == "down_blocks.0.downsamplers.0.conv"  # 1 + 0 * 2 + 1


@pytest.mark.parametrize(
    "keys,expected",
    [
        (["unet.x.lora_down.weight"], True),
        (["lora_unet_a.alpha"], True),
        (["lora_te1_a.alpha"], True),
        (["lora_transformer_a.alpha"], True),
        (["base_model.model.a.lora_A.weight", "lora_unet_b.alpha"], True),  # any key
        (["base_model.model.a.lora_A.weight"], False),
        (["a.lora_up.weight"], False),
        ([], False),
    ],
)
def test_is_kohya_recognises_kohya_keys(keys, expected):
    from mole.formats.kohya import is_kohya

    assert is_kohya(keys) is expected


def test_parse_kohya_reads_pairs_alpha_default_and_skips_text_encoders():
    # kills: down / up swapped, the alpha default (rank) changed, the name prefix cut at the wrong length, the text
    # encoders read as denoiser layers, lora_transformer_ keys dropped
    from mole.formats.kohya import parse_kohya

    down, up = torch.arange(8.0).reshape(2, 4), torch.arange(6.0).reshape(3, 2)
    state = {
        "lora_unet_blk_q.lora_down.weight": down, "lora_unet_blk_q.lora_up.weight": up,
        "lora_unet_blk_q.alpha": torch.tensor(1.0),
        "lora_transformer_blk_k.lora_down.weight": down, "lora_transformer_blk_k.lora_up.weight": up,  # no alpha
        "lora_te_enc_q.lora_down.weight": down, "lora_te_enc_q.lora_up.weight": up,
        "lora_te2_enc_q.alpha": torch.tensor(1.0),
    }  # fmt: skip
    layers, skipped = parse_kohya(state, "f.safetensors")
    assert sorted(layers) == ["blk_k", "blk_q"]
    assert skipped == ["lora_te_enc_q.lora_down.weight", "lora_te_enc_q.lora_up.weight", "lora_te2_enc_q.alpha"]
    q, k = layers["blk_q"], layers["blk_k"]
    assert torch.equal(q.down, down) and torch.equal(q.up, up)
    assert q.alpha == 1.0 and q.scale == 0.5
    assert k.alpha == 2.0 and k.scale == 1.0  # no alpha key: alpha = rank (2)


def test_parse_kohya_errors_name_the_source_the_key_and_the_kind():
    from mole.experts import ExpertLoadError
    from mole.formats.kohya import parse_kohya

    msg = (
        "f.st: key 'lora_unet_a.hada_w1_a' is a LoHa (hada_*) tensor; MoLE mixes plain LoRA / LoCon experts "
        "(lora_down / lora_up / alpha) only. Convert or merge it first, or use another expert"
    )
    with pytest.raises(ExpertLoadError, match=f"^{re.escape(msg)}$"):
        parse_kohya({"lora_unet_a.hada_w1_a": torch.zeros(2, 2)}, "f.st")
    msg = "f.st: key 'lora_unet_a.weight' is not a kohya LoRA key (lora_unet_*.lora_down.weight / lora_up.weight / "
    msg += "alpha)"
    with pytest.raises(ExpertLoadError, match=f"^{re.escape(msg)}$"):
        parse_kohya({"lora_unet_a.weight": torch.zeros(2, 2)}, "f.st")
    bad = {"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.lora_up.weight": torch.zeros(3, 5)}
    with pytest.raises(ExpertLoadError, match=re.escape("f.st: layer 'lora_unet_a':")):
        parse_kohya(bad, "f.st")
    with pytest.raises(ExpertLoadError, match="f.st: incomplete LoRA pairs"):
        parse_kohya({"lora_unet_a.lora_down.weight": torch.zeros(2, 4)}, "f.st")


def test_kohya_state_dict_keys_alpha_dtype_and_factors():
    # kills: the lora_unet_ prefix, '.' -> '_' flattening, the alpha tensor's dtype, down / up swapped
    from mole.experts import ExpertWeights
    from mole.formats.kohya import kohya_state_dict

    down, up = torch.arange(8.0).reshape(2, 4), torch.arange(6.0).reshape(3, 2)
    expert = ExpertWeights("e", {"blocks.0.attn.to_q": LoraPair(down, up, 3.0)})
    sd = kohya_state_dict(expert)
    assert sorted(sd) == [
        "lora_unet_blocks_0_attn_to_q.alpha",
        "lora_unet_blocks_0_attn_to_q.lora_down.weight",
        "lora_unet_blocks_0_attn_to_q.lora_up.weight",
    ]
    alpha = sd["lora_unet_blocks_0_attn_to_q.alpha"]
    assert alpha.dtype == torch.float32 and alpha.shape == () and alpha.item() == 3.0
    assert torch.equal(sd["lora_unet_blocks_0_attn_to_q.lora_down.weight"], down)
    assert torch.equal(sd["lora_unet_blocks_0_attn_to_q.lora_up.weight"], up)


# ---------------------------------------------------------------------------------------------------- formats/diffusers


def test_find_weights_prefers_the_peft_file_and_reads_the_config(tmp_path):
    # kills: the file order, the is_file test, the config's file name, the JSON error message
    from mole.experts import ExpertLoadError
    from mole.formats.diffusers import find_weights

    with pytest.raises(ExpertLoadError, match=re.escape(f"expert 'e': folder {tmp_path} holds none of adapter_m")):
        find_weights(tmp_path, "e")
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert find_weights(tmp_path, "e") == (tmp_path / "pytorch_lora_weights.safetensors", {})
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    assert find_weights(tmp_path, "e") == (tmp_path / "adapter_model.safetensors", {"r": 4, "lora_alpha": 8})
    (tmp_path / "adapter_config.json").write_text("{r: 4")
    msg = f"expert 'e': {tmp_path / 'adapter_config.json'} is not valid JSON"
    with pytest.raises(ExpertLoadError, match=re.escape(msg)):
        find_weights(tmp_path, "e")


def test_metadata_config_keeps_the_components_entries(tmp_path):
    from mole.experts import ExpertLoadError
    from mole.formats.diffusers import metadata_config

    assert metadata_config({}, "unet", "e", tmp_path) == {}
    assert metadata_config({"lora_adapter_metadata": ""}, "unet", "e", tmp_path) == {}
    meta = '{"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": 2, "unetx.r": 9}'
    assert metadata_config({"lora_adapter_metadata": meta}, "unet", "e", tmp_path) == {"r": 4, "lora_alpha": 8}
    assert metadata_config({"lora_adapter_metadata": meta}, "text_encoder", "e", tmp_path) == {"r": 2}
    msg = f"expert 'e': {tmp_path}: metadata 'lora_adapter_metadata' is not JSON"
    with pytest.raises(ExpertLoadError, match=re.escape(msg)):
        metadata_config({"lora_adapter_metadata": "{"}, "unet", "e", tmp_path)


@pytest.mark.parametrize(
    "keys,expected",
    [
        (["a.lora_A.weight"], True),
        (["a.lora_B.weight"], True),
        (["a.lora.down.weight"], True),
        (["a.lora.up.weight"], True),
        (["a.lora_linear_layer.down.weight"], True),
        (["lora_unet_a.lora_down.weight"], False),
        (["a.lora_Ab.weight"], False),
        ([], False),
    ],
)
def test_is_dotted_recognises_peft_and_diffusers_keys(keys, expected):
    from mole.formats.diffusers import is_dotted

    assert is_dotted(keys) is expected


def _ab(rank=2, d_in=4, d_out=3):
    return torch.arange(float(rank * d_in)).reshape(rank, d_in), torch.arange(float(d_out * rank)).reshape(d_out, rank)


def test_parse_dotted_reads_every_layout_and_skips_other_components():
    # kills: lora_A / lora_B buckets swapped, a layout dropped, base_model.model. kept, the component test, the
    # .alpha suffix cut at the wrong length, the alpha default
    from mole.formats.diffusers import parse_dotted

    down, up = _ab()
    state = {
        "base_model.model.unet.blk.q.lora_A.weight": down, "unet.blk.q.lora_B.weight": up, "unet.blk.q.alpha": 1.0,
        "blk.k.lora.down.weight": down, "blk.k.lora.up.weight": up,
        "unet.blk.v.lora_linear_layer.down.weight": down, "unet.blk.v.lora_linear_layer.up.weight": up,
        "text_encoder.enc.q.lora_A.weight": down, "text_encoder_2.enc.q.lora_B.weight": up,
    }  # fmt: skip
    layers, skipped = parse_dotted(state, "unet", None, {}, "f")
    assert sorted(layers) == ["blk.k", "blk.q", "blk.v"]
    assert skipped == ["text_encoder.enc.q.lora_A.weight", "text_encoder_2.enc.q.lora_B.weight"]
    for pair in layers.values():
        assert torch.equal(pair.down, down) and torch.equal(pair.up, up)
    assert layers["blk.q"].alpha == 1.0 and layers["blk.k"].alpha == 2.0 and layers["blk.v"].alpha == 2.0


def test_parse_dotted_errors_name_the_key_and_the_fix():
    from mole.experts import ExpertLoadError
    from mole.formats.diffusers import parse_dotted

    down, up = _ab()
    with pytest.raises(ExpertLoadError, match=re.escape("f: DoRA adapters (use_dora = true in the adapter config) are "
                                                            "not low-rank")):
        parse_dotted({"a.lora_A.weight": down}, "unet", None, {"use_dora": True}, "f")
    with pytest.raises(ExpertLoadError, match=re.escape("f: key 'unet.a.hada_w1_a' is a LoHa (hada_*) tensor, which")):
        parse_dotted({"unet.a.hada_w1_a": down}, "unet", None, {}, "f")
    msg = "f: key 'unet.a.weight' is not a LoRA factor (expected <layer>.lora_A.weight / lora_B.weight / alpha)"
    with pytest.raises(ExpertLoadError, match=re.escape(msg)):
        parse_dotted({"unet.a.weight": down}, "unet", None, {}, "f")
    with pytest.raises(ExpertLoadError, match=re.escape("f: key 'a.processor.lora_A.weight' uses diffusers' pre-0.20")):
        parse_dotted({"a.processor.lora_A.weight": down}, "unet", None, {}, "f")
    two = {"a.lora_A.x.weight": down, "a.lora_B.x.weight": up, "a.lora_A.y.weight": down, "a.lora_B.y.weight": up}
    with pytest.raises(ExpertLoadError, match=re.escape("f: the state dict holds adapters ['x', 'y']; pass adapter=")):
        parse_dotted(two, "unet", None, {}, "f")
    with pytest.raises(ExpertLoadError, match=re.escape("f: adapter 'z' not found; the state dict holds ['x', 'y']")):
        parse_dotted(two, "unet", "z", {}, "f")
    one = {"a.lora_A.x.weight": down, "a.lora_B.x.weight": up}
    with pytest.raises(ExpertLoadError, match=re.escape("f: adapter 'z' not found; the state dict holds ['x']")):
        parse_dotted(one, "unet", "z", {}, "f")
    with pytest.raises(ExpertLoadError, match=re.escape("f: layer 'a':")):
        parse_dotted({"a.lora_A.weight": down, "a.lora_B.weight": torch.zeros(3, 5)}, "unet", None, {}, "f")


def test_parse_dotted_picks_the_named_adapter():
    from mole.formats.diffusers import parse_dotted

    down, up = _ab()
    two = {"a.lora_A.x.weight": down, "a.lora_B.x.weight": up, "a.lora_A.y.weight": 2 * down, "a.lora_B.y.weight": up}
    layers, _ = parse_dotted(two, "unet", "y", {}, "f")
    assert list(layers) == ["a"] and torch.equal(layers["a"].down, 2 * down)
    layers, _ = parse_dotted({"a.lora_A.x.weight": down, "a.lora_B.x.weight": up}, "unet", None, {}, "f")
    assert list(layers) == ["a"]  # a single named adapter needs no adapter=


@pytest.mark.parametrize(
    "layer,config,alpha",
    [
        ("blk.to_k", {"alpha_pattern": {"to_k": 16}, "lora_alpha": 8}, 16.0),
        ("to_k", {"alpha_pattern": {"to_k": 16}, "lora_alpha": 8}, 16.0),  # the whole name
        ("blk.to_kx", {"alpha_pattern": {"to_k": 16}, "lora_alpha": 8}, 8.0),  # a suffix, not a prefix
        ("blk.xto_k", {"alpha_pattern": {"to_k": 16}, "lora_alpha": 8}, 8.0),  # at a '.' boundary
        ("blk.to_q", {"alpha_pattern": {"to_k": 16, "to_q": 2}, "lora_alpha": 8}, 2.0),
        ("blk.to_q", {"lora_alpha": 8}, 8.0),
        ("blk.to_q", {"lora_alpha": 0}, 0.0),  # a zero alpha is an alpha
        ("blk.to_q", {}, 4.0),  # none: alpha = rank
        ("blk.to_q", {"alpha_pattern": None, "lora_alpha": None}, 4.0),
        ("blk.to_q", {"lora_alpha": 8, "use_rslora": True}, 16.0),  # alpha / sqrt(4) = alpha' / 4: alpha' = 8 * 2
        ("blk.to_q", {"use_rslora": True}, 4.0),  # no alpha stored: scale 1 even with rsLoRA
    ],
)
def test_peft_alpha_follows_the_pattern_lora_alpha_and_rslora(layer, config, alpha):
    from mole.formats.diffusers import _peft_alpha

    assert _peft_alpha(layer, 4, config) == alpha


def test_diffusers_state_dict_metadata_holds_the_common_rank_alpha_and_the_exceptions():
    # kills: the most frequent rank / alpha picked wrongly, a pattern holding the common entries, the key layout
    import json

    from mole.experts import ExpertWeights
    from mole.formats.diffusers import diffusers_state_dict

    d2, u2 = _ab(rank=2)
    d4, u4 = _ab(rank=4)
    expert = ExpertWeights("e", {"a": LoraPair(d4, u4, 8.0), "b": LoraPair(d2, u2, 2.0), "c": LoraPair(d2, u2, 2.0)})
    sd, meta = diffusers_state_dict(expert, component="transformer")
    assert sorted(sd) == [f"transformer.{k}.lora_{f}.weight" for k in "abc" for f in "AB"]
    assert torch.equal(sd["transformer.a.lora_A.weight"], d4) and torch.equal(sd["transformer.a.lora_B.weight"], u4)
    assert json.loads(meta) == {
        "transformer.r": 2, "transformer.lora_alpha": 2.0, "transformer.target_modules": ["a", "b", "c"],
        "transformer.rank_pattern": {"a": 4}, "transformer.alpha_pattern": {"a": 8.0},
    }  # fmt: skip


class _FakePeftLayer(nn.Module):
    def __init__(self, down, up, scale, dora=False):
        super().__init__()
        self.lora_A = nn.ModuleDict({"x": nn.Linear(down.shape[1], down.shape[0], bias=False)})
        self.lora_B = nn.ModuleDict({"x": nn.Linear(up.shape[1], up.shape[0], bias=False)})
        with torch.no_grad():
            self.lora_A["x"].weight.copy_(down)
            self.lora_B["x"].weight.copy_(up)
        self.scaling = {"x": scale}
        if dora:
            self.use_dora = {"x": True}


def test_expert_from_peft_reads_factors_scale_and_clean_paths():
    # kills: the base_model.model. prefix kept, alpha = scale instead of scale * rank, A / B swapped, the name default
    from mole.experts import ExpertLoadError
    from mole.formats.diffusers import expert_from_peft

    down, up = _ab()
    model = nn.Module()
    model.base_model = nn.Module()
    model.base_model.model = nn.Module()
    model.base_model.model.q = _FakePeftLayer(down, up, 0.75)
    model.other = nn.Linear(2, 2)
    expert = expert_from_peft(model, "x")
    assert expert.name == "x" and expert.source == "peft:x" and list(expert.layers) == ["q"]
    pair = expert.layers["q"]
    assert torch.equal(pair.down, down) and torch.equal(pair.up, up) and pair.alpha == 1.5
    assert expert_from_peft(model, "x", name="mine").name == "mine"
    with pytest.raises(ExpertLoadError, match=re.escape("model has no peft LoRA layers for adapter 'y'")):
        expert_from_peft(model, "y")
    model.base_model.model.k = _FakePeftLayer(down, up, 1.0, dora=True)
    with pytest.raises(ExpertLoadError, match=re.escape("adapter 'x' at 'base_model.model.k' uses DoRA")):
        expert_from_peft(model, "x")


def test_parse_dotted_without_own_keys_is_empty_and_half_pairs_are_named():
    # kills: `names[0] if names or True` (IndexError on no own keys), `.get(key, None)` for either bucket, `&` for `|`
    # in the adapter names (an adapter with only B factors vanished), check_pairs' source dropped, the pre-0.20
    # processor message's fix, the unnamed adapter's bucket name
    from mole.experts import ExpertLoadError
    from mole.formats.diffusers import parse_dotted

    down, up = _ab()
    assert parse_dotted({"text_encoder.q.lora_A.weight": down}, "unet", None, {}, "f") == (
        {}, ["text_encoder.q.lora_A.weight"]
    )  # fmt: skip
    msg = "f: incomplete LoRA pairs: layers with A/down but no B/up: [], with B/up but no A/down: ['blk.q']"
    with pytest.raises(ExpertLoadError, match=re.escape(msg)):
        parse_dotted({"unet.blk.q.lora_B.x.weight": up}, "unet", None, {}, "f")
    msg = "f: incomplete LoRA pairs: layers with A/down but no B/up: ['blk.q'], with B/up but no A/down: []"
    with pytest.raises(ExpertLoadError, match=re.escape(msg)):
        parse_dotted({"unet.blk.q.lora_A.weight": down}, "unet", None, {}, "f")
    msg = "f: key 'a.processor.lora_A.weight' uses diffusers' pre-0.20 attention-processor layout; re-save it with a"
    with pytest.raises(ExpertLoadError, match=re.escape(msg + " current diffusers")):
        parse_dotted({"a.processor.lora_A.weight": down}, "unet", None, {}, "f")
    mixed = {"a.lora_A.weight": down, "a.lora_B.weight": up, "a.lora_A.x.weight": down, "a.lora_B.x.weight": up}
    with pytest.raises(ExpertLoadError, match=re.escape("f: the state dict holds adapters ['', 'x']; pass adapter=")):
        parse_dotted(mixed, "unet", None, {}, "f")


@pytest.mark.parametrize("rank,alpha", [(16, 32.0), (2, 8.0 * 2**0.5), (1, 8.0)])
def test_peft_rslora_alpha_at_ranks_where_half_r_is_not_sqrt_r(rank, alpha):
    # kills: alpha * r * 0.5 for alpha * sqrt(r) (equal at r = 4 only): peft's scale alpha / sqrt(r) = alpha' / r
    from mole.formats.diffusers import _peft_alpha

    assert _peft_alpha("blk.to_q", rank, {"lora_alpha": 8, "use_rslora": True}) == pytest.approx(alpha, rel=1e-12)
    assert alpha / rank == pytest.approx(8 / rank**0.5)  # the scale peft applies, written out


def test_diffusers_state_dict_defaults_to_the_unet_component():
    # kills: the default component renamed; diffusers' load_lora_weights reads unet.* keys for the UNet
    import json

    from mole.experts import ExpertWeights
    from mole.formats.diffusers import diffusers_state_dict

    down, up = _ab()
    sd, meta = diffusers_state_dict(ExpertWeights("e", {"blk.q": LoraPair(down, up, 2.0)}))
    assert sorted(sd) == ["unet.blk.q.lora_A.weight", "unet.blk.q.lora_B.weight"]
    assert json.loads(meta)["unet.r"] == 2 and json.loads(meta)["unet.lora_alpha"] == 2.0


# ---------------------------------------------------------------------------------------------------- layers/spatial


def _conv_expert(pair, base, x):
    """E(x) = up * (down * x) * alpha / r, written out: down with the base conv's geometry, a 1x1 up."""
    mid = torch.nn.functional.conv2d(x, pair.down, None, base.stride, base.padding, base.dilation)
    return torch.nn.functional.conv2d(mid, pair.up[:, :, None, None]) * pair.alpha / pair.rank


def _spatial_literal(layer, pairs, x, weights=None, routing=None):
    """(F(X) + sum_i w_i g_i E_i(X * s_i), local (b, n, e) or None, global (b, e) or None), expert by expert."""
    b, _, h, w = x.shape
    base, gates = layer.base, layer.gates
    tokens = x.flatten(2).transpose(1, 2)  # (b, h*w, c)
    out, locs, globs = base(x), [], []
    for i, name in enumerate(layer.expert_names):
        pair, s, g = pairs.get(name), None, None
        if layer.gating in (Gating.LOCAL, Gating.BOTH):
            s = torch.sigmoid(tokens @ gates.local_weight[i] + gates.local_bias[i])  # (b, n)
        if layer.gating in (Gating.GLOBAL, Gating.BOTH):
            if layer.global_source is GlobalSource.INPUT:
                g = torch.sigmoid(tokens.mean(1) @ gates.global_weight[i] + gates.global_bias[i])
            elif pair is None:  # no output to pool: the bias alone
                g = torch.sigmoid(gates.global_bias[i]).expand(b)
            else:
                pooled = _conv_expert(pair, base, x).mean((2, 3))  # (b, o)
                g = torch.sigmoid(pooled @ gates.global_weight[i] + gates.global_bias[i])
        locs.append(s)
        globs.append(g)
        if pair is None:
            continue
        y = _conv_expert(pair, base, x * s.view(b, 1, h, w) if s is not None else x)
        if g is not None:
            y = y * g[:, None, None, None]
        if routing is not None:
            y = y * routing[:, i, None, None, None]
        out = out + y * (1.0 if weights is None else weights[i])
    local = torch.stack(locs, -1) if locs[0] is not None else None
    glob = torch.stack(globs, -1) if globs[0] is not None else None
    return out, local, glob


def _spatial(names, ranks, cfg, base=None, seed=0):
    from mole.layers import mole_layer_for

    g = torch.Generator().manual_seed(seed)
    base = base or nn.Conv2d(3, 5, 3, padding=1)
    pairs = {n: LoraPair(torch.randn(r, 3, 3, 3, generator=g) * 0.5, torch.randn(5, r, 1, 1, generator=g) * 0.5,
                         alpha=1.0 + k) for k, (n, r) in enumerate(zip(names, ranks)) if r}  # fmt: skip
    layer = mole_layer_for(base, names, pairs, cfg, path="down.conv1")
    with torch.no_grad():
        for p in layer.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return layer, pairs


@pytest.mark.parametrize(
    "gating,source,names,ranks",
    [
        ("both", "input", ("a", "b"), (2, 2)),  # one grouped conv
        ("both", "expert_output", ("a", "b", "c"), (2, 3, 4)),  # a loop over unequal ranks, three experts
        ("local", "input", ("a", "b", "c"), (3, 1, 2)),
        ("global", "expert_output", ("a", "b"), (2, 3)),
        ("both", "input", ("hand", "face"), (0, 2)),  # the first expert has no weights in this layer
        ("global", "expert_output", ("hand", "face"), (0, 2)),
        ("local", "input", ("hand", "face"), (0, 2)),
    ],
)
def test_spatial_layer_output_and_reported_gates_are_the_literal_formula(gating, source, names, ranks):
    # kills: the row offset of unequal ranks reset (`start = r`), a gate column slice off, the recorder given the
    # wrong (or no) gates on either path, an expert missing here ending the naive loop or taking the bias gate
    # when its global gate comes from the input, the expert weights dropped
    torch.manual_seed(0)
    layer, pairs = _spatial(names, ranks, MoLEConfig(gating=gating, global_source=source))
    weights = torch.tensor([0.5, 2.0, -1.0][: len(names)])
    layer.expert_weight.copy_(weights)
    x = torch.randn(2, 3, 4, 5)
    want, want_local, want_glob = _spatial_literal(layer, pairs, x, weights)
    layer.recorder = _Gates()
    with torch.no_grad():
        for fused in (True, False):
            layer.fused = fused
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    for local, glob in layer.recorder.calls:
        for got, ref in ((local, want_local), (glob, want_glob)):
            assert (got is None) == (ref is None)
            if ref is not None:
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_spatial_layer_routing_weighs_each_sample_and_is_reported():
    # kills: the router's weights dropped or not reported as the global gate of a layer without one (fused path),
    # and dropped in the naive path
    torch.manual_seed(0)
    layer, pairs = _spatial(("a", "b"), (2, 3), MoLEConfig(gating="none"))
    routing = torch.tensor([[0.7, 0.3], [0.1, 0.9]])
    layer.routing = routing
    layer.recorder = _Gates()
    x = torch.randn(2, 3, 4, 5)
    want, _, _ = _spatial_literal(layer, pairs, x, routing=routing)
    with torch.no_grad():
        for fused in (True, False):
            layer.fused = fused
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert layer.recorder.calls[0][1].tolist() == routing.tolist()


@pytest.mark.parametrize("gating", ["none", "local"])
def test_spatial_layer_tracks_the_cosines_of_the_ungated_expert_outputs(gating):
    # kills: track_orthogonality failing on a spatial layer (an AttributeError before: InstructMoLE's orthogonality
    # loss on a model with LoCon experts), the naive path not tracking
    torch.manual_seed(0)
    layer, pairs = _spatial(("a", "b", "c"), (2, 0, 3), MoLEConfig(gating=gating))
    layer.track_orthogonality = True
    x = torch.randn(2, 3, 4, 5)
    outs = [_conv_expert(pairs[n], layer.base, x).flatten(1) if n in pairs else torch.zeros(2, 5 * 20) for n in "abc"]
    inner = torch.stack([torch.stack([(outs[i] * outs[j]).sum(1) for j in range(3)], 1) for i in range(3)], 1)
    norms = inner.diagonal(dim1=1, dim2=2).clamp_min(1e-24).sqrt()
    for fused in (True, False):
        layer.fused = fused
        with torch.no_grad():
            layer(x)
        torch.testing.assert_close(layer.last_inner, inner, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.last_cosine[:, 0, 2], inner[:, 0, 2] / (norms[:, 0] * norms[:, 2]))


def test_spatial_layer_errors_name_the_layer_and_the_fix():
    from mole.layers import SpatialMoLELayer

    layer, _ = _spatial(("a",), (2,), MoLEConfig())
    msg = "layer 'down.conv1': a Conv2d input must be (b, c, h, w), got (3, 4, 5)"
    for fused in (True, False):
        layer.fused = fused
        with pytest.raises(ValueError, match=re.escape(msg)):
            layer(torch.zeros(3, 4, 5))
    pair = LoraPair(torch.ones(2, 3, 1, 1), torch.ones(5, 2, 1, 1), 2.0)
    base = nn.Conv2d(3, 5, 1)
    with pytest.raises(ValueError, match=re.escape(f"layer 'q': {base} is pointwise; wrap it with MoLELayer")):
        SpatialMoLELayer(base, ["a"], {"a": pair}, MoLEConfig(), path="q")


@pytest.mark.parametrize("source", ["input", "expert_output"])
def test_spatial_naive_path_runs_bf16_with_fp32_gates(source):
    # kills: the naive path's gate weights not cast to the input's dtype (stage 3 keeps the gates fp32 under
    # bf16 mixed precision: a bf16 @ fp32 product is refused)
    torch.manual_seed(0)
    layer, _ = _spatial(("a", "b"), (2, 3), MoLEConfig(gating="both", global_source=source))
    layer.to(torch.bfloat16)
    layer.gates.float()
    x = torch.randn(2, 3, 4, 5).bfloat16()
    with torch.no_grad():
        fused = layer(x)
        layer.fused = False
        naive = layer(x)
    assert naive.dtype == torch.bfloat16
    torch.testing.assert_close(naive, fused, rtol=2e-2, atol=2e-2)


def _gate_init_literal(path, seed, e, fan_in):
    """torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from crc32(path) seeded with `seed`:
    local weight, local bias, global weight, global bias (gating 'both', global gate from the input)."""
    gen = torch.Generator().manual_seed(zlib.crc32(path.encode(), seed))
    bound = 1.0 / fan_in**0.5
    return [torch.empty(shape).uniform_(-bound, bound, generator=gen) for shape in ((e, fan_in), (e,)) * 2]


def test_spatial_gates_are_seeded_by_the_run_seed_and_the_layer_path():
    # kills: the seed not passed on (SpatialMoLELayer.__init__ to MoLELayer, mole_layer_for to the layer: a run's
    # --seed ignored on LoCon layers), the defaults path='' / seed=0 changed (the init of files trained before
    # the seed existed)
    from mole import ExpertWeights, inject_mole
    from mole.layers import SpatialMoLELayer, mole_layer_for

    pairs = {n: LoraPair(torch.ones(2, 3, 3, 3), torch.ones(5, 2, 1, 1), 2.0) for n in ("a", "b")}
    cfg = MoLEConfig(gating="both", targets=["0"])
    model = inject_mole(nn.Sequential(nn.Conv2d(3, 5, 3, padding=1)),
                        [ExpertWeights(n, {"0": p}) for n, p in pairs.items()], cfg, seed=7)  # fmt: skip
    default = mole_layer_for(nn.Conv2d(3, 5, 3), ["a", "b"], pairs, cfg)
    direct = SpatialMoLELayer(nn.Conv2d(3, 5, 3), ["a", "b"], pairs, cfg)
    for layer, path, seed in ((model[0], "0", 7), (default, "", 0), (direct, "", 0)):
        assert layer.path == path
        gates = layer.gates
        got = [gates.local_weight, gates.local_bias, gates.global_weight, gates.global_bias]
        for g, want in zip(got, _gate_init_literal(path, seed, 2, 3)):
            torch.testing.assert_close(g.detach(), want, rtol=0, atol=0)


@pytest.mark.parametrize("source", ["input", "expert_output"])
@pytest.mark.parametrize("recipe", ["gates", "router", "experts"])
def test_bf16_spatial_layer_with_fp32_gates_router_or_experts_is_the_literal_formula(source, recipe):
    # kills: a cast to the input's dtype dropped where the operand is fp32 under bf16 mixed precision: the fp32
    # alpha/r buffers (`coef.to(None)`: RuntimeError in the up GEMM), an fp32 router's weights (RuntimeError on
    # the fused path, an fp32 output on the naive one), fp32 expert factors (`lora_A.to(None)`, `lora_B.to(None)`,
    # the naive path's down / up)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    pairs = {n: LoraPair(torch.randn(r, 3, 3, 3, generator=g) * 0.5, torch.randn(5, r, 1, 1, generator=g) * 0.5,
                         alpha=1.0 + k) for k, (n, r) in enumerate((("a", 2), ("b", 3)))}  # fmt: skip
    cfg = MoLEConfig(gating="both", global_source=source, targets=["0"])
    model = _stage_model(nn.Conv2d(3, 5, 3, padding=1), pairs, cfg, recipe)
    layer = model[0]
    routing = torch.tensor([[0.7, 0.3], [0.2, 1.1]]) if recipe == "router" else None
    layer.routing = routing
    x = torch.randn(2, 3, 4, 5).bfloat16()
    ref = copy.deepcopy(layer).float()  # the same weights in fp32, read by the literal formula only
    rounded = {n: LoraPair(p.down.bfloat16().float(), p.up.bfloat16().float(), p.alpha) for n, p in pairs.items()}
    want, _, _ = _spatial_literal(ref, rounded, x.float(), routing=routing)
    with torch.no_grad():
        for fused in (True, False):
            layer.fused = fused
            y = model(x)
            assert y.dtype == torch.bfloat16, fused
            torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("fused", [True, False])
def test_record_gates_lays_a_spatial_layers_local_gates_on_its_input_grid(fused):
    # kills: the recorder given no layer or no input (record_gates on a LoCon layer: AttributeError; it keys by the
    # layer's path and lays the local gates on the input's grid), the router's weights reported in place of a
    # global gate the layer has (fused path)
    from mole import ExpertWeights, inject_mole, record_gates

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    pairs = {n: LoraPair(torch.randn(2, 3, 3, 3, generator=g), torch.randn(5, 2, 1, 1, generator=g), 2.0)
             for n in ("a", "b")}  # fmt: skip
    base = nn.Conv2d(3, 5, 3, stride=2, padding=1)  # the output grid (2, 3) is not the input's (4, 5)
    model = inject_mole(nn.Sequential(base), [ExpertWeights(n, {"0": p}) for n, p in pairs.items()],
                        MoLEConfig(gating="both", targets=["0"]))  # fmt: skip
    layer = model[0]
    with torch.no_grad():
        for p in layer.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    routing = torch.tensor([[0.7, 0.3], [0.2, 0.9]])
    layer.routing = routing
    layer.fused = fused
    x = torch.randn(2, 3, 4, 5)
    want, local, glob = _spatial_literal(layer, pairs, x, routing=routing)
    with torch.no_grad(), record_gates(model) as rec:
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rec.local_map(0, "0"), local.transpose(1, 2).reshape(2, 2, 4, 5))
    torch.testing.assert_close(rec.global_gates()[0, 0], glob)  # the gates, not the router's weights


@pytest.mark.parametrize("gating", ["both", "local"])
def test_spatial_fused_path_runs_one_down_conv_for_every_expert(monkeypatch, gating):
    # kills: the ungated down activations computed when nothing needs them (`and` for `or` in needs_plain, or
    # `needs_plain or plain is None`: one more conv over the input, the same values)
    torch.manual_seed(0)
    layer, _ = _spatial(("a", "b"), (2, 2), MoLEConfig(gating=gating))  # equal ranks: one grouped conv
    x = torch.randn(2, 3, 4, 5)
    with torch.no_grad():
        layer.fused = False
        want = layer(x)
        layer.fused = True
        calls = []
        real = torch.nn.functional.conv2d
        monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # the base conv, and every expert's down-conv in one grouped conv
