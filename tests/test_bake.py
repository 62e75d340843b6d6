"""`mole bake`: one plain kohya LoRA whose per-layer delta W is exactly sum_i w_i dW_i of the experts `mole convert`
exports; diffusers loads it and matches the two experts loaded as weighted adapters; --rank; --from-prompts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mole.mole_tiny import ASSETS

needs_assets = pytest.mark.skipif(not (ASSETS / "mole.safetensors").is_file(), reason="mole-tiny not built")
WEIGHTS = {"face": 0.8, "hand": 0.3}


def _deltas(path) -> dict[str, torch.Tensor]:
    """Literal reference: up @ down * alpha / r per kohya module of a LoRA file (2-D, conv factors flattened)."""
    sd = load_file(str(path))
    out = {}
    for key in sd:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        down = sd[key].double().flatten(1)
        up = sd[f"{stem}.lora_up.weight"].double().flatten(1)
        alpha = float(sd[f"{stem}.alpha"])
        out[stem] = up @ down * (alpha / down.shape[0])
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """mole-tiny's face and hand experts as `mole convert` writes them (kohya files). mole-tiny's gates pool the
    input (global_source=input), which the official layout cannot hold, so its experts go into a file with the
    official gating first; `convert` then exports them untouched."""
    from mole import inject_mole, remove_mole, save_mole
    from mole.cli import main
    from mole.config import MoLEConfig
    from mole.formats.mole_file import embedded_experts, read_mole_file
    from mole.models import DiffusionModel

    out = tmp_path_factory.mktemp("official")
    manifest, tensors = read_mole_file("mole-tiny")
    experts = embedded_experts(manifest, tensors, "mole-tiny")
    unet = DiffusionModel.from_pretrained("mole-tiny").denoiser
    inject_mole(unet, [experts["face"], experts["hand"]], MoLEConfig(gating="both", global_source="expert_output"))
    save_mole(unet, out / "official_gating.safetensors", base_model="mole-tiny")
    remove_mole(unet)
    assert main(["convert", "--mole", str(out / "official_gating.safetensors"), "--base", "mole-tiny",
                 "--out", str(out)]) == 0  # fmt: skip
    return out


def _bake(tmp_path, *extra):
    from mole.cli import main

    out = tmp_path / "baked.safetensors"
    assert main(["bake", "--mole", "mole-tiny", "--out", str(out), *extra]) == 0
    return out


@needs_assets
def test_bake_equals_the_weighted_sum_of_the_exported_experts(tmp_path, exported, capsys):
    out = _bake(tmp_path, "--weights", "face=0.8", "--weights", "hand=0.3", "--json")
    report = json.loads(capsys.readouterr().out)
    face, hand, baked = _deltas(exported / "face.safetensors"), _deltas(exported / "hand.safetensors"), _deltas(out)
    assert set(baked) == set(face) | set(hand) and all(k.startswith("lora_unet_") for k in baked)
    worst = max(float((baked[k] - (0.8 * face.get(k, 0) + 0.3 * hand.get(k, 0))).abs().max()) for k in baked)
    biggest = max(float(d.abs().max()) for d in baked.values())
    assert worst < 1e-6 * max(biggest, 1.0) and biggest > 1e-4
    sd = load_file(str(out))
    for key, alpha in sd.items():  # one alpha per module = its total rank, so kohya's scale is 1
        if key.endswith(".alpha"):
            assert float(alpha) == sd[key.replace(".alpha", ".lora_down.weight")].shape[0]
    raw = load_file(str(exported / "face.safetensors"))
    assert all(sd[k].ndim == raw[k].ndim for k in raw if k.endswith("weight"))  # conv factors stay 4-D
    assert report["relative_error"] == 0.0 and report["weights"] == WEIGHTS
    assert report["total_rank"] == report["rank"]


def test_bake_folds_each_experts_scale_and_compresses_by_svd():
    """alpha / r differs per expert here, so forgetting to fold it (or folding it twice) fails."""
    from mole.bake import bake_layers
    from mole.experts import ExpertWeights
    from mole.layers.lora import LoraPair

    g = torch.Generator().manual_seed(0)
    a = ExpertWeights("face", {"l": LoraPair(torch.randn(4, 10, generator=g), torch.randn(12, 4, generator=g), 8.0)})
    b = ExpertWeights("hand", {"l": LoraPair(torch.randn(2, 10, generator=g), torch.randn(12, 2, generator=g), 1.0)})
    want = 0.8 * a.layers["l"].delta_weight() + 0.3 * b.layers["l"].delta_weight()
    layers, report = bake_layers({"face": a, "hand": b}, WEIGHTS)
    assert report.total_rank == 6 and layers["l"].alpha == 6.0
    assert torch.allclose(layers["l"].delta_weight(), want, atol=1e-5)
    for r, exact in ((6, True), (9, True), (3, False)):
        layers, report = bake_layers({"face": a, "hand": b}, WEIGHTS, rank=r)
        err = float((layers["l"].delta_weight() - want).norm() / want.norm())
        assert layers["l"].rank == min(r, 6)
        if exact:
            assert report.relative_error == 0.0 and err < 1e-6
        else:  # the reported error is the true one, and it is the best rank-3 error (tail singular values)
            s = torch.linalg.svdvals(want.double())
            assert report.relative_error > 0.01
            assert abs(report.relative_error - err) < 1e-4
            assert abs(report.relative_error - float(s[3:].norm() / s.norm())) < 1e-4
    with pytest.raises(ValueError, match="feet"):
        bake_layers({"face": a, "hand": b}, {"feet": 1.0})


@needs_assets
def test_rank_option_reports_error_zero_at_full_rank_and_above_zero_below(tmp_path, capsys):
    _bake(tmp_path, "--weights", "face=0.8,hand=0.3", "--json")
    full = json.loads(capsys.readouterr().out)
    _bake(tmp_path, "--weights", "face=0.8,hand=0.3", "--rank", str(full["total_rank"]), "--json", "--overwrite")
    assert json.loads(capsys.readouterr().out)["relative_error"] == 0.0
    out = _bake(tmp_path, "--weights", "face=0.8,hand=0.3", "--rank", "2", "--json", "--overwrite")
    low = json.loads(capsys.readouterr().out)
    assert 0.0 < low["relative_error"] < 1.0 and low["rank"] == 2
    assert all(t.shape[0] == 2 for k, t in load_file(str(out)).items() if k.endswith("lora_down.weight"))


@needs_assets
def test_bake_refuses_to_overwrite_and_names_unknown_experts(tmp_path):
    from mole.cli import main

    out = _bake(tmp_path, "--weights", "face=1")
    assert main(["bake", "--mole", "mole-tiny", "--weights", "face=1", "--out", str(out)]) == 2
    assert main(["bake", "--mole", "mole-tiny", "--weights", "feet=1", "--out", str(tmp_path / "x.safetensors")]) == 2


@needs_assets
def test_diffusers_loads_the_bake_and_it_equals_the_two_weighted_adapters(tmp_path, exported):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    out = _bake(tmp_path, "--weights", "face=0.8", "--weights", "hand=0.3")
    pipe = StableDiffusionPipeline.from_pretrained(
        str(ASSETS / "pipeline"), safety_checker=None, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a close-up photo of a face", num_inference_steps=3, guidance_scale=7.5, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    base = run()
    pipe.load_lora_weights(str(out), adapter_name="baked")
    baked = run()
    pipe.delete_adapters("baked")
    assert torch.allclose(run(), base, atol=1e-6)  # unloaded cleanly
    pipe.load_lora_weights(str(exported / "face.safetensors"), adapter_name="face")
    pipe.load_lora_weights(str(exported / "hand.safetensors"), adapter_name="hand")
    pipe.set_adapters(["face", "hand"], adapter_weights=[0.8, 0.3])
    both = run()
    change = float((baked - base).abs().max())
    assert change > 1e-3
    assert float((baked - both).abs().max()) < 1e-3 * change


@needs_assets
def test_from_prompts_weights_equal_the_recorded_conditional_gate_means(tmp_path, capsys):
    from mole.inference.pipeline import load_mole_weights, load_pipeline
    from mole.recording import record_gates

    prompts = ["a close-up photo of a hand", "a close-up photo of a face"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    _bake(tmp_path, "--from-prompts", str(tmp_path / "p.txt"), "--base", "mole-tiny", "--steps", "3", "--json")
    got = json.loads(capsys.readouterr().out)["weights"]
    model = load_pipeline("mole-tiny", device="cpu")
    load_mole_weights(model.pipe, "mole-tiny", "mole")
    model.pipe.set_progress_bar_config(disable=True)
    per = []
    for i, p in enumerate(prompts):  # an independent reference: the second (conditional) sample of each CFG batch
        with record_gates(model.denoiser, keep_local=False) as rec:
            model.pipe(p, num_inference_steps=3, guidance_scale=7.5, output_type="latent",
                       generator=torch.Generator().manual_seed(i))  # fmt: skip
        per.append(rec.global_gates()[:, :, 1].mean((0, 1)))  # (steps, layers, b=2, e) -> e
    want = torch.stack(per).mean(0)
    names = rec.expert_names
    assert sorted(got) == sorted(names)
    for i, n in enumerate(names):
        assert abs(got[n] - float(want[i])) < 1e-6
    cond_uncond = torch.stack([rec.global_gates()[:, :, 0].mean((0, 1)), rec.global_gates()[:, :, 1].mean((0, 1))])
    assert float((cond_uncond[0] - cond_uncond[1]).abs().max()) > 1e-6  # the halves differ: the choice matters


def test_sdxl_bake_uses_the_sgm_names_convert_writes_and_sums_exactly(tmp_path):
    from mole import inject_mole, remove_mole, save_mole
    from mole.bake import bake_mole_file
    from mole.config import MoLEConfig
    from mole.convert import mole_to_official
    from mole.tiny import random_expert, tiny_unet

    unet = tiny_unet("sdxl").eval()
    experts = [random_expert(unet, "face", seed=1, std=0.2), random_expert(unet, "hand", seed=2, rank=6, std=0.2)]
    inject_mole(unet, experts, MoLEConfig(gating="both", global_source="expert_output"))
    ours = save_mole(unet, tmp_path / "mole.safetensors")
    remove_mole(unet)
    files = mole_to_official(ours, tmp_path / "official", model=unet)
    out = tmp_path / "baked.safetensors"
    with pytest.raises(ValueError, match="needs the base model"):
        bake_mole_file(ours, out, {"face": 0.5, "hand": -1.5})
    report = bake_mole_file(ours, out, {"face": 0.5, "hand": -1.5}, model=unet)
    face, hand, baked = _deltas(files["face"]), _deltas(files["hand"]), _deltas(out)
    assert set(baked) == set(face) and any(k.startswith("lora_unet_input_blocks_") for k in baked)
    for k in baked:
        torch.testing.assert_close(baked[k], 0.5 * face[k] - 1.5 * hand[k], rtol=1e-5, atol=1e-6)
    assert report.total_rank == 4 + 6 and report.relative_error == 0.0
