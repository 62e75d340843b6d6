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
        {"prompt": "a man on a horse", "prompt_nsfw": 0.1, "image_nsfw": 0.95},  # the second flag counts too
        {"prompt": "a witch", "prompt_nsfw": 0.49, "image_nsfw": 0.5},
    ]))  # fmt: skip
    records, stats = diffusiondb_human_prompts(src)
    assert [r["prompt"] for r in records] == ["portrait of a woman, oil painting", "a boy with a kite"]
    assert stats == {"source_records": 8, "dropped_nsfw": 3, "dropped_special_symbols": 1, "dropped_no_human_word": 1,
                     "dropped_duplicate": 1, "has_nsfw_flag": True, "kept": 2}  # fmt: skip


def test_a_prompt_file_of_the_other_kind_is_an_error(tmp_path):
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [], "annotations": [{"id": 1, "image_id": 1, "caption": "a man"}]}))
    ddb = tmp_path / "ddb.json"
    ddb.write_text(json.dumps([{"prompt": "a man"}]))
    with pytest.raises(ValueError, match="coco.json.*not a diffusiondb prompt source.*coco builder"):
        diffusiondb_human_prompts(coco)
    with pytest.raises(ValueError, match="ddb.json.*not a coco prompt source.*diffusiondb builder"):
        coco_human_prompts(ddb)
    with pytest.raises(ValueError, match="not a diffusiondb"):
        build_benchmark("diffusiondb", coco, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()
    assert len(coco_human_prompts(coco)[0]) == len(diffusiondb_human_prompts(ddb)[0]) == 1


@pytest.mark.parametrize("text, human", [
    ("A couple of elephants walking", False), ("portrait", False), ("portrait of a cat, oil painting", False),
    ("a city street with no people", False), ("empty beach, no humans, no faces", False),
    ("a passenger bus parked", False), ("a baby giraffe next to its mother giraffe", False),
    ("castle, art by greg rutkowski and alphonse mucha", False), ("anthropomorphic fox wearing armor", False),
    ("A couple in the kitchen", True), ("a couple of men holding umbrellas", True), ("a hunter in the woods", True),
    ("old villager, oil painting", True), ("evil wizard, trending on artstation", True),
    ("tom cruise with a long white beard", True), ("putin as darth vader", True), ("beyoncé posing", True),
    ("portrait of a woman by greg rutkowski", True), ("A man giving a thumbs up", True),
    ("A Woman's umbrella", True), ("Manhattan skyline", False), ("a mannequin", False),
])  # fmt: skip
def test_human_text_rules(text, human):
    from mole.eval.human_text import human_evidence

    assert (human_evidence(text) is not None) == human, human_evidence(text)


@pytest.mark.parametrize("name", ["coco", "diffusiondb"])
def test_human_prompt_rule_on_hand_labelled_samples(name):
    """Precision >= 0.95 and recall >= 0.90 on >= 200 prompts labelled by reading them (tests/data/)."""
    from mole.eval.human_text import is_human_text

    rows = [json.loads(x) for x in (Path(__file__).parent / "data" / f"human_prompts_{name}_labelled.jsonl")
            .read_text().splitlines() if x.strip()]  # fmt: skip
    assert len(rows) >= 200 and 50 <= sum(r["human"] for r in rows) <= len(rows) - 50
    pred = [is_human_text(r["prompt"]) for r in rows]
    tp = sum(p and r["human"] for p, r in zip(pred, rows))
    assert tp / sum(pred) >= 0.95 and tp / sum(r["human"] for r in rows) >= 0.90


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
    # the sizes README and `mole eval prompts --help` quote (the paper's ~60k come from COCO 2014, not here)
    assert stats["source_records"] == 25014 and stats["kept"] == len(all_records) == 10751


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
    assert got == pytest.approx((i * t).sum(-1).tolist(), abs=1e-6)  # raw cosine; reports show 100 x as HPS (%)


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


def test_a_damaged_image_is_set_aside_once_generated_and_scored_again(tmp_path, eval_setup, caplog):
    """An image of an earlier run that no longer decodes (cut short on disk) is not scored as if present: it is kept
    as NAME.unreadable.png, warned once, drawn again from its seed and rescored; the report counts it once."""
    scorer = Brightness()
    first = run_eval(_opts(eval_setup, tmp_path), scorers={"bright": scorer})
    [img] = (tmp_path / "images" / "base").rglob("r0/00001_*.png")
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 3])
    with caplog.at_level("WARNING", logger="mole"):
        again = run_eval(_opts(eval_setup, tmp_path), scorers={"bright": scorer})
    assert again["run"] == {"generated": 1, "scored": 1}
    warned = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warned) == 1 and img.name in warned[0].getMessage()
    assert img.with_suffix(".unreadable.png").read_bytes() == data[: len(data) // 3]
    assert img.read_bytes() == data  # the same seed draws the same image
    assert len(again["per_image"]["base"]) == 6  # the damaged image's old score is gone, its new one counted once
    for model, metrics in first["summary"].items():  # rows now in another order: equal up to summation rounding
        for m, v in metrics.items():
            assert again["summary"][model][m]["mean"] == pytest.approx(v["mean"], rel=1e-12)
            assert again["summary"][model][m]["n_images"] == v["n_images"]


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
    # a random tiny pipeline draws noise: facehand finds nothing on any image, so the run exits 3 (nothing
    # produced, docs/cli.md#exit-codes) after writing its report and printing the summary
    assert main(["eval", "run", "--config", str(cfg), "--json"]) == 3
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
    with pytest.raises(TrainConfigError, match=r'models\[0\]\.mode = "softmax" is not valid'):
        load_eval_config(cfg)
    cfg.write_text('benchmark = "b"\nrepeat = 3\n[[models]]\nname = "m"\nbase = "b"\n')
    with pytest.raises(TrainConfigError, match=r"unknown option repeat \(did you mean repeats\?\)"):
        load_eval_config(cfg)


def test_ablation_cli_runs_the_stage_ladder(tmp_path, eval_setup, capsys):
    pytest.importorskip("mediapipe")
    args = ["eval", "ablation", "--benchmark", str(eval_setup / "bench.jsonl"), "--base", str(eval_setup / "base"),
            "--mole", str(eval_setup / "mole.safetensors"), "--gating", f"both={eval_setup / 'mole.safetensors'}",
            "--num-prompts", "1", "--repeats", "2", "--steps", "2", "--json", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 3  # every score 0 on noise from a random tiny pipeline: nothing produced (still reported)
    out = json.loads(capsys.readouterr().out)
    assert out["models"] == ["base", "stage2-fixed", "stage3-mole", "gating-both"]
    assert set(out["summary"]) == set(out["models"]) and out["run"]["generated"] == 8
    assert main([*args[:-2], "--out", str(tmp_path / "x"), "--gating", "softmax=f"]) == 2


# ---------------------------------------------------------------------------------------------------- the paper's units
class RawScores:
    """A stand-in for HPS and ImageReward: raw scores from the image's brightness (HPS ~0.2, IR ~0.3)."""

    name = "paperlike"
    metrics = ("hps", "image_reward")

    def score(self, images, prompts):
        b = [float(np.asarray(im, dtype=np.float64).mean() / 255) for im in images]
        return {"hps": [0.2 + 0.01 * x for x in b], "image_reward": [0.3 - 0.5 * x for x in b]}


def test_report_in_the_papers_units_with_its_reference_rows(tmp_path, eval_setup):
    from mole.eval.paper import PAPER_RESULTS

    bench = tmp_path / "coco_human.jsonl"
    bench.write_text((eval_setup / "bench.jsonl").read_text())
    Path(str(bench) + ".meta.json").write_text(json.dumps({"benchmark": "coco-human-prompts"}))
    root = eval_setup
    models = [ModelSpec("sd15", str(root / "base"), reference="SD v1.5"),
              ModelSpec("mole", str(root / "base"), str(root / "mole.safetensors"))]  # fmt: skip
    opts = EvalOptions(benchmark=str(bench), out_dir=str(tmp_path / "out"), num_prompts=2, repeats=2, steps=2,
                       models=models)  # fmt: skip
    report = run_eval(opts, scorers={"paperlike": RawScores()})
    for name in ("sd15", "mole"):
        raw, pct = report["summary"][name], report["paper_units"][name]
        assert pct["HPS (%)"]["mean"] == pytest.approx(100 * raw["hps"]["mean"])  # x100, not x1 or /100
        assert pct["IR (%)"]["mean"] == pytest.approx(100 * raw["image_reward"]["mean"])
        assert pct["IR (%)"]["se"] == pytest.approx(100 * raw["image_reward"]["se"])
    md = (tmp_path / "out" / "report.md").read_text().splitlines()
    head = next(i for i, line in enumerate(md) if line.startswith("| model |"))
    assert md[head] == "| model | hps | image_reward | HPS (%) | IR (%) |"
    rows = md[head + 2 :]
    s = report["paper_units"]["sd15"]
    assert rows[0].startswith(f"| sd15 | {report['summary']['sd15']['hps']['mean']:.4f} ± ")
    assert f"| {s['HPS (%)']['mean']:.2f} ± {s['HPS (%)']['se']:.2f} |" in rows[0]
    # the paper's row for the model's setting right beneath it; the other recorded rows at the end
    assert rows[1] == "| *paper: SD v1.5* | - | - | 19.91 | 28.34 |"
    assert rows[2].startswith("| mole |") and rows[3] == "| *paper: MoLE* | - | - | 20.27 | 33.75 |"
    assert PAPER_RESULTS[("coco", "MoLE")] == {"HPS (%)": 20.27, "IR (%)": 33.75}
    assert report["paper_reference"]["benchmark"] == "coco"
    # a benchmark without provenance gets no reference rows (its setting is unknown)
    bare = run_eval(EvalOptions(benchmark=str(root / "bench.jsonl"), out_dir=str(tmp_path / "out2"), num_prompts=1,
                                repeats=1, steps=2, models=models[:1]), scorers={"paperlike": RawScores()})  # fmt: skip
    assert bare["paper_reference"]["rows"] == {} and "paper:" not in (tmp_path / "out2" / "report.md").read_text()


def test_stage_ablation_uses_the_same_prompts_and_seeds_for_every_stage(tmp_path, eval_setup):
    root = eval_setup
    models = ablation_models(str(root / "base"), stage1=str(root / "base"), mole=str(root / "mole.safetensors"))
    assert [m.name for m in models] == ["base", "stage1", "stage2-fixed", "stage3-mole"]
    opts = EvalOptions(benchmark=str(root / "bench.jsonl"), out_dir=str(tmp_path), num_prompts=2, repeats=2,
                       steps=2, models=models, seed=3)  # fmt: skip
    report = run_eval(opts, scorers={"bright": Brightness()})
    keyed = {name: {(r["repeat"], r["index"]): (r["prompt"], r["seed"]) for r in rows}
             for name, rows in report["per_image"].items()}  # fmt: skip
    assert len(keyed["base"]) == 4
    assert keyed["base"] == keyed["stage1"] == keyed["stage2-fixed"] == keyed["stage3-mole"]
    assert len({seed for _, seed in keyed["base"].values()}) == 4  # each image its own seed, shared across stages
    # same seed and prompt, same model -> same image: base and stage1 (here the same weights) agree pixel for pixel
    path = {name: next(r["path"] for r in rows if (r["repeat"], r["index"]) == (1, 1))
            for name, rows in report["per_image"].items()}  # fmt: skip
    assert path["base"] != path["stage1"]  # each model its own files
    a = np.asarray(Image.open(path["base"]))
    b = np.asarray(Image.open(path["stage1"]))
    assert np.array_equal(a, b)
