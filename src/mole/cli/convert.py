"""`mole convert`: the paper's three files (face, hand, gate) <-> one mole file."""

from __future__ import annotations

import argparse
import json

from ._common import check_base_arg, check_file, check_mole_arg, expert_files, tokenizer_arg


def register(sub: argparse._SubParsersAction) -> None:
    conv = sub.add_parser("convert", help="the paper's three files (face, hand, gate) <-> one mole file")
    conv.add_argument("--mole", required=True, help="the paper's gate file (-> one mole file) or a mole file "
                      "(-> the official layout)")  # fmt: skip
    conv.add_argument("--expert", action="append", metavar="NAME=FILE", help="face=FILE and hand=FILE (paper's files)")
    conv.add_argument("--base", help="the base model (required for the paper's files; for SDXL mole files)")
    conv.add_argument("--out", required=True, help="mole .safetensors, or a folder for the official layout")
    tokenizer_arg(conv)
    conv.add_argument("--overwrite", action="store_true", help="replace existing output files")
    conv.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..convert import mole_to_official, official_to_mole
    from ..formats.official import is_official_gate_file
    from ..inference.pipeline import load_pipeline

    check_mole_arg(args.mole)  # every name checked in milliseconds, before the base loads (minutes on SDXL)
    for path in (expert_files(args.expert) or {}).values():
        check_file(path, "expert LoRA", "--expert")
    if args.base is not None:
        check_base_arg(args.base)
    model = load_pipeline(args.base, device="cpu").denoiser if args.base else None
    if is_official_gate_file(args.mole):
        if model is None:
            raise ValueError("--base is required to convert the paper's files: the manifest identifies the base model")
        files = expert_files(args.expert) or {}
        out = official_to_mole(model, args.mole, files, args.out, base_model=args.base, overwrite=args.overwrite)
        print(json.dumps({"mole": str(out)}, indent=2))
    else:
        if args.expert:
            raise ValueError("--expert is for converting the paper's gate file; a mole file embeds its experts")
        written = mole_to_official(args.mole, args.out, model=model, overwrite=args.overwrite)
        print(json.dumps({k: str(v) for k, v in written.items()}, indent=2))
    return 0
