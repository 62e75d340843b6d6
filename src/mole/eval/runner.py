"""`mole eval`: N prompts x R repeats per model, scored, reported as mean +- standard error (the paper's Tables 1-3).

Repeat r draws its own N prompts from the benchmark (seeded by seed + r) and its own image seeds. Everything is
cached on disk and resumed, keyed by everything that changes an image (<key>: the base and MoLE file fingerprints,
mode, expert weights, steps, sampler, guidance, size, dtype, device type and seed; the file name: the prompt):
    out/images/<model>/<key>/r<r>/<i>_<prompt hash>.png   generated once (a rerun generates only missing images)
    out/scores/<model>/<key>.jsonl      one line per (repeat, image, metric family) (a rerun scores only what is new;
                                        a half-written last line, left by a kill, is dropped)
    out/report.md, out/report.json, out/bars_<metric>.png
The standard error of a model's metric is std(repeat means, ddof=1) / sqrt(R).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
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
    overwrite: bool = False  # remove earlier images, scores and reports in out_dir first (else: resumed by key)

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

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"eval config {path} is a folder; give the .toml file")
    if not path.is_file():
        raise FileNotFoundError(f"eval config {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"eval config {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"eval config {path} is not valid TOML: {exc}") from None
    data.update(overrides or {})
    return build_dataclass(EvalOptions, data, "", cli="")


def repeat_prompts(benchmark: list[dict], n: int, repeat: int, seed: int) -> list[dict]:
    rng = random.Random(seed * 1009 + repeat)
    return rng.sample(benchmark, min(n, len(benchmark)))


def image_seed(seed: int, repeat: int, index: int) -> int:
    return seed * 10_000_019 + repeat * 1_000_003 + index


def file_fingerprint(path: str | Path) -> str:
    """A cheap content fingerprint: size plus hashes of the first and last MiB (a file), or of every file's relative
    path, size and first/last KiB (a folder, e.g. a local pipeline). A hub id fingerprints as itself; `mole-tiny` as
    the files it names."""
    from ..mole_tiny import is_mole_tiny, mole_path, resolve_base

    if is_mole_tiny(path):  # as a base and as a MoLE file: both files, so a rebuilt mole-tiny is a new key
        return file_fingerprint(resolve_base(path)) + file_fingerprint(mole_path())
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return str(path)
    span = (1 << 20) if path.is_file() else 1024
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if f != path else ''}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(span))
            if size > span:
                fh.seek(max(span, size - span))
                h.update(fh.read(span))
    return h.hexdigest()[:16]


def cache_key(opts: EvalOptions, spec: ModelSpec) -> str:
    """12 hex characters naming everything that changes a model's images (not the prompt: that names the file)."""
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = opts.dtype if opts.dtype != "auto" else ("fp16" if device.startswith("cuda") else "fp32")
    settings = {"base": spec.base, "base_fp": file_fingerprint(spec.base), "mole": spec.mole,
                "mole_fp": file_fingerprint(spec.mole) if spec.mole else None, "mode": spec.mode.value,
                "expert_weights": spec.expert_weights, "steps": opts.steps, "scheduler": opts.scheduler,
                "guidance_scale": opts.guidance_scale, "height": opts.height, "width": opts.width, "dtype": dtype,
                "device": torch.device(device).type, "seed": opts.seed}  # fmt: skip
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _image_path(out: Path, spec: ModelSpec, key: str, repeat: int, index: int, prompt: str) -> Path:
    ph = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    return out / "images" / spec.name / key / f"r{repeat}" / f"{index:05d}_{ph}.png"


def read_scores(path: Path) -> list[dict]:
    """The rows of a scores file; a line cut short by a kill (or otherwise not JSON) is dropped from the file."""
    if not path.is_file():
        return []
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            bad += 1
    if bad:
        logger.warning("%s: dropped %d unreadable line(s) (an interrupted write); they are scored again", path, bad)
        _rewrite_scores(path, rows)
    return rows


def _rewrite_scores(path: Path, rows: list[dict]) -> None:
    """Replace a score file by `rows`, atomically (a crash leaves the old file or the new one, never half)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _set_aside_unreadable(paths: list[Path]) -> set[str]:
    """Images of an earlier run that no longer decode (damaged on disk): each is renamed to NAME.unreadable.png
    (kept, not deleted), warned once, and generated and scored again; returns their paths."""
    bad = set()
    for path in paths:
        if not path.is_file():
            continue
        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, ValueError, SyntaxError):  # PIL's decode errors
            aside = path.with_suffix(".unreadable.png")
            path.replace(aside)
            logger.warning("%s cannot be read (damaged); kept as %s, generated and scored again", path, aside.name)
            bad.add(str(path))
    return bad


def _generate_missing(opts: EvalOptions, spec: ModelSpec, jobs: list[tuple[Path, str, int]], bar=None) -> int:
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
        if bar is not None:
            bar.update(len(chunk))
    del model, pipe
    return len(missing)


def run_eval(opts: EvalOptions, scorers: dict[str, Scorer] | None = None) -> dict:
    """Generate, score and report; `scorers` replaces building them from opts.metrics (custom or test scorers)."""
    from tqdm.auto import tqdm

    out = Path(opts.out_dir)
    from ..models import check_base_name, check_mole_name

    for spec in opts.models:  # cheap checks first: a missing MoLE file fails before any model loads; the names
        check_base_name(spec.base, f"models[{spec.name}].base")  # resolve as in every other command (mole-tiny)
        if spec.mole:
            check_mole_name(spec.mole, f"models[{spec.name}].mole")
    bench = read_benchmark(opts.benchmark)
    if not bench:
        raise ValueError(f"benchmark {opts.benchmark} holds no prompts")
    scorers = scorers if scorers is not None else {
        m.name: build_scorer(m.name, m.weights, opts.device, **({"med_config": m.med_config} if m.med_config else {}))
        for m in opts.metrics
    }  # fmt: skip
    if opts.overwrite:
        for name in ("images", "scores", "report.md", "report.json", *[p.name for p in out.glob("bars_*.png")]):
            p = out / name
            if p.exists():
                logger.warning("--overwrite: removing %s", p)
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    plans = []
    for spec in opts.models:
        key = cache_key(opts, spec)
        jobs, keys = [], []
        for r in range(opts.repeats):
            for i, rec in enumerate(repeat_prompts(bench, opts.num_prompts, r, opts.seed)):
                path = _image_path(out, spec, key, r, i, rec["prompt"])
                jobs.append((path, rec["prompt"], image_seed(opts.seed, r, i)))
                keys.append((r, i, rec))
        score_file = out / "scores" / spec.name / f"{key}.jsonl"
        rows = read_scores(score_file)
        redo = _set_aside_unreadable([j[0] for j in jobs])
        if redo and rows:  # the damaged images' old scores go: they are scored again from the new images
            rows = [row for row in rows if row.get("path") not in redo]
            _rewrite_scores(score_file, rows)
        done = {(row["repeat"], row["index"], row["scorer"], row.get("path")) for row in rows}
        todo = {sname: [(j, k) for j, k in zip(jobs, keys) if (k[0], k[1], sname, str(j[0])) not in done]
                for sname in scorers}  # fmt: skip
        plans.append((spec, jobs, todo, score_file))
    total = sum(sum(not j[0].is_file() for j in jobs) + sum(map(len, todo.values())) for _, jobs, todo, _ in plans)
    stats = {"generated": 0, "scored": 0}
    bar = tqdm(total=total, desc="eval", unit="image", disable=None if logger.isEnabledFor(logging.WARNING) else True)
    for spec, jobs, todo_by_scorer, score_file in plans:
        stats["generated"] += _generate_missing(opts, spec, jobs, bar)
        score_file.parent.mkdir(parents=True, exist_ok=True)
        with score_file.open("a") as fh:
            for sname, scorer in scorers.items():
                todo = todo_by_scorer[sname]
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
                    bar.update(len(chunk))
    bar.close()
    report = write_report(opts, out, {spec.name: {str(j[0]) for j in jobs} for spec, jobs, _, _ in plans},
                          {spec.name: sf for spec, _, _, sf in plans})  # fmt: skip
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


def write_report(opts: EvalOptions, out: Path, paths: dict[str, set[str]] | None = None,
                 score_files: dict[str, Path] | None = None) -> dict:  # fmt: skip
    """Report the rows of this run's images only (paths: model -> image paths; default: every row in range)."""
    from ..inference.plot import bar_chart

    rows_by_model, summary = {}, {}
    for spec in opts.models:
        f = (score_files or {}).get(spec.name) or out / "scores" / spec.name / f"{cache_key(opts, spec)}.jsonl"
        rows = read_scores(f)
        rows = [r for r in rows if r["repeat"] < opts.repeats and r["index"] < opts.num_prompts]
        if paths is not None:
            rows = [r for r in rows if r.get("path") in paths[spec.name]]
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
                          "scheduler": opts.scheduler, "height": opts.height, "width": opts.width,
                          "dtype": opts.dtype, "models": [m.name for m in opts.models],
                          "cache_keys": {m.name: cache_key(opts, m) for m in opts.models}}}  # fmt: skip
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
