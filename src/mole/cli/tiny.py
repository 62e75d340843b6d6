"""`mole tiny`: write a tiny randomly initialised pipeline (real diffusers architectures, built from configs, no
download) to a folder, to try a path offline in minutes; with --instruct also a fresh InstructMoLE file for it.

    mole tiny flux-kontext --out runs/tiny-kontext --instruct
    mole generate --base runs/tiny-kontext/base --mole runs/tiny-kontext/instruct.safetensors \\
        --prompt "make it blue" --image photo.png --steps 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KINDS = ("flux-kontext", "flux", "sd15", "sd21", "sdxl")
OUTPUTS = ("base", "instruct.safetensors")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny", help="write a tiny random pipeline (flux-kontext, flux, sd15, sd21, sdxl) to a folder")
    p.add_argument("kind", choices=KINDS, help="the architecture (flux-kontext: FluxKontextPipeline, 32 px)")
    p.add_argument("--out", required=True, help="folder: the pipeline goes to OUT/base")
    p.add_argument("--instruct", action="store_true",
                   help="also OUT/instruct.safetensors: fresh InstructMoLE experts + router (flux, flux-kontext)")
    p.add_argument("--seed", type=int, default=0, help="the random weights' seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier tiny model in --out")
    p.add_argument("--json", action="store_true", help="print the written paths as JSON")
    p.set_defaults(func=_cmd_tiny)


def _cmd_tiny(args: argparse.Namespace) -> int:
    from ..outputs import check_output_dir

    if args.instruct and not args.kind.startswith("flux"):
        raise ValueError(f"--instruct with kind {args.kind!r}: InstructMoLE runs on DiTs; use flux-kontext or flux")
    check_output_dir(args.out, OUTPUTS, args.overwrite, "mole tiny")
    written = write_tiny(args.kind, Path(args.out), args.instruct, args.seed)
    if args.json:
        print(json.dumps(written, indent=2))
    else:
        for what, path in written.items():
            print(f"{what:<8} {path}")
    return 0


def write_tiny(kind: str, out: Path, instruct: bool = False, seed: int = 0) -> dict[str, str]:
    from ..tiny import tiny_flux_pipeline, tiny_pipeline

    pipe = tiny_flux_pipeline(kontext=kind == "flux-kontext", seed=seed) if kind.startswith("flux") else \
        tiny_pipeline(kind, seed=seed)  # fmt: skip
    base = out / "base"
    pipe.save_pretrained(base)
    written = {"base": str(base)}
    if instruct:
        from ..instruct import InstructConfig, InstructMoLE

        cfg = InstructConfig(rank=4, shared_rank=4, resampler_dim=32, resampler_heads=2)
        im = InstructMoLE(pipe.transformer, cfg, text_dim=pipe.transformer.config.joint_attention_dim, seed=seed)
        written["instruct"] = str(im.save(out / "instruct.safetensors", base_model=str(base)))
    return written
