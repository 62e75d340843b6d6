"""mole-tiny: the shipped small real model loads by name offline and generates; the pretraining command runs,
checkpoints and resumes to the same weights; the demo's table is made of the measured numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED
from mole import load_mole, mole_layers, remove_mole
from mole.cli import main
from mole.demo import summary_table
from mole.measure import mean_se, separated
from mole.models import DiffusionModel
from mole.mole_tiny import ASSETS, is_mole_tiny, resolve_base

needs_assets = pytest.mark.skipif(not (ASSETS / "mole.safetensors").is_file(), reason="mole-tiny not built")
needs_shared = pytest.mark.skipif(not (SHARED / "data" / "faces").is_dir(), reason="../shared/data missing")


@needs_assets
def test_mole_tiny_loads_by_name_and_draws_real_images():
    model = DiffusionModel.from_pretrained("mole-tiny")
    assert model.name == "mole-tiny" and model.denoiser.dtype == torch.float32
    assert type(model.pipe).__name__ == "StableDiffusionPipeline"
    # v2: 8-channel latents (v1 had 4: its VAE halved what the detectors found on real faces)
    assert model.pipe.vae.config.latent_channels == 8 == model.denoiser.config.in_channels
    assert model.denoiser.config.out_channels == 8
    model.pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=8, guidance_scale=4.0, generator=torch.Generator().manual_seed(0))
    base = np.asarray(model.pipe("a close-up photo of a face", **kw).images[0], dtype=np.float32)
    assert base.shape == (64, 64, 3)
    assert 10 < base.std() < 120  # an image, not a constant or noise clipped to black/white
    load_mole(model.denoiser, "mole-tiny")
    assert set(next(iter(mole_layers(model.denoiser).values())).expert_names) == {"face", "hand"}
    kw["generator"] = torch.Generator().manual_seed(0)
    mixed = np.asarray(model.pipe("a close-up photo of a face", **kw).images[0], dtype=np.float32)
    assert np.abs(mixed - base).mean() > 0.5  # the experts change the picture
    remove_mole(model.denoiser)


def test_mole_tiny_name_resolution_leaves_other_names_alone(tmp_path):
    assert is_mole_tiny("mole-tiny") and is_mole_tiny(" MOLE-TINY ") and not is_mole_tiny("mole-tiny2")
    assert resolve_base(str(tmp_path)) == str(tmp_path)
    assert resolve_base("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"


@needs_assets
def test_cli_generate_accepts_mole_tiny_for_base_and_mole(tmp_path):
    out = tmp_path / "gen"
    args = ["generate", "--base", "mole-tiny", "--mole", "mole-tiny", "--prompt", "a close-up photo of a hand",
            "--steps", "3", "--out", str(out), "--compare"]  # fmt: skip
    assert main(args) == 0
    assert (out / "compare.png").is_file() and len(list((out / "mole").glob("*.png"))) >= 1


@needs_shared
def test_pruned_tokenizer_keeps_known_words_whole_and_splits_unknown_ones():
    from mole.pretrain.model import pruned_clip_tokenizer

    tok = pruned_clip_tokenizer(SHARED / "assets" / "clip_tokenizer", ["a close-up photo of a face", "two hands"])
    assert tok.tokenize("a face photo") == ["a</w>", "face</w>", "photo</w>"]
    pieces = tok.tokenize("zebra")  # never seen: smaller known pieces, never <unk>
    assert len(pieces) > 1 and all(p in tok.get_vocab() for p in pieces)
    assert tok.unk_token_id not in tok("zebra", add_special_tokens=False)["input_ids"]
    assert len(tok) < 2000  # 512 byte symbols + what the texts need, not 49,408


@needs_shared
def test_pretrain_runs_checkpoints_and_resumes_to_the_same_weights(tmp_path):
    from mole.pretrain.train import PretrainError, PretrainOptions, pretrain

    common = dict(data=str(SHARED / "data"), tokenizer=str(SHARED / "assets" / "clip_tokenizer"), vae_steps=2,
                  steps=4, batch_size=2, vae_batch_size=2, checkpoint_every=2, sample_every=10**6, sample_steps=2,
                  limit=3)
    straight = pretrain(PretrainOptions(out=str(tmp_path / "a"), **common))
    assert json.loads((tmp_path / "a" / "pretrain.json").read_text())["steps"] == 4
    assert (tmp_path / "a" / "pipeline" / "model_index.json").is_file()
    assert (tmp_path / "a" / "loss.png").is_file() and (tmp_path / "a" / "samples" / "final.png").is_file()
    assert len((tmp_path / "a" / "losses.jsonl").read_text().splitlines()) == 4
    cfg = {c: json.loads((tmp_path / "a" / "pipeline" / c / "config.json").read_text()) for c in ("vae", "unet")}
    assert cfg["vae"]["latent_channels"] == 8 == cfg["unet"]["in_channels"] == cfg["unet"]["out_channels"]  # v2

    # a run stopped after step 3 (a checkpoint exists at step 2), then resumed
    def stop(phase, step, total, loss):
        if phase == "denoiser" and step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(PretrainOptions(out=str(tmp_path / "b"), **common), progress=stop)
    with pytest.raises(PretrainError, match="resume"):  # never silently reused
        pretrain(PretrainOptions(out=str(tmp_path / "b"), **common))
    resumed = pretrain(PretrainOptions(out=str(tmp_path / "b"), resume=True, **common))
    assert resumed["loss_last100"] == pytest.approx(straight["loss_last100"], abs=1e-6)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PretrainError, match="changed options"):
        pretrain(PretrainOptions(out=str(tmp_path / "b"), resume=True, **{**common, "batch_size": 3}))
    with pytest.raises(PretrainError, match="latent_channels"):  # another latent space: never mixed with the old
        pretrain(PretrainOptions(out=str(tmp_path / "b"), resume=True, **{**common, "latent_channels": 4}))
    shutil.rmtree(tmp_path / "b")


def test_mean_se_and_separation():
    m, s = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and s == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert mean_se([5.0]) == (5.0, 0.0)
    assert separated((0.8, 0.05), (0.5, 0.1)) and not separated((0.6, 0.05), (0.5, 0.1))


def test_demo_table_is_built_from_the_summary_numbers():
    se = {"base": 0.02, "fixed 1:1": 0.0, "MoLE": 0.05}
    summary = {
        "base": "mole-tiny", "mole": "mole-tiny", "seconds": 12.3, "seeds": [0, 1],
        "prompts": {"face": ["a"], "hand": ["b"], "scene": ["c"]},
        "global_gate": {"face": {"face": {"mean": 0.8123, "se": 0.011}, "hand": {"mean": 0.4567, "se": 0.01}},
                        "hand": {"face": {"mean": 0.3456, "se": 0.01}, "hand": {"mean": 0.7891, "se": 0.01}}},
        "detection": {f"{m}/{k}": {"face_rate": {"mean": r, "se": se[m]}, "hand_rate": {"mean": r + 0.01, "se": se[m]}}
                      for m, r0 in (("base", 0.1), ("fixed 1:1", 0.2), ("MoLE", 0.3))
                      for k, r in (("face", r0), ("hand", r0 + 0.4), ("scene", r0 - 0.15 if m == "MoLE" else r0))},
        "checks": {"max_abs_fused_vs_naive": 1.5e-7, "max_abs_kohya_hand_vs_embedded_hand": 0.0,
                   "remove_restores_base_exactly": True, "wrapped_layers": 84},
        "files": {"compare": "X/compare.png", "inspect": "X/inspect", "images": "X/images"},
        "bench": {"date": "2026-11-23", "images_per_cell": 80, "detection": {
            m: {"face": {"face_rate": [0.09, 0.03]}, "hand": {"hand_rate": [h, 0.04]},
                "scene": {"face_rate": [0.0, 0.0]}}
            for m, h in (("base", 0.12), ("fixed 1:1", 0.04), ("MoLE", 0.30))}},
    }  # fmt: skip
    text = summary_table(summary)
    lines = text.splitlines()
    face_row = next(line for line in lines if line.strip().startswith("face ") and "0.812" in line)
    assert "0.812 ± 0.011" in face_row and "0.457" in face_row
    assert "0.789" in next(line for line in lines if line.strip().startswith("hand "))
    assert "n=2 images per cell" in text  # 2 seeds x 1 prompt per kind
    quick = lines[next(i for i, line in enumerate(lines) if line.startswith("Quick look")):]
    det_row = next(line for line in quick if "hand found on hand prompts" in line)
    assert "0.51 ± 0.02" in det_row and "0.61 ± 0.00" in det_row and "0.71 ± 0.05" in det_row
    assert det_row.endswith("higher (error bars apart)")  # 0.71-0.05 > 0.51+0.02
    face_det = next(line for line in quick if "face found on face prompts" in line)
    assert face_det.endswith("higher (error bars apart)")  # 0.30-0.05 = 0.25 > 0.12
    scene_det = next(line for line in quick if "face found on scene prompts" in line)
    assert scene_det.endswith("no difference shown at this n")  # MoLE 0.15 ± 0.05 vs base 0.10 ± 0.02 overlap
    measured = lines[next(i for i, line in enumerate(lines) if line.startswith("Measured (2026-11-23, n=80")):]
    assert next(line for line in measured if "face found on face" in line).endswith("no difference shown at this n")
    assert next(line for line in measured if "hand found on hand" in line).endswith("higher (error bars apart)")
    assert "84 wrapped layers" in text and "X/compare.png" in text


def test_demo_verdict_needs_error_bars_apart():
    from mole.demo import _verdict

    assert _verdict({"mean": 0.30, "se": 0.05}, {"mean": 0.20, "se": 0.04}) == "higher (error bars apart)"
    assert _verdict({"mean": 0.12, "se": 0.05}, {"mean": 0.20, "se": 0.04}) == "no difference shown at this n"
    assert _verdict({"mean": 0.10, "se": 0.01}, {"mean": 0.20, "se": 0.01}) == "lower (error bars apart)"


def test_shipped_bench_table_matches_the_results_file():
    from mole.demo import shipped_bench

    bench = shipped_bench()
    assert bench is not None and bench["images_per_cell"] >= 200
    results = (Path(__file__).resolve().parents[1] / "bench" / "RESULTS.md").read_text()
    table = results[results.index("| model | face prompts: face rate"):]
    header = [c.strip() for c in table.splitlines()[0].split("|")]
    row = [c.strip() for c in next(line for line in table.splitlines() if line.startswith("| base | 0.")).split("|")]
    face, hand = (tuple(float(x) for x in row[header.index(col)].split(" ± "))
                  for col in ("face prompts: face rate", "hand prompts: hand rate"))  # fmt: skip
    assert tuple(bench["detection"]["base"]["face"]["face_rate"]) == face
    assert tuple(bench["detection"]["base"]["hand"]["hand_rate"]) == hand
