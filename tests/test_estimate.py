"""mole estimate: memory per training stage from the real shapes (meta tensors, nothing allocated)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mole import MoLEConfig, inject_mole
from mole.cli import main
from mole.estimate import (
    EstimateError,
    count_saved,
    denoiser_inputs,
    estimate_for_preset,
    estimate_memory,
    wrap_meta_experts,
)
from mole.full import build_denoiser
from mole.targets import TARGETS, Backbone, target_modules
from mole.tiny import random_expert, tiny_unet


@pytest.fixture(scope="module")
def sd15():
    """Stage-3 estimates of SD1.5 at 512 px: batch 1 and 2, fp32 and bf16, with and without checkpointing."""
    return {
        key: estimate_memory("sd15", 3, batch_size=b, precision=p, gradient_checkpointing=c)
        for key, (b, p, c) in {"b1": (1, "fp32", False), "b2": (2, "fp32", False), "bf16": (1, "bf16", False),
                               "ckpt": (1, "fp32", True)}.items()  # fmt: skip
    }


def test_meta_count_equals_the_count_on_real_tensors():
    """The shapes-only forward saves exactly the bytes a real forward of the same stage-3 model saves."""
    real = tiny_unet("sd15")
    inject_mole(real, [random_expert(real, "a", 4, seed=1), random_expert(real, "b", 4, seed=2)], MoLEConfig())
    for p in real.parameters():
        p.requires_grad_(False)
    for layer_gate in [m for n, m in real.named_modules() if n.endswith(".gates")]:
        layer_gate.requires_grad_(True)
    meta = tiny_unet("sd15").to("meta")
    wrap_meta_experts(meta, ["a", "b"], 4, "both")
    meta.requires_grad_(False)
    for n, p in meta.named_parameters():
        p.requires_grad_(".gates." in n)
    counts = []
    for model, device in ((real, "cpu"), (meta, "meta")):
        inputs = denoiser_inputs(model, 2, (8, 6), device, torch.float32)
        counts.append(count_saved(model, lambda m=model, i=inputs: m(**i)))
    assert counts[0]["total"] > 0
    assert counts[0]["total"] == counts[1]["total"]
    assert counts[0]["per_unit"] == counts[1]["per_unit"]


def test_parts_follow_the_real_shapes(sd15):
    est = sd15["b1"]
    assert est.wrapped_layers == 192  # the official SD1.5 count
    unet = build_denoiser("sd15", device="meta")
    paths = target_modules(unet, TARGETS[Backbone.SD15])
    factor_values = 0
    for path in paths:
        m = unet.get_submodule(path)
        d, o = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
        factor_values += 256 * (d + o)
    assert est.weights["2 experts (frozen)"] == 2 * factor_values * 4
    gate_values = est.trainable_params
    assert est.gradients == 4 * gate_values
    assert est.optimizer_state == 2 * 4 * gate_values  # AdamW: two fp32 states
    assert est.weights["unet"] == sum(p.numel() for p in unet.parameters()) * 4
    assert est.total == sum(est.weights.values()) + est.gradients + est.optimizer_state + est.activations + \
        est.workspace


def test_activations_scale_with_batch_and_shrink_with_checkpointing(sd15):
    b1, b2 = sd15["b1"].activations, sd15["b2"].activations
    assert 2 * b1 <= b2 <= 2.1 * b1  # linear in the batch, up to tensors shared by a batch of one
    assert sd15["ckpt"].activations < 0.4 * b1
    assert sd15["bf16"].activations == pytest.approx(b1 / 2, rel=0.1)  # half-size activations, fp32 gates
    assert sd15["bf16"].weights["unet"] * 2 == sd15["b1"].weights["unet"]
    assert sd15["b1"].recording > 0


def test_stage_2_trains_one_expert_and_lion_keeps_one_state():
    est = estimate_memory("sd15", 2, optimizer="lion", rank=64, resolution=256)
    assert est.weights["expert (trained, fp32)"] == est.trainable_params * 4
    assert est.optimizer_state == est.trainable_params * 4
    assert est.gradients == est.trainable_params * 4


@pytest.mark.parametrize(
    "kw,match",
    [({"kind": "sd3"}, "kind='sd3'"), ({"stage": 5}, "stage=5"), ({"precision": "fp8"}, "precision='fp8'"),
     ({"optimizer": "sgd"}, "optimizer='sgd'"), ({"resolution": 100}, "resolution=100"),
     ({"batch_size": 0}, "batch_size=0")],
)  # fmt: skip
def test_bad_requests_name_the_field(kw, match):
    args = {"kind": "sd15", "stage": 3, **kw}
    with pytest.raises(EstimateError, match=match):
        estimate_memory(**args)


def test_preset_uses_the_native_resolution_and_its_optimizer():
    est = estimate_for_preset("sd21", "stage1")
    assert (est.resolution, est.optimizer, est.stage) == (768, "lion", 1)
    assert est.weights["text_encoder"] == sum(
        p.numel() for p in __import__("mole.full", fromlist=["x"])._build_model("sd21", "text_encoder",
                                                                                 torch.float32, "meta").parameters()
    ) * 4  # stage 1 trains the text encoder: fp32


def test_cli_estimate_json_and_errors(capsys, caplog):
    assert main(["estimate", "--base", "sd15", "--stage", "3", "--resolution", "256", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["kind"], out["stage"], out["resolution"], out["wrapped_layers"]) == ("sd15", 3, 256, 192)
    assert out["gib"]["total (accelerator)"] > out["gib"]["weights: unet"]
    assert main(["estimate"]) == 2
    assert "--preset" in caplog.text
