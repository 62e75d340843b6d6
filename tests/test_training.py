"""The three stages end to end on a tiny SD1.5 pipeline and real face images from shared/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import HANDS, image_folder
from mole import inject_mole, load_expert, load_mole, mole_layers
from mole.models import DiffusionModel
from mole.tiny import random_expert, tiny_unet, unet_inputs
from mole.training import load_config, train

FAST = ["data.resolution=32", "batch_size=2", "total_batch_size=2", "tensorboard=false", "data.caption_dropout=0.0"]


def run(preset, base, data, out, *extra):
    # the presets carry the paper's alpha (64 / 128 at rank 256); a test's small rank keeps scale 1 unless it says
    rank = next((e.split("=", 1)[1] for e in extra if e.startswith("expert.rank=")), None)
    alpha = [f"expert.alpha={rank}"] if rank and not any(e.startswith("expert.alpha=") for e in extra) else []
    return train(load_config(preset=preset, overrides=[
        f"model='{base}'", f"data.path='{data}'", f"output_dir='{out}'", *FAST, *alpha, *extra]))  # fmt: skip


def params_of(model_dir: Path, sub: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((model_dir / sub).glob("*.safetensors"))))


def test_stage2_trains_only_the_expert_and_memorises(tmp_path, tiny_sd15_dir, faces_dir):
    result = run("stage2-face", tiny_sd15_dir, faces_dir, tmp_path / "s2", "max_steps=30", "expert.rank=4",
                 "optim.lr=3e-3", "checkpoint_every=10")  # fmt: skip
    assert result.steps == 30 and len(result.losses) == 30
    assert result.probe_loss_last < 0.9 * result.probe_loss_first  # the memorised batch got easier
    expert = load_expert(result.final[0], "face")
    assert expert.ranks == {4} and len(expert.layers) == 48
    assert all(p.up.abs().sum() > 0 for p in expert.layers.values())  # B left zero-init: every layer learned
    assert [p.name for p in result.checkpoints] == ["checkpoint-0000020", "checkpoint-0000030"]
    # only the expert's factors were trainable: they are all a checkpoint holds
    keys = list(params_of(result.checkpoints[-1], ".").keys())
    assert len(keys) == 2 * 48 and all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    assert (result.checkpoints[-1] / "config.toml").read_text() == (tmp_path / "s2" / "config.toml").read_text()
    # and diffusers' own loader reads the expert
    model = DiffusionModel.from_pretrained(tiny_sd15_dir)
    model.pipe.load_lora_weights(str(result.final[0].parent), weight_name=result.final[0].name, adapter_name="face")
    assert "face" in model.denoiser.peft_config


def test_stage3_trains_only_gates(tmp_path, tiny_sd15_dir, faces_dir):
    base_unet = DiffusionModel.from_pretrained(tiny_sd15_dir).denoiser
    face = random_expert(base_unet, "face", rank=4, seed=1, std=0.05)
    hand = random_expert(base_unet, "hand", rank=4, seed=2, std=0.05)
    from mole import save_expert

    paths = {n: save_expert(e, tmp_path / f"{n}.safetensors") for n, e in (("face", face), ("hand", hand))}
    experts = "{" + ", ".join(f"{n} = '{p}'" for n, p in paths.items()) + "}"
    result = run("stage3", tiny_sd15_dir, faces_dir, tmp_path / "s3", "max_steps=6", f"mixture.experts={experts}",
                 "optim.lr=1e-2", "log_every=3", "mixture.gate_init='zero'")  # fmt: skip
    assert result.steps == 6
    # gate statistics were logged per expert, and moved away from the zero-init value 0.5
    assert [g["step"] for g in result.gate_log] == [3, 6]
    assert set(result.gate_log[0]) >= {"gate/global/face", "gate/global/hand", "gate/local_mean/face"}
    assert any(abs(v - 0.5) > 1e-3 for k, v in result.gate_log[-1].items() if k.startswith("gate/"))
    metrics = [json.loads(line) for line in (tmp_path / "s3" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3, 6] and "gate/global/hand" in metrics[0]
    # the saved file: experts identical to the inputs (frozen), gates changed, base unchanged
    unet = DiffusionModel.from_pretrained(tiny_sd15_dir).denoiser
    load_mole(unet, result.final[0])
    for path, layer in mole_layers(unet).items():
        assert torch.equal(layer.expert("face").down, face.layers[path].down)
        assert torch.equal(layer.expert("hand").up, hand.layers[path].up)
    # every zero-initialised gate tensor was trained, the biases included (a stage-3 optimizer that left out
    # the biases passed when only `any` gate tensor had to move)
    gates = {f"{path}.{n}": p for path, layer in mole_layers(unet).items() for n, p in layer.gates.named_parameters()}
    assert any(n.endswith("_bias") for n in gates) and any(n.endswith("_weight") for n in gates)
    unmoved = [n for n, p in gates.items() if not p.abs().max() > 0]
    assert not unmoved, unmoved
    keys = list(params_of(result.checkpoints[-1], ".").keys())
    assert keys and all(".gates." in k for k in keys)  # and they were the only trainable tensors


def test_stage1_changes_unet_and_text_encoder_but_not_vae(tmp_path, tiny_sd15_dir, faces_dir):
    result = run("stage1", tiny_sd15_dir, faces_dir, tmp_path / "s1", "max_steps=3", "optim.lr=1e-3")
    final = result.final[0]
    assert (final / "model_index.json").is_file()
    for sub, should_change in (("unet", True), ("text_encoder", True), ("vae", False)):
        before, after = params_of(tiny_sd15_dir, sub), params_of(final, sub)
        assert before.keys() == after.keys()
        changed = any(not torch.equal(before[k], after[k]) for k in before)
        assert changed is should_change, sub


def test_resume_continues_the_same_trajectory(tmp_path, tiny_sd15_dir, faces_dir):
    common = ["expert.rank=4", "optim.lr=1e-3", "checkpoint_every=4"]
    full = run("stage2-face", tiny_sd15_dir, faces_dir, tmp_path / "full", "max_steps=8", *common)
    part = run("stage2-face", tiny_sd15_dir, faces_dir, tmp_path / "part", "max_steps=4", *common)
    resumed = run("stage2-face", tiny_sd15_dir, faces_dir, tmp_path / "part", "max_steps=8", "resume='latest'",
                  *common)  # fmt: skip
    assert resumed.start_step == 4 and resumed.steps == 8
    torch.testing.assert_close(torch.tensor(part.losses + resumed.losses), torch.tensor(full.losses), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    a, b = load_expert(full.final[0], "face"), load_expert(resumed.final[0], "face")
    for k in a.layers:
        torch.testing.assert_close(a.layers[k].up, b.layers[k].up, rtol=1e-5, atol=1e-7)


def test_interrupted_checkpoint_write_is_ignored(tmp_path, tiny_sd15_dir, faces_dir):
    out = tmp_path / "run"
    run("stage2-face", tiny_sd15_dir, faces_dir, out, "max_steps=2", "expert.rank=2", "checkpoint_every=2")
    (out / "checkpoints" / ".tmp-checkpoint-0000004").mkdir()  # a crash mid-write leaves only this
    resumed = run("stage2-face", tiny_sd15_dir, faces_dir, out, "max_steps=3", "expert.rank=2", "resume='latest'")
    assert resumed.start_step == 2 and resumed.steps == 3


def test_corrupt_images_are_skipped_and_counted(tmp_path, tiny_sd15_dir, faces_dir):
    data = image_folder(tmp_path / "mixed", [str(p) for p in sorted(faces_dir.glob("*.pgm"))[:2]], "a face")
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (data / "broken.txt").write_text("a face")
    result = run("stage2-face", tiny_sd15_dir, data, tmp_path / "s2", "max_steps=6", "expert.rank=2",
                 "batch_size=3", "total_batch_size=3")  # fmt: skip
    assert result.steps == 6 and result.skipped_images == 6  # one bad image in every batch of the 3-image set


def test_v_prediction_model_trains(tmp_path, faces_dir):
    from mole.tiny import tiny_pipeline

    tiny_pipeline("sd21").save_pretrained(tmp_path / "sd21")
    model = DiffusionModel.from_pretrained(tmp_path / "sd21")
    assert model.prediction_type == "v_prediction"
    result = run("stage2-face", tmp_path / "sd21", faces_dir, tmp_path / "s2", "max_steps=3", "expert.rank=2")
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.parametrize("kind", ["sdxl", "pixart"])
def test_other_backbones_train_experts(tmp_path, faces_dir, kind):
    from mole.tiny import tiny_pipeline

    tokenizer = None
    if kind == "pixart":
        tokenizer = pytest.importorskip("conftest").t5_tokenizer()
    tiny_pipeline(kind, tokenizer=tokenizer).save_pretrained(tmp_path / kind)
    result = run("stage2-hand", tmp_path / kind, faces_dir, tmp_path / "s2", "max_steps=2", "expert.rank=2")
    expert = load_expert(result.final[0], "hand", component="unet" if kind == "sdxl" else "transformer")
    model = DiffusionModel.from_pretrained(tmp_path / kind).denoiser
    inject_mole(model, [expert])
    assert len(mole_layers(model)) == len(expert.layers)


def test_two_processes_keep_identical_weights(tmp_path, tiny_sd15_dir, faces_dir):
    if not HANDS:
        pytest.skip("shared data missing")
    script = Path(__file__).parent / "scripts" / "mp_train.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611",
           str(script), str(tmp_path), str(tiny_sd15_dir), str(faces_dir)]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}  # what `accelerate launch --cpu` sets: gloo on the CPU
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == "2"
    # total_batch_size=2 over 2 processes of batch 1: no accumulation (the process count enters the arithmetic)
    assert r0["batch"] == r1["batch"] == {"per_device": 1, "processes": 2, "grad_accum": 1, "total": 2}
    assert r0["checksum"] == r1["checksum"] > 0  # gradients were all-reduced: both processes hold the same expert
    assert r0["losses"] != r1["losses"]  # ... while each saw its own share of the data
    assert (tmp_path / "final" / "face.safetensors").is_file()


def test_probe_of_untrained_model_matches_a_direct_computation(tiny_sd15_dir):
    """The loss pieces agree with diffusers' scheduler: x_t and v from add_noise / get_velocity."""
    model = DiffusionModel.from_pretrained(tiny_sd15_dir)
    sched = model.noise_scheduler
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    a = sched.alphas_cumprod[t].view(2, 1, 1, 1)
    torch.testing.assert_close(sched.add_noise(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(sched.get_velocity(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    unet = tiny_unet("sd15")
    assert unet(**unet_inputs(unet)).sample.shape == (2, 4, 16, 16)


def test_accumulation_checkpointing_bf16_caches_and_tensorboard(tmp_path, tiny_sd15_dir, faces_dir):
    pytest.importorskip("tensorboard")
    result = run("stage2-face", tiny_sd15_dir, faces_dir, tmp_path / "s2", "max_steps=3", "expert.rank=2",
                 "total_batch_size=4", "gradient_checkpointing=true", "mixed_precision='bf16'",
                 "data.cache_latents=true", "data.cache_text=true", "tensorboard=true", "log_every=1",
                 "optim.lr=1e-3")  # fmt: skip
    assert result.steps == 3 and len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    events = list((tmp_path / "s2").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    expert = load_expert(result.final[0], "face")
    assert all(p.up.dtype == torch.float32 and p.up.abs().sum() > 0 for p in expert.layers.values())


def test_cli_resume_is_explicit_about_changed_settings(tmp_path, tiny_sd15_dir, faces_dir, capsys, caplog):
    from mole.cli import main

    out = tmp_path / "run"
    base = ["train", "--preset", "stage2-face", *[a for s in [f"model='{tiny_sd15_dir}'", f"data.path='{faces_dir}'",
            f"output_dir='{out}'", *FAST, "expert.rank=2", "expert.alpha=2", "checkpoint_every=2"]
            for a in ("--set", s)]]  # fmt: skip
    # resume=none / false start fresh (they used to be refused as "not a checkpoint folder")
    assert main([*base, "--set", "max_steps=2", "--set", "resume=none"]) == 0
    assert main([*base, "--set", "max_steps=2", "--set", "resume=false", "--overwrite"]) == 0
    capsys.readouterr()
    caplog.clear()
    # a changed learning rate stops the resume, naming the key, both values and the two ways forward
    assert main([*base, "--set", "max_steps=3", "--set", "resume=latest", "--set", "optim.lr=5e-4"]) == 2
    err = capsys.readouterr().err + caplog.text
    assert "optim.lr" in err and "0.0005" in err and "output_dir" in err and "--accept-changes" in err
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "max_steps" not in errors[0]  # one line; more steps is a safe change
    assert not (out / "checkpoints" / "checkpoint-0000003").exists()
    # more steps alone is applied; with --accept-changes the new lr too, and config.toml says what ran
    assert main([*base, "--set", "max_steps=3", "--set", "resume=latest", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["start_step"] == 2
    assert main([*base, "--set", "max_steps=4", "--set", "resume=latest", "--set", "optim.lr=5e-4",
                 "--accept-changes"]) == 0  # fmt: skip
    assert "5e-4" in (out / "config.toml").read_text() or "0.0005" in (out / "config.toml").read_text()
