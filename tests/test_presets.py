"""The presets are the paper's settings: each field read back from `load_config(preset=...)` and checked against
the table below (kept here, not imported from the library, so a preset that drifts fails). The loop honours the
fields the presets added: total_batch_size (through accumulation), clip_skip and expert.alpha."""

from __future__ import annotations

import pytest
import tomllib
import torch

from mole.cli import main
from mole.training import PRESET_SOURCES, PRESETS, TrainConfig, TrainConfigError, annotated_toml, load_config
from mole.training.config import build_dataclass

# The paper (Zhu et al., MoLE, NeurIPS 2024, appendix) and the official scripts (github.com/JiePKU/MoLE, command/).
PAPER = {
    "stage1": {
        "stage": 1, "model": "runwayml/stable-diffusion-v1-5", "train_text_encoder": True, "total_batch_size": 64,
        "max_steps": 300_000, "optim.name": "lion", "optim.lr": 2e-6, "optim.schedule": "constant",
        "optim.warmup_steps": 0, "min_snr_gamma": 5.0, "clip_skip": 1,
    },
    "stage2-face": {
        "stage": 2, "model": "runs/stage1/final", "expert.name": "face", "total_batch_size": 64, "max_steps": 30_000,
        "optim.name": "adamw", "optim.lr": 2e-5, "optim.schedule": "constant", "optim.warmup_steps": 0,
        "expert.rank": 256, "expert.alpha": 64.0, "clip_skip": 1,
    },
    "stage2-hand": {
        "stage": 2, "model": "runs/stage1/final", "expert.name": "hand", "total_batch_size": 64, "max_steps": 60_000,
        "optim.name": "adamw", "optim.lr": 1e-5, "optim.schedule": "constant", "optim.warmup_steps": 0,
        "expert.rank": 256, "expert.alpha": 128.0, "clip_skip": 1,
    },
    "stage3": {
        "stage": 3, "model": "runs/stage1/final", "total_batch_size": 64, "max_steps": 50_000, "optim.name": "adamw",
        "optim.lr": 1e-5, "optim.schedule": "constant", "optim.warmup_steps": 0, "clip_skip": 1,
        "mixture.gating": "both",
    },
}  # fmt: skip


def field_of(cfg: TrainConfig, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return getattr(value, "value", value)  # enums compare by their TOML spelling


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_each_preset_field_is_the_papers_value(preset):
    cfg = load_config(preset=preset)  # the presets are complete: no --set needed to validate
    for dotted, expected in PAPER[preset].items():
        assert field_of(cfg, dotted) == expected, f"{preset}: {dotted}"
    assert cfg.batch_plan(1).grad_accum * cfg.batch_size == 64
    sources = PRESET_SOURCES[preset]
    for dotted in PAPER[preset]:  # every paper value names where it comes from
        assert "paper" in sources[dotted] or "official script" in sources[dotted], dotted


def test_stage_two_and_three_build_on_stage_one_and_train_the_unet_only():
    s1, s3 = load_config(preset="stage1"), load_config(preset="stage3")
    for name in ("stage2-face", "stage2-hand"):
        s2 = load_config(preset=name)
        assert s2.model == f"{s1.output_dir}/final" and s2.train_text_encoder is False
        assert s3.mixture.experts[s2.expert.name] == f"{s2.output_dir}/final/{s2.expert.name}.safetensors"
    assert s3.model == f"{s1.output_dir}/final"
    assert set(PRESETS) == {"stage1", "stage2-face", "stage2-hand", "stage3", "instruct"}
    # no MoLE-paper value is claimed for InstructMoLE; its preset is the official variant
    assert "not from the MoLE paper: InstructMoLE official code" in PRESET_SOURCES["instruct"]["optim.lr"]
    assert PRESETS["instruct"]["instruct"]["variant"] == "official"
    from mole.training.optim import make_optimizer

    instruct = load_config(preset="instruct", overrides=["model='m'", "data.path='d'"])
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], instruct.optim)
    assert type(opt).__name__ == "AdamW" and opt.param_groups[0]["weight_decay"] == 1e-4  # official, not 1e-2
    assert opt.param_groups[0]["lr"] == 1e-4


# ---------------------------------------------------------------------------------------------------- batch 64
@pytest.mark.parametrize("batch,procs,accum", [(8, 1, 8), (8, 4, 2), (16, 4, 1), (1, 1, 64), (2, 8, 4)])
def test_total_batch_is_reached_by_accumulation(batch, procs, accum):
    plan = load_config(preset="stage3", overrides=[f"batch_size={batch}"]).batch_plan(procs)
    assert (plan.per_device, plan.processes, plan.grad_accum, plan.total) == (batch, procs, accum, 64)
    assert plan.describe() == f"64 images per optimizer step = {batch} per device x {procs} process(es) x {accum} " \
                              "accumulation step(s)"  # fmt: skip


def test_a_total_that_cannot_be_reached_is_an_error_never_rounded():
    with pytest.raises(TrainConfigError, match=r"total_batch_size=64 .* batch_size=6 .*\[1, 2, 4, 8, 16, 32, 64\]"):
        load_config(preset="stage1", overrides=["batch_size=6"])
    cfg = load_config(preset="stage1", overrides=["batch_size=8"])
    with pytest.raises(TrainConfigError, match=r"batch_size=8 x 3 process\(es\) = 24.*\[\]|batch_size=8 x 3"):
        cfg.batch_plan(3)
    with pytest.raises(TrainConfigError, match=r"grad_accum=4 contradicts total_batch_size=64"):
        load_config(preset="stage1", overrides=["batch_size=8", "grad_accum=4"])
    assert load_config(preset="stage1", overrides=["batch_size=8", "grad_accum=8"]).batch_plan(1).grad_accum == 8
    # without a total, the old meaning: batch_size x processes x grad_accum
    plain = load_config(overrides=["model=m", "data.path=d", "mixture.experts={face='f'}", "batch_size=3",
                                   "grad_accum=5"])  # fmt: skip
    assert plain.batch_plan(2).total == 30


# ---------------------------------------------------------------------------------------------------- print-config
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_print_config_names_each_preset_fields_source(preset, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["train", "--preset", preset, "--set", "model=m", "--set", "data.path=d", "--print-config"]) == 0
    out = capsys.readouterr().out
    commented = [line for line in out.splitlines() if "  # " in line and not line.startswith("#")]
    assert len(commented) == len(PRESET_SOURCES[preset])  # one comment per preset field, none elsewhere
    if preset == "stage2-face":
        assert 'lr = 2e-05  # paper appendix, Stage 2 (face expert): lr 2e-05' in out
        assert "alpha = 64.0  # official script command/lora_unet_adamw_face-bsd15.sh: --network_alpha=64" in out
        assert 'min_snr_gamma = "none"  # not in the paper for this stage' in out
        assert out.rstrip().endswith("# batch: 64 images per optimizer step = 8 per device x 4 process(es) x 2 "
                                     "accumulation step(s)")  # fmt: skip
    # what it prints is a config that reads back to the same config
    cfg = load_config(preset=preset, overrides=["model=m", "data.path=d"])
    assert build_dataclass(TrainConfig, tomllib.loads(out), "").to_dict() == cfg.to_dict()


def test_unset_options_survive_the_toml_round_trip():
    cfg = load_config(preset="stage2-face", overrides=["optim.max_grad_norm=none"])
    assert cfg.min_snr_gamma is None and cfg.optim.max_grad_norm is None
    again = build_dataclass(TrainConfig, tomllib.loads(cfg.to_toml()), "")
    assert again.min_snr_gamma is None and again.optim.max_grad_norm is None  # not the defaults 5.0 and 1.0
    assert annotated_toml(cfg, "stage2-face").count("\n# batch: ") == 1


# ---------------------------------------------------------------------------------------------------- the loop
FAST = ["data.resolution=32", "tensorboard=false", "data.caption_dropout=0.0", "max_steps=2", "expert.rank=2",
        "optim.lr=1e-3", "checkpoint_every=100"]  # fmt: skip


def _train(preset, base, data, out, *extra):
    from mole.training import train

    return train(load_config(preset=preset, overrides=[f"model='{base}'", f"data.path='{data}'",
                                                       f"output_dir='{out}'", *FAST, *extra]))  # fmt: skip


def test_loop_accumulates_to_the_total_batch(tmp_path, tiny_sd15_dir, faces_dir):
    acc = _train("stage2-face", tiny_sd15_dir, faces_dir, tmp_path / "a", "batch_size=1", "total_batch_size=2",
                 "expert.alpha=2")  # fmt: skip
    one = _train("stage2-face", tiny_sd15_dir, faces_dir, tmp_path / "b", "batch_size=1", "total_batch_size=1",
                 "expert.alpha=2")  # fmt: skip
    assert acc.batch == {"per_device": 1, "processes": 1, "grad_accum": 2, "total": 2}
    assert one.batch["grad_accum"] == 1
    # two micro-batches per step, not one: the same seed and data order end at other weights
    assert acc.trainable_checksum != pytest.approx(one.trainable_checksum, rel=1e-9)


def test_loop_honours_clip_skip(tmp_path, tiny_sd15_dir, faces_dir):
    last = _train("stage2-face", tiny_sd15_dir, faces_dir, tmp_path / "a", "batch_size=2", "total_batch_size=2")
    pen = _train("stage2-face", tiny_sd15_dir, faces_dir, tmp_path / "b", "batch_size=2", "total_batch_size=2",
                 "clip_skip=2")  # fmt: skip
    # the probe runs before any training with fixed noise and timesteps: only the text conditioning differs
    assert last.probe_loss_first != pytest.approx(pen.probe_loss_first, rel=1e-6)


def test_clip_skip_is_kohyas_numbering(tiny_sd15_dir):
    from mole.models import DiffusionModel

    model = DiffusionModel.from_pretrained(tiny_sd15_dir)
    enc, tok = model.pipe.text_encoder, model.pipe.tokenizer
    ids = tok(["a photo of a hand"], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        states = enc(ids, output_hidden_states=True).hidden_states
        norm = getattr(enc, "text_model", enc).final_layer_norm
        one = model.encode_text(["a photo of a hand"], clip_skip=1).kwargs["encoder_hidden_states"]
        two = model.encode_text(["a photo of a hand"], clip_skip=2).kwargs["encoder_hidden_states"]
        torch.testing.assert_close(one, norm(states[-1]))  # 1: the last layer
        torch.testing.assert_close(two, norm(states[-2]))  # 2: the penultimate
        assert not torch.allclose(one, two)
        with pytest.raises(ValueError, match=rf"clip_skip={len(states)}: the text encoder has {len(states) - 1} "):
            model.encode_text(["x"], clip_skip=len(states))
    with pytest.raises(TrainConfigError, match="clip_skip=0"):
        load_config(preset="stage1", overrides=["clip_skip=0"])


def test_loop_writes_the_presets_alpha(tmp_path, tiny_sd15_dir, faces_dir):
    from mole import load_expert

    result = _train("stage2-hand", tiny_sd15_dir, faces_dir, tmp_path / "h", "batch_size=2", "total_batch_size=2",
                    "max_steps=1")  # fmt: skip
    expert = load_expert(result.final[0], "hand")
    assert {p.alpha for p in expert.layers.values()} == {128.0}  # the preset's alpha, not alpha = rank


def test_inference_and_eval_default_to_the_papers_guidance_and_protocol():
    from mole.cli import build_parser
    from mole.eval import EvalOptions, ModelSpec

    parser = build_parser()
    for cmd in (["generate"], ["inspect"]):
        args = parser.parse_args([*cmd, "--base", "b", "--prompt", "p"])
        assert (args.guidance_scale, args.steps) == (7.5, 50)
    opts = EvalOptions(benchmark="b", models=[ModelSpec("m", "b")])
    assert (opts.guidance_scale, opts.steps, opts.num_prompts, opts.repeats) == (7.5, 50, 3000, 3)
    abl = parser.parse_args(["eval", "ablation", "--benchmark", "b", "--base", "b"])
    assert (abl.num_prompts, abl.repeats, abl.steps) == (3000, 3, 50)
