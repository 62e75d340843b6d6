"""The MoLE layer on its own: the formula, the fused path, shapes, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mole import GateInit, LoraPair, MoLEConfig, MoLELayer

GATINGS = ["local", "global", "both", "none"]
ALPHA_OVER_R = 1.5  # make_layer's experts have alpha = 1.5 r; references use this literal, never LoraPair.scale
SOURCES = ["input", "expert_output"]


def make_layer(base, ranks=(4, 6, 3), missing=(), gating="both", source="input", init="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    d_in = base.in_channels if isinstance(base, nn.Conv2d) else base.in_features
    d_out = base.out_channels if isinstance(base, nn.Conv2d) else base.out_features
    names = [f"e{i}" for i in range(len(ranks))]
    experts = {
        n: LoraPair(
            torch.randn(r, d_in, generator=g) * 0.3, torch.randn(d_out, r, generator=g) * 0.3, alpha=r * ALPHA_OVER_R
        )
        for n, r in zip(names, ranks)
        if n not in missing
    }
    cfg = MoLEConfig(gating=gating, global_source=source, gate_init=init)
    return MoLELayer(base, names, experts, cfg, path="test.layer")


def manual_reference(layer: MoLELayer, x: torch.Tensor) -> torch.Tensor:
    """X' = F(X) + sum_i g_i E_i(X s_i), written out for (b, n, d) inputs of a Linear with both gates on X."""
    out = layer.base(x)
    g = layer.gates
    s = torch.sigmoid(x @ g.local_weight.T + g.local_bias)  # (b, n, e)
    glob = torch.sigmoid(x.mean(1) @ g.global_weight.T + g.global_bias)  # (b, e)
    for i, name in enumerate(layer.expert_names):
        p = layer.expert(name)
        y = ((x * s[..., i : i + 1]) @ p.down.T) @ p.up.T * ALPHA_OVER_R
        out = out + glob[:, i, None, None] * y
    return out


def test_naive_path_is_the_paper_formula():
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(24, 20))
    x = torch.randn(3, 10, 24)
    layer.fused = False
    torch.testing.assert_close(layer(x), manual_reference(layer, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("ranks,missing", [((4, 4), ()), ((4, 6, 3), ()), ((5,), ()), ((4, 6, 3), ("e1",))])
def test_fused_equals_naive_linear(gating, source, ranks, missing):
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(24, 20), ranks, missing, gating, source)
    x = torch.randn(3, 10, 24)
    fused = layer(x)
    layer.fused = False
    naive = layer(x)
    assert fused.shape == (3, 10, 20)
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("source", SOURCES)
def test_fused_equals_naive_conv1x1_non_square(gating, source):
    torch.manual_seed(0)
    layer = make_layer(nn.Conv2d(16, 12, 1), (4, 2), (), gating, source)
    x = torch.randn(2, 16, 5, 7)  # h != w: nothing may assume square maps
    fused = layer(x)
    layer.fused = False
    naive = layer(x)
    assert fused.shape == (2, 12, 5, 7)
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-5)


def test_conv_layer_equals_linear_layer_on_tokens():
    """A 1x1 conv MoLE layer is the linear one applied to the (h*w) tokens of each sample."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 12, 1)
    lin = nn.Linear(16, 12)
    lin.weight.data = conv.weight.data[:, :, 0, 0].clone()
    lin.bias.data = conv.bias.data.clone()
    lc, ll = make_layer(conv, (4, 2)), make_layer(lin, (4, 2))
    ll.gates.load_state_dict(lc.gates.state_dict())
    x = torch.randn(2, 16, 3, 5)
    tokens = x.flatten(2).transpose(1, 2)
    expected = ll(tokens).transpose(1, 2).reshape(2, 12, 3, 5)
    torch.testing.assert_close(lc(x), expected, rtol=1e-5, atol=1e-5)


def test_two_dim_input_is_one_token_per_sample():
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(8, 6), (2, 3))
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), layer(x[:, None, :])[:, 0, :])


def test_zero_experts_give_the_base_output_exactly():
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    layer = make_layer(base, (4, 4))
    with torch.no_grad():
        layer.lora_B.zero_()
    x = torch.randn(2, 9, 24)
    assert torch.equal(layer(x), base(x))


def test_global_gate_is_per_sample_and_local_gate_per_token():
    """Samples never see each other's tokens: a sample's output does not depend on the rest of the batch."""
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(24, 20), (4, 4))
    x = torch.randn(3, 10, 24)
    torch.testing.assert_close(layer(x)[1:2], layer(x[1:2]), rtol=1e-5, atol=1e-6)


def test_sigmoid_gates_are_not_a_softmax():
    """Two identical experts with gates pinned open add up (2x), which a softmax over experts could not do."""
    base = nn.Linear(8, 8)
    a, b = torch.randn(2, 8) * 0.5, torch.randn(8, 2) * 0.5
    cfg = MoLEConfig(gate_init=GateInit.ZERO)
    two = MoLELayer(base, ["x", "y"], {"x": LoraPair(a, b, 2), "y": LoraPair(a, b, 2)}, cfg)
    one = MoLELayer(base, ["x"], {"x": LoraPair(a, b, 2)}, cfg)
    for layer in (two, one):
        with torch.no_grad():
            layer.gates.local_bias.fill_(40.0)
            layer.gates.global_bias.fill_(40.0)
    x = torch.randn(1, 5, 8)
    delta_two, delta_one = two(x) - base(x), one(x) - base(x)
    torch.testing.assert_close(delta_two, 2 * delta_one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta_one, (x @ a.T @ b.T), rtol=1e-5, atol=1e-6)


def test_no_gating_is_the_plain_sum_of_loras():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = make_layer(base, (2, 3), gating="none")
    assert list(layer.gates.parameters()) == []
    x = torch.randn(2, 3, 8)
    expected = base(x) + sum(
        (x @ layer.expert(n).down.T @ layer.expert(n).up.T) * ALPHA_OVER_R for n in layer.expert_names
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_zero_gate_init_starts_every_gate_at_one_half():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = make_layer(base, (2, 2), init="zero")
    x = torch.randn(2, 3, 8)
    expected = base(x) + 0.25 * sum(
        (x @ layer.expert(n).down.T @ layer.expert(n).up.T) * ALPHA_OVER_R for n in layer.expert_names
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_only_gates_receive_gradients(fused):
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    base.requires_grad_(False)
    layer = make_layer(base, (4, 4))
    layer.fused = fused
    layer(torch.randn(2, 5, 24)).pow(2).mean().backward()
    assert layer.lora_A.grad is None and layer.lora_B.grad is None and base.weight.grad is None
    grads = {n: p.grad for n, p in layer.gates.named_parameters()}
    assert set(grads) == {"local_weight", "local_bias", "global_weight", "global_bias"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_fused_and_naive_gradients_agree():
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(24, 20), (4, 6), source="expert_output")
    x = torch.randn(2, 5, 24)
    grads = []
    for fused in (True, False):
        layer.zero_grad()
        layer.fused = fused
        layer(x).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in layer.gates.parameters()])
    for gf, gn in zip(*grads):
        torch.testing.assert_close(gf, gn, rtol=1e-4, atol=1e-5)


def test_inference_cache_follows_gate_updates():
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(8, 8), (2, 2))
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        first = layer(x)
        layer.gates.local_weight.add_(1.0)  # in-place update, as an optimizer step does
        second = layer(x)
        layer.fused = False
        reference = layer(x)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, reference, rtol=1e-5, atol=1e-6)


def test_half_precision_runs_and_stays_close():
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(32, 32), (4, 4))
    x = torch.randn(2, 6, 32)
    ref = layer(x)
    half = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "module,match",
    [
        (nn.Conv2d(4, 4, 3), "kernel_size"),
        (nn.Conv2d(4, 4, 1, stride=2), "stride"),
        (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Embedding(4, 4), "Embedding"),
    ],
)
def test_unwrappable_modules_are_refused_by_name(module, match):
    with pytest.raises(ValueError, match=match):
        MoLELayer(module, ["face"], {}, MoLEConfig(), path="blocks.0.odd")


def test_expert_shape_mismatch_names_layer_and_expert():
    with pytest.raises(ValueError, match=r"'blk'.*expert 'face'.*in 9"):
        MoLELayer(
            nn.Linear(8, 8),
            ["face"],
            {"face": LoraPair(torch.zeros(2, 9), torch.zeros(8, 2), 2)},
            MoLEConfig(),
            path="blk",
        )


def test_lora_pair_rank_mismatch_is_reported():
    with pytest.raises(ValueError, match="rank mismatch"):
        LoraPair(torch.zeros(2, 8), torch.zeros(8, 3), 2)


@pytest.mark.parametrize("fused", [True, False])
def test_expert_weights_scale_each_expert(fused):
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = make_layer(base, (2, 3), gating="none")
    layer.fused = fused
    x = torch.randn(2, 3, 8)
    e0, e1 = (layer.expert(n) for n in layer.expert_names)
    layer.expert_weight.copy_(torch.tensor([0.5, 0.0]))
    expected = base(x) + 0.5 * (x @ e0.down.T @ e0.up.T) * ALPHA_OVER_R
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- fast paths
# Shapes that send the fused path down each kernel (checked with choose_path, so a changed rule fails here):
# few tokens and low rank -> lowrank; rank rows above e*d*o/(d+o) -> dense; per-sample coefficients and many
# tokens -> merged.
FAST_CASES = [
    ("lowrank", "both", (4, 6, 3), (), 10),
    ("lowrank", "local", (4, 4), ("e1",), 10),
    ("dense", "both", (16, 16), (), 10),
    ("dense", "local", (20, 12, 9), ("e0",), 10),
    ("merged", "global", (4, 6, 3), (), 64),
    ("merged", "global", (8, 8), ("e1",), 64),
    ("merged", "none", (4, 4), (), 64),
    ("lowrank", "global", (4, 6), (), 10),
]


def _fused_and_naive(layer, x, grad: bool):
    """Outputs and (when grad) gradients of x and every gate parameter, fused then naive, for one upstream grad."""
    results = []
    upstream = None
    for fused in (True, False):
        layer.fused = fused
        xs = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = layer(xs)
            grads = []
            if grad:
                if upstream is None:
                    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
                grads = torch.autograd.grad(y, [xs, *layer.gates.parameters()], upstream)
        results.append((y.detach(), grads))
    return results


@pytest.mark.parametrize("path,gating,ranks,missing,tokens", FAST_CASES)
@pytest.mark.parametrize("conv", [False, True])
def test_fast_paths_equal_naive_in_values_and_gradients(path, gating, ranks, missing, tokens, conv):
    from mole.layers.fused import choose_path

    torch.manual_seed(0)
    base = (nn.Conv2d(24, 20, 1) if conv else nn.Linear(24, 20)).requires_grad_(False)  # frozen, as in stage 3
    layer = make_layer(base, ranks, missing, gating)
    rows, e = sum(ranks), len(ranks)
    per_sample = not layer.gating.uses_local
    assert choose_path(tokens, 24, 20, rows, e, per_sample) == path
    x = torch.randn(3, 24, 2, tokens // 2) if conv else torch.randn(3, tokens, 24)
    (y_inf, _), (y_ref, _) = _fused_and_naive(layer, x, grad=False)
    torch.testing.assert_close(y_inf, y_ref, rtol=1e-5, atol=1e-5)
    (y_tr, g_fused), (y_ref2, g_naive) = _fused_and_naive(layer, x, grad=True)
    torch.testing.assert_close(y_tr, y_ref2, rtol=1e-5, atol=1e-5)
    assert len(g_fused) == 1 + len(list(layer.gates.parameters()))
    for gf, gn in zip(g_fused, g_naive):
        torch.testing.assert_close(gf, gn, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keep", [False, True])
def test_training_path_keeps_little_for_the_backward(keep):
    """Frozen experts: the fused training path saves X and the (b, n, e) coefficients, not the (b, n, R) low-rank
    activations (unless keep_activations), and both choices give the naive path's gradients."""
    torch.manual_seed(0)
    base = nn.Linear(32, 32).requires_grad_(False)
    layer = make_layer(base, (64, 64))
    layer.keep_activations = keep
    x = torch.randn(2, 50, 32, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {
        b.untyped_storage().data_ptr() for b in layer.buffers()
    }
    activations = sum(v for k, v in saved.items() if k not in params)
    x_bytes, rows_bytes = x.numel() * 4, 2 * 50 * 128 * 4
    assert activations >= x_bytes
    if keep:
        assert activations >= x_bytes + rows_bytes
    else:
        assert activations < x_bytes + rows_bytes / 2  # autograd's own graph keeps h and h * coef: 2 x rows_bytes
    gx, *gg = torch.autograd.grad(y.pow(2).sum(), [x, *layer.gates.parameters()])
    layer.fused = False
    rx, *rg = torch.autograd.grad(layer(x).pow(2).sum(), [x, *layer.gates.parameters()])
    for a, b in zip([gx, *gg], [rx, *rg]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_global_only_training_uses_the_merged_path(monkeypatch):
    """Per-sample coefficients and many tokens: the training step runs MergedMix (one GEMM per sample, no rank-R
    pass over the tokens), and a trainable base falls back to the path that gives the base its gradients."""
    from mole.layers import fused

    calls = []
    real = fused.MergedMix.apply
    monkeypatch.setattr(fused.MergedMix, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(24, 20).requires_grad_(False), (8, 8), gating="global")
    x = torch.randn(2, 64, 24, requires_grad=True)
    layer(x).sum().backward()
    assert len(calls) == 1
    assert layer.gates.global_weight.grad is not None and layer.gates.global_weight.grad.abs().sum() > 0
    layer.base.weight.requires_grad_(True)
    layer(x).sum().backward()
    assert len(calls) == 1  # not taken: the base's weight needs its gradient
    assert layer.base.weight.grad is not None


def test_dense_cache_follows_expert_and_base_updates():
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(24, 20), (16, 16))
    x = torch.randn(2, 6, 24)
    with torch.no_grad():
        first = layer(x)
        layer.lora_B.mul_(2.0)
        layer.base.weight.add_(0.1)
        second = layer(x)
        layer.fused = False
        reference = layer(x)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, reference, rtol=1e-5, atol=1e-5)


def test_expert_training_keeps_factor_gradients():
    """Stage 2 trains lora_A / lora_B through the fused layer: they must still get gradients."""
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(24, 20), (4,), gating="none")
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    x = torch.randn(2, 5, 24)
    layer(x).pow(2).sum().backward()
    got = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    layer.zero_grad()
    layer.fused = False
    layer(x).pow(2).sum().backward()
    torch.testing.assert_close(got[0], layer.lora_A.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1], layer.lora_B.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gating,tokens", [("both", 5), ("global", 64)])  # lowrank / merged (MergedMix) training
def test_fused_layer_compiles_without_graph_breaks(gating, tokens):
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(24, 20).requires_grad_(False), (4, 6), gating=gating)
    x = torch.randn(2, tokens, 24)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x.requires_grad_(True))
    assert explained.graph_break_count == 0
