"""`mole estimate`: accelerator memory of a training stage from the model's real shapes."""

from __future__ import annotations

import argparse
import json

from ._common import check_base_arg, finite_float


def register(sub: argparse._SubParsersAction) -> None:
    est = sub.add_parser("estimate", help="accelerator memory of a training stage (weights, gradients, optimizer, "
                         "activations) from the model's real shapes; nothing is loaded")  # fmt: skip
    est.add_argument("config", nargs="?", help="a training config (TOML), as for mole train")
    est.add_argument("--base", help="sd15 / sd21 / sdxl / pixart, their hub ids, or a single-file checkpoint")
    est.add_argument("--preset", help="a training preset: stage1, stage2-face, stage2-hand, stage3 (with --base)")
    est.add_argument("--stage", type=int, choices=[1, 2, 3], help="the stage (with --base; overrides the config)")
    est.add_argument("--batch-size", type=int)
    est.add_argument("--resolution", type=int, help="pixels (default: the config's, or the model's native size)")
    est.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="fp32 or mixed precision")
    est.add_argument("--optimizer", choices=["adamw", "lion"])
    est.add_argument("--gradient-checkpointing", dest="checkpointing", action="store_true", default=None)
    est.add_argument("--rank", type=int, help="expert rank (stage 2 / 3)")
    est.add_argument("--experts", type=int, help="number of experts (stage 3)")
    est.add_argument("--gpus", type=int, help="devices the run is spread over (default 1); memory is per device")
    est.add_argument("--strategy", choices=["ddp", "zero2", "fsdp2", "zero3"],
                     help="how the weights are spread (default: the config's distributed, else ddp): ddp replicates "
                     "everything, zero2 shards gradients and optimizer states, fsdp2 / zero3 the trained modules too")
    est.add_argument("--fits", type=finite_float, nargs="+", metavar="GIB",
                     help="also the largest batch size per budget")
    est.add_argument("--json", action="store_true")
    est.set_defaults(func=_cmd_estimate)


def _cmd_estimate(args: argparse.Namespace) -> int:
    from ..estimate import estimate_for_preset, estimate_from_config, max_batch_size

    kw = {"stage": args.stage, "batch_size": args.batch_size, "resolution": args.resolution,
          "precision": args.precision, "optimizer": args.optimizer, "gradient_checkpointing": args.checkpointing,
          "rank": args.rank, "num_experts": args.experts, "gpus": args.gpus, "strategy": args.strategy}  # fmt: skip
    from ..full import KINDS, PUBLISHED

    if args.base and args.base not in KINDS and args.base not in PUBLISHED.values():
        check_base_arg(args.base)  # a path or hub id: the rule every command shares
    if args.config:
        est = estimate_from_config(args.config, **kw)
    elif args.base and args.preset:
        est = estimate_for_preset(args.base, args.preset, **kw)
    elif args.base and args.stage:  # the stage's preset (the paper's settings), e.g. Lion for stage 1
        est = estimate_for_preset(args.base, {1: "stage1", 2: "stage2-face", 3: "stage3"}[args.stage], **kw)
    else:
        raise ValueError("mole estimate needs a training config (TOML), or --base with --preset or --stage; "
                         "e.g. mole estimate --base sdxl --preset stage3")  # fmt: skip
    settings = {k: getattr(est, k) for k in ("kind", "stage", "batch_size", "resolution", "precision", "optimizer",
                                             "gradient_checkpointing", "rank", "num_experts", "wrapped_layers",
                                             "gpus", "strategy")}
    fits = {}
    if args.fits:
        for budget in args.fits:
            fits[f"{budget:g}"] = max_batch_size(est.kind, est.stage, budget, resolution=est.resolution,
                                                 precision=est.precision, optimizer=est.optimizer,
                                                 gradient_checkpointing=est.gradient_checkpointing,
                                                 rank=max(est.rank, 1), num_experts=max(est.num_experts, 1),
                                                 gpus=est.gpus, strategy=est.strategy)
    if args.json:
        rows = {name: round(gib, 4) for name, gib in est.rows()}
        print(json.dumps({**settings, "gib": rows, "max_batch_size_by_gib": fits}, indent=2))
        return 0
    print(" ".join(f"{k}={v}" for k, v in settings.items()))
    for name, gib in est.rows():
        print(f"  {name:<40} {gib:8.2f} GiB")
    for budget, batch in fits.items():
        print(f"  fits {budget} GiB: " + (f"batch size up to {batch}" if batch else "no, not even batch 1"))
    return 0
