"""The README's table: the largest batch size per stage, precision and GPU memory, from mole.estimate.

    python bench/estimate_table.py > table.md

Activations grow linearly with the batch, so two estimates per configuration (batch 1 and 2) give every budget.
A budget keeps 1 GiB back for the CUDA context and allocator slack.
"""

from __future__ import annotations

import argparse

from mole.estimate import GB, NATIVE_RESOLUTION, estimate_memory

BUDGETS = (12, 16, 24, 40, 80)
STAGES = {1: ("lion", "stage 1 (fine-tune, Lion)"), 2: ("adamw", "stage 2 (expert r256, AdamW)"),
          3: ("adamw", "stage 3 (gates, 2 x r256)")}  # fmt: skip


def cell(fixed: float, per_sample: float, budget: float, limit: int = 64) -> str:
    room = (budget - 1) * GB - fixed
    if room < per_sample:
        return "-"
    return str(int(min(limit, room // per_sample)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["sd15", "sd21", "sdxl", "pixart"])
    args = parser.parse_args()
    header = "| model @ px | stage | precision | checkpointing | GiB at batch 1 | " + " | ".join(
        f"{b} GB" for b in BUDGETS) + " |"  # fmt: skip
    print(header)
    print("|" + "---|" * (5 + len(BUDGETS)))
    for kind in args.kinds:
        for stage, (opt, label) in STAGES.items():
            for precision in ("bf16", "fp32"):
                one = estimate_memory(kind, stage, batch_size=1, precision=precision, optimizer=opt)
                two = estimate_memory(kind, stage, batch_size=2, precision=precision, optimizer=opt)
                for ckpt in (False, True):
                    t1 = one.total - one.activations + one.activations_by_checkpointing[ckpt]
                    t2 = two.total - two.activations + two.activations_by_checkpointing[ckpt]
                    per = t2 - t1
                    cells = " | ".join(cell(t1 - per, per, b) for b in BUDGETS)
                    print(f"| {kind} @ {NATIVE_RESOLUTION[kind]} | {label} | {precision} | {'on' if ckpt else 'off'} "
                          f"| {t1 / GB:.1f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
