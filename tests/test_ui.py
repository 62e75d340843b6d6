"""`mole ui` without a browser: the page's generate function on mole-tiny equals `mole generate` / `mole inspect`,
its PNGs carry their parameters, bad input is refused before the model loads, a training run's curves are read as
written, and a missing gradio gives the one-line install hint. The page itself: tests/test_ui_browser.py."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mole.cli import main
from mole.inference import GenerateOptions, InspectOptions, MixMode, generate, inspect
from mole.ui import INSTALL_HINT, Studio, UIOptions, UIUnavailable, parse_map_steps, require_gradio, run_curves

PROMPT = "a close-up photo of a face"
WEIGHTS = {"face": 0.7, "hand": 0.2}


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def studio_run(tmp_path_factory):
    studio = Studio(UIOptions(out_dir=str(tmp_path_factory.mktemp("ui"))))
    seen = []
    result = studio.generate(PROMPT, seed=5, steps=4, weights=WEIGHTS, map_steps="0, 3",
                             progress=lambda fraction, desc: seen.append((fraction, desc)))  # fmt: skip
    return studio, result, seen


def test_base_and_fixed_columns_equal_mole_generate_at_the_same_seed_and_weights(studio_run, tmp_path):
    studio, result, _ = studio_run
    index = generate(GenerateOptions(base="mole-tiny", mole="mole-tiny", prompts=[PROMPT], seeds=[5], steps=4,
                                     modes=[MixMode.NONE, MixMode.FIXED], expert_weights=WEIGHTS,
                                     out_dir=str(tmp_path / "gen")))  # fmt: skip
    by_mode = {rec["mode"]: rec["path"] for rec in index["images"]}
    for mode in ("none", "fixed"):  # the MoLE column (the gates alone, no slider) is checked against mole inspect
        assert np.array_equal(_pixels(result["images"][mode]), _pixels(by_mode[mode])), mode
    # the columns differ from each other (a slider that is ignored, or one noise for all, would not show above alone)
    none, fixed, mole = (_pixels(result["images"][m]) for m in ("none", "fixed", "mole"))
    assert np.abs(fixed - none).mean() > 0.5 and np.abs(mole - fixed).mean() > 0.5
    other = studio.generate(PROMPT, seed=5, steps=4, weights={"face": 0.0, "hand": 1.5})
    assert np.abs(_pixels(other["images"]["fixed"]) - fixed).mean() > 0.5  # the sliders reach the fixed column
    assert np.array_equal(_pixels(other["images"]["none"]), none)  # ... and nothing else
    assert np.array_equal(_pixels(other["images"]["mole"]), mole)
    assert other["out"] != result["out"]  # every generation has its own folder


def test_the_mole_column_and_its_gate_curves_equal_mole_inspect(studio_run, tmp_path):
    _, result, _ = studio_run
    data = inspect(InspectOptions(base="mole-tiny", mole="mole-tiny", prompts=[PROMPT], seed=5, steps=4,
                                  map_steps=2, out_dir=str(tmp_path / "ins")))  # fmt: skip
    assert result["experts"] == data["experts"] == ["face", "hand"]
    assert np.array_equal(_pixels(result["images"]["mole"]), _pixels(tmp_path / "ins" / "image_0.png"))
    for name in ("face", "hand"):
        assert len(result["global_gates"][name]) == 4
        assert np.allclose(result["global_gates"][name], data["global_mean"][name], atol=1e-5)
    assert data["local_map_steps"] == result["local_map_steps"] == [0, 3]
    for name in ("face", "hand"):
        for t in (0, 3):
            heat = np.asarray(data["local_maps"]["0"][str(t)][name])
            assert result["local_means"][f"{name}@{t}"] == pytest.approx(heat.mean(), abs=1e-3)
    for key in ("gate_plot", "local_maps"):
        assert Image.open(result[key]).size[0] > 100


def test_the_pngs_carry_their_parameters_and_progress_reaches_the_end(studio_run):
    _, result, seen = studio_run
    for mode in ("none", "fixed", "mole"):
        text = Image.open(result["images"][mode]).text
        meta = json.loads(text["mole"])
        assert (meta["prompt"], meta["seed"], meta["steps"], meta["mode"]) == (PROMPT, 5, 4, mode)
        assert meta["expert_weights"] == (WEIGHTS if mode == "fixed" else None)
        assert "Seed: 5" in text["parameters"] and "Steps: 4" in text["parameters"]
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert sum("step" in d and "of 4" in d and not d.endswith("step 0 of 4") for _, d in seen) == 12  # 3 x 4 steps
    saved = json.loads((Path(result["out"]) / "result.json").read_text())
    assert saved["global_gates"] == result["global_gates"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "   "}, "the prompt is empty"),
        ({"height": 100000}, "height 100000 is outside 8..1024"),
        ({"width": 60}, "width 60 is not a multiple of 8"),
        ({"seed": -1}, "seed -1 is outside"),
        ({"seed": 1.5}, "seed 1.5 is not a whole number"),
        ({"steps": 0}, "steps 0 is outside 1..500"),
        ({"guidance_scale": float("nan")}, "guidance scale nan"),
        ({"weights": {"face": float("inf")}}, "the weight of face is inf"),
        ({"weights": {"hands": 1.0}}, "expert 'hands' is not in mole-tiny"),
        ({"map_steps": "0, 9"}, "map step 9 is outside 0..3"),
        ({"map_steps": "first"}, "map steps 'first' is not a step number"),
        ({"scheduler": "nope"}, "scheduler 'nope' is unknown"),
    ],
)
def test_bad_input_is_refused_with_a_message_before_the_model_loads(kwargs, message, tmp_path):
    studio = Studio(UIOptions(out_dir=str(tmp_path)))
    args = {"prompt": PROMPT, "steps": 4} | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        studio.generate(**args)
    assert not studio.loaded and not any(tmp_path.iterdir())


def test_map_steps_default_to_five_evenly_spaced_and_a_missing_mole_file_is_named(tmp_path):
    assert parse_map_steps("", 25) == [0, 6, 12, 18, 24]
    assert parse_map_steps("24; 0,0", 25) == [0, 24]
    with pytest.raises(FileNotFoundError, match="nope.safetensors: no such file"):
        Studio(UIOptions(mole=str(tmp_path / "nope.safetensors")))


def test_run_curves_read_the_metrics_a_training_run_writes(tmp_path):
    run = tmp_path / "stage3"
    run.mkdir()
    records = [{"step": 10 * k, "loss": 0.5 / k, "lr": 1e-4, "gate/global/face": 0.5 + 0.01 * k,
                "gate/global/hand": 0.5 - 0.01 * k, "gate/local_mean/face": 0.4 + k / 100}
               for k in range(1, 6)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curves = run_curves(run)
    assert curves["steps"] == [10, 20, 30, 40, 50]
    assert curves["loss"] == [0.5 / k for k in range(1, 6)]
    assert curves["gates"] == {"face": [0.5 + 0.01 * k for k in range(1, 6)],
                               "hand": [0.5 - 0.01 * k for k in range(1, 6)]}  # fmt: skip
    assert curves["local_gates"] == {"face": [0.4 + k / 100 for k in range(1, 6)]}
    from mole.ui import plot_run

    plotted = plot_run(run, tmp_path / "plots")
    assert Image.open(plotted["loss_plot"]).size == (640, 400) and plotted["gate_plot"].endswith("gates.png")
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl .*the runs inside it: stage3"):
        run_curves(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        run_curves(tmp_path / "missing")
    (run / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        run_curves(run)


def test_without_gradio_the_command_says_how_to_install_it(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    with pytest.raises(UIUnavailable, match=r"pip install 'mole-diffusion\[ui\]'"):
        require_gradio()
    assert main(["ui"]) == 2
    logging.getLogger("mole").setLevel(logging.NOTSET)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"mole ui needs gradio, which is not installed: {INSTALL_HINT}"]


def test_the_app_builds_with_every_control(tmp_path):
    gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install 'mole-diffusion[ui]')")
    from mole.ui import build_app

    app = build_app(Studio(UIOptions(out_dir=str(tmp_path))))
    assert isinstance(app, gr.Blocks)
    ids = {block.elem_id for block in app.blocks.values() if getattr(block, "elem_id", None)}
    assert {"prompt", "seed", "generate", "weight-face", "weight-hand", "image-none", "image-fixed", "image-mole",
            "gate-plot", "local-maps", "status", "run-folder", "run-loss", "run-gates"} <= ids  # fmt: skip


def test_the_command_refuses_a_missing_file_and_a_bad_port_in_one_line_before_serving(tmp_path, caplog):
    missing = tmp_path / "nope.safetensors"
    assert main(["ui", "--mole", str(missing)]) == 2
    assert main(["ui", "--port", "70000"]) == 2
    assert main(["ui", "--base", str(tmp_path / "no-such-folder")]) == 2
    logging.getLogger("mole").setLevel(logging.NOTSET)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    folder = tmp_path / "no-such-folder"
    assert errors == [f"--mole {missing} does not exist; check the path (or give mole-tiny)",
                      "--port 70000: use 1 to 65535",
                      f"--base {folder}: no such file or folder; check the path (or give a hub id)"]  # fmt: skip


def test_a_real_stage3_run_shows_its_curves_and_its_mole_file_runs_in_the_page(tmp_path, tiny_sd15_dir, faces_dir):
    """Another base than mole-tiny (a tiny SD1.5 folder) with the MoLE file its own stage-3 run wrote, and that
    run's metrics.jsonl in the Training run tab."""
    from mole import save_expert
    from mole.models import DiffusionModel
    from mole.tiny import random_expert
    from mole.training import load_config, train
    from mole.ui import plot_run

    unet = DiffusionModel.from_pretrained(tiny_sd15_dir).denoiser
    paths = {n: save_expert(random_expert(unet, n, rank=4, seed=s, std=0.05), tmp_path / f"{n}.safetensors")
             for s, n in enumerate(("face", "hand"), 1)}  # fmt: skip
    experts = "{" + ", ".join(f"{n} = '{p}'" for n, p in paths.items()) + "}"
    result = train(load_config(preset="stage3", overrides=[
        f"model='{tiny_sd15_dir}'", f"data.path='{faces_dir}'", f"output_dir='{tmp_path / 's3'}'", "max_steps=4",
        "log_every=2", "data.resolution=32", "batch_size=2", "total_batch_size=2", "tensorboard=false",
        f"mixture.experts={experts}", "optim.lr=1e-2", "expert.alpha=4"]))  # fmt: skip
    curves = plot_run(tmp_path / "s3", tmp_path / "plots")
    logged = [json.loads(line) for line in (tmp_path / "s3" / "metrics.jsonl").read_text().splitlines()]
    assert curves["steps"] == [2, 4] and curves["loss"] == [m["loss"] for m in logged]
    assert curves["gates"] == {n: [m[f"gate/global/{n}"] for m in logged] for n in ("face", "hand")}
    assert set(curves["local_gates"]) == {"face", "hand"} and curves["gate_plot"]

    studio = Studio(UIOptions(base=str(tiny_sd15_dir), mole=str(result.final[0]), out_dir=str(tmp_path / "ui")))
    assert studio.experts == ["face", "hand"]
    r = studio.generate("a photo of a face", seed=1, steps=2, weights={"hand": 1.0})
    assert set(r["images"]) == {"none", "fixed", "mole"} and len(r["global_gates"]["face"]) == 2
    assert all(0.0 < g < 1.0 for v in r["global_gates"].values() for g in v)


def test_the_papers_gate_file_with_its_experts_runs_in_the_page(tmp_path, tiny_sd15_dir):
    from mole.inference.pipeline import load_pipeline
    from test_official import write_official

    folder = write_official(load_pipeline(tiny_sd15_dir, device="cpu").denoiser, tmp_path / "official")
    gate = str(folder / "gate.safetensors")
    with pytest.raises(ValueError, match="the paper's gate file: give its experts by name"):
        Studio(UIOptions(base=str(tiny_sd15_dir), mole=gate))
    files = {n: str(folder / f"{n}.safetensors") for n in ("face", "hand")}
    studio = Studio(UIOptions(base=str(tiny_sd15_dir), mole=gate, expert_files=files, out_dir=str(tmp_path / "ui")))
    r = studio.generate("a close-up photo of a face", seed=0, steps=2, weights={"face": 1.0})
    index = generate(GenerateOptions(base=str(tiny_sd15_dir), mole=gate, expert_files=files, prompts=[r["parameters"][
        "prompt"]], seeds=[0], steps=2, modes=[MixMode.FIXED], expert_weights={"face": 1.0},
        out_dir=str(tmp_path / "gen")))  # fmt: skip
    assert np.array_equal(_pixels(r["images"]["fixed"]), _pixels(index["images"][0]["path"]))
    assert r["experts"] == ["face", "hand"] and len(r["global_gates"]["hand"]) == 2
