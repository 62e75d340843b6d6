"""InstructMoLE's official variant against literal re-implementations of the published code (yanq095/InstructMoLE,
src/lora_moe.py, src/resampler.py, train_kontext.py), written out here formula by formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mole import LoraPair, MoLEConfig, MoLELayer, mole_layers, set_fused
from mole.instruct import (
    InstructConfig,
    InstructMoLE,
    PerceiverResampler,
    TopKGate,
    balance_from_mass,
    cosine_decay,
    expert_orthogonality,
)
from mole.tiny import tiny_pixart, unet_inputs

SMALL = dict(rank=4, shared_rank=4, resampler_dim=32, resampler_heads=2)  # official in every point but the sizes


# ---------------------------------------------------------------------------------------------------- literal code
def literal_gate(h, weight, k, alpha, training):
    """TopKGate.forward of the official code, line by line."""
    e, d = weight.shape
    logits = F.linear(h.view(-1, d), weight)
    if training:
        logits = logits + torch.randn_like(logits) * (1.0 / e)
    scores = logits.softmax(dim=-1)
    weights, indices = torch.topk(scores, k=k, dim=-1)
    aux = None
    if training and alpha > 0.0:
        expert_mask = F.one_hot(indices, num_classes=e).sum(dim=1).float()
        aux = alpha * e * (expert_mask.mean(dim=0) * scores.mean(dim=0)).sum()
    return indices, weights, aux


def literal_ortho(expert_outputs):
    """compute_orthogonality_loss of the official code."""
    e = expert_outputs.shape[0]
    norm = F.normalize(expert_outputs.reshape(e, -1), p=2, dim=1)
    sim = norm @ norm.t()
    mask = 1 - torch.eye(e)
    return (sim * mask).pow(2).sum() / (e * (e - 1))


def literal_decay(step, total, min_value=1e-5):
    if step >= total:
        return min_value
    return min_value + 0.5 * (1.0 - min_value) * (1 + math.cos(math.pi * step / total))


# ---------------------------------------------------------------------------------------------------- gate
@pytest.mark.parametrize("training", [True, False])
def test_topk_gate_equals_the_official_gate_values_and_gradients(training):
    torch.manual_seed(0)
    gate = TopKGate(16, num_experts=8, top_k=4, aux_loss_alpha=0.1).train(training)
    assert gate.weight.shape == (8, 16) and gate.weight.abs().max() <= 1 / math.sqrt(16)  # kaiming-uniform a=sqrt5
    h = torch.randn(3, 16, requires_grad=True)  # batch 3: one routing row per sample
    torch.manual_seed(7)
    idx, w, aux = gate(h)
    torch.manual_seed(7)  # the same training noise
    w_ref = gate.weight.detach().clone().requires_grad_(True)
    h_ref = h.detach().clone().requires_grad_(True)
    idx_ref, w_lit, aux_ref = literal_gate(h_ref, w_ref, 4, 0.1, training)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_lit)
    assert (w.sum(-1) < 1).all()  # not renormalised
    if not training:
        assert aux is None and aux_ref is None
        return
    torch.testing.assert_close(aux, aux_ref)
    (aux + (w * torch.arange(4.0)).sum()).backward()
    (aux_ref + (w_lit * torch.arange(4.0)).sum()).backward()
    torch.testing.assert_close(gate.weight.grad, w_ref.grad)
    torch.testing.assert_close(h.grad, h_ref.grad)


def test_training_noise_is_randn_over_num_experts():
    gate = TopKGate(4, num_experts=5, top_k=5, aux_loss_alpha=0.0)
    h = torch.randn(6, 4)
    torch.manual_seed(3)
    _, w, _ = gate.train()(h)
    torch.manual_seed(3)
    noise = torch.randn(6, 5) / 5
    clean = F.linear(h, gate.weight.detach())
    torch.testing.assert_close(w.sort(-1).values, (clean + noise).softmax(-1).sort(-1).values)
    _, w_eval, _ = gate.eval()(h)
    torch.testing.assert_close(w_eval.sort(-1).values, clean.softmax(-1).sort(-1).values)


def test_balance_uses_hard_counts_not_probabilities():
    """f_i = share of rows that picked expert i among their top-k (sums to k); a probability-based f differs."""
    gate = TopKGate(3, num_experts=4, top_k=2, aux_loss_alpha=1.0, noise=False)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [0, 0, 0]]))
    h = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    idx, _, aux = gate(h)
    scores = F.linear(h, gate.weight.detach()).softmax(-1)
    f = torch.zeros(4)
    for row in idx:
        f[row] += 0.5
    assert float(f.sum()) == pytest.approx(2.0)
    expected = 4 * float((f * scores.mean(0)).sum())
    assert float(aux.detach()) == pytest.approx(expected, rel=1e-6)
    prob_f = 4 * float((scores.mean(0) * scores.mean(0)).sum())
    assert abs(prob_f - expected) > 0.1
    # only P carries gradient: d aux / d scores_mean = E * f
    g = torch.autograd.grad(aux, gate.last_scores)[0]
    torch.testing.assert_close(g, (4 * f / 2).expand(2, 4))


def test_package_balance_detaches_the_routed_mass():
    """balance_from_mass (the package's option): gradient only through P, never through the routed weights."""
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], requires_grad=True)
    weights = probs * torch.tensor([1.0, 1.0, 0.0])  # top-2 of each row, depends on probs
    loss = balance_from_mass(probs, weights)
    loss.backward()
    f = weights.detach().mean(0) / weights.detach().mean(0).sum()
    p = probs.detach().mean(0)
    s = p.sum()
    # d/dprobs of 3 * sum f_i p_i / s, with f constant
    expected = 3 * (f / s - (f * p).sum() / s**2) / 2
    torch.testing.assert_close(probs.grad, expected.expand(2, 3))


# ---------------------------------------------------------------------------------------------------- orthogonality
def test_expert_orthogonality_equals_the_official_loss():
    torch.manual_seed(0)
    outs = torch.randn(4, 10, 6, requires_grad=True)
    ref = outs.detach().clone().requires_grad_(True)
    loss, lit = expert_orthogonality(outs), literal_ortho(ref)
    torch.testing.assert_close(loss, lit)
    loss.backward()
    lit.backward()
    torch.testing.assert_close(outs.grad, ref.grad)


@pytest.mark.parametrize("fused", [True, False])
def test_layer_orthogonality_spans_the_whole_batch(fused):
    """The official loss flattens the ungated outputs of all experts over the whole batch [E, B*S*D]; the layer's
    inner products give it exactly on the fused and the naive path, with gradients."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    pairs = {f"e{i}": LoraPair(torch.randn(2, 8), torch.randn(6, 2), 2.0 + i) for i in range(3)}
    layer = MoLELayer(base, list(pairs), pairs, MoLEConfig(gating="none"))
    layer.lora_B.requires_grad_(True)
    layer.track_orthogonality = True
    layer.fused = fused
    layer.routing = torch.tensor([[0.5, 0.2, 0.0], [0.0, 0.4, 0.1]])  # the loss ignores the routing weights
    x = torch.randn(2, 5, 8)
    x[1] *= 4  # a batch where per-sample and batch-wide cosines differ
    layer(x)
    cfg = InstructConfig(**SMALL)
    from mole.instruct.gate import cosine_penalty

    loss = cosine_penalty(layer.last_inner.sum(0))
    B = layer.lora_B.detach().clone().requires_grad_(True)
    A = layer.lora_A.detach()
    outs = torch.stack([(x.reshape(-1, 8) @ A[2 * i : 2 * i + 2].t() @ B[:, 2 * i : 2 * i + 2].t()) * (2.0 + i) / 2
                        for i in range(3)])  # fmt: skip  # [E, B*S, D]
    lit = literal_ortho(outs)
    torch.testing.assert_close(loss, lit, rtol=1e-5, atol=1e-6)
    loss.backward()
    lit.backward()
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-4, atol=1e-6)
    per_sample = torch.stack([literal_ortho(outs.view(3, 2, 5, 6)[:, b]) for b in range(2)]).mean()
    assert abs(float(per_sample) - float(lit)) > 1e-3  # the package's per-sample option is a different loss
    assert cfg.ortho_scope == "batch" and cfg.ortho_weight == 0.01


# ---------------------------------------------------------------------------------------------------- schedule
def test_aux_weight_is_the_official_cosine_decay():
    for step in (0, 1, 25, 50, 75, 99, 100, 150):
        assert cosine_decay(step, 100) == pytest.approx(literal_decay(step, 100), rel=1e-12, abs=0)
    assert cosine_decay(25, 100) == pytest.approx(0.853557, rel=1e-5)  # a linear decay would give 0.75
    im_cfg = InstructConfig(**SMALL)
    t = tiny_pixart()
    im = InstructMoLE(t, im_cfg, text_dim=32, total_steps=40)
    assert [im.aux_weight(s) for s in (0, 10, 40)] == pytest.approx([1.0, literal_decay(10, 40), 1e-5])


# ---------------------------------------------------------------------------------------------------- resampler
def test_perceiver_resampler_equals_the_official_network():
    torch.manual_seed(0)
    res = PerceiverResampler(embedding_dim=12, output_dim=10, dim=16, depth=2, dim_head=4, heads=4).eval()
    x, pooled = torch.randn(3, 7, 12), torch.randn(3, 10)
    lat = res.latents.repeat(3, 1, 1)
    xx = res.proj_in(x)
    for attn, ff in res.layers:
        xa, la = attn.norm1(xx), attn.norm2(lat)
        q = attn.to_q(la).view(3, 1, 4, 4).transpose(1, 2)
        k, v = attn.to_kv(torch.cat([xa, la], 1)).chunk(2, -1)
        k, v = (t.view(3, 8, 4, 4).transpose(1, 2) for t in (k, v))
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(4)).softmax(-1) @ v
        lat = attn.to_out(a.transpose(1, 2).reshape(3, 1, 16)) + lat
        lat = ff(lat) + lat
    expected = res.norm_out(res.proj_out(lat)) + pooled[:, None]
    torch.testing.assert_close(res(x, pooled), expected, rtol=1e-5, atol=1e-5)
    assert res.latents.shape == (1, 1, 16)
    padded = x.clone()
    padded[0, 5:] = 3.0  # no padding mask: every position counts
    assert not torch.allclose(res(padded, pooled)[0], res(x, pooled)[0])


# ---------------------------------------------------------------------------------------------------- the model
def pixart_inputs(model, batch=2):
    inp = unet_inputs(model, batch=batch, hw=(8, 12))
    inp["encoder_attention_mask"] = torch.ones(batch, 6, dtype=torch.long)
    return inp


def test_official_defaults_and_initialisation():
    cfg = InstructConfig()
    assert (cfg.num_experts, cfg.top_k, cfg.rank, cfg.alpha, cfg.lb_weight, cfg.ortho_weight) == (8, 4, 32, 32, 0.1,
                                                                                                   0.01)  # fmt: skip
    assert (cfg.resampler_dim, cfg.resampler_depth, cfg.resampler_heads, cfg.num_queries) == (768, 2, 12, 1)
    assert (cfg.shared_rank, cfg.shared_alpha, cfg.gate_lr, cfg.decay_min) == (256, 256, 5e-5, 1e-5)
    assert not cfg.renormalize and cfg.router_noise and cfg.layer_reduce == "sum"
    t = tiny_pixart()
    im = InstructMoLE(t, InstructConfig(**SMALL), text_dim=32, total_steps=10)
    layers = mole_layers(t)
    assert list(layers) == ["transformer_blocks.0.ff.net.2", "transformer_blocks.1.ff.net.2"]
    for layer in layers.values():
        assert layer.num_experts == 8 and layer.ranks == (4,) * 8 and layer.alphas == (32.0,) * 8
        assert layer.lora_A.abs().max() <= 1 / math.sqrt(4) and layer.lora_A.abs().max() > 0.45  # U(+-1/sqrt(r))
        assert float(layer.lora_B.abs().max()) == 0.0
    a = torch.cat([lora.lora_A.flatten() for lora in im.shared.loras])
    assert float(a.std()) == pytest.approx(1 / 4, rel=0.05)  # peft's gaussian init, std 1/r
    assert all(float(lora.lora_B.abs().max()) == 0 for lora in im.shared.loras)
    groups = im.param_groups(1e-4)
    gate_ids = {id(p) for g in im.router.gates for p in g.parameters()}
    assert groups[1]["lr"] == 5e-5 and {id(p) for p in groups[1]["params"]} == gate_ids
    assert {id(p) for p in im.router.resampler.parameters()} <= {id(p) for p in groups[0]["params"]}


def test_signal_is_computed_once_per_call_and_shared_by_all_layers():
    t = tiny_pixart()
    im = InstructMoLE(t, InstructConfig(**SMALL), text_dim=32, total_steps=10)
    calls, seen = [], []
    im.router.resampler.register_forward_hook(lambda m, a, o: calls.append(1))
    for g in im.router.gates:
        g.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    t.eval()
    with torch.no_grad():
        t(**pixart_inputs(t))
    assert len(calls) == 1 and len(seen) == 2 and torch.equal(seen[0], seen[1])
    w = im.router.last_weights  # (layers, b, E)
    scores = torch.stack([g.last_scores for g in im.router.gates])
    torch.testing.assert_close(w.sort(-1).values[..., -4:], scores.sort(-1).values[..., -4:])  # top-4, raw scores
    assert ((w > 0).sum(-1) == 4).all() and (w.sum(-1) < 1).all()


def test_official_aux_loss_is_the_literal_sum_over_layers():
    """Training mode, batch 2: aux = w(t) * sum_l (0.1 * E * sum f P + 0.01 * ortho over [E, B*S*D])."""
    t = tiny_pixart()
    im = InstructMoLE(t, InstructConfig(**SMALL), text_dim=32, total_steps=20)
    with torch.no_grad():
        for layer in mole_layers(t).values():
            layer.lora_B.normal_(0, 0.1)
    inputs = {}
    for path, layer in mole_layers(t).items():
        layer.register_forward_pre_hook(lambda m, a, p=path: inputs.__setitem__(p, a[0].detach()))
    t.train()
    torch.manual_seed(0)
    t(**pixart_inputs(t))
    aux, logs = im.aux_loss(5)
    expected = 0.0
    for gate, (path, layer) in zip(im.router.gates, mole_layers(t).items()):
        scores = gate.last_scores.detach()
        idx = scores.topk(4, -1).indices
        lb = 0.1 * 8 * (F.one_hot(idx, 8).sum(1).float().mean(0) * scores.mean(0)).sum()
        x = inputs[path].reshape(-1, layer.in_features)
        outs = torch.stack([layer.expert(f"expert{i}").delta_weight() @ x.t() for i in range(8)]).transpose(1, 2)
        expected += lb + 0.01 * literal_ortho(outs)
    expected *= literal_decay(5, 20)
    torch.testing.assert_close(aux.detach(), expected, rtol=1e-5, atol=1e-7)
    assert float(aux) > 0.1 and logs["instruct/aux_weight"] == pytest.approx(literal_decay(5, 20))
    gate_grad = torch.autograd.grad(aux, im.router.gates[0].weight, retain_graph=True)[0]
    assert float(gate_grad.abs().sum()) > 0  # the balance loss reaches the gates
    t.eval()
    with torch.no_grad():
        t(**pixart_inputs(t))
    assert not im.router.training and im.router.last_aux == {}  # no balance loss (nor noise) at inference


def test_everything_trains_jointly():
    """One optimizer step moves the gates (at their own lr), the resampler, the experts and the shared LoRA."""
    t = tiny_pixart()
    im = InstructMoLE(t, InstructConfig(**SMALL), text_dim=32, total_steps=10)
    t.train()
    opt = torch.optim.AdamW(im.param_groups(1e-3))
    watched = {"gate": im.router.gates[0].weight, "resampler": im.router.resampler.latents,
               "expert_B": mole_layers(t)["transformer_blocks.0.ff.net.2"].lora_B,
               "shared_B": im.shared.loras[0].lora_B}  # fmt: skip
    before = {k: v.detach().clone() for k, v in watched.items()}
    torch.manual_seed(0)
    out = t(**pixart_inputs(t)).sample
    (out.pow(2).mean() + im.aux_loss(0)[0]).backward()
    opt.step()
    for k, v in watched.items():
        assert not torch.equal(v.detach(), before[k]), f"{k} did not train"
    delta = (watched["gate"].detach() - before["gate"]).abs().max()
    assert float(delta) == pytest.approx(5e-5, rel=0.05)  # Adam's first step moves each weight by ~lr


def test_token_route_overrides_route_per_token():
    t = tiny_pixart()
    cfg = InstructConfig(**SMALL, token_route_overrides=[r"^transformer_blocks\.1\."])
    im = InstructMoLE(t, cfg, text_dim=32, total_steps=10)
    assert im.router.layer_paths == ["transformer_blocks.0.ff.net.2"]
    assert im.router.token_paths == ["transformer_blocks.1.ff.net.2"]
    layer = mole_layers(t)["transformer_blocks.1.ff.net.2"]
    assert im.router.token_gates[0].weight.shape == (8, layer.in_features) and im.router.token_gates[0].alpha == 0.01
    t.train()
    t(**pixart_inputs(t))
    w = layer.routing
    assert w.shape == (2, 24, 8) and ((w > 0).sum(-1) == 4).all()
    assert not torch.allclose(w[0, 0], w[0, 1])  # tokens route differently
    assert set(im.router.last_aux) == {"transformer_blocks.0.ff.net.2", "transformer_blocks.1.ff.net.2"}
    # the token-routed layer gives the same output on the naive path
    x = torch.randn(2, 24, layer.in_features)
    layer.routing = w
    torch.testing.assert_close(layer.forward_naive(x), MoLELayer.forward(layer, x), rtol=1e-4, atol=1e-5)


def test_official_file_round_trip(tmp_path):
    t = tiny_pixart()
    im = InstructMoLE(t, InstructConfig(**SMALL), text_dim=32, total_steps=10)
    with torch.no_grad():
        for layer in mole_layers(t).values():
            layer.lora_B.normal_(0, 0.1)
        for lora in im.shared.loras:
            lora.lora_B.normal_(0, 0.1)
    t.eval()
    inp = pixart_inputs(t)
    with torch.no_grad():
        expected = t(**inp).sample
    path = im.save(tmp_path / "instruct.safetensors", base_model="tiny")
    fresh = tiny_pixart().eval()
    loaded = InstructMoLE.load(fresh, path)
    assert loaded.cfg.to_dict() == im.cfg.to_dict() and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inp).sample, expected)
        set_fused(fresh, False)
        torch.testing.assert_close(fresh(**inp).sample, expected, rtol=1e-4, atol=1e-5)
