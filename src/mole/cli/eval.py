"""`mole eval prompts | run | ablation`: benchmarks, metric runs with repeats, the paper's ablations."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import (
    NothingProduced,
    check_base_arg,
    check_file,
    check_mole_arg,
    expert_weights,
    table,
    tokenizer_arg,
)


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="human-centric benchmarks, metrics, repeats with standard errors")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    evp = ev_sub.add_parser(
        "prompts", help="build COCO / DiffusionDB Human Prompts (jsonl + provenance)",
        description="The paper's selection rule: keep the captions / prompts about people (a person word, whole word, "
        "case-insensitive: woman, man, kid, girl, boy, person, teenager, ... see mole.eval.HUMAN_WORDS; or a body "
        "part or a person's name in the subject; not artist credits, 'no people' or 'a couple of elephants'), drop "
        "duplicates; for DiffusionDB also drop NSFW-flagged prompts and prompts with [ ] { } ( ) | < >. COCO 2017 "
        "val captions (25,014) give 10,751 prompts; the paper's ~60k come from COCO 2014 captions. Keep all prompts "
        "here: `mole eval run` samples 3k per repeat (num_prompts), three repeats.",
    )  # fmt: skip
    evp.add_argument("kind", choices=["coco", "diffusiondb"])
    evp.add_argument("source", help="coco_captions_val2017.json or diffusiondb_prompts_10k.json (or your own)")
    evp.add_argument("--out", required=True, help="output .jsonl (+ .meta.json: rules, counts, source sha256)")
    evp.add_argument("--limit", type=int, help="keep a fixed sample of this many prompts (default: all)")
    evp.add_argument("--seed", type=int, default=0)
    evp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    evp.add_argument("--json", action="store_true", help="print the counts as JSON (default: a table)")
    evp.set_defaults(func=_cmd_eval_prompts)
    evr = ev_sub.add_parser("run", help="generate, score and report the models of an eval TOML (resumable)")
    evr.add_argument("--config", required=True, help="TOML with benchmark, [[models]], [[metrics]] (see configs/)")
    evr.add_argument("--num-prompts", type=int)
    evr.add_argument("--repeats", type=int)
    evr.add_argument("--out")
    tokenizer_arg(evr)
    evr.add_argument("--overwrite", action="store_true",
                     help="replace the results in the output folder when they were made with other settings")
    evr.add_argument("--json", action="store_true", help="print the summary as JSON (default: the report's table)")
    evr.set_defaults(func=_cmd_eval_run)
    eva = ev_sub.add_parser("ablation", help="the paper's ablations: stage ladder and local/global/both gating")
    eva.add_argument("--benchmark", required=True, help="a benchmark .jsonl from `mole eval prompts`")
    eva.add_argument("--base", required=True, help="the original base model")
    tokenizer_arg(eva)
    eva.add_argument("--stage1", help="the stage-1 fine-tuned model (pipeline folder)")
    eva.add_argument("--mole", help="the stage-3 MoLE file (its experts also give the fixed-weight stage-2 rung)")
    eva.add_argument("--experts", action="append", metavar="NAME=W", help="stage-2 rung weights (default: all 1)")
    eva.add_argument("--gating", action="append", metavar="MODE=FILE", help="a MoLE file per gating mode")
    eva.add_argument("--metric", action="append", metavar="NAME[=WEIGHTS]", help="facehand, clip=..., hps=...")
    eva.add_argument("--out", default="runs/eval/ablation")
    eva.add_argument("--num-prompts", type=int, default=3000)
    eva.add_argument("--repeats", type=int, default=3)
    eva.add_argument("--steps", type=int, default=50)
    eva.add_argument("--seed", type=int, default=0)
    eva.add_argument("--overwrite", action="store_true",
                     help="replace the results in --out when they were made with other settings")
    eva.add_argument("--json", action="store_true", help="print the summary as JSON (default: the report's table)")
    eva.set_defaults(func=_cmd_eval_ablation)


def _cmd_eval_prompts(args: argparse.Namespace) -> int:
    from ..eval import build_benchmark
    from ..outputs import check_output_file

    check_file(args.source, "prompt source", "source")
    check_output_file(args.out, args.overwrite, "mole eval prompts --out")
    path = build_benchmark(args.kind, args.source, args.out, limit=args.limit, seed=args.seed)
    meta = json.loads(Path(str(path) + ".meta.json").read_text())
    if args.json:
        print(json.dumps({"benchmark": str(path), "count": meta["count"], "stats": meta["stats"]}, indent=2))
    else:
        st = meta["stats"]
        rows = [["kept prompts", meta["count"]], ["source records", st.get("source_records", 0)]]
        rows += [[f"dropped: {k[len('dropped_'):]}", v] for k, v in st.items() if k.startswith("dropped_") and v]
        print(table(["benchmark", "count"], rows))
        print(f"{path} (+ .meta.json: rules, counts, source sha256)")
    if not meta["count"]:
        dropped = ", ".join(f"{k[len('dropped_'):]} {v}" for k, v in meta["stats"].items()
                            if k.startswith("dropped_") and v)  # fmt: skip
        why = "--limit 0" if args.limit == 0 else (dropped or "the source holds no records")
        raise NothingProduced(f"mole eval prompts: kept 0 of {meta['stats'].get('source_records', 0)} prompts "
                              f"({why}); give a source whose captions / prompts are about people (see --help), "
                              "or a --limit of 1 or more")  # fmt: skip
    return 0


def _cmd_eval_run(args: argparse.Namespace) -> int:
    from ..eval import load_eval_config, run_eval

    check_file(args.config, "eval TOML", "--config")
    overrides = {}
    if args.num_prompts is not None:
        overrides["num_prompts"] = args.num_prompts
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.out is not None:
        overrides["out_dir"] = args.out
    opts = load_eval_config(args.config, overrides)
    opts.overwrite = args.overwrite
    report = run_eval(opts)
    _print_report(args, report, opts.out_dir, {"summary": report["summary"], "run": report["run"]})
    _check_scores(report, opts.out_dir)
    return 0


def _print_report(args: argparse.Namespace, report: dict, out: str, summary: dict) -> None:
    """The table report.md holds (mean +- s.e. per model and metric), or with --json the summary as JSON."""
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
        return
    text = (Path(out) / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("|")]
    run = report["run"]
    print(f"mole eval: {run['generated']} images generated, {run['scored']} scores added -> {out}/report.md")
    print("\n".join(rows))


def _check_scores(report: dict, out: str) -> None:
    """Exit 3 (nothing produced) when no image was scored, or when every metric is 0 for every model: a detector
    that sees nothing or a metric that failed silently, not a result."""
    summary = report["summary"]
    n = max((m["n_images"] for s in summary.values() for m in s.values()), default=0)
    if not n:
        raise NothingProduced(f"mole eval: 0 images scored for {len(summary)} model(s); check --num-prompts / "
                              f"--repeats and the [[metrics]] of the config (report: {out}/report.md)")  # fmt: skip
    values = [m["mean"] for s in summary.values() for m in s.values()]
    if all(v == 0 for v in values):
        metrics = sorted({k for s in summary.values() for k in s})
        raise NothingProduced(f"mole eval: every score is 0 ({', '.join(metrics)}) on {n} images per model for "
                              f"{len(summary)} model(s): the metric found nothing; look at the images in {out}/images "
                              "and the metric's settings ([[metrics]]) before trusting the report")  # fmt: skip


def _cmd_eval_ablation(args: argparse.Namespace) -> int:
    from ..eval import EvalOptions, MetricSpec, ablation_models, run_eval

    gating = dict(item.split("=", 1) for item in (args.gating or []))
    bad = sorted(set(gating) - {"local", "global", "both"})
    if bad:
        raise ValueError(f"--gating {bad}: use local=FILE, global=FILE, both=FILE")
    check_base_arg(args.base)
    if args.stage1 is not None:
        check_base_arg(args.stage1, "--stage1")
    for path in [args.mole, *gating.values()]:
        check_mole_arg(path)
    models = ablation_models(args.base, stage1=args.stage1, mole=args.mole, gating=gating,
                             expert_weights=expert_weights(args.experts))  # fmt: skip
    metrics = [MetricSpec(*(m.split("=", 1) if "=" in m else (m, None))) for m in (args.metric or ["facehand"])]
    report = run_eval(EvalOptions(
        benchmark=args.benchmark, models=models, metrics=metrics, out_dir=args.out, num_prompts=args.num_prompts,
        repeats=args.repeats, steps=args.steps, seed=args.seed, overwrite=args.overwrite,
    ))  # fmt: skip
    _print_report(args, report, args.out, {"models": [m.name for m in models], "summary": report["summary"],
                                           "run": report["run"]})  # fmt: skip
    _check_scores(report, args.out)
    return 0
