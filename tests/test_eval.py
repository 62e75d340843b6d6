"""Evaluation: benchmark builders, metric backends (real offline detectors, tiny stand-ins for weight-bound ones),
repeats with standard errors, resumable runs, reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FACES, HANDS, SHARED, pipeline_with_mole
from mole.cli import main
from mole.eval import (
    CLIPScore,
    EvalOptions,
    HPSv2,
    ImageRewardScorer,
    MetricSpec,
    MetricUnavailable,
    ModelSpec,
    ablation_models,
    build_benchmark,
    build_scorer,
    coco_human_prompts,
    diffusiondb_human_prompts,
    read_benchmark,
    run_eval,
)
from mole.eval.prompts import has_human_word
from mole.eval.runner import repeat_prompts
from mole.tiny import tiny_clip_tokenizer


# ---------------------------------------------------------------------------------------------------- prompts
def test_human_words_match_whole_words_only():
    assert has_human_word("A Woman's umbrella") and has_human_word("two BOYS playing") and has_human_word("a man.")
    assert not has_human_word("Manhattan skyline") and not has_human_word("a mannequin") and not has_human_word("")


def test_diffusiondb_rules(tmp_path):
    src = tmp_path / "ddb.json"
    src.write_text(json.dumps([
        {"prompt": "portrait of a woman, oil painting"}, {"prompt": "a (man:1.2) walking"},
        {"text": "a castle on a hill"}, {"prompt": "a girl", "prompt_nsfw": 0.9},
        {"prompt": "portrait of a woman, oil painting"},
        {"prompt": "a boy with a kite", "image_nsfw": 0.1},
    ]))  # fmt: skip
    records, stats = diffusiondb_human_prompts(src)
    assert [r["prompt"] for r in records] == ["portrait of a woman, oil painting", "a boy with a kite"]
    assert stats == {"source_records": 6, "dropped_nsfw": 1, "dropped_special_symbols": 1, "dropped_no_human_word": 1,
                     "dropped_duplicate": 1, "has_nsfw_flag": True, "kept": 2}  # fmt: skip


def test_benchmarks_from_shared_prompts_are_reproducible(tmp_path):
    coco = SHARED / "data" / "prompts" / "coco_captions_val2017.json"
    if not coco.is_file():
        pytest.skip("shared prompts missing")
    a = build_benchmark("coco", coco, tmp_path / "a.jsonl", limit=50, seed=3)
    b = build_benchmark("coco", coco, tmp_path / "b.jsonl", limit=50, seed=3)
    assert a.read_text() == b.read_text()
    records = read_benchmark(a)
    assert len(records) == 50 and all(has_human_word(r["prompt"]) for r in records)
    meta = json.loads(Path(str(a) + ".meta.json").read_text())
    assert meta["count"] == 50 and len(meta["source_sha256"]) == 64 and "woman" in meta["rules"]["human_words"]
    all_records, stats = coco_human_prompts(coco)
    assert stats["source_records"] == 25014 and stats["kept"] == len(all_records) > 5000


# ---------------------------------------------------------------------------------------------------- metrics
def test_face_hand_detection_on_real_photos():
    pytest.importorskip("mediapipe")
    if not FACES or not HANDS:
        pytest.skip("shared images missing")
    det = build_scorer("facehand")
    faces = [Image.open(p).convert("RGB").resize((184, 224)) for p in FACES[:6]]
    hands = [Image.open(p).convert("RGB").resize((200, 200)) for p in HANDS[:6]]
    on_faces, on_hands = det.score(faces, [""] * 6), det.score(hands, [""] * 6)
    assert np.mean(on_faces["face_rate"]) >= 0.5 and np.mean(on_hands["hand_rate"]) >= 0.5
    assert np.mean(on_hands["face_rate"]) <= 0.2 and np.mean(on_faces["hand_rate"]) <= 0.2
    assert all(0 <= c <= 1 for c in on_faces["face_conf"] + on_hands["hand_conf"])
    blank = det.score([Image.new("RGB", (128, 128), "gray")], [""])
    assert blank == {"face_rate": [0.0], "face_conf": [0.0], "hand_rate": [0.0], "hand_conf": [0.0]}


def tiny_clip_dir(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(tok) - 2,
                         eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = CLIPProcessor(image_processor=images, tokenizer=tok)
    proc.save_pretrained(path)
    return path


def test_clip_score_loads_a_local_folder_and_scores(tmp_path):
    scorer = CLIPScore(tiny_clip_dir(tmp_path / "clip"))
    imgs = [Image.new("RGB", (40, 40), c) for c in ("red", "blue")]
    out = scorer.score(imgs, ["a red square", "a blue square"])
    assert len(out["clip_score"]) == 2 and all(0 <= v <= 100 for v in out["clip_score"])
    again = scorer.score(imgs[::-1], ["a blue square", "a red square"])
    assert again["clip_score"] == pytest.approx(out["clip_score"][::-1], abs=1e-4)
    with pytest.raises(MetricUnavailable, match="could not be loaded"):
        CLIPScore(tmp_path / "missing")


class _StandInCLIP(torch.nn.Module):
    """The open_clip interface HPS uses (encode_image / encode_text) with tiny random weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img = torch.nn.Linear(3 * 8 * 8, 4)
        self.txt = torch.nn.Embedding(100, 4)

    def encode_image(self, x):
        return self.img(x.flatten(1))

    def encode_text(self, t):
        return self.txt(t).mean(1)


def test_hps_math_with_a_stand_in_model():
    model = _StandInCLIP()

    def preprocess(im):
        return torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255

    def tokenizer(texts):
        return torch.tensor([[len(w) % 100 for w in (t.split() + ["", "", ""])[:3]] for t in texts])

    hps = HPSv2(model, preprocess, tokenizer, device="cpu")
    imgs, prompts = [Image.new("RGB", (16, 16), "white"), Image.new("RGB", (16, 16), "green")], ["a b", "ccc dd"]
    got = hps.score(imgs, prompts)["hps"]
    i = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(x) for x in imgs])), dim=-1)
    t = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    assert got == pytest.approx((100 * (i * t).sum(-1)).tolist(), abs=1e-4)


def test_weight_bound_metrics_say_what_is_missing(tmp_path):
    with pytest.raises(MetricUnavailable, match="needs weights"):
        build_scorer("hps")
    with pytest.raises(MetricUnavailable, match="open_clip"):
        build_scorer("hps", weights=str(tmp_path / "hps.pt"))
    with pytest.raises(MetricUnavailable, match="image-reward"):
        build_scorer("imagereward", weights=str(tmp_path / "ir.pt"))
    with pytest.raises(ValueError, match="metric='fid' is unknown"):
        build_scorer("fid", weights="x")

    class Reward:
        def score(self, prompt, images):
            return float(len(prompt))

    assert ImageRewardScorer(Reward()).score([Image.new("RGB", (4, 4))] * 2, ["ab", "abcd"]) == {
        "image_reward": [2.0, 4.0]
    }


# ---------------------------------------------------------------------------------------------------- runs
class Brightness:
    """A deterministic stand-in scorer: mean pixel value and its square."""

    name = "bright"
    metrics = ("brightness", "brightness_sq")

    def __init__(self):
        self.calls = 0

    def score(self, images, prompts):
        self.calls += len(images)
        b = [float(np.asarray(im, dtype=np.float64).mean() / 255) for im in images]
        return {"brightness": b, "brightness_sq": [x * x for x in b]}


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    root = pipeline_with_mole(tmp_path_factory.mktemp("eval"))
    bench = root / "bench.jsonl"
    bench.write_text("\n".join(json.dumps({"id": i, "prompt": p}) for i, p in enumerate(
        ["a man smiling", "a woman waving her hand", "two kids", "a girl's face", "people in a park"])))  # fmt: skip
    return root


def _opts(root, out, **kw):
    mole = str(root / "mole.safetensors")
    models = [ModelSpec("base", str(root / "base")), ModelSpec("mole", str(root / "base"), mole)]
    kw = {"num_prompts": 3, "repeats": 2, "steps": 2, **kw}
    return EvalOptions(benchmark=str(root / "bench.jsonl"), out_dir=str(out), models=models, **kw)


def test_run_reports_mean_and_standard_error_and_resumes(tmp_path, eval_setup):
    scorer = Brightness()
    report = run_eval(_opts(eval_setup, tmp_path), scorers={"bright": scorer})
    assert report["run"] == {"generated": 12, "scored": 12}
    assert len(list((tmp_path / "images").rglob("*.png"))) == 12
    for model in ("base", "mole"):
        rows = report["per_image"][model]
        assert len(rows) == 6 and {r["repeat"] for r in rows} == {0, 1}
        means = [np.mean([r["brightness"] for r in rows if r["repeat"] == k]) for k in (0, 1)]
        s = report["summary"][model]["brightness"]
        assert s["mean"] == pytest.approx(np.mean(means))
        assert s["se"] == pytest.approx(np.std(means, ddof=1) / math.sqrt(2))
    assert report["summary"]["base"]["brightness"]["mean"] != report["summary"]["mole"]["brightness"]["mean"]
    md = (tmp_path / "report.md").read_text()
    assert "| mole |" in md and "±" in md and (tmp_path / "bars_brightness.png").is_file()
    # repeats draw different prompt samples: each its own seeded sample of the benchmark
    bench = [json.loads(x) for x in (eval_setup / "bench.jsonl").read_text().splitlines()]
    prompts_by_rep = [[r["prompt"] for r in report["per_image"]["base"] if r["repeat"] == k] for k in (0, 1)]
    assert prompts_by_rep == [[b["prompt"] for b in repeat_prompts(bench, 3, k, 0)] for k in (0, 1)]
    assert set(prompts_by_rep[0]) != set(prompts_by_rep[1])

    # a rerun redoes nothing; a lost image is regenerated alone and its score is kept
    again = run_eval(_opts(eval_setup, tmp_path), scorers={"bright": scorer})
    assert again["run"] == {"generated": 0, "scored": 0}
    [lost] = (tmp_path / "images" / "mole").rglob("r1/00002_*.png")
    lost.unlink()
    third = run_eval(_opts(eval_setup, tmp_path), scorers={"bright": scorer})
    assert third["run"] == {"generated": 1, "scored": 0}
    assert third["summary"] == report["summary"]


def test_eval_cache_is_keyed_by_what_changes_the_images(tmp_path, eval_setup):
    """Other steps, sampler or MoLE file: new images and scores, never the cached ones; the old ones come back."""
    scorer = Brightness()
    first = run_eval(_opts(eval_setup, tmp_path), scorers={"bright": scorer})
    other_steps = run_eval(_opts(eval_setup, tmp_path, steps=3), scorers={"bright": scorer})
    assert other_steps["run"] == {"generated": 12, "scored": 12}
    assert other_steps["summary"]["mole"] != first["summary"]["mole"]
    other_sampler = run_eval(_opts(eval_setup, tmp_path, scheduler="euler"), scorers={"bright": scorer})
    assert other_sampler["run"] == {"generated": 12, "scored": 12}
    # a changed MoLE file (same path): only the MoLE model is redone
    mole_copy = tmp_path / "m.safetensors"
    mole_copy.write_bytes((eval_setup / "mole.safetensors").read_bytes())
    models = [ModelSpec("mole", str(eval_setup / "base"), str(mole_copy))]
    opts = EvalOptions(benchmark=str(eval_setup / "bench.jsonl"), out_dir=str(tmp_path / "m"), num_prompts=3,
                       repeats=2, steps=2, models=models)  # fmt: skip
    a = run_eval(opts, scorers={"bright": scorer})
    assert a["run"] == {"generated": 6, "scored": 6}
    assert run_eval(opts, scorers={"bright": scorer})["run"] == {"generated": 0, "scored": 0}  # the cache is hit
    changed = tmp_path / "changed.safetensors"
    _scaled_gates(mole_copy, changed)
    mole_copy.write_bytes(changed.read_bytes())
    b = run_eval(opts, scorers={"bright": scorer})
    assert b["run"] == {"generated": 6, "scored": 6}
    # the first settings again: all cached, the same numbers
    again = run_eval(_opts(eval_setup, tmp_path), scorers={"bright": scorer})
    assert again["run"] == {"generated": 0, "scored": 0} and again["summary"] == first["summary"]
    assert again["options"]["steps"] == 2


def _scaled_gates(src, dst):
    """A copy of a MoLE file with every gate value changed (same manifest, same size)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors = {k: (v + 1.0 if k.startswith("gates.") else v) for k, v in tensors.items()}
    save_file(tensors, str(dst), metadata=meta)


def test_half_written_score_line_is_dropped_and_rescored(tmp_path, eval_setup):
    scorer = Brightness()
    first = run_eval(_opts(eval_setup, tmp_path), scorers={"bright": scorer})
    [score_file] = (tmp_path / "scores" / "mole").glob("*.jsonl")
    lines = score_file.read_text().splitlines()
    score_file.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # a kill mid-write
    again = run_eval(_opts(eval_setup, tmp_path), scorers={"bright": scorer})
    assert again["run"] == {"generated": 0, "scored": 1}
    assert again["summary"] == first["summary"]
    assert all(json.loads(x) for x in score_file.read_text().splitlines())


def test_eval_cli_with_a_toml(tmp_path, eval_setup, capsys):
    pytest.importorskip("mediapipe")
    cfg = tmp_path / "eval.toml"
    cfg.write_text(
        f'benchmark = "{eval_setup / "bench.jsonl"}"\nout_dir = "{tmp_path / "out"}"\nnum_prompts = 2\nrepeats = 2\n'
        f'steps = 2\n[[models]]\nname = "base"\nbase = "{eval_setup / "base"}"\n[[metrics]]\nname = "facehand"\n'
    )
    assert main(["eval", "run", "--config", str(cfg)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["summary"]["base"]) == {"face_rate", "face_conf", "hand_rate", "hand_conf"}
    assert out["run"] == {"generated": 4, "scored": 4}


def test_ablation_model_lists():
    names = [m.name for m in ablation_models("b", stage1="s1", mole="m", gating={"local": "l", "global": "g"})]
    assert names == ["base", "stage1", "stage2-fixed", "stage3-mole", "gating-local", "gating-global"]
    fixed = ablation_models("b", mole="m", expert_weights={"face": 1.0})[1]
    assert fixed.mode.value == "fixed" and fixed.base == "b" and fixed.expert_weights == {"face": 1.0}
    with pytest.raises(ValueError, match="unique"):
        EvalOptions(benchmark="b", models=[ModelSpec("x", "b"), ModelSpec("x", "c")])
    assert MetricSpec("facehand").weights is None


def test_eval_config_errors_name_the_field(tmp_path):
    from mole.eval import load_eval_config
    from mole.training import TrainConfigError

    cfg = tmp_path / "e.toml"
    cfg.write_text('benchmark = "b"\n[[models]]\nname = "m"\nbase = "b"\nmode = "softmax"\n')
    with pytest.raises(TrainConfigError, match=r"models\[0\]\.mode='softmax' is not valid"):
        load_eval_config(cfg)
    cfg.write_text('benchmark = "b"\nrepeat = 3\n[[models]]\nname = "m"\nbase = "b"\n')
    with pytest.raises(TrainConfigError, match=r"unknown option\(s\) \['repeat'\]"):
        load_eval_config(cfg)


def test_ablation_cli_runs_the_stage_ladder(tmp_path, eval_setup, capsys):
    pytest.importorskip("mediapipe")
    args = ["eval", "ablation", "--benchmark", str(eval_setup / "bench.jsonl"), "--base", str(eval_setup / "base"),
            "--mole", str(eval_setup / "mole.safetensors"), "--gating", f"both={eval_setup / 'mole.safetensors'}",
            "--num-prompts", "1", "--repeats", "2", "--steps", "2", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["models"] == ["base", "stage2-fixed", "stage3-mole", "gating-both"]
    assert set(out["summary"]) == set(out["models"]) and out["run"]["generated"] == 8
    assert main([*args[:-2], "--out", str(tmp_path / "x"), "--gating", "softmax=f"]) == 2
