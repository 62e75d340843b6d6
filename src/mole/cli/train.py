"""`mole train`: one MoLE stage from a TOML config and / or a preset; Ctrl-C says how to resume."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ._common import table, tokenizer_arg


def register(sub: argparse._SubParsersAction) -> None:
    from ..training.config import PRESETS

    tr = sub.add_parser("train", help="train one MoLE stage (1 fine-tune, 2 expert, 3 mixture)")
    tr.add_argument("--config", help="TOML file (see configs/)")
    tr.add_argument("--preset", choices=sorted(PRESETS),
                    help="the paper's settings for a stage (steps, batch 64 by accumulation, optimizer, lr, rank, "
                         "alpha, clip skip); --print-config names each one's source")  # fmt: skip
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set optim.lr=1e-4")
    tr.add_argument("--print-config", action="store_true",
                    help="print the resolved config (each preset option's source, the batch arithmetic) and exit")
    tokenizer_arg(tr)
    tr.add_argument("--overwrite", action="store_true",
                    help="start afresh in an output_dir that holds an earlier run (its checkpoints, final/ and "
                         "metrics are removed); to continue that run use --set resume=latest")  # fmt: skip
    tr.add_argument("--accept-changes", action="store_true",
                    help="resume a run with settings that differ from its checkpoint's (without it, a changed "
                         "setting other than steps / logging stops with the list of changes)")  # fmt: skip
    tr.add_argument("--json", action="store_true", help="print the result as JSON (default: a table)")
    tr.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from ..models import check_base_name
    from ..training import annotated_toml, load_config, train
    from ..training.interrupt import TrainingInterrupted

    cfg = load_config(args.config, preset=args.preset, overrides=args.set or [])
    if cfg.model:  # --print-config too: the rule every command shares (milliseconds); none set: train says so
        check_base_name(cfg.model, "model")
    for key, note in getattr(cfg, "adapted", {}).items():
        if not args.print_config:  # --print-config marks them in the TOML instead
            logging.getLogger("mole").warning("%s=%s: %s", key, _value(cfg, key), note)
    if args.print_config:  # the batch arithmetic for the processes this command runs on (WORLD_SIZE under launch)
        print(annotated_toml(cfg, args.preset, int(os.environ.get("WORLD_SIZE", "1"))), end="")
        return 0
    try:
        result = train(cfg, overwrite=args.overwrite, accept_changes=args.accept_changes)
    except TrainingInterrupted as exc:
        if os.environ.get("RANK", "0") == "0":
            cmd = _resume_command(args.argv)
            print(f"stopped by {exc.signal_name} at step {exc.step}; checkpoint: {exc.checkpoint}\n"
                  f"resume with: {cmd}", file=sys.stderr)  # fmt: skip
        return exc.exit_code
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch only the first process reports
        return 0
    summary = {
        "steps": result.steps, "start_step": result.start_step, "skipped_images": result.skipped_images,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "probe_loss_first": result.probe_loss_first, "probe_loss_last": result.probe_loss_last,
        "final": [str(p) for p in result.final], "checkpoints": [str(p) for p in result.checkpoints],
        "gate_log": result.gate_log[-1:] , "batch": result.batch,
    }  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(table(["train", "value"], [
        ["steps", f"{result.start_step} -> {result.steps}"],
        ["loss (first -> last step)", f"{_num(summary['first_loss'])} -> {_num(summary['last_loss'])}"],
        ["probe loss (before -> after)", f"{_num(result.probe_loss_first)} -> {_num(result.probe_loss_last)}"],
        ["images per step", result.batch.get("total", "?")], ["skipped images", result.skipped_images],
    ]))  # fmt: skip
    for p in result.final:
        print(f"saved {p}")
    return 0


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _value(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return getattr(node, "value", node)


def _resume_command(argv: list[str]) -> str:
    """The command line that was run, with --overwrite dropped and resume=latest added."""
    import shlex

    kept = [a for a in argv if a != "--overwrite"]
    return "mole " + " ".join(shlex.quote(a) for a in kept) + " --set resume=latest"
