"""The README's strategy table: per backbone and stage, the fewest 24 / 40 / 80 GB devices a run fits on and the
simplest strategy that fits on that many, from mole.estimate (with_strategy, devices_needed).

    PYTHONPATH=src python bench/strategy_table.py > table.md

Settings: the stage presets' optimizer (stage 1 Lion, stages 2-3 AdamW), bf16 mixed precision, the native
resolution, per-device batch 1 (--batch-size; the total batch of 64 comes from more devices or gradient
accumulation), rank 256 and 2 experts; each budget keeps 1 GiB back for the CUDA context and allocator slack.
Device counts tried: 1, 2, 4, ..., 64. Strategies tried simplest first: ddp, zero2, fsdp2 (zero3 gives the
same numbers as fsdp2 here).
"""

from __future__ import annotations

import argparse
import dataclasses

from mole.estimate import GB, NATIVE_RESOLUTION, STRATEGIES, devices_needed, estimate_memory

BUDGETS = (24, 40, 80)
STAGES = {1: ("lion", "1 (fine-tune)"), 2: ("adamw", "2 (expert r256)"), 3: ("adamw", "3 (gates, 2 x r256)")}
NAMES = {"sd15": "SD1.5", "sd21": "SD2.1", "sdxl": "SDXL", "pixart": "PixArt-alpha"}


def cell(est, budget: float) -> str:
    found = [(n, k, s) for k, s in enumerate(STRATEGIES[:3]) if (n := devices_needed(est, budget, s)) is not None]
    if not found:
        return "-"
    n, _, strategy = min(found)
    return f"{n} ({strategy})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=list(NAMES))
    parser.add_argument("--batch-size", type=int, default=1, help="per-device batch (default 1)")
    args = parser.parse_args()
    print("| model @ px | stage | checkpointing | GiB on 1 device (ddp) | "
          + " | ".join(f"{b} GB devices" for b in BUDGETS) + " |")  # fmt: skip
    print("|" + "---|" * (4 + len(BUDGETS)))
    for kind in args.kinds:
        for stage, (optimizer, label) in STAGES.items():
            est = estimate_memory(kind, stage, batch_size=args.batch_size, precision="bf16", optimizer=optimizer)
            for ckpt in (False, True):
                e = dataclasses.replace(est, weights=dict(est.weights), gradient_checkpointing=ckpt,
                                        activations=est.activations_by_checkpointing[ckpt])  # fmt: skip
                cells = " | ".join(cell(e, b) for b in BUDGETS)
                print(f"| {NAMES[kind]} @ {NATIVE_RESOLUTION[kind]} | {label} | {'on' if ckpt else 'off'} | "
                      f"{e.total / GB:.1f} | {cells} |")  # fmt: skip


if __name__ == "__main__":
    main()
