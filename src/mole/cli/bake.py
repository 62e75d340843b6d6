"""`mole bake`: a MoLE file's experts at fixed weights as one plain kohya LoRA (ComfyUI, A1111, diffusers)."""

from __future__ import annotations

import argparse
import json

from ._common import check_base_arg, check_file, check_mole_arg, expert_weights, finite_float, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bake", help="bake a MoLE file's experts at fixed weights into one plain kohya LoRA")
    p.add_argument("--mole", required=True, help="MoLE .safetensors with embedded experts (or mole-tiny)")
    p.add_argument(
        "--weights",
        action="append",
        metavar="NAME=W",
        help="an expert's weight, e.g. --weights face=0.8 --weights hand=0.3 (experts not named: 0)",
    )
    p.add_argument(
        "--from-prompts",
        metavar="FILE",
        help="set the weights to the mean recorded global gates over these prompts (needs --base)",
    )
    p.add_argument("--base", help="the base model (names SDXL layers, shapes conv factors; needed with "
                   "--from-prompts); default: mole-tiny for --mole mole-tiny")  # fmt: skip
    p.add_argument("--rank", type=int, help="compress to this rank by SVD (reports the relative error)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per prompt for --from-prompts")
    p.add_argument("--guidance-scale", type=finite_float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the baked LoRA .safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_bake)


def _cmd_bake(args: argparse.Namespace) -> int:
    from ..mole_tiny import is_mole_tiny

    check_mole_arg(args.mole)
    if args.weights and args.from_prompts:
        raise ValueError("--weights and --from-prompts both set the weights; give one")
    if not args.weights and not args.from_prompts:
        raise ValueError("no weights: pass --weights face=0.8 --weights hand=0.3, or --from-prompts FILE --base B")
    base = args.base or ("mole-tiny" if is_mole_tiny(args.mole) else None)
    if args.from_prompts:
        check_file(args.from_prompts, "prompt", "--from-prompts")
        if base is None:
            raise ValueError("--from-prompts runs the MoLE on the prompts: pass --base (the model the file is for)")
    if base is not None:
        check_base_arg(base)
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank {args.rank}: use a positive rank, or leave it out for the exact bake")
    from pathlib import Path

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; pass --overwrite to replace it")

    from ..bake import bake_mole_file, gate_means
    from ..inference import read_prompt_file
    from ..inference.pipeline import load_mole_weights, load_pipeline

    model = load_pipeline(base, device="cpu") if base is not None else None
    weights = expert_weights(args.weights)
    if args.from_prompts:
        prompts = read_prompt_file(args.from_prompts)
        load_mole_weights(model.pipe, args.mole, "mole")
        model.pipe.set_progress_bar_config(disable=True)
        weights = gate_means(model.pipe, prompts, num_inference_steps=args.steps,
                             guidance_scale=args.guidance_scale, seed=args.seed, output_type="latent")  # fmt: skip
        from ..inject import remove_mole

        remove_mole(model.denoiser)
    denoiser = model.denoiser if model is not None else None
    report = bake_mole_file(args.mole, args.out, weights, model=denoiser, rank=args.rank, overwrite=args.overwrite)
    result = {"out": str(args.out), **report.to_dict()}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(table(["bake", "value"], [
        ["weights", ", ".join(f"{n}={w:.4g}" for n, w in report.weights.items())],
        ["layers / rank", f"{report.layers} / {report.rank} (experts' total {report.total_rank})"],
        ["relative error", f"{report.relative_error:.3g} (worst layer {report.max_layer_error:.3g})"],
    ]))  # fmt: skip
    print(f"baked {args.out}")
    return 0
