"""`mole ui`: a local web app over one model: prompt and seed in; the base, the fixed-weight mix and MoLE side by
side out; each expert's global gate over the denoising steps and its local maps at chosen steps (the paper's Fig. 7,
live); the PNGs with their generation parameters embedded; a tab that plots a training run's loss and gate curves.

The page is a thin shell (gradio, the optional extra `[ui]`) over two plain functions that need no browser:

    studio = Studio(UIOptions())                                  # mole-tiny; the model loads on first use
    result = studio.generate(prompt="a close-up photo of a face", seed=0, steps=25, weights={"face": 1.0})
    result["images"]["mole"], result["global_gates"]["face"]      # a PNG path, the gate at each step
    curves = run_curves("runs/train-stage3")                      # loss and gates per logged step

`build_app(studio)` returns the gradio Blocks; `launch` serves it (127.0.0.1 by default).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .inference import check_prompt_lengths, mean_local_map, write_png
from .inference.pipeline import (
    DTYPES,
    SCHEDULERS,
    MixMode,
    check_device,
    default_size,
    load_mole_weights,
    open_sampler,
    pipeline_kwargs,
    set_scheduler,
)
from .inference.plot import grid, line_chart, overlay
from .inject import mole_layers
from .recording import record_gates
from .targets import Backbone

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'mole-diffusion[ui]'"
MODES = (MixMode.NONE, MixMode.FIXED, MixMode.MOLE)  # the three columns, left to right
MAX_STEPS = 500
# small models draw small images (mole-tiny: 64 px): the three columns show them enlarged, pixels kept sharp
CSS = """#image-none img, #image-fixed img, #image-mole img {width: 100%; height: 100%; object-fit: contain;
image-rendering: pixelated}"""


class UIUnavailable(ImportError):
    """gradio (the `[ui]` extra) is not installed."""


def require_gradio():
    """The gradio module, or UIUnavailable naming the install command."""
    try:
        import gradio
    except ImportError:
        raise UIUnavailable(f"mole ui needs gradio, which is not installed: {INSTALL_HINT}") from None
    return gradio


@dataclass(kw_only=True)
class UIOptions:
    base: str = "mole-tiny"
    mole: str | None = "mole-tiny"  # None: the base alone (the fixed and MoLE columns stay empty)
    expert_files: dict[str, str] | None = None  # {name: LoRA file}: the experts of the paper's gate files
    strict_base: bool = True
    dtype: str = "auto"
    device: str | None = None
    steps: int = 25  # the page's default number of steps
    max_side: int = 1024  # the largest height / width the page accepts
    out_dir: str | None = None  # where each generation's folder goes (None: a fresh temporary folder)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype={self.dtype!r}: use auto, fp32, fp16 or bf16")
        check_device(self.device)
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps={self.steps}: use 1 to {MAX_STEPS}")
        if self.max_side < 8 or self.max_side % 8:
            raise ValueError(f"max_side={self.max_side}: use a positive multiple of 8 (e.g. 1024)")


def expert_names(mole: str | None, expert_files: Mapping[str, str] | None = None) -> list[str]:
    """The experts a MoLE file mixes, from its header alone (the paper's gate files: the names given with them)."""
    if mole is None:
        return []
    from .formats.mole_file import read_mole_manifest
    from .formats.official import is_official_gate_file
    from .mole_tiny import resolve_mole

    path = resolve_mole(mole)
    if not Path(path).is_file():
        raise FileNotFoundError(f"mole={mole}: no such file; give a MoLE .safetensors (or mole-tiny)")
    if is_official_gate_file(path):
        if not expert_files:
            raise ValueError(f"mole={mole} is the paper's gate file: give its experts by name (--expert face=FILE)")
        return list(expert_files)
    names = [e["name"] for e in read_mole_manifest(path).get("experts", [])]
    return list(expert_files or {}) or names


def parse_map_steps(text: str | None, steps: int, default_count: int = 5) -> list[int]:
    """ "0, 12, 24" -> [0, 12, 24] (0-based denoising steps); empty -> `default_count` evenly spaced steps."""
    if text is None or not str(text).strip():
        return sorted({round(k * (steps - 1) / max(1, default_count - 1)) for k in range(default_count)})
    out = set()
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            t = int(part)
        except ValueError:
            raise ValueError(f"map steps {part!r} is not a step number; give steps such as 0, 12, 24") from None
        if not 0 <= t < steps:
            raise ValueError(f"map step {t} is outside 0..{steps - 1} (the run has {steps} steps); "
                             f"give steps from 0 to {steps - 1}")  # fmt: skip
        out.add(t)
    return sorted(out)


def _int(value, name: str, lo: int, hi: int, fix: str) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number; {fix}") from None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"{name} {value!r} is not a whole number; {fix}")
    if not lo <= int(f) <= hi:
        raise ValueError(f"{name} {int(f)} is outside {lo}..{hi}; {fix}")
    return int(f)


class Studio:
    """One model behind the page: loaded on first use, one generation at a time. Every generation writes its own
    numbered folder under out_dir (never over an earlier one)."""

    def __init__(self, opts: UIOptions | None = None):
        self.opts = opts or UIOptions()
        self.experts = expert_names(self.opts.mole, self.opts.expert_files)
        self.out_dir = Path(self.opts.out_dir or tempfile.mkdtemp(prefix="mole-ui-"))
        self._model = None
        self._device = None
        self._lock = threading.Lock()
        self._count = 0

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self):
        """The sampler (loads the base, once); returns the DiffusionModel."""
        if self._model is None:
            t0 = time.perf_counter()
            self._model, self._device = open_sampler(self.opts.base, "ddim", self.opts.dtype, self.opts.device)
            logger.info("loaded %s in %.1f s", self.opts.base, time.perf_counter() - t0)
        return self._model

    def preload(self) -> threading.Thread:
        """Load the model in a background thread (the page is up meanwhile; a generation waits for it)."""

        def run():
            with self._lock:
                try:
                    self.load()
                except Exception as exc:  # reported again, in the page, by the first generation
                    logger.warning("could not load %s: %s", self.opts.base, exc)

        thread = threading.Thread(target=run, name="mole-ui-preload", daemon=True)
        thread.start()
        return thread

    def new_folder(self, label: str) -> Path:
        """A fresh numbered folder under out_dir (0001-<label>, 0002-...; existing ones are skipped)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        while True:
            self._count += 1
            folder = self.out_dir / f"{self._count:04d}-{label}"
            if not folder.exists():
                folder.mkdir()
                return folder

    def check(self, prompt, seed, steps, guidance_scale, height, width, weights, scheduler) -> dict:
        """The inputs, checked and normalised (ValueError naming the field, the value and the fix)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty: type what to draw, e.g. 'a close-up photo of a face'")
        side = self.opts.max_side
        size_fix = f"use a multiple of 8 from 8 to {side}"
        checked = {
            "prompt": prompt.strip(),
            "seed": _int(seed, "seed", 0, 2**63 - 1, "use a whole number from 0"),
            "steps": _int(steps, "steps", 1, MAX_STEPS, f"use 1 to {MAX_STEPS} steps"),
            "height": None if height in (None, "", 0) else _int(height, "height", 8, side, size_fix),
            "width": None if width in (None, "", 0) else _int(width, "width", 8, side, size_fix),
        }
        for name in ("height", "width"):
            if checked[name] is not None and checked[name] % 8:
                raise ValueError(f"{name} {checked[name]} is not a multiple of 8; {size_fix}")
        try:
            g = float(guidance_scale)
        except (TypeError, ValueError):
            raise ValueError(f"guidance scale {guidance_scale!r} is not a number; use e.g. 7.5") from None
        if not math.isfinite(g) or not 0 <= g <= 100:
            raise ValueError(f"guidance scale {guidance_scale!r}: use a number from 0 to 100, e.g. 7.5")
        checked["guidance_scale"] = g
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {scheduler!r} is unknown; use one of {', '.join(sorted(SCHEDULERS))}")
        checked["scheduler"] = scheduler
        clean = {}
        for name, w in (weights or {}).items():
            if name not in self.experts:
                raise ValueError(f"expert {name!r} is not in {self.opts.mole} (its experts: {self.experts})")
            try:
                clean[name] = float(w)
            except (TypeError, ValueError):
                raise ValueError(f"the weight of {name} ({w!r}) is not a number; use e.g. 1.0") from None
            if not math.isfinite(clean[name]):
                raise ValueError(f"the weight of {name} is {w!r}; use a finite number such as 1.0")
        checked["weights"] = {name: 0.0 for name in self.experts} | clean  # experts not given: 0
        return checked

    def generate(
        self,
        prompt: str,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        weights: Mapping[str, float] | None = None,
        map_steps: str | None = None,
        negative_prompt: str = "",
        scheduler: str = "ddim",
        progress: Callable[[float, str], None] | None = None,
    ) -> dict:
        """Base, fixed-weight mix and MoLE from one prompt and seed (the same starting noise in each), the MoLE
        column's gates recorded. Returns the PNG paths (parameters embedded), the global gate per expert and step
        (mean over layers, the conditional half under CFG), the local-map steps, the plots and the parameters."""
        steps = self.opts.steps if steps is None else steps
        c = self.check(prompt, seed, steps, guidance_scale, height, width, weights, scheduler)
        shown = parse_map_steps(map_steps, c["steps"])
        with self._lock:
            return self._generate(c, shown, (negative_prompt or "").strip(), progress)

    def _generate(self, c: dict, shown: list[int], negative: str, progress) -> dict:
        t0 = time.perf_counter()
        report = progress or (lambda fraction, desc: None)
        if not self.loaded:
            report(0.0, f"loading {self.opts.base}")
        model = self.load()
        pipe, device = model.pipe, self._device
        set_scheduler(pipe, c["scheduler"])
        native = default_size(model)
        height, width = c["height"] or native[0], c["width"] or native[1]
        lengths = check_prompt_lengths(model, [c["prompt"]])
        f = model.vae_scale_factor
        latent_hw = (height // f, width // f)
        if model.backbone is Backbone.PIXART:
            p = model.denoiser.config.patch_size
            latent_hw = (latent_hw[0] // p, latent_hw[1] // p)
        folder = self.new_folder(f"seed{c['seed']}")
        modes = list(MODES) if self.opts.mole else [MixMode.NONE]
        total = len(modes) * c["steps"]
        images, paths, rec = {}, {}, None
        for m, mode in enumerate(modes):
            if self.opts.mole:
                load_mole_weights(pipe, self.opts.mole, mode, c["weights"] if mode is MixMode.FIXED else None,
                                  self.opts.strict_base, self.opts.expert_files)  # fmt: skip
            kwargs = dict(prompt=[c["prompt"]], num_inference_steps=c["steps"], guidance_scale=c["guidance_scale"],
                          height=height, width=width, generator=[torch.Generator(device=device).manual_seed(c["seed"])],
                          **pipeline_kwargs(model))  # fmt: skip
            if negative:
                kwargs["negative_prompt"] = [negative]

            def on_step(_pipe, i, _t, tensors, m=m, mode=mode):
                report((m * c["steps"] + i + 1) / total, f"{mode.value}: step {i + 1} of {c['steps']}")
                return tensors

            kwargs["callback_on_step_end"] = on_step
            report(m * c["steps"] / total, f"{mode.value}: step 0 of {c['steps']}")
            if mode is MixMode.MOLE:
                with record_gates(model.denoiser, keep_local=True, latent_hw=latent_hw, local_steps=set(shown)) as rec:
                    image = pipe(**kwargs).images[0]
            else:
                image = pipe(**kwargs).images[0]
            meta = {"prompt": c["prompt"], "negative_prompt": negative or None, "seed": c["seed"], "steps": c["steps"],
                    "guidance_scale": c["guidance_scale"], "scheduler": c["scheduler"], "height": height,
                    "width": width, "base": self.opts.base, "mole": self.opts.mole, "mode": mode.value,
                    "expert_weights": c["weights"] if mode is MixMode.FIXED else None,
                    "truncated": lengths[0]["truncated"]}  # fmt: skip
            path = folder / f"{mode.value}.png"
            write_png(image, path, meta)
            images[mode.value], paths[mode.value] = image, str(path)
        result = {"images": paths, "parameters": {k: v for k, v in c.items() if k != "weights"} | {
            "height": height, "width": width, "expert_weights": c["weights"], "negative_prompt": negative or None,
            "base": self.opts.base, "mole": self.opts.mole}, "experts": list(self.experts), "global_gates": {},
            "local_map_steps": shown, "local_means": {}, "gate_plot": None, "local_maps": None, "out": str(folder),
            "truncated": lengths[0]["truncated"]}  # fmt: skip
        if rec is not None:
            self._gate_pictures(rec, images["mole"], shown, latent_hw, folder, result)
        result["seconds"] = round(time.perf_counter() - t0, 3)
        (folder / "result.json").write_text(json.dumps(result, indent=2))
        report(1.0, "done")
        return result

    def _gate_pictures(self, rec, image, shown, latent_hw, folder: Path, result: dict) -> None:
        experts = rec.expert_names
        result["experts"] = list(experts)
        try:
            g = rec.global_gates()  # (steps, layers, b, e); the conditional sample is the last under CFG
        except ValueError:  # gating="local": no global gates
            g = None
        if g is not None:
            cond = g[:, :, -1, :].mean(1)  # (steps, e)
            result["global_gates"] = {n: [round(float(v), 6) for v in cond[:, i]] for i, n in enumerate(experts)}
            path = folder / "gates_global.png"
            line_chart(result["global_gates"], path, xlabel="denoising step", ylabel="gate",
                       title=f"global gate (mean over {len(list(mole_layers(self.load().denoiser)))} layers)")
            result["gate_plot"] = str(path)
        scale = max(1.0, 160 / min(image.size))
        shown_image = image.resize((round(image.width * scale), round(image.height * scale)), 3)
        heats = {}
        for e, name in enumerate(experts):
            for t in shown:
                if t < len(rec.steps):
                    heat = mean_local_map(rec.steps[t], -1, latent_hw, e)
                    if heat is not None:
                        heats[(name, t)] = heat
        if heats:
            lo = min(float(h.min()) for h in heats.values())
            hi = max(float(h.max()) for h in heats.values())
            cells = [overlay(shown_image, h, alpha=0.55, vmin=lo, vmax=hi) for h in heats.values()]
            labels = [f"{name} t{t} mean {h.mean():.2f}" for (name, t), h in heats.items()]
            path = folder / "local_maps.png"
            grid(cells, cols=len({t for _, t in heats}), labels=labels).save(path)
            result["local_maps"] = str(path)
            result["local_means"] = {f"{name}@{t}": round(float(np.mean(h)), 6) for (name, t), h in heats.items()}


def run_curves(folder: str | Path) -> dict:
    """A training run folder (the --out of `mole train`): its metrics.jsonl as curves per logged step:
    {"steps": [...], "loss": [...], "gates": {name: [...]}, "local_gates": {name: [...]}}."""
    folder = Path(str(folder).strip()).expanduser()
    if not str(folder).strip() or str(folder) == ".":
        raise ValueError("no run folder given: type the --out folder of a `mole train` run")
    if not folder.exists():
        raise FileNotFoundError(f"run folder {folder} does not exist; give the --out folder of a `mole train` run")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file; give the run folder that holds metrics.jsonl")
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        inside = sorted(p.parent.name for p in folder.glob("*/metrics.jsonl"))
        hint = f"; the runs inside it: {', '.join(inside)}" if inside else ""
        raise FileNotFoundError(f"{folder} has no metrics.jsonl (not a `mole train` run folder){hint}")
    records = []
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise ValueError(f"{metrics} line {n} is not JSON; the file is damaged") from None
    records = [r for r in records if isinstance(r, dict) and "step" in r and "loss" in r]
    if not records:
        raise ValueError(f"{metrics} holds no logged step yet; wait for the first log_every steps")
    names = [k.split("/", 2)[2] for k in records[0] if k.startswith("gate/global/")]
    local = [k.split("/", 2)[2] for k in records[0] if k.startswith("gate/local_mean/")]
    return {
        "folder": str(folder),
        "steps": [r["step"] for r in records],
        "loss": [r["loss"] for r in records],
        "gates": {n: [r.get(f"gate/global/{n}", float("nan")) for r in records] for n in names},
        "local_gates": {n: [r.get(f"gate/local_mean/{n}", float("nan")) for r in records] for n in local},
    }


def plot_run(folder: str | Path, out_dir: str | Path) -> dict:
    """run_curves plus its charts (loss.png, gates.png in out_dir); returns the curves with the chart paths."""
    curves = run_curves(folder)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves["loss_plot"] = str(line_chart({"loss": curves["loss"]}, out / "loss.png", xs=curves["steps"],
                                         title=f"training loss ({len(curves['steps'])} logged steps)",
                                         xlabel="step", ylabel="loss"))  # fmt: skip
    series = {f"global {n}": v for n, v in curves["gates"].items()} | {
        f"local {n}": v for n, v in curves["local_gates"].items()}  # fmt: skip
    curves["gate_plot"] = None
    if series:
        curves["gate_plot"] = str(line_chart(series, out / "gates.png", xs=curves["steps"], xlabel="step",
                                             ylabel="gate", title="mean gates while training"))  # fmt: skip
    return curves


def build_app(studio: Studio, run_folder: str | None = None):
    """The page (gradio Blocks) over `studio`; nothing is loaded or served until launch."""
    gr = require_gradio()
    o = studio.opts
    with gr.Blocks(title="MoLE", analytics_enabled=False) as app:
        gr.Markdown(f"## MoLE: mixture of low-rank experts\nbase `{o.base}`, MoLE `{o.mole or 'none'}`, experts: "
                    f"{', '.join(studio.experts) or 'none'}")  # fmt: skip
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt",
                                        placeholder="a close-up photo of a woman's face")  # fmt: skip
                    negative = gr.Textbox(label="negative prompt", elem_id="negative")
                with gr.Column(scale=1):
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Accordion("settings", open=False):
                with gr.Row():
                    steps = gr.Slider(1, 100, value=min(o.steps, 100), step=1, label="steps", elem_id="steps")
                    guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="guidance scale", elem_id="guidance")
                    scheduler = gr.Dropdown(sorted(SCHEDULERS), value="ddim", label="scheduler")
                with gr.Row():
                    height = gr.Number(value=0, precision=0, label="height (0: the model's own)", elem_id="height")
                    width = gr.Number(value=0, precision=0, label="width (0: the model's own)", elem_id="width")
                    map_steps = gr.Textbox(label="local-map steps (e.g. 0, 12, 24; empty: 5 evenly spaced)",
                                           elem_id="map-steps")  # fmt: skip
            sliders = []
            if studio.experts:
                with gr.Row():
                    for name in studio.experts:
                        sliders.append(gr.Slider(-1, 2, value=1.0, step=0.05, label=f"fixed weight: {name}",
                                                 elem_id=f"weight-{name}"))  # fmt: skip
            status = gr.Markdown("", elem_id="status")
            with gr.Row():
                columns = [gr.Image(type="filepath", label=label, elem_id=f"image-{mode.value}", format="png",
                                    buttons=["download", "fullscreen"], interactive=False, height=288)
                           for mode, label in zip(MODES, ("base", "fixed weights", "MoLE"))]  # fmt: skip
            with gr.Row():
                gate_plot = gr.Image(type="filepath", label="global gate per step (MoLE)", elem_id="gate-plot",
                                     format="png", interactive=False, show_label=False)  # fmt: skip
                local_maps = gr.Image(type="filepath", label="local maps (rows: experts, columns: steps)",
                                      elem_id="local-maps", format="png", interactive=False)  # fmt: skip
            files = gr.File(label="download (PNG with the parameters embedded; result.json)", file_count="multiple",
                            elem_id="files")  # fmt: skip

            def on_generate(prompt_, negative_, seed_, steps_, guidance_, scheduler_, height_, width_, maps_,
                            *weights_, progress=gr.Progress()):  # noqa: B008  # fmt: skip
                try:
                    r = studio.generate(prompt_, seed_, steps_, guidance_, height_, width_,
                                        dict(zip(studio.experts, weights_)), maps_, negative_, scheduler_,
                                        progress=lambda fraction, desc: progress(fraction, desc=desc))  # fmt: skip
                except (ValueError, OSError, LookupError, FloatingPointError, RuntimeError) as exc:
                    logger.info("generation refused: %s", exc)
                    message = " ".join(str(exc).split())
                    return (f"**error:** {message}", *[gr.skip()] * 6)
                imgs = [r["images"].get(m.value) for m in MODES]
                gates = ", ".join(f"{n} {v[0]:.3f} -> {v[-1]:.3f}" for n, v in r["global_gates"].items())
                text = (f"done in {r['seconds']:.1f} s: seed {r['parameters']['seed']}, {r['parameters']['steps']} "
                        f"steps, {r['parameters']['width']}x{r['parameters']['height']}"
                        + (f"; global gate first -> last step: {gates}" if gates else "")
                        + (f"; the text encoder cut off: {r['truncated']!r}" if r["truncated"] else ""))  # fmt: skip
                downloads = [p for p in imgs if p] + [str(Path(r["out"]) / "result.json")]
                return (text, *imgs, r["gate_plot"], r["local_maps"], downloads)

            inputs = [prompt, negative, seed, steps, guidance, scheduler, height, width, map_steps, *sliders]
            outputs = [status, *columns, gate_plot, local_maps, files]
            button.click(on_generate, inputs, outputs)
            prompt.submit(on_generate, inputs, outputs)
        with gr.Tab("Training run"):
            with gr.Row():
                folder = gr.Textbox(value=run_folder or "", label="run folder (the --out of mole train)",
                                    elem_id="run-folder", scale=3)  # fmt: skip
                show = gr.Button("Show", elem_id="run-show", scale=1)
            run_status = gr.Markdown("", elem_id="run-status")
            with gr.Row():
                loss_plot = gr.Image(type="filepath", label="loss", elem_id="run-loss", interactive=False)
                run_gates = gr.Image(type="filepath", label="gates", elem_id="run-gates", interactive=False)

            def on_show(folder_):
                try:
                    c = plot_run(folder_, studio.new_folder("run"))
                except (ValueError, OSError) as exc:
                    return f"**error:** {' '.join(str(exc).split())}", gr.skip(), gr.skip()
                text = (f"{c['folder']}: {len(c['steps'])} logged steps up to step {c['steps'][-1]}, last loss "
                        f"{c['loss'][-1]:.4f}" + ("" if c["gate_plot"] else "; no gate curves logged"))  # fmt: skip
                return text, c["loss_plot"], c["gate_plot"]

            show.click(on_show, [folder], [run_status, loss_plot, run_gates])
            folder.submit(on_show, [folder], [run_status, loss_plot, run_gates])
    return app


def launch(studio: Studio, host: str = "127.0.0.1", port: int | None = None, run_folder: str | None = None,
           block: bool = True):  # fmt: skip
    """Serve the page; returns the running Blocks (its `local_url`) when block=False."""
    app = build_app(studio, run_folder)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True, ssr_mode=False,
               allowed_paths=[str(studio.out_dir)], inbrowser=False, share=False, css=CSS)  # fmt: skip
    return app
