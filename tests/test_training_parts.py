"""Training pieces on their own: config files and overrides, Min-SNR weights, Lion, data reading and ordering."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mole.cli import main
from mole.data import CaptionedImages, StepBatchSampler, collate, scan_samples
from mole.data.dataset import DataError, load_rgb
from mole.training import PRESETS, Stage, TrainConfig, TrainConfigError, load_config
from mole.training.loss import min_snr_weights, snr
from mole.training.optim import Lion, make_schedule


# ---------------------------------------------------------------------------------------------------- config
def test_toml_preset_and_overrides_compose(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'model = "some/model"\nmax_steps = 50\n[data]\npath = "imgs"\nresolution = 256\n'
        '[mixture]\nexperts = {face = "f.safetensors", hand = "h.safetensors"}\n'
    )
    cfg = load_config(toml, preset="stage3", overrides=["optim.lr=3e-5", "data.center_crop=false", "seed=7"])
    assert cfg.stage is Stage.MIXTURE and cfg.optim.lr == 3e-5 and cfg.max_steps == 50
    assert cfg.data.resolution == 256 and cfg.data.center_crop is False and cfg.seed == 7
    assert cfg.mixture.experts == {"face": "f.safetensors", "hand": "h.safetensors"}
    # the written config reads back to the same config
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert load_config(again).to_dict() == cfg.to_dict()


def test_presets_hold_the_papers_settings():
    base = ["model=m", "data.path=d", "mixture.experts={face='f'}"]
    s1 = load_config(preset="stage1", overrides=base)
    assert (s1.optim.name.value, s1.optim.lr, s1.min_snr_gamma, s1.train_text_encoder) == ("lion", 2e-6, 5.0, True)
    face, hand = load_config(preset="stage2-face", overrides=base), load_config(preset="stage2-hand", overrides=base)
    assert (face.expert.rank, face.optim.lr, hand.optim.lr, hand.expert.name) == (256, 2e-5, 1e-5, "hand")
    s3 = load_config(preset="stage3", overrides=base)
    assert (s3.optim.name.value, s3.optim.lr, s3.mixture.gating.value) == ("adamw", 1e-5, "both")
    assert set(PRESETS) == {"stage1", "stage2-face", "stage2-hand", "stage3", "instruct"}


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["optim.lr=-1"], r"optim\.lr=-1"),
        (["optim.name=sgd"], r'optim\.name = "sgd" is not valid; use one of adamw, lion$'),
        (["data.resolution=100"], r"data\.resolution=100.*multiple of 8"),
        (["max_steps=ten"], r'max_steps must be a whole number, got "ten"'),
        (["optim.learning_rate=1"], r"unknown option optim\.learning_rate"),
        (["data.cache_latents=true", "data.random_flip=true"], r"data\.cache_latents.*random_flip"),
        (["mixture.gating=none"], r"mixture\.gating='none'.*stage 3 trains gates"),
        (["stage=2", "expert.name='face.png'"], r"expert\.name='face\.png'"),
        (["lr"], r"override 'lr' is not key=value"),
    ],
)
def test_bad_options_name_the_field(overrides, match):
    with pytest.raises(TrainConfigError, match=match):
        load_config(overrides=["model=m", "data.path=d", "mixture.experts={face='f'}", *overrides])


def test_missing_essentials_are_named():
    with pytest.raises(TrainConfigError, match="model=''"):
        TrainConfig().validate()
    with pytest.raises(TrainConfigError, match="does not exist"):
        load_config("no-such-file.toml")


def test_cli_prints_the_resolved_config(capsys):
    assert main(["train", "--preset", "stage2-hand", "--set", "model=m", "--set", "data.path=d",
                 "--print-config"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert 'name = "hand"' in out and "lr = 1e-05" in out and "stage = 2" in out


# ---------------------------------------------------------------------------------------------------- loss, optimizer
def test_min_snr_weights_follow_the_formula():
    alphas = torch.tensor([0.99, 0.9, 0.5, 0.1, 0.001])
    t = torch.arange(5)
    s = alphas / (1 - alphas)  # 99, 9, 1, 0.111, 0.001
    torch.testing.assert_close(snr(alphas, t), s)
    eps = min_snr_weights(alphas, t, 5.0, "epsilon")
    torch.testing.assert_close(eps, torch.tensor([5 / 99, 5 / 9, 1.0, 1.0, 1.0]))
    v = min_snr_weights(alphas, t, 5.0, "v_prediction")
    torch.testing.assert_close(v, torch.minimum(s, torch.tensor(5.0)) / (s + 1))
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(alphas, t, 5.0, "sample")


def test_lion_step_matches_the_update_rule():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    g1, g2 = torch.tensor([0.5, -1.0, 0.0]), torch.tensor([-2.0, 1.0, 1.0])
    p.grad = g1.clone()
    opt.step()
    expected = torch.tensor([1.0, -2.0, 3.0]) * (1 - 0.05) - 0.1 * torch.sign(0.1 * g1)
    torch.testing.assert_close(p.data, expected)
    m = 0.01 * g1
    p.grad = g2.clone()
    opt.step()
    expected = expected * (1 - 0.05) - 0.1 * torch.sign(0.9 * m + 0.1 * g2)
    torch.testing.assert_close(p.data, expected)


def test_schedules():
    from mole.training.config import LRSchedule, OptimConfig

    p = torch.nn.Parameter(torch.zeros(1))
    for schedule, at_end in ((LRSchedule.CONSTANT, 1.0), (LRSchedule.LINEAR, 0.0), (LRSchedule.COSINE, 0.0)):
        opt = torch.optim.SGD([p], lr=1.0)
        sched = make_schedule(opt, OptimConfig(schedule=schedule, warmup_steps=2), max_steps=10)
        lrs = []
        for _ in range(10):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        assert lrs[0] == 0.5 and lrs[1] == 1.0
        assert sched.get_last_lr()[0] == pytest.approx(at_end, abs=1e-6)


# ---------------------------------------------------------------------------------------------------- data
def _img(path, mode="RGB", size=(40, 30), value=128):
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], value * 257, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, size, value if mode in ("L", "I;16") else (value,) * len(mode)).save(path)
    return path


def test_manifests_jsonl_json_and_kohya(tmp_path):
    for i in range(3):
        _img(tmp_path / f"im{i}.png")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"file": f"im{i}.png", "caption": f"c{i}"})
                                                for i in range(3)))  # fmt: skip
    assert [s.caption for s in scan_samples(tmp_path, tmp_path / "m.jsonl")] == ["c0", "c1", "c2"]
    (tmp_path / "m.json").write_text(json.dumps([{"image": "im1.png", "text": "x"}]))
    assert scan_samples(tmp_path, tmp_path / "m.json")[0].path.name == "im1.png"
    (tmp_path / "kohya.json").write_text(json.dumps({"im2": {"caption": "kohya caption", "tags": "a, b"}}))
    s = scan_samples(tmp_path, tmp_path / "kohya.json")
    assert s[0].path.name == "im2.png" and s[0].caption == "kohya caption"
    (tmp_path / "bad.jsonl").write_text('{"file": "nope.png", "caption": "x"}')
    with pytest.raises(DataError, match=r"bad\.jsonl: record 1 names 'nope\.png'"):
        scan_samples(tmp_path, tmp_path / "bad.jsonl")


def test_txt_captions_and_missing_ones(tmp_path):
    _img(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text(" a man  \n")
    _img(tmp_path / "b.jpg")  # no caption: skipped
    samples = scan_samples(tmp_path)
    assert [(s.path.name, s.caption) for s in samples] == [("a.jpg", "a man")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no captioned images"):
        scan_samples(tmp_path / "empty")


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_odd_image_modes_become_rgb(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    _img(path, mode, value=200)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (40, 30)
    if mode in ("L", "I;16"):
        assert np.asarray(img)[0, 0].tolist() == [200, 200, 200]


def test_crops_resize_to_the_resolution_and_are_deterministic(tmp_path):
    _img(tmp_path / "wide.png", size=(80, 20))
    (tmp_path / "wide.txt").write_text("cap")
    ds = CaptionedImages(scan_samples(tmp_path), 16, center_crop=False, random_flip=True, caption_dropout=0.5)
    a, b = ds[(0, 3)], ds[(0, 3)]
    assert a["pixels"].shape == (3, 16, 16) and torch.equal(a["pixels"], b["pixels"]) and a["caption"] == b["caption"]
    assert a["pixels"].min() >= -1 and a["pixels"].max() <= 1
    captions = {ds[(0, e)]["caption"] for e in range(40)}
    assert captions == {"", "cap"}  # dropout happens, per epoch


def test_sampler_partitions_processes_and_is_a_pure_function_of_the_step():
    s0 = StepBatchSampler(10, batch_size=2, num_processes=2, process_index=0, seed=1)
    s1 = StepBatchSampler(10, batch_size=2, num_processes=2, process_index=1, seed=1)
    first_epoch = [k for m in range(2) for k in s0.batch(m) + s1.batch(m)][:8]
    idx = [i for i, _ in first_epoch]
    assert len(set(idx)) == 8  # no sample twice within an epoch, across processes
    later = StepBatchSampler(10, batch_size=2, num_processes=2, process_index=0, seed=1, start=5)
    assert next(iter(later)) == s0.batch(5)
    assert collate([{"index": 0, "bad": True}])["pixels"] is None


@pytest.mark.parametrize("name,preset", [("stage1_sd15", "stage1"), ("stage2_face", "stage2-face"),
                                         ("stage3", "stage3")])  # fmt: skip
def test_shipped_configs_are_valid(name, preset):
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.toml", preset=preset)
    assert cfg.stage.value == int(preset[5]) and cfg.data.resolution == 512


def test_mixed_precision_loads_frozen_components_in_the_weight_dtype(tiny_sd15_dir):
    """Stages 2-3 load every component in the weight dtype (no fp32 copy of a large pipeline in host memory);
    stage 1 loads what it trains (UNet, text encoder when it trains) in fp32 master weights, the rest in bf16."""
    from mole.models import DiffusionModel
    from mole.training.loop import load_dtype

    def cfg(stage, precision, te=True):
        return TrainConfig.from_dict({"stage": stage, "model": str(tiny_sd15_dir), "mixed_precision": precision,
                                      "train_text_encoder": te, "data": {"path": "x"}})  # fmt: skip

    assert load_dtype(cfg(2, "bf16"), torch.bfloat16) == torch.bfloat16
    assert load_dtype(cfg(1, "no"), torch.float32) == torch.float32
    model = DiffusionModel.from_pretrained(tiny_sd15_dir, dtype=load_dtype(cfg(1, "bf16"), torch.bfloat16))
    assert model.pipe.unet.dtype == torch.float32 and model.pipe.text_encoder.dtype == torch.float32
    assert model.pipe.vae.dtype == torch.bfloat16
    dtypes = load_dtype(cfg(1, "bf16", te=False), torch.bfloat16)
    frozen_te = DiffusionModel.from_pretrained(tiny_sd15_dir, dtype=dtypes)
    assert frozen_te.pipe.unet.dtype == torch.float32 and frozen_te.pipe.text_encoder.dtype == torch.bfloat16
