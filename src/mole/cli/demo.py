"""`mole demo`: MoLE on mole-tiny, base / fixed / MoLE side by side, with its summary table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import check_base_arg, check_mole_arg, logger


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="MoLE on mole-tiny (a small real model): base / fixed / MoLE, gates, checks")
    demo.add_argument("--out", help="output folder (default: runs/demo, or runs/demo-2, ... when that is used)")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    demo.add_argument("--base", default="mole-tiny", help="base pipeline (default: mole-tiny)")
    demo.add_argument("--mole", default="mole-tiny", help="MoLE file (default: mole-tiny's)")
    demo.add_argument("--train", metavar="DATA", help="re-run stages 2 and 3 from DATA/face, DATA/hand, DATA/mix")
    demo.add_argument("--train-steps", type=int, default=300, help="steps per stage with --train (default: 300)")
    demo.add_argument("--rank", type=int, default=16, help="expert rank with --train (default: 16)")
    demo.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    demo.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default: 2)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    demo.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import DemoOptions, run_demo, summary_table

    check_base_arg(args.base)  # the rule every command shares, before any folder is touched
    check_mole_arg(args.mole)
    opts = DemoOptions(out_dir=args.out or "runs/demo", base=args.base, mole=args.mole, train=args.train,
                       train_steps=args.train_steps, sample_steps=args.steps, rank=args.rank, seeds=args.seeds,
                       seed=args.seed)  # fmt: skip (checked before any folder is touched)
    if args.out is None:
        from ..outputs import fresh_dir

        args.out = str(fresh_dir("runs/demo"))
    elif Path(args.out).is_dir() and any(Path(args.out).iterdir()):
        out = Path(args.out)
        if not args.overwrite:
            raise ValueError(f"mole demo: output folder {args.out!r} is not empty; pass --overwrite to replace an "
                             "earlier demo there, or choose another --out")  # fmt: skip
        if not ((out / "summary.json").is_file() or (out / "base" / "model_index.json").is_file()):
            raise ValueError(f"mole demo --overwrite: {args.out!r} does not hold an earlier demo (no summary.json, "
                             "no base/); choose an empty or new --out")  # fmt: skip
        import shutil

        logger.warning("--overwrite: removing the earlier demo in %s", out)
        shutil.rmtree(out)
    opts.out_dir = Path(args.out)
    summary = run_demo(opts)
    print(json.dumps(summary, indent=2) if args.json else summary_table(summary))
    return 0
