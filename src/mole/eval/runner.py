"""`mole eval`: N prompts x R repeats per model, scored, reported as mean +- standard error (the paper's Tables 1-3).

Repeat r draws its own N prompts from the benchmark (seeded by seed + r) and its own image seeds. Everything is
cached on disk and resumed:
    out/images/<model>/r<r>/<i>.png     generated once (a rerun generates only missing images)
    out/scores/<model>.jsonl            one line per (repeat, image, metric family) (a rerun scores only what is new)
    out/report.md, out/report.json, out/bars_<metric>.png
The standard error of a model's metric is std(repeat means, ddof=1) / sqrt(R).
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import tomllib
import torch
from PIL import Image

from ..inference.pipeline import MixMode, SamplingOptions
from .metrics import Scorer, build_scorer
from .paper import BENCHMARK_NAMES, benchmark_kind, paper_rows, paper_units
from .prompts import read_benchmark

logger = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    name: str
    base: str
    mole: str | None = None
    mode: MixMode = MixMode.MOLE
    expert_weights: dict[str, float] | None = None
    strict_base: bool = True
    reference: str | None = None  # the paper's row this model reproduces ("SD v1.5", "MoLE"): printed beneath it

    def __post_init__(self) -> None:
        self.mode = MixMode(self.mode)
        if self.mole is None and self.mode is not MixMode.NONE:
            self.mode = MixMode.NONE  # a model without a MoLE file is the base alone
        if "/" in self.name or not self.name:
            raise ValueError(f"models.name={self.name!r}: use a non-empty name without '/' (it names a folder)")


@dataclass
class MetricSpec:
    name: str
    weights: str | None = None
    med_config: str | None = None


@dataclass(kw_only=True)
class EvalOptions(SamplingOptions):
    benchmark: str
    models: list[ModelSpec]
    metrics: list[MetricSpec] = field(default_factory=lambda: [MetricSpec("facehand")])
    out_dir: str = "runs/eval"
    num_prompts: int = 3000
    repeats: int = 3
    seed: int = 0
    batch_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.models:
            raise ValueError("models is empty: name at least one model to evaluate")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models.name must be unique, got {names}")
        if self.num_prompts < 1 or self.repeats < 1:
            raise ValueError(f"num_prompts={self.num_prompts}, repeats={self.repeats}: use at least 1 each")


def load_eval_config(path: str | Path, overrides: dict | None = None) -> EvalOptions:
    """An EvalOptions from TOML ([[models]] and [[metrics]] tables), validated like the training config."""
    from ..training.config import build_dataclass

    data = tomllib.loads(Path(path).read_text())
    data.update(overrides or {})
    return build_dataclass(EvalOptions, data, "")


def repeat_prompts(benchmark: list[dict], n: int, repeat: int, seed: int) -> list[dict]:
    rng = random.Random(seed * 1009 + repeat)
    return rng.sample(benchmark, min(n, len(benchmark)))


def image_seed(seed: int, repeat: int, index: int) -> int:
    return seed * 10_000_019 + repeat * 1_000_003 + index


def _generate_missing(opts: EvalOptions, spec: ModelSpec, jobs: list[tuple[Path, str, int]]) -> int:
    missing = [j for j in jobs if not j[0].is_file()]
    if not missing:
        return 0
    from ..inference.pipeline import load_mole_weights, open_sampler, pipeline_kwargs

    model, device = open_sampler(spec.base, opts.scheduler, opts.dtype, opts.device)
    pipe = model.pipe
    if spec.mole:
        load_mole_weights(pipe, spec.mole, spec.mode, spec.expert_weights, spec.strict_base)
    for start in range(0, len(missing), opts.batch_size):
        chunk = missing[start : start + opts.batch_size]
        kwargs = dict(prompt=[p for _, p, _ in chunk], num_inference_steps=opts.steps,
                      guidance_scale=opts.guidance_scale, height=opts.height, width=opts.width,
                      generator=[torch.Generator(device=device).manual_seed(s) for _, _, s in chunk],
                      **pipeline_kwargs(model))  # fmt: skip
        for (path, _, _), image in zip(chunk, pipe(**kwargs).images):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.png")
            image.save(tmp)
            tmp.replace(path)  # a crash never leaves a half-written image that a rerun would trust
    del model, pipe
    return len(missing)


def run_eval(opts: EvalOptions, scorers: dict[str, Scorer] | None = None) -> dict:
    """Generate, score and report; `scorers` replaces building them from opts.metrics (custom or test scorers)."""
    out = Path(opts.out_dir)
    bench = read_benchmark(opts.benchmark)
    if not bench:
        raise ValueError(f"benchmark {opts.benchmark} holds no prompts")
    scorers = scorers if scorers is not None else {
        m.name: build_scorer(m.name, m.weights, opts.device, **({"med_config": m.med_config} if m.med_config else {}))
        for m in opts.metrics
    }  # fmt: skip
    stats = {"generated": 0, "scored": 0}
    for spec in opts.models:
        jobs, keys = [], []
        for r in range(opts.repeats):
            for i, rec in enumerate(repeat_prompts(bench, opts.num_prompts, r, opts.seed)):
                path = out / "images" / spec.name / f"r{r}" / f"{i:05d}.png"
                jobs.append((path, rec["prompt"], image_seed(opts.seed, r, i)))
                keys.append((r, i, rec))
        stats["generated"] += _generate_missing(opts, spec, jobs)
        score_file = out / "scores" / f"{spec.name}.jsonl"
        score_file.parent.mkdir(parents=True, exist_ok=True)
        done = set()
        if score_file.is_file():
            for line in score_file.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    done.add((rec["repeat"], rec["index"], rec["scorer"]))
        with score_file.open("a") as fh:
            for sname, scorer in scorers.items():
                todo = [(j, k) for j, k in zip(jobs, keys) if (k[0], k[1], sname) not in done]
                for start in range(0, len(todo), 16):
                    chunk = todo[start : start + 16]
                    images = [Image.open(j[0]).convert("RGB") for j, _ in chunk]
                    values = scorer.score(images, [j[1] for j, _ in chunk])
                    for n, ((path, prompt, seed), (r, i, rec)) in enumerate(chunk):
                        row = {"model": spec.name, "repeat": r, "index": i, "scorer": sname, "prompt": prompt,
                               "prompt_id": rec.get("id"), "seed": seed, "path": str(path),
                               **{m: v[n] for m, v in values.items()}}  # fmt: skip
                        fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    stats["scored"] += len(chunk)
    report = write_report(opts, out)
    report["run"] = stats
    return report


def summarise(rows: list[dict], repeats: int) -> dict[str, dict[str, float]]:
    """metric -> {mean, se, n_images, repeat_means} from per-image rows of one model."""
    out = {}
    metrics = sorted({k for r in rows for k in r if k not in _ROW_KEYS})
    for m in metrics:
        per_repeat = []
        for rep in range(repeats):
            vals = [r[m] for r in rows if r["repeat"] == rep and m in r]
            if vals:
                per_repeat.append(sum(vals) / len(vals))
        if not per_repeat:
            continue
        mean = sum(per_repeat) / len(per_repeat)
        if len(per_repeat) > 1:
            var = sum((x - mean) ** 2 for x in per_repeat) / (len(per_repeat) - 1)
            se = math.sqrt(var / len(per_repeat))
        else:
            se = float("nan")
        out[m] = {"mean": mean, "se": se, "repeat_means": per_repeat,
                  "n_images": sum(1 for r in rows if m in r)}  # fmt: skip
    return out


_ROW_KEYS = {"model", "repeat", "index", "scorer", "prompt", "prompt_id", "seed", "path"}


def write_report(opts: EvalOptions, out: Path) -> dict:
    from ..inference.plot import bar_chart

    rows_by_model, summary = {}, {}
    for spec in opts.models:
        f = out / "scores" / f"{spec.name}.jsonl"
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
        rows = [r for r in rows if r["repeat"] < opts.repeats and r["index"] < opts.num_prompts]
        rows_by_model[spec.name] = rows
        summary[spec.name] = summarise(rows, opts.repeats)
    metrics = sorted({m for s in summary.values() for m in s})
    units = {name: paper_units(s) for name, s in summary.items()}
    columns = sorted({c for u in units.values() for c in u})
    kind = benchmark_kind(opts.benchmark)
    reference = paper_rows(kind)
    lines = [f"# Evaluation: {Path(opts.benchmark).name}", "",
             f"{opts.num_prompts} prompts x {opts.repeats} repeats per model, {opts.steps} steps, guidance "
             f"{opts.guidance_scale}, {opts.scheduler}; mean +- standard error over repeats; every model sees the "
             "same prompts and seeds.", ""]  # fmt: skip
    if columns:
        lines += ["HPS (%) = 100 x hps and IR (%) = 100 x image_reward: the paper's units (Tables 1-3).", ""]
    if reference:
        lines += [f"Rows `paper: ...` are the paper's own numbers on {BENCHMARK_NAMES[kind]} (its benchmark: ~60k "
                  "COCO 2014 captions, 3k prompts x 3 repeats; its HPS checkpoint): a reference for the protocol, "
                  "not the same prompts.", ""]  # fmt: skip
    header = metrics + columns
    lines += ["| model | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]

    def paper_line(row: str) -> str:
        cells = ["-"] * len(metrics) + [f"{reference[row][c]:.2f}" if c in reference[row] else "-" for c in columns]
        return f"| *paper: {row}* | " + " | ".join(cells) + " |"

    shown = set()
    for spec in opts.models:
        s, u = summary[spec.name], units[spec.name]
        cells = [f"{s[m]['mean']:.4f} ± {s[m]['se']:.4f}" if m in s else "-" for m in metrics]
        cells += [f"{u[c]['mean']:.2f} ± {u[c]['se']:.2f}" if c in u else "-" for c in columns]
        lines.append(f"| {spec.name} | " + " | ".join(cells) + " |")
        if spec.reference in reference and columns:
            lines.append(paper_line(spec.reference))
            shown.add(spec.reference)
    if columns:
        lines += [paper_line(row) for row in reference if row not in shown]
    (out / "report.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    for m in metrics:
        vals = {n: s[m]["mean"] for n, s in summary.items() if m in s}
        errs = {n: (0.0 if math.isnan(s[m]["se"]) else s[m]["se"]) for n, s in summary.items() if m in s}
        bar_chart(vals, errs, out / f"bars_{m}.png", title=f"{m} (mean ± s.e.)")
    report = {"summary": summary, "paper_units": units, "per_image": rows_by_model,
              "paper_reference": {"benchmark": kind, "rows": reference,
                                  "models": {m.name: m.reference for m in opts.models if m.reference}},
              "options": {"benchmark": opts.benchmark, "num_prompts": opts.num_prompts, "repeats": opts.repeats,
                          "seed": opts.seed, "steps": opts.steps, "guidance_scale": opts.guidance_scale,
                          "scheduler": opts.scheduler, "models": [m.name for m in opts.models]}}  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    return report


def ablation_models(
    base: str,
    stage1: str | None = None,
    mole: str | None = None,
    gating: dict[str, str] | None = None,
    expert_weights: dict[str, float] | None = None,
) -> list[ModelSpec]:
    """The paper's ablations as model lists. Stage ladder: base, +stage1 (fine-tuned base), +stage2 (experts at
    fixed weights, no gates), +stage3 (MoLE). Gating: one MoLE file per gating mode, e.g. {"local": ..., "both": ...}.
    """
    models = [ModelSpec("base", base)]
    tuned = stage1 or base
    if stage1:
        models.append(ModelSpec("stage1", stage1))
    if mole:
        models.append(ModelSpec("stage2-fixed", tuned, mole, MixMode.FIXED, expert_weights))
        models.append(ModelSpec("stage3-mole", tuned, mole, MixMode.MOLE))
    for mode, path in (gating or {}).items():
        models.append(ModelSpec(f"gating-{mode}", tuned, path, MixMode.MOLE))
    return models
