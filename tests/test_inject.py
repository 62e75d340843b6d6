"""Injecting experts into tiny real diffusers backbones, and taking them out again."""

from __future__ import annotations

import pytest
import torch

from conftest import out_of, two_experts
from mole import (
    MoLEConfig,
    MoLEConfigError,
    MoLEInjectError,
    MoLELayer,
    gate_parameters,
    inject_mole,
    mole_layers,
    remove_mole,
    set_fused,
)
from mole.targets import TARGETS, Backbone, detect_backbone, target_modules
from mole.tiny import random_expert, tiny_pixart, tiny_unet


def test_detect_backbone_on_tiny_models():
    assert detect_backbone(tiny_unet("sd15")) is Backbone.SD15
    assert detect_backbone(tiny_unet("sd21")) is Backbone.SD21
    assert detect_backbone(tiny_unet("sdxl")) is Backbone.SDXL
    assert detect_backbone(tiny_pixart()) is Backbone.PIXART


def test_target_tables_pick_attention_ff_and_projections():
    sd15 = tiny_unet("sd15")
    paths = target_modules(sd15, TARGETS[Backbone.SD15])
    # 3 spatial transformers (down 0, mid, up 1) x (proj_in, proj_out, 8 attention, 2 ff) = 36... per block
    blocks = {p.rsplit(".transformer_blocks", 1)[0].rsplit(".proj_", 1)[0] for p in paths}
    assert len(paths) == 12 * len(blocks)
    assert any(p.endswith("proj_in") for p in paths) and any(p.endswith("attn2.to_k") for p in paths)
    assert isinstance(sd15.get_submodule([p for p in paths if p.endswith("proj_in")][0]), torch.nn.Conv2d)
    pixart = target_modules(tiny_pixart(), TARGETS[Backbone.PIXART])
    assert len(pixart) == 2 * 10  # 2 blocks x (8 attention + 2 ff)
    assert not any("caption_projection" in p or "adaln" in p for p in pixart)


def test_inject_wraps_every_covered_layer_and_prints(backbone):
    model, inputs = backbone
    experts = two_experts(model)
    inject_mole(model, experts)
    layers = mole_layers(model)
    assert set(layers) == set(experts[0].layers)
    assert "MoLELayer" in repr(model) and "face(r=4)" in repr(model)
    out = out_of(model, inputs)
    x = inputs.get("sample", inputs.get("hidden_states"))
    assert out.shape[0] == x.shape[0] and out.shape[2:] == x.shape[2:] and torch.isfinite(out).all()


def test_fused_model_equals_naive_model(backbone):
    model, inputs = backbone
    inject_mole(model, two_experts(model, std=0.2), MoLEConfig(gating="both"))
    fused = out_of(model, inputs)
    set_fused(model, False)
    naive = out_of(model, inputs)
    torch.testing.assert_close(fused, naive, rtol=1e-4, atol=1e-5)


def test_zero_experts_leave_the_model_output_unchanged(backbone):
    model, inputs = backbone
    before = out_of(model, inputs)
    experts = two_experts(model)
    for ex in experts:
        for pair in ex.layers.values():
            pair.up.zero_()
    inject_mole(model, experts)
    torch.testing.assert_close(out_of(model, inputs), before, rtol=0, atol=1e-6)


def test_experts_change_the_output(sd15):
    model, inputs = sd15
    before = out_of(model, inputs)
    inject_mole(model, two_experts(model, std=0.2))
    assert (out_of(model, inputs) - before).abs().max() > 1e-3


def test_only_gates_are_trainable_and_get_gradients(sd15):
    model, inputs = sd15
    model.train()
    inject_mole(model, two_experts(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".gates." in n for n in trainable)
    assert len(gate_parameters(model)) == len(trainable) == 4 * len(mole_layers(model))
    model(**inputs).sample.pow(2).mean().backward()
    for n, p in model.named_parameters():
        if ".gates." in n:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n


def test_remove_restores_the_model_bit_exactly(backbone):
    model, inputs = backbone
    params = list(model.parameters())
    for i, p in enumerate(params):  # a mix of frozen and trainable parameters, as a user may have
        p.requires_grad_(i % 3 == 0)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = out_of(model, inputs)
    inject_mole(model, two_experts(model, std=0.3))
    assert not torch.equal(out_of(model, inputs), before)
    remove_mole(model)
    assert not hasattr(model, "mole_state")
    assert not any(isinstance(m, MoLELayer) for m in model.modules())
    after_modules = dict(model.named_modules())
    assert after_modules.keys() == modules.keys() and all(after_modules[k] is modules[k] for k in modules)
    after_state = model.state_dict()
    assert after_state.keys() == state.keys() and all(torch.equal(after_state[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(out_of(model, inputs), before)


def test_any_number_of_experts_with_different_ranks(sd15):
    model, inputs = sd15
    experts = [
        random_expert(model, n, rank=r, seed=i) for i, (n, r) in enumerate([("face", 4), ("hand", 8), ("feet", 2)])
    ]
    inject_mole(model, experts)
    layer = next(iter(mole_layers(model).values()))
    assert layer.expert_names == ("face", "hand", "feet") and layer.ranks == (4, 8, 2)
    assert layer.lora_A.shape[0] == 14
    fused = out_of(model, inputs)
    set_fused(model, False)
    torch.testing.assert_close(fused, out_of(model, inputs), rtol=1e-4, atol=1e-5)


def test_experts_may_cover_different_layers(sd15):
    model, inputs = sd15
    paths = target_modules(model, TARGETS[Backbone.SD15])
    face = random_expert(model, "face", paths=paths[:10], seed=1, std=0.2)
    hand = random_expert(model, "hand", paths=paths[5:], seed=2, std=0.2)
    inject_mole(model, [face, hand])
    layers = mole_layers(model)
    assert set(layers) == set(paths)
    assert layers[paths[0]].ranks == (4, 0) and layers[paths[-1]].ranks == (0, 4)
    fused = out_of(model, inputs)
    set_fused(model, False)
    torch.testing.assert_close(fused, out_of(model, inputs), rtol=1e-4, atol=1e-5)


def test_kohya_and_dotted_experts_inject_the_same(sd15):
    model, inputs = sd15
    inject_mole(model, [random_expert(model, "face", seed=3, std=0.2)], MoLEConfig(gate_init="zero"))
    dotted = out_of(model, inputs)
    remove_mole(model)
    inject_mole(model, [random_expert(model, "face", seed=3, std=0.2, kohya=True)], MoLEConfig(gate_init="zero"))
    torch.testing.assert_close(out_of(model, inputs), dotted, rtol=0, atol=0)


def test_unknown_layer_key_is_named_and_nothing_changes(sd15):
    model, _ = sd15
    bad = random_expert(model, "face")
    bad.layers["down_blocks.9.attentions.0.proj_in"] = next(iter(bad.layers.values()))
    with pytest.raises(Exception, match=r"expert 'face'.*down_blocks\.9\.attentions\.0\.proj_in.*nearest: "):
        inject_mole(model, [bad])
    assert not mole_layers(model) and not hasattr(model, "mole_state")


def test_non_target_layer_is_refused_with_the_fix(sd15):
    model, _ = sd15
    ex = random_expert(model, "face", paths=["time_embedding.linear_1"])
    with pytest.raises(MoLEInjectError, match=r"time_embedding\.linear_1.*not a MoLE target.*targets"):
        inject_mole(model, [ex])
    inject_mole(model, [ex], MoLEConfig(targets=[r"time_embedding\.linear_1$"]))
    assert list(mole_layers(model)) == ["time_embedding.linear_1"]


def test_bad_expert_lists_are_refused(sd15):
    model, _ = sd15
    face = random_expert(model, "face")
    with pytest.raises(MoLEInjectError, match="two experts are named 'face'"):
        inject_mole(model, [face, face])
    with pytest.raises(MoLEInjectError, match="at least one expert"):
        inject_mole(model, [])
    inject_mole(model, [face])
    with pytest.raises(MoLEInjectError, match="already has MoLE layers"):
        inject_mole(model, [face])


def test_config_errors_name_field_and_value():
    with pytest.raises(MoLEConfigError, match=r"gating='softmax'.*'local', 'global', 'both'"):
        MoLEConfig(gating="softmax")
    with pytest.raises(MoLEConfigError, match="global_source"):
        MoLEConfig(global_source="pooled")
    with pytest.raises(MoLEConfigError, match="list of regular expressions"):
        MoLEConfig(targets="to_q")
    with pytest.raises(MoLEConfigError, match=r"unknown MoLEConfig field\(s\) \['rank'\]"):
        MoLEConfig.from_dict({"rank": 4})
    assert MoLEConfig.from_dict(MoLEConfig(gating="local").to_dict()).gating.value == "local"
