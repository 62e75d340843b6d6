"""The full-size model configs that ship with the package: architectures, parameter counts, MoLE target counts."""

import json
from pathlib import Path

import pytest
import tomllib
import torch

from mole.full import (
    KINDS,
    build_denoiser,
    build_pipeline,
    component_config,
    config_dir,
    count_parameters,
    load_tokenizer,
)
from mole.targets import TARGETS, Backbone, detect_backbone, target_modules

SHARED_CLIP = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets" / "clip_tokenizer"

# Parameter counts of the published checkpoints (diffusers' num_parameters() on the hub weights).
PUBLISHED_PARAMS = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684, "pixart": 610_856_096}
# Layers the official MoLE code wraps (kohya LoRA on Transformer2DModel: attention, feed-forward, proj_in/out):
# SD1.5 16 transformers x 12 = 192; SDXL 70 blocks x 10 + 11 transformers x 2 = 722; PixArt 28 blocks x 10.
WRAPPED = {"sd15": 192, "sd21": 192, "sdxl": 722, "pixart": 280}


@pytest.mark.parametrize("kind", KINDS)
def test_full_denoiser_matches_the_published_model(kind):
    model = build_denoiser(kind, device="meta")
    assert next(model.parameters()).device.type == "meta"  # no memory
    assert count_parameters(model) == PUBLISHED_PARAMS[kind]
    backbone = detect_backbone(model)
    assert backbone is Backbone(kind)
    assert len(target_modules(model, TARGETS[backbone])) == WRAPPED[kind]


def test_full_text_encoders_and_vae_sizes():
    sizes = {}
    for kind in ("sd15", "sd21", "sdxl"):
        pipe = build_pipeline(kind, device="meta")
        sizes[kind] = {n: count_parameters(getattr(pipe, n)) for n in ("vae", "text_encoder", "text_encoder_2")
                       if getattr(pipe, n, None) is not None}  # fmt: skip
    # CLIP ViT-L/14 text tower, OpenCLIP ViT-H (23 of 24 layers), OpenCLIP ViT-bigG with projection, the SD VAE
    assert sizes == {
        "sd15": {"vae": 83_653_863, "text_encoder": 123_060_480},
        "sd21": {"vae": 83_653_863, "text_encoder": 340_387_840},
        "sdxl": {"vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    }


def test_published_settings_that_matter():
    assert component_config("sd21", "scheduler")["prediction_type"] == "v_prediction"
    assert component_config("sd21", "unet")["sample_size"] * 8 == 768
    assert component_config("sd15", "scheduler").get("prediction_type", "epsilon") == "epsilon"
    assert component_config("sdxl", "vae")["scaling_factor"] == 0.13025
    assert component_config("sd15", "vae")["scaling_factor"] == 0.18215
    assert component_config("sd21", "tokenizer")["pad_token"] == "!"
    assert component_config("sdxl", "tokenizer")["pad_token"] == "<|endoftext|>"
    assert component_config("sdxl", "tokenizer_2")["pad_token"] == "!"
    assert component_config("pixart", "transformer")["caption_channels"] == 4096
    with pytest.raises(ValueError, match="kind='sd3'.*sd15"):
        config_dir("sd3")
    with pytest.raises(ValueError, match="no component 'text_encoder_2'"):
        component_config("sd15", "text_encoder_2")


def test_configs_are_package_data():
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mole"]
    files = sorted(p.relative_to(root / "src" / "mole") for p in (root / "src" / "mole" / "configs_full").rglob("*"))
    files = [f for f in files if f.suffix]
    assert len(files) == 26
    unshipped = [f for f in files if not any(f.match(p) for p in patterns)]
    assert unshipped == []
    for f in files:
        json.loads((root / "src" / "mole" / f).read_text())


@pytest.mark.skipif(not SHARED_CLIP.is_dir(), reason="needs ../shared/assets/clip_tokenizer")
def test_kind_settings_apply_to_a_given_vocabulary():
    tok1 = load_tokenizer("sdxl", SHARED_CLIP, "tokenizer")
    tok2 = load_tokenizer("sdxl", SHARED_CLIP, "tokenizer_2")
    assert len(tok1) == len(tok2) == 49408
    assert tok1.pad_token_id == 49407 and tok2.pad_token_id == 0  # '!' pads SDXL's second encoder
    ids = tok1("a photo of a hand").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 7
    with pytest.raises(ValueError, match="no vocab.json"):
        load_tokenizer("sd15", SHARED_CLIP.parent)


def test_full_sd15_unet_runs_with_random_weights():
    """The real-size SD1.5 UNet (3.4 GB fp32), materialised: one forward at a small latent size."""
    unet = build_denoiser("sd15", seed=0)
    assert count_parameters(unet) == 859_520_964
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        out = unet(sample, torch.tensor(500), encoder_hidden_states=torch.randn(1, 77, 768, generator=g)).sample
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all() and out.std() > 0


def test_pixart_tokenizer_from_a_spiece_model_file(tmp_path):
    """A T5 sentencepiece .model file (or its folder) is a PixArt tokenizer: the same ids as sentencepiece gives,
    then </s> (transformers 5's T5Tokenizer takes the vocabulary, not the file: passing the path failed with
    "Can't extract `str` to `Vec`")."""
    import shutil

    from conftest import SHARED

    model = SHARED / "assets" / "t5_spiece_unigram1000.model"
    if not model.is_file():
        pytest.skip("../shared/assets/t5_spiece_unigram1000.model is not available")
    import sentencepiece as spm

    from mole.full import load_tokenizer

    text = "a close-up photo of a smiling woman's face"
    expected = spm.SentencePieceProcessor(model_file=str(model)).encode(text)
    tok = load_tokenizer("pixart", model)
    ids = tok(text).input_ids
    assert ids == expected + [tok.eos_token_id]
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>"
    shutil.copy(model, tmp_path / "spiece.model")
    assert load_tokenizer("pixart", tmp_path)(text).input_ids == ids
