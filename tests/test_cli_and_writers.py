"""The `mole` CLI (demo, info) and writing experts in formats other tools read."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import out_of
from mole import ExpertFormat, MoLEConfig, inject_mole, load_expert, mole_layers, save_expert
from mole.cli import main
from mole.tiny import random_expert, tiny_pixart, tiny_unet, unet_inputs


def test_demo_runs_all_stages_and_reports_real_numbers(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path), "--steps", "3", "--rank", "4", "--train-steps", "4"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["wrapped_layers"] == 48
    assert summary["max_abs_fused_vs_naive"] < 1e-4
    assert summary["max_abs_kohya_hand_vs_diffusers_hand"] == 0.0
    assert summary["remove_restores_base_exactly"] is True
    assert summary["max_abs_change_vs_base"] > 1e-4
    assert set(summary["mean_global_gate"]["face_prompts"]) == {"face", "hand"}
    for name in ("face", "hand"):
        assert summary["experts"][name]["probe_loss_last"] < summary["experts"][name]["probe_loss_first"]
    assert (tmp_path / "inspect" / "gates_global.png").is_file() and (tmp_path / "generate" / "compare.png").is_file()
    assert main(["info", "--json", summary["files"]["mole"]]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in info["experts"]] == ["face", "hand"] and info["tensor_counts"]["gate_values"] > 0


def test_cli_errors_are_reported_not_raised(tmp_path, caplog):
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in caplog.text
    assert main(["demo", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "sample_steps=0" in caplog.text


@pytest.mark.parametrize("fmt", [ExpertFormat.DIFFUSERS, ExpertFormat.KOHYA])
def test_saved_experts_load_back_identically(tmp_path, fmt):
    model = tiny_unet("sd15")
    expert = random_expert(model, "face", rank=4, alpha=2.0, seed=3)
    path = save_expert(expert, tmp_path / f"face_{fmt.value}.safetensors", fmt)
    back = load_expert(path, "face")
    inject_mole(model, [back])  # kohya names resolve against the model
    for key, pair in expert.layers.items():
        got = mole_layers(model)[key].expert("face")
        assert torch.equal(got.down, pair.down) and torch.equal(got.up, pair.up) and got.alpha == 2.0


def test_diffusers_reads_our_expert_files(tmp_path):
    """An expert saved in diffusers format loads with diffusers' own loader and computes the same as MoLE."""
    pytest.importorskip("peft")
    model = tiny_unet("sd15").eval()
    inputs = unet_inputs(model, hw=(16, 12))
    expert = random_expert(model, "face", rank=4, alpha=8.0, seed=3, std=0.2)
    path = save_expert(expert, tmp_path / "face.safetensors")
    model.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="unet", adapter_name="face")
    by_diffusers = out_of(model, inputs)
    plain = tiny_unet("sd15").eval()
    inject_mole(plain, [load_expert(path, "face")], MoLEConfig(gate_init="zero"))
    with torch.no_grad():
        for layer in mole_layers(plain).values():
            layer.gates.local_bias.fill_(40.0)
            layer.gates.global_bias.fill_(40.0)
    torch.testing.assert_close(out_of(plain, inputs), by_diffusers, rtol=1e-4, atol=1e-5)


def test_dit_expert_round_trip(tmp_path):
    model = tiny_pixart()
    expert = random_expert(model, "hand", rank=2, seed=1)
    path = save_expert(expert, tmp_path / "hand.safetensors", component="transformer")
    back = load_expert(path, "hand", component="transformer")
    assert set(back.layers) == set(expert.layers)
    with pytest.raises(Exception, match="no LoRA layers"):
        load_expert(path, "hand", component="unet")
