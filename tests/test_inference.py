"""`mole generate` and `mole inspect` on tiny random pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import pipeline_with_mole
from mole import MoLEFileError, mole_layers
from mole.cli import main
from mole.inference import GenerateOptions, InspectOptions, MixMode, generate, inspect, load_mole_weights
from mole.models import DiffusionModel
from mole.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def tiny_mole(tmp_path_factory):
    """A tiny SD1.5 pipeline on disk and a MoLE file (random experts, random gates) made for it."""
    return pipeline_with_mole(tmp_path_factory.mktemp("gen"))


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_is_deterministic_and_writes_metadata(tmp_path, tiny_mole):
    def run(out):
        return generate(GenerateOptions(base=str(tiny_mole / "base"), mole=str(tiny_mole / "mole.safetensors"),
                                        prompts=["a close-up photo of a face", "a hand"], seeds=[3, 4], steps=4,
                                        out_dir=str(out), batch_size=3))  # fmt: skip

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert len(a["images"]) == 4
    for ra, rb in zip(a["images"], b["images"]):
        assert np.array_equal(_pixels(ra["path"]), _pixels(rb["path"]))
    first = Image.open(a["images"][0]["path"])
    meta = json.loads(first.text["mole"])
    assert meta["prompt"] == "a close-up photo of a face" and meta["seed"] == 3 and meta["steps"] == 4
    assert meta["scheduler"] == "ddim" and meta["guidance_scale"] == 7.5 and meta["mode"] == "mole"
    assert "Seed: 3" in first.text["parameters"] and first.size == (32, 32)
    sheet = Image.open(tmp_path / "a" / "mole" / "grid.png")
    assert sheet.width > 2 * 32 and sheet.height > 2 * 32
    lines = (tmp_path / "a" / "images.jsonl").read_text().splitlines()
    assert [json.loads(x)["seed"] for x in lines] == [3, 4, 3, 4]
    other_seed = _pixels(a["images"][1]["path"])
    assert not np.array_equal(_pixels(a["images"][0]["path"]), other_seed)


def test_compare_modes_differ_and_base_matches_plain_pipeline(tmp_path, tiny_mole):
    index = generate(GenerateOptions(base=str(tiny_mole / "base"), mole=str(tiny_mole / "mole.safetensors"),
                                     prompts=["a face"], seeds=[0], steps=3, out_dir=str(tmp_path),
                                     modes=["none", "fixed", "mole"]))  # fmt: skip
    by_mode = {r["mode"]: _pixels(r["path"]) for r in index["images"]}
    assert not np.array_equal(by_mode["none"], by_mode["mole"])
    assert not np.array_equal(by_mode["fixed"], by_mode["mole"])
    assert (tmp_path / "compare.png").is_file()
    plain = DiffusionModel.from_pretrained(tiny_mole / "base").pipe
    from diffusers import DDIMScheduler

    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    img = plain("a face", num_inference_steps=3, guidance_scale=7.5, height=32, width=32,
                generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert np.abs(np.asarray(img, dtype=np.int16) - by_mode["none"]).max() <= 1


def test_fixed_weights_zero_equal_the_base(tmp_path, tiny_mole):
    model = DiffusionModel.from_pretrained(tiny_mole / "base")
    inputs = dict(sample=torch.randn(1, 4, 16, 16), timestep=torch.tensor(10),
                  encoder_hidden_states=torch.randn(1, 77, 32))  # fmt: skip
    with torch.no_grad():
        base = model.denoiser(**inputs).sample
        load_mole_weights(model.pipe, tiny_mole / "mole.safetensors", MixMode.FIXED, {"face": 0.0})
        assert all(layer.gating.value == "none" for layer in mole_layers(model.denoiser).values())
        torch.testing.assert_close(model.denoiser(**inputs).sample, base, rtol=0, atol=1e-6)
        load_mole_weights(model.pipe, tiny_mole / "mole.safetensors", MixMode.FIXED, {"face": 1.0})
        assert (model.denoiser(**inputs).sample - base).abs().max() > 1e-4
        load_mole_weights(model.pipe, tiny_mole / "mole.safetensors", MixMode.NONE)
        torch.testing.assert_close(model.denoiser(**inputs).sample, base, rtol=0, atol=0)


def test_long_prompts_are_reported_with_the_cut_text(tmp_path, tiny_mole):
    long_prompt = "a face " * 20  # 140 characters: the char-level tiny tokenizer takes 77 tokens
    index = generate(GenerateOptions(base=str(tiny_mole / "base"), mole=str(tiny_mole / "mole.safetensors"),
                                     prompts=[long_prompt, "short"], steps=2, out_dir=str(tmp_path)))  # fmt: skip
    report, short = index["prompts"]
    assert report["tokens"] > report["limit"] == 77
    assert report["truncated"] and long_prompt.replace(" ", "").endswith(report["truncated"].replace(" ", ""))
    assert short["truncated"] is None
    assert json.loads(Image.open(index["images"][0]["path"]).text["mole"])["truncated"] == report["truncated"]


def test_wrong_base_and_missing_file_are_refused(tmp_path, tiny_mole):
    tiny_pipeline("sd21").save_pretrained(tmp_path / "sd21")
    with pytest.raises(MoLEFileError, match=r"made for base model .*base.*sd15.*different architecture"):
        generate(GenerateOptions(base=str(tmp_path / "sd21"), mole=str(tiny_mole / "mole.safetensors"),
                                 prompts=["a"], steps=1, out_dir=str(tmp_path / "o")))  # fmt: skip
    with pytest.raises(MoLEFileError, match=r"nope\.safetensors does not exist"):
        generate(GenerateOptions(base=str(tiny_mole / "base"), mole=str(tmp_path / "nope.safetensors"),
                                 prompts=["a"], steps=1, out_dir=str(tmp_path / "o")))  # fmt: skip
    with pytest.raises(ValueError, match="mole is not set"):
        GenerateOptions(base="b", prompts=["a"])


def test_inspect_records_every_step_and_layer_and_draws(tmp_path, tiny_mole):
    data = inspect(InspectOptions(base=str(tiny_mole / "base"), mole=str(tiny_mole / "mole.safetensors"),
                                  prompts=["a face", "a hand"], steps=6, map_steps=3,
                                  out_dir=str(tmp_path)))  # fmt: skip
    assert data["experts"] == ["face", "hand"]
    assert all(len(data["global_mean"][e]) == 6 for e in data["experts"])
    assert all(len(per_prompt) == 6 for per_prompt in data["global_per_prompt"]["face"])
    assert len(data["global_per_layer"]) == len(data["layers"]) == 48
    assert all(len(v["hand"]) == 6 for v in data["global_per_layer"].values())
    assert data["local_map_steps"] == [0, 2, 5]
    face_map = np.array(data["local_maps"]["0"]["5"]["face"])
    assert face_map.shape == (16, 16) and 0 < face_map.min() <= face_map.max() < 1
    saved = json.loads((tmp_path / "gates.json").read_text())
    assert saved["global_mean"] == data["global_mean"]
    for name in ("gates_global.png", "local_maps_0.png", "local_maps_1.png", "image_0.png", "images.png"):
        with Image.open(tmp_path / name) as im:
            im.load()
            assert im.width >= 32 and im.height >= 32
    chart = np.asarray(Image.open(tmp_path / "gates_global.png").convert("RGB"))
    assert (chart != 255).any(axis=-1).mean() > 0.02  # something was drawn


def test_cli_generate_and_inspect(tmp_path, tiny_mole, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# close-ups\na face\n\na hand\n")
    args = ["--base", str(tiny_mole / "base"), "--mole", str(tiny_mole / "mole.safetensors"), "--steps", "2", "--json"]
    assert main(["generate", *args, "--prompt-file", str(prompts), "--num-images", "2", "--out", str(tmp_path / "g"),
                 "--experts", "face=1.0"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 4 and len(list((tmp_path / "g" / "fixed").glob("*.png"))) == 5  # 4 images + grid
    assert main(["inspect", *args, "--prompt", "a face", "--out", str(tmp_path / "i")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["global_gate"]) == {"face", "hand"}
    assert main(["generate", *args, "--prompt", "x", "--experts", "face=abc"]) == 2


def test_cli_never_overwrites_earlier_images(tmp_path, tiny_mole, capsys, caplog, monkeypatch):
    args = ["generate", "--base", str(tiny_mole / "base"), "--mole", str(tiny_mole / "mole.safetensors"),
            "--json", "--steps", "1", "--prompt", "a face"]  # fmt: skip
    out = tmp_path / "g"
    assert main([*args, "--out", str(out)]) == 0
    first = (out / "mole" / "0000_seed0.png").read_bytes()
    index = (out / "index.json").read_text()
    assert main([*args, "--out", str(out), "--seed", "0", "--guidance-scale", "2"]) == 2
    assert "--overwrite" in caplog.text and (out / "index.json").read_text() == index
    assert (out / "mole" / "0000_seed0.png").read_bytes() == first
    assert main([*args, "--out", str(out), "--guidance-scale", "2", "--overwrite"]) == 0
    assert (out / "mole" / "0000_seed0.png").read_bytes() != first
    # the default folder is never shared by two runs: runs/generate, then runs/generate-2
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["out"] == "runs/generate"
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["out"] == "runs/generate-2"
    assert (tmp_path / "runs" / "generate" / "index.json").is_file()
    # arguments are checked before the pipeline loads: each of these fails in milliseconds with one line
    bad = {
        ("--device", "tpu9"): "device='tpu9' is not a torch device",
        ("--height", "100"): "--height 100: use a positive multiple of 8",
        ("--mole", str(tmp_path / "none.safetensors")): "does not exist",
        ("--mole", str(tmp_path)): "is a folder",
    }
    for extra, message in bad.items():
        caplog.clear()
        assert main([*args, "--out", str(tmp_path / "x"), *extra]) == 2, extra
        assert message in caplog.text and "Traceback" not in caplog.text
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "a face"}\n')
    caplog.clear()
    assert main([*args[:-2], "--prompt-file", str(prompts), "--out", str(tmp_path / "x")]) == 2
    assert "record 1 has no 'prompt' text" in caplog.text
    prompts.write_bytes("a caf\xe9\n".encode("latin-1"))
    prompts = prompts.rename(tmp_path / "p.txt")
    caplog.clear()
    assert main([*args[:-2], "--prompt-file", str(prompts), "--out", str(tmp_path / "x")]) == 2
    assert f"prompt file {prompts} is not UTF-8" in caplog.text
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["sdxl", "pixart"])
def test_generate_and_inspect_other_pipelines(tmp_path, kind):
    pipeline_with_mole(tmp_path, kind)
    index = generate(GenerateOptions(base=str(tmp_path / "base"), mole=str(tmp_path / "mole.safetensors"),
                                     prompts=["a face"], steps=2, out_dir=str(tmp_path / "g"),
                                     modes=["none", "mole"]))  # fmt: skip
    imgs = {r["mode"]: _pixels(r["path"]) for r in index["images"]}
    side = 32 if kind == "sdxl" else 16  # sample_size x VAE factor 2 of the tiny models
    assert imgs["mole"].shape[:2] == (side, side) and not np.array_equal(imgs["mole"], imgs["none"])
    data = inspect(InspectOptions(base=str(tmp_path / "base"), mole=str(tmp_path / "mole.safetensors"),
                                  prompts=["a face"], steps=3, map_steps=2, out_dir=str(tmp_path / "i")))  # fmt: skip
    assert len(data["global_mean"]["face"]) == 3 and data["local_maps"]["0"]


def test_inspect_records_the_conditional_half_of_cfg(tmp_path, tiny_mole):
    # bug targeted: inspect keeping the unconditional half of the CFG batch. Reference: a conditional-only run
    # (guidance 1: no CFG batch) with the same seed has the same first-step latents, hence the same step-0 gates.
    from mole import record_gates

    data = inspect(InspectOptions(base=str(tiny_mole / "base"), mole=str(tiny_mole / "mole.safetensors"),
                                  prompts=["a face"], steps=2, map_steps=1, height=64, width=64,
                                  guidance_scale=7.5, out_dir=str(tmp_path)))  # fmt: skip
    pipe = load_mole_weights(DiffusionModel.from_pretrained(tiny_mole / "base").pipe, tiny_mole / "mole.safetensors")
    with record_gates(pipe.unet, keep_local=False) as rec:
        pipe(prompt="a face", num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
             generator=torch.Generator().manual_seed(0))  # fmt: skip
    g = rec.global_gates()  # (steps, layers, b=1, e)
    assert g.shape[2] == 1
    for j, layer in enumerate(data["layers"]):
        for e, name in enumerate(data["experts"]):
            assert abs(data["global_per_layer"][layer][name][0] - float(g[0, j, 0, e])) < 1e-5, (layer, name)


def test_grid_writes_each_rows_label_above_it_and_checks_the_count():
    from mole.inference.plot import grid

    cells = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue", "red", "green", "blue")]
    plain = np.asarray(grid(cells, cols=3, min_cell=32))
    sheet = np.asarray(grid(cells, cols=3, min_cell=32, row_labels=["first prompt", "second prompt"]))
    assert sheet.shape[0] == plain.shape[0] + 2 * 14 and sheet.shape[1] == plain.shape[1]
    for r in range(2):  # the strip above each row holds dark text; the cells below it are the images, moved down
        y = 4 + r * (32 + 4 + 14)
        strip = sheet[y : y + 14]
        assert (strip.min(axis=2) < 100).sum() > 20
        assert tuple(sheet[y + 14 + 16, 4 + 16]) == (255, 0, 0)
    with pytest.raises(ValueError, match="3 row_labels for 2 rows"):
        grid(cells, cols=3, row_labels=["a", "b", "c"])
