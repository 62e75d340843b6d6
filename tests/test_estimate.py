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


# ---------------------------------------------------------------------------------------------------- strategies
@pytest.fixture(scope="module")
def stage2():
    """SD1.5 stage 2 (bf16, 256 px) on one device: what the strategies divide."""
    return estimate_memory("sd15", 2, precision="bf16", resolution=256, rank=16)


def test_ddp_is_the_same_on_any_number_of_devices(stage2):
    from mole.estimate import with_strategy

    for n in (2, 8):
        assert with_strategy(stage2, n, "ddp").total == stage2.total
        assert with_strategy(stage2, n, "ddp").weights == stage2.weights


def test_fsdp2_halves_the_sharded_part_on_two_devices(stage2):
    from mole.estimate import GATHER_BUFFER, with_strategy

    two = with_strategy(stage2, 2, "fsdp2")
    assert stage2.sharded_weights == ("unet", "expert (trained, fp32)")  # the denoiser: base and expert
    for name in stage2.sharded_weights:
        assert two.weights[name] == -(-stage2.weights[name] // 2)
    assert two.weights["vae"] == stage2.weights["vae"] > 0  # frozen components stay whole
    assert two.weights["text_encoder"] == stage2.weights["text_encoder"] > 0
    assert (two.gradients, two.optimizer_state) == (stage2.gradients // 2, stage2.optimizer_state // 2)
    assert two.activations == stage2.activations  # per device's batch
    sharded = sum(stage2.weights[k] for k in stage2.sharded_weights) + stage2.gradients + stage2.optimizer_state
    assert two.weights[GATHER_BUFFER] == 2 * stage2.largest_block > 0
    assert two.total == pytest.approx(stage2.total - sharded / 2 + 2 * stage2.largest_block, abs=4)
    four = with_strategy(stage2, 4, "fsdp2")
    assert four.weights["unet"] == -(-stage2.weights["unet"] // 4) and four.total < two.total
    assert with_strategy(stage2, 2, "zero3").total == two.total  # the same layout: trained modules partitioned


def test_zero2_shards_gradients_optimizer_and_fp32_masters_only():
    from mole.estimate import with_strategy

    one = estimate_memory("sd15", 1, precision="bf16", optimizer="lion", resolution=256)
    four = with_strategy(one, 4, "zero2")
    assert one.trained_weights == ("text_encoder", "unet")  # stage 1 trains both, fp32 master weights
    assert four.weights["unet"] == one.weights["unet"] // 4 and four.weights["text_encoder"] == -(
        -one.weights["text_encoder"] // 4)
    assert four.weights["autocast weight copies"] == one.weights["autocast weight copies"] > 0  # bf16, whole
    assert four.weights["vae"] == one.weights["vae"]
    assert four.gradients == one.gradients // 4 and four.optimizer_state == one.optimizer_state // 4
    fp32 = estimate_memory("sd15", 2, precision="fp32", resolution=256, rank=16)
    assert with_strategy(fp32, 4, "zero2").weights == fp32.weights  # no master copies: the weights stay whole


def test_largest_unit_follows_the_block_lists():
    from mole.estimate import largest_unit

    model = nn.Module()
    model.stem = nn.Linear(5, 5)  # 30, the module's own unit
    model.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(8, 8), nn.Sequential(nn.Linear(2, 2))])
    model.layers[1].block = nn.ModuleList([nn.Linear(6, 6)])  # nested: its own unit (42), out of layers.1's 72
    assert largest_unit(model, lambda p: p.numel()) == 72
    model.layers[1].block.append(nn.Linear(9, 9))  # 90
    assert largest_unit(model, lambda p: p.numel()) == 90


def test_devices_needed_and_bad_strategies(stage2, caplog, capsys):
    from mole.estimate import GB, devices_needed, with_strategy

    budget = stage2.total / GB + 1 - 0.01  # just too small for one device (1 GiB kept back)
    n = devices_needed(stage2, budget, "fsdp2")
    assert n == 2 and with_strategy(stage2, 2, "fsdp2").total <= (budget - 1) * GB < stage2.total
    assert devices_needed(stage2, budget, "ddp") is None  # ddp never shrinks
    with pytest.raises(EstimateError, match="strategy='fsdp'"):
        estimate_memory("sd15", 2, strategy="fsdp")
    with pytest.raises(EstimateError, match="gpus=0"):
        with_strategy(stage2, 0, "ddp")
    outs = []
    for extra in ([], ["--gpus", "2", "--strategy", "fsdp2"]):
        assert main(["estimate", "--base", "sd15", "--stage", "2", "--resolution", "256", "--rank", "16", "--json",
                     *extra]) == 0  # fmt: skip
        outs.append(json.loads(capsys.readouterr().out))
    assert [(o["gpus"], o["strategy"]) for o in outs] == [(1, "ddp"), (2, "fsdp2")]
    assert outs[1]["gib"]["weights: unet"] == pytest.approx(outs[0]["gib"]["weights: unet"] / 2, abs=1e-4)
    assert outs[1]["gib"]["weights: vae"] == outs[0]["gib"]["weights: vae"]
