"""The `mole` command line. Each subcommand turns its arguments into an options dataclass and calls the library;
only this module prints or sets exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

logger = logging.getLogger("mole")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    summary = run_demo(
        DemoOptions(out_dir=args.out, backbone=args.backbone, steps=args.steps, rank=args.rank, seed=args.seed)
    )
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .io import read_mole_file

    manifest, tensors = read_mole_file(args.file)
    gates = sum(t.numel() for k, t in tensors.items() if k.startswith("gates."))
    experts = sum(t.numel() for k, t in tensors.items() if k.startswith("experts."))
    print(json.dumps({**manifest, "tensor_counts": {"gate_values": gates, "expert_values": experts}}, indent=2))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import load_config, train

    cfg = load_config(args.config, preset=args.preset, overrides=args.set or [])
    if args.print_config:
        print(cfg.to_toml(), end="")
        return 0
    result = train(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch only the first process reports
        return 0
    print(json.dumps({
        "steps": result.steps, "start_step": result.start_step, "skipped_images": result.skipped_images,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "probe_loss_first": result.probe_loss_first, "probe_loss_last": result.probe_loss_last,
        "final": [str(p) for p in result.final], "checkpoints": [str(p) for p in result.checkpoints],
        "gate_log": result.gate_log[-1:] ,
    }, indent=2))  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mole", description="Mixture of Low-rank Experts for diffusion models")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole MoLE foundation on a tiny built-in model (offline, seconds)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--backbone", default="sd15", choices=["sd15", "sd21", "sdxl"])
    demo.add_argument("--steps", type=int, default=10, help="denoising steps to record (default: 10)")
    demo.add_argument("--rank", type=int, default=8, help="expert rank (default: 8)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    from .training.config import PRESETS

    tr = sub.add_parser("train", help="train one MoLE stage (1 fine-tune, 2 expert, 3 mixture)")
    tr.add_argument("--config", help="TOML file (see configs/)")
    tr.add_argument("--preset", choices=sorted(PRESETS), help="the paper's settings for a stage")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set optim.lr=1e-4")
    tr.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    tr.set_defaults(func=_cmd_train)

    info = sub.add_parser("info", help="print the manifest of a MoLE .safetensors file")
    info.add_argument("file")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)  # INFO by default, DEBUG with -v
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError) as exc:  # our errors name the field, value and fix
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
