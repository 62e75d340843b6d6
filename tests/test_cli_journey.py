"""The everyday journey through the CLI (issue 21): a command that produces nothing never reports success (exit 3,
the counts and the option that would change it), model names resolve the same way everywhere (mole-tiny in an
eval TOML), generate continues an interrupted run, inspect reports gates per prompt, presets adapt to the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FACES, SHARED
from mole.cli import main
from mole.mole_tiny import ASSETS

needs_tiny = pytest.mark.skipif(not (ASSETS / "mole.safetensors").is_file(), reason="mole-tiny not built")
TINY = ["--base", "mole-tiny", "--mole", "mole-tiny"]


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


# ------------------------------------------------------------------------------------ 2. nothing produced: exit 3
def test_nothing_to_generate_exits_3_with_the_counts_and_the_flag(tmp_path, caplog):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n# a comment\n\n")
    cases = {
        ("--prompt", "a face", "--num-images", "0"): ("0 images to draw (1 prompts x 0 seeds)", "--num-images 1"),
        ("--prompt-file", str(empty)): ("0 prompts", "--prompt TEXT"),
    }
    for extra, (count, flag) in cases.items():
        caplog.clear()
        assert main(["generate", *TINY, "--out", str(tmp_path / "g"), *extra]) == 3, extra
        (line,) = _errors(caplog)
        assert count in line and flag in line
    assert not (tmp_path / "g").exists()  # checked before anything loads or is written
    caplog.clear()  # no prompt at all is a usage error (exit 2), not an empty result
    assert main(["generate", *TINY, "--out", str(tmp_path / "g")]) == 2


def test_eval_prompts_keeping_nothing_exits_3(tmp_path, caplog):
    source = tmp_path / "captions.json"
    source.write_text(json.dumps({"annotations": [{"id": i, "image_id": i, "caption": c} for i, c in
                                                  enumerate(["a red bus on a street", "two elephants", "a bowl"])]}))
    assert main(["eval", "prompts", "coco", str(source), "--out", str(tmp_path / "b.jsonl")]) == 3
    (line,) = _errors(caplog)
    assert "kept 0 of 3 prompts (no_human_word_or_duplicate 3)" in line


def test_data_build_keeping_nothing_exits_3_naming_each_reason_and_its_option(tmp_path, caplog):
    src = tmp_path / "faces"
    src.mkdir()
    for f in FACES[:2]:
        shutil.copy(f, src)
    args = ["data", "closeups", str(src), str(tmp_path / "out"), "--part", "face", "--workers", "1",
            "--captioner", "template:a face", "--min-scale", "0.9"]  # fmt: skip
    assert main(args) == 3  # 92x112 ORL faces: every crop is below 0.9 x 512 px
    (line,) = _errors(caplog)
    assert "kept 0 crops from 2 source images: upscale_floor 2 (--min-scale; 0: any upscale)" in line
    caplog.clear()
    (tmp_path / "empty").mkdir()
    assert main([*args[:2], str(tmp_path / "empty"), str(tmp_path / "out2"), *args[4:]]) == 3
    assert "no source images found in SOURCE" in _errors(caplog)[0]


class _ZeroScorer:
    name = "zero"
    metrics = ("face_rate", "hand_rate")

    def score(self, images, prompts):
        return {m: [0.0] * len(images) for m in self.metrics}


@needs_tiny
def test_eval_run_takes_mole_tiny_by_name_and_all_zero_scores_exit_3(tmp_path, caplog, monkeypatch, capsys):
    """`mole = "mole-tiny"` in an eval TOML resolves as --mole mole-tiny does (was: 'does not exist'); a run whose
    every score is 0 is not reported as a success."""
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"id": 0, "prompt": "a close-up photo of a face"}) + "\n")
    config = tmp_path / "eval.toml"
    config.write_text(f'benchmark = "{bench}"\nout_dir = "{tmp_path / "ev"}"\nnum_prompts = 1\nrepeats = 1\n'
                      'steps = 1\n[[models]]\nname = "tiny"\nbase = "mole-tiny"\nmole = "mole-tiny"\n'
                      '[[metrics]]\nname = "facehand"\n')  # fmt: skip
    import mole.eval.runner as runner

    monkeypatch.setattr(runner, "build_scorer", lambda *a, **k: _ZeroScorer())
    assert main(["eval", "run", "--config", str(config)]) == 3
    (line,) = _errors(caplog)
    assert "every score is 0 (face_rate, hand_rate) on 1 images per model" in line
    assert len(list((tmp_path / "ev" / "images" / "tiny").rglob("*.png"))) == 1  # it ran: mole-tiny resolved
    out = capsys.readouterr().out  # the report's table, not a JSON block (--json gives that)
    assert "| model | face_rate | hand_rate |" in out and "| tiny | 0.0000 ± nan | 0.0000 ± nan |" in out
    assert len(out.splitlines()) <= 6 and "{" not in out


# ------------------------------------------------------------------------- 3. facehand sees what a person sees
def test_facehand_finds_real_64px_face_and_hand_closeups():
    """mole eval's facehand metric on real held-out close-ups at mole-tiny's 64 px: through the claims bench's
    calibrated detector view its rates are >= 0.8 (as the images were shown before, faces filling the frame: 0.4;
    generated mole-tiny close-ups scored 0 on both)."""
    from PIL import Image

    from mole.eval.metrics import build_scorer

    faces = [Image.open(f).convert("RGB").resize((64, 64)) for f in sorted(SHARED.glob("data/faces/orl/s*/1.pgm"))]
    hands = [Image.open(f).convert("RGB").resize((64, 64))
             for f in sorted(SHARED.glob("data/hands/sign_language_digits/*/*.JPG"))[::100]]  # fmt: skip
    faces, hands = faces[:20], hands[:20]
    assert len(faces) == len(hands) == 20
    scorer = build_scorer("facehand")
    on_faces, on_hands = scorer.score(faces, [""] * 20), scorer.score(hands, [""] * 20)
    rate = lambda v: sum(v) / len(v)  # noqa: E731
    assert rate(on_faces["face_rate"]) >= 0.8 and rate(on_hands["hand_rate"]) >= 0.8
    assert rate(on_hands["face_rate"]) <= 0.1 and rate(on_faces["hand_rate"]) <= 0.1  # and tells them apart
    as_is = build_scorer("facehand", view="none").score(faces, [""] * 20)
    assert rate(as_is["face_rate"]) < 0.8  # the view is what finds them


# ---------------------------------------------------------------- 3. a short table at the end, JSON on request
def test_data_and_eval_prompts_end_with_a_table_and_print_json_only_with_the_flag(tmp_path, capsys):
    source = tmp_path / "captions.json"
    captions = ["a woman riding a bike", "a man holding a kite", "two elephants in a field"]
    source.write_text(json.dumps({"annotations": [{"id": i, "image_id": i, "caption": c}
                                                  for i, c in enumerate(captions)]}))  # fmt: skip
    bench = ["eval", "prompts", "coco", str(source), "--out", str(tmp_path / "b.jsonl")]
    assert main(bench) == 0
    text = capsys.readouterr().out
    assert "| kept prompts | 2 |" in text and "| source records | 3 |" in text and len(text.splitlines()) <= 8
    assert not text.lstrip().startswith("{")
    assert main([*bench, "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 2

    src = tmp_path / "faces"
    src.mkdir()
    for f in FACES[:2]:
        shutil.copy(f, src)
    build = ["data", "closeups", str(src), str(tmp_path / "out"), "--part", "face", "--size", "64", "--workers", "1",
             "--captioner", "template:a face"]  # fmt: skip
    assert main(build) == 0
    text = capsys.readouterr().out
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["kept"] >= 1 and f"| kept crops | {stats['kept']} |" in text and "| source images | 2 |" in text
    assert not text.lstrip().startswith("{") and len(text.splitlines()) <= 12
    assert main([*build, "--json"]) == 0  # the same options: the build is kept, and its stats come as JSON
    assert json.loads(capsys.readouterr().out)["sources"] == 2


# ------------------------------------------------------------------- 5. generate: as it goes, and continued
@needs_tiny
def test_interrupted_generate_continues_with_the_same_command(tmp_path, monkeypatch, capsys):
    """Ctrl-C after the first image: images.jsonl already holds it; the same command then draws only the rest
    (was: no images.jsonl, and the folder refused). Repeated --prompt-file adds the files (was: the last only)."""
    import importlib

    gen = importlib.import_module("mole.inference.generate")  # the module (mole.inference.generate is the function)
    (tmp_path / "a.txt").write_text("a close-up photo of a face\n")
    (tmp_path / "b.txt").write_text("a close-up photo of a hand\n")
    out = tmp_path / "g"
    args = ["generate", *TINY, "--prompt-file", str(tmp_path / "a.txt"), "--prompt-file", str(tmp_path / "b.txt"),
            "--steps", "2", "--num-images", "2", "--batch-size", "1", "--out", str(out)]  # fmt: skip
    written, real_png = [], gen.write_png

    def png(image, path, meta):
        if len(written) == 1:
            raise KeyboardInterrupt
        real_png(image, path, meta)
        written.append(path.name)

    monkeypatch.setattr(gen, "write_png", png)
    assert main(args) == 130
    rows = [json.loads(x) for x in (out / "images.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["0000_seed0.png"]
    first = (out / "mole" / "0000_seed0.png").read_bytes()
    written.clear()
    monkeypatch.setattr(gen, "write_png", lambda *a: (real_png(*a), written.append(a[1].name)))
    capsys.readouterr()
    assert main(args) == 0
    assert written == ["0000_seed1.png", "0001_seed0.png", "0001_seed1.png"]  # the rest only
    assert (out / "mole" / "0000_seed0.png").read_bytes() == first
    rows = [json.loads(x) for x in (out / "images.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [(p, s) for p in ("a close-up photo of a face",
                                                                         "a close-up photo of a hand") for s in (0, 1)]
    assert "3 images drawn, 1 already there" in capsys.readouterr().out
    # another setting into the same folder is still refused, not mixed in
    assert main([*args, "--guidance-scale", "3"]) == 2


# ------------------------------------------------------------------------------------- 6. inspect per prompt (kind)
@needs_tiny
def test_inspect_reports_gates_per_prompt_and_per_kind(tmp_path, capsys):
    """Fig. 7 per prompt kind: on mole-tiny the face gate is high on face prompts and low on hand prompts, and the
    hand gate the other way round; the all-prompt average (the old summary) hides that."""
    prompts = ["a close-up photo of a face", "a close-up photo of a hand", "a close-up photo of a face, smiling"]
    args = ["inspect", *TINY, "--steps", "1", "--map-steps", "1", "--out", str(tmp_path / "i")]
    for p, kind in zip(prompts, ["face", "hand", "face"]):
        args += ["--prompt", p, "--prompt-kind", kind]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    face_p, hand_p, smile_p = (r for r in out["per_prompt"])
    assert face_p["face"]["mean"] > hand_p["face"]["mean"] + 0.2 and hand_p["hand"]["mean"] > face_p["hand"]["mean"]
    kinds = out["per_kind"]
    assert kinds["face"]["face"]["prompts"] == [0, 2] and kinds["hand"]["face"]["prompts"] == [1]
    assert kinds["face"]["face"]["mean"] == pytest.approx((face_p["face"]["mean"] + smile_p["face"]["mean"]) / 2)
    overall = out["global_gate"]["face"]["mean"]
    assert overall == pytest.approx(sum(r["face"]["mean"] for r in out["per_prompt"]) / 3)
    assert kinds["hand"]["face"]["mean"] < overall - 0.1  # what the single average hid
    gates = json.loads((tmp_path / "i" / "gates.json").read_text())
    assert gates["per_kind"] == kinds
    # the default output is a short table: a row per prompt and per kind
    assert main([*args, "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "| face: a close-up photo of a face |" in text and "| kind hand (1 prompts) |" in text
    assert main([*args[:-2], "--overwrite"]) == 2  # 3 prompts, 2 kinds: one line, before anything loads


# ------------------------------------------------------------------------------- 4. presets adapt to the model
@needs_tiny
def test_presets_adapt_to_the_model_and_print_config_marks_it(tmp_path, capsys):
    """--preset stage2-face on mole-tiny: 64 px (the model's native side), not the preset's 512; the shipped
    config's bf16 becomes full precision without a GPU; rank 256 above mole-tiny's 32-channel blocks is marked."""
    import tomllib
    import torch

    base = ["train", "--preset", "stage2-face", "--set", "model=mole-tiny", "--set", f"data.path={tmp_path}"]
    assert main([*base, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert tomllib.loads(out)["data"]["resolution"] == 64
    assert "resolution = 64  # adapted: mole-tiny draws 64 px (was 512)" in out
    assert "rank = 256  # conflicts: rank 256 is above mole-tiny's narrowest block (32 channels" in out
    assert 'model = "mole-tiny"  # --set (not the preset)' in out
    # a value the user gives is kept, and the conflict said
    assert main([*base, "--set", "data.resolution=128", "--print-config"]) == 0
    assert "resolution = 128  # conflicts: mole-tiny draws 64 px; kept as given" in capsys.readouterr().out
    config = Path(__file__).resolve().parents[1] / "configs" / "stage2_face.toml"
    assert main(["train", "--config", str(config), *base[1:], "--print-config"]) == 0
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert 'mixed_precision = "no"  # adapted: no GPU here, so full precision (was bf16)' in out
    assert "resolution = 512  # conflicts: mole-tiny draws 64 px; kept as given" in out  # the file's own value


@needs_tiny
def test_print_config_marks_a_gpu_batch_on_a_cpu_with_a_value_and_the_accumulation(tmp_path, capsys, monkeypatch):
    """Item 4: the preset's 64 images per step (8 x 8 accumulation) on a CPU is marked with a smaller total; at
    512 px its micro-batch of 8 as well, with batch_size=1 and accumulation keeping the total. Kept, not changed."""
    import tomllib

    from mole.training.config import adapt_to_model, load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["train", "--preset", "stage2-face", "--set", "model=mole-tiny", "--set", f"data.path={tmp_path}"]
    assert main([*base, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert tomllib.loads(out)["total_batch_size"] == 64  # marked, kept
    line = next(x for x in out.splitlines() if x.startswith("total_batch_size"))
    assert "conflicts: no GPU here: 64 images per optimizer step (8 accumulation step(s) of 8)" in line
    assert "--set total_batch_size=8" in line
    assert "# conflicts" not in next(x for x in out.splitlines() if x.startswith("batch_size"))  # 8 at 64 px: fine
    assert main([*base, "--set", "data.resolution=512", "--print-config"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("batch_size"))
    assert "a micro-batch of 8 images at 512 px" in line and "--set batch_size=1" in line
    assert "total_batch_size=64 is then reached by gradient accumulation" in line
    # without total_batch_size: the suggested accumulation keeps the same images per step
    cfg = load_config(None, preset="stage2-face", overrides=["model=mole-tiny", f"data.path={tmp_path}",
                                                              "total_batch_size=none", "batch_size=4",
                                                              "data.resolution=128"])  # fmt: skip
    assert "--set batch_size=2 (add --set grad_accum=2 to keep 4 images per step" in cfg.adapted["batch_size"]
    assert not {"batch_size", "total_batch_size"} & set(adapt_to_model(cfg, cuda=True))  # a GPU: no mark


@needs_tiny
def test_a_base_with_reinitialised_up_blocks_is_refused_by_generate_and_inspect(tmp_path, caplog):
    """Item 7: mole-tiny's pipeline with its up_blocks re-initialised used to pass the strict base check (the
    shipped file recorded samples of 4 layers) and draw noise. Now one line names the tensors, the count and the fix,
    before an image is drawn; --no-strict-base is the way to use it on purpose."""
    from diffusers import UNet2DConditionModel

    base = tmp_path / "base"
    shutil.copytree(ASSETS / "pipeline", base)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    torch.manual_seed(0)
    for m in unet.up_blocks.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    unet.save_pretrained(base / "unet")
    prompt = ["--prompt", "a close-up photo of a face", "--steps", "1"]
    for cmd in (["generate", "--num-images", "1"], ["inspect", "--map-steps", "1"]):
        caplog.clear()
        out = tmp_path / cmd[0]
        assert main([*cmd, "--base", str(base), "--mole", "mole-tiny", *prompt, "--out", str(out)]) == 2, cmd
        (line,) = _errors(caplog)
        assert "\n" not in line and "but the weights of" in line and "--no-strict-base" in line, line
        n = int(line.split("differ in ")[1].split(" of ")[0])
        assert n > 100 and line.split("tensors: ")[1].startswith("up_blocks.") and f"and {n - 3} more" in line
        assert not list(out.glob("**/*.png"))


# --------------------------------------------------------------------------- 7 / 8. config shapes, messages, warnings
def test_config_shape_mistakes_are_one_line_naming_the_fix(tmp_path, caplog):
    """A table where a list is meant ([models] for [[models]]), a list where a table is meant ([[optim]]), and
    `data = "DIR"` for the folder each stop with one line that says what to write (was: data.path='' reported)."""
    cases = {
        'benchmark = "b"\n[models]\nname = "m"\nbase = "b"\n': (["eval", "run"], "write [[models]] (two pairs"),
        'model = "m"\n[[optim]]\nlr = 1e-4\n': (["train"], "write [optim] (one pair of brackets), not [[optim]]"),
        'model = "m"\ndata = "data/faces"\n': (["train"], "for the folder write data.path = 'data/faces'"),
    }
    for n, (text, (cmd, fix)) in enumerate(cases.items()):
        config = tmp_path / f"c{n}.toml"
        config.write_text(text)
        caplog.clear()
        assert main([*cmd, "--config", str(config), *(["--print-config"] if cmd == ["train"] else [])]) == 2, text
        (line,) = _errors(caplog)
        assert fix in line and "internal error" not in line
    caplog.clear()
    assert main(["train", "--set", "model=m", "--print-config"]) == 2
    assert "data.path is not set: give the training image folder, e.g. --set data.path=DIR" in _errors(caplog)[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_each_corrupt_image_is_warned_once(tmp_path, tiny_sd15_dir, caplog, capsys, workers):
    """One unreadable file in a training folder, met in every epoch: one warning naming it (was: one per epoch, and
    with data.num_workers > 0 one per DataLoader worker, from the worker's process, which caplog does not see: the
    test below checks that the dataset itself no longer warns)."""
    from conftest import image_folder

    data = image_folder(tmp_path / "faces", FACES[:2], "a close-up photo of a face")
    (data / "broken.png").write_bytes(b"not a png")
    (data / "broken.txt").write_text("a close-up photo of a face")
    sets = [f"model='{tiny_sd15_dir}'", f"data.path='{data}'", f"output_dir='{tmp_path / 'run'}'", "max_steps=12",
            "data.resolution=32", "batch_size=1", "total_batch_size=1", "tensorboard=false", "expert.rank=2",
            "expert.alpha=2", "checkpoint_every=100", f"data.num_workers={workers}"]  # fmt: skip
    assert main(["train", "--preset", "stage2-face", *[a for s in sets for a in ("--set", s)]]) == 0
    named = [r for r in caplog.records if r.levelname == "WARNING" and "broken.png" in r.getMessage()]
    assert len(named) == 1  # 12 steps over 3 images: the broken one is met 4 times
    text = capsys.readouterr().out
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "micro-step" in r.getMessage()][1:]
    # mole train ends with a short table (item 3), not a JSON block; --json gives that
    assert "| steps | 0 -> 12 |" in text and "| images per step | 1 |" in text and len(text.splitlines()) <= 10
    assert "saved " in text and not text.lstrip().startswith("{")


def test_the_dataset_leaves_the_warning_to_the_loop_so_workers_do_not_repeat_it(tmp_path, caplog):
    """A DataLoader worker's copy of the dataset cannot know what the others named: it only marks the image bad with
    its reason (collate gathers them in bad_reasons), and the training loop warns once per image for the run."""
    from mole.data import CaptionedImages, Sample, collate

    (tmp_path / "broken.png").write_bytes(b"not a png")
    dataset = CaptionedImages([Sample(path=tmp_path / "broken.png", caption="a face")], 32)
    items = [dataset[(0, epoch)] for epoch in range(3)]
    assert not [r for r in caplog.records if r.levelno >= 30]  # was: a warning from each worker's copy
    batch = collate(items[:2])
    assert batch["pixels"] is None and batch["bad_indices"] == [0, 0]
    assert set(batch["bad_reasons"]) == {0} and "broken.png" in batch["bad_reasons"][0]
