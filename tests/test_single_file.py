"""Single-file (original-layout) base checkpoints: the same model as its diffusers folder, offline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mole import inject_mole, load_mole, save_mole
from mole.cli import main
from mole.formats.ldm import SingleFileError, checkpoint_shapes, detect_kind, pipeline_to_original, save_single_file
from mole.identity import structure_hash, weight_signature
from mole.io import build_manifest
from mole.models import DiffusionModel
from mole.targets import TARGETS, detect_backbone, target_modules
from mole.tiny import _tiny_clip_text, random_expert, tiny_clip_tokenizer, tiny_pipeline, tiny_vae


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny SDXL whose two text encoders differ in width, as SDXL's do (768 / 1280): an original-layout file
    tells them apart by width."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 48, use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
    )  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed), text_encoder=_tiny_clip_text(32, len(tok)),
        text_encoder_2=_tiny_clip_text(48, len(tok), with_projection=True, projection_dim=16),
        tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
    )  # fmt: skip


def write_both(pipe, root: Path) -> tuple[Path, Path, Path]:
    """The pipeline as a diffusers folder and as one original-layout file; plus a folder with the folder's configs
    only (no weights, no vocabulary): what a user passes as config= for a variant of a published model."""
    folder, single, configs = root / "diffusers", root / "model.safetensors", root / "configs"
    pipe.save_pretrained(folder)
    save_single_file(pipe, single)
    for p in folder.rglob("*.json"):
        if p.name in ("tokenizer.json", "vocab.json"):
            continue
        (configs / p.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, configs / p.relative_to(folder))
    return folder, single, configs


def components(pipe) -> list[str]:
    return [n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]


def images(pipe, seed=0):
    out = pipe("a photo of a hand", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return torch.from_numpy(out.images)


@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl"])
def test_single_file_is_the_same_model_as_the_diffusers_folder(kind, tmp_path):
    pipe = tiny_sdxl_pipeline() if kind == "sdxl" else tiny_pipeline(kind)
    folder, single, configs = write_both(pipe, tmp_path)
    assert detect_kind(checkpoint_shapes(single)) == kind
    a = DiffusionModel.from_pretrained(folder)
    b = DiffusionModel.from_pretrained(single, config=configs, tokenizer=folder / "tokenizer")
    assert b.backbone is a.backbone and b.prediction_type == a.prediction_type
    for name in components(pipe):
        sa, sb = getattr(a.pipe, name).state_dict(), getattr(b.pipe, name).state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    # the base fingerprint of a MoLE manifest: structure hash and sampled weights
    layers = target_modules(a.denoiser, TARGETS[detect_backbone(a.denoiser)])
    assert structure_hash(b.denoiser) == structure_hash(a.denoiser)
    assert weight_signature(b.denoiser, layers) == weight_signature(a.denoiser, layers)
    # bit-equal weights; SDXL's text projection is one (16, 48) matmul whose kernel may round differently (2e-7)
    assert (images(b.pipe) - images(a.pipe)).abs().max() <= (1e-5 if kind == "sdxl" else 0.0)


def test_mole_file_made_on_the_folder_loads_on_the_single_file(tmp_path):
    pipe = tiny_pipeline("sd15")
    folder, single, configs = write_both(pipe, tmp_path)
    a = DiffusionModel.from_pretrained(folder)
    inject_mole(a.denoiser, [random_expert(a.denoiser, "face", seed=1, std=0.2),
                             random_expert(a.denoiser, "hand", seed=2, std=0.2)])  # fmt: skip
    save_mole(a.denoiser, tmp_path / "mole.safetensors", base_model=str(folder))
    b = DiffusionModel.from_pretrained(single, config=configs, tokenizer=folder / "tokenizer")
    load_mole(b.denoiser, tmp_path / "mole.safetensors", strict_base=True)  # the base check passes
    base_a, base_b = build_manifest(a.denoiser)["base_model"], build_manifest(b.denoiser)["base_model"]
    assert base_a["structure_sha256"] == base_b["structure_sha256"]
    assert base_a["weight_signature"] == base_b["weight_signature"]
    assert torch.equal(images(b.pipe, 3), images(a.pipe, 3))
    # a different single file (other weights) is refused by the same check
    other = tiny_pipeline("sd15", seed=5)
    save_single_file(other, tmp_path / "other.safetensors")
    c = DiffusionModel.from_pretrained(tmp_path / "other.safetensors", config=configs, tokenizer=folder / "tokenizer")
    with pytest.raises(ValueError, match="weights of .* differ"):
        load_mole(c.denoiser, tmp_path / "mole.safetensors", strict_base=True)


def test_writer_matches_the_original_layout_names():
    """Spot checks against the key names of the released SD1.5 / SDXL checkpoints."""
    keys = set(pipeline_to_original(tiny_pipeline("sd15")))
    for k in ("model.diffusion_model.input_blocks.0.0.weight",
              "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
              "model.diffusion_model.input_blocks.2.0.op.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
              "model.diffusion_model.output_blocks.1.1.conv.weight", "model.diffusion_model.out.2.weight",
              "first_stage_model.encoder.down.0.block.0.conv1.weight",
              "first_stage_model.decoder.up.1.block.0.norm1.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
              "cond_stage_model.transformer.text_model.final_layer_norm.weight"):  # fmt: skip
        assert k in keys, k
    xl = pipeline_to_original(tiny_sdxl_pipeline())
    assert xl["model.diffusion_model.label_emb.0.0.weight"].shape == (128, 16 + 6 * 8)
    assert xl["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert xl["conditioner.embedders.1.model.text_projection"].shape == (48, 16)  # (width, embed): transposed
    assert xl["first_stage_model.decoder.mid.attn_1.proj_out.weight"].ndim == 4  # 1x1 conv in the original


def test_tokenizer_is_found_offline_or_named(tmp_path, monkeypatch):
    monkeypatch.delenv("MOLE_TOKENIZER", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, single, configs = write_both(tiny_pipeline("sd15"), tmp_path)
    with pytest.raises(SingleFileError, match=r"--tokenizer DIR .*MOLE_TOKENIZER=DIR"):
        DiffusionModel.from_pretrained(single, config=configs)
    monkeypatch.setenv("MOLE_TOKENIZER", str(folder))  # a pipeline folder: its tokenizer/ is used
    assert len(DiffusionModel.from_pretrained(single, config=configs).pipe.tokenizer) == len(tiny_clip_tokenizer())
    monkeypatch.setenv("MOLE_TOKENIZER", str(tmp_path / "nowhere"))
    with pytest.raises(SingleFileError, match=r"\$MOLE_TOKENIZER .*nowhere.* holds no vocab.json"):
        DiffusionModel.from_pretrained(single, config=configs)
    monkeypatch.delenv("MOLE_TOKENIZER")
    shutil.copytree(folder / "tokenizer", single.parent / "tokenizer")  # beside the checkpoint
    assert DiffusionModel.from_pretrained(single, config=configs).backbone.value == "sd15"


def test_bad_single_files_are_named(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    with pytest.raises(SingleFileError, match="no model.diffusion_model.* keys"):
        DiffusionModel.from_pretrained(lora)
    inpaint = tmp_path / "inpaint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}, str(inpaint))
    with pytest.raises(SingleFileError, match="9 input channels"):
        DiffusionModel.from_pretrained(inpaint)
    with pytest.raises(FileNotFoundError, match="base model .*missing.safetensors: no such file or folder"):
        DiffusionModel.from_pretrained(tmp_path / "missing.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(SingleFileError, match="not a readable .safetensors"):
        DiffusionModel.from_pretrained(broken)


def test_shipped_configs_are_the_default_and_a_mismatch_is_explained(tmp_path, monkeypatch):
    """A tiny file is not full-size SD1.5: loading it with the shipped configs fails with an error naming config=."""
    monkeypatch.delenv("MOLE_TOKENIZER", raising=False)
    folder, single, _ = write_both(tiny_pipeline("sd15"), tmp_path)
    with pytest.raises(SingleFileError, match=r"as sd15 with the configs in .*configs_full/sd15.*pass config="):
        DiffusionModel.from_pretrained(single, tokenizer=folder / "tokenizer")
    with pytest.raises(SingleFileError, match="config='sdxl' but .* holds a sd15 model"):
        DiffusionModel.from_pretrained(single, tokenizer=folder / "tokenizer", config="sdxl")


def test_cli_names_the_tokenizer_fix(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MOLE_TOKENIZER", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, single, _ = write_both(tiny_pipeline("sd15"), tmp_path)
    argv = ["generate", "--base", str(single), "--no-mole", "--prompt", "a face", "--steps", "1", "--device", "cpu",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    assert "--tokenizer DIR" in caplog.text
    caplog.clear()
    assert main([*argv, "--tokenizer", str(folder / "tokenizer")]) == 2  # found; the tiny file is not full-size
    assert "configs_full/sd15" in caplog.text and "--tokenizer DIR" not in caplog.text
    assert not (tmp_path / "out").exists()
    assert "MOLE_TOKENIZER" not in os.environ  # main() leaves the environment as it found it
