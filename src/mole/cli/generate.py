"""`mole generate` and `mole inspect`: sampling with MoLE (or the base / fixed-weight experts), and the gates
recorded while sampling (the paper's Fig. 7)."""

from __future__ import annotations

import argparse
import json

from ._common import (
    NothingProduced,
    check_sampling_args,
    expert_files,
    expert_weights,
    logger,
    output_dir,
    read_prompts,
    sampling_args,
    table,
)


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate images with MoLE (or the base / fixed-weight experts)")
    sampling_args(gen)
    gen.add_argument("--out", help="output folder (default: runs/generate, or runs/generate-2, ... when used)")
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    gen.add_argument("--seeds", type=int, nargs="+", help="explicit seeds (overrides --seed/--num-images)")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--batch-size", type=int, default=4)
    gen.add_argument("--no-mole", action="store_true", help="the base model alone")
    gen.add_argument("--experts", action="append", metavar="NAME=W", help="fixed-weight mixing, e.g. face=1.0")
    gen.add_argument("--compare", action="store_true", help="base, fixed-weight and MoLE side by side")
    gen.add_argument("--preset", choices=["official"], help="official: the paper's generation scripts' settings "
                     "(DDIM 50 steps, CFG 7.5, kohya's DDIM, ' best quality, 8K' appended)")  # fmt: skip
    gen.set_defaults(func=_cmd_generate)

    ins = sub.add_parser("inspect", help="record the gates while generating and draw them (the paper's Fig. 7)")
    sampling_args(ins)
    ins.add_argument("--out", help="output folder (default: runs/inspect, or runs/inspect-2, ... when used)")
    ins.add_argument("--map-steps", type=int, default=5, help="steps shown in the local score maps")
    ins.add_argument("--prompt-kind", action="append", metavar="KIND",
                     help="the kind of each prompt, in order (e.g. face, hand): gates are also reported per kind")
    ins.set_defaults(func=_cmd_inspect)


def _cmd_generate(args: argparse.Namespace) -> int:
    from ..inference import GenerateOptions, MixMode, generate

    weights = expert_weights(args.experts)
    check_sampling_args(args)
    if args.compare:
        modes = [MixMode.NONE, MixMode.FIXED, MixMode.MOLE]
    elif args.no_mole:
        modes = [MixMode.NONE]
    elif weights is not None:
        modes = [MixMode.FIXED]
    else:
        modes = [MixMode.MOLE]
    seeds = args.seeds if args.seeds else list(range(args.seed, args.seed + max(args.num_images, 0)))
    if not seeds:
        raise NothingProduced(f"--num-images {args.num_images}: 0 images to draw ({len(read_prompts(args))} prompts x "
                              "0 seeds); use --num-images 1 or more (or --seeds)")  # fmt: skip
    preset = {}
    if args.preset:
        from ..inference.presets import generate_preset

        preset = generate_preset(args.preset)
        # explicit flags win; the parser's defaults give way to the preset's
        for key, default in (("steps", 50), ("guidance_scale", 7.5), ("scheduler", "ddim")):
            if getattr(args, key) == default:
                setattr(args, key, preset[key])
    opts = GenerateOptions(
        base=args.base, prompts=read_prompts(args), mole=args.mole, out_dir=args.out or "runs/generate", seeds=seeds,
        negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
        scheduler=args.scheduler, height=args.height, width=args.width, batch_size=args.batch_size,
        dtype=args.dtype, device=args.device, modes=modes, expert_weights=weights, strict_base=not args.no_strict_base,
        expert_files=expert_files(args.expert), prompt_suffix=preset.get("prompt_suffix", ""),
        negative_suffix=preset.get("negative_suffix", ""), scheduler_config=preset.get("scheduler_config"),
        overwrite=args.overwrite, images=args.image, condition_types=args.condition_type,
    )  # fmt: skip
    opts.out_dir = _generate_dir(args, opts)
    index = generate(opts)
    out = opts.out_dir
    if args.json:
        print(json.dumps({"images": len(index["images"]), "drawn": index["drawn"], "out": out,
                          "truncated_prompts": [p for p in index["prompts"] if p["truncated"]]}, indent=2))  # fmt: skip
        return 0
    counts = {m.value: sum(r["mode"] == m.value for r in index["images"]) for m in modes}
    print(f"mole generate: {index['drawn']} images drawn, {len(index['images']) - index['drawn']} already there "
          f"-> {out} (images.jsonl)")  # fmt: skip
    print(table(["mode", "images", "folder"], [[m, n, f"{out}/{m}"] for m, n in counts.items()]))
    return 0


def _generate_dir(args: argparse.Namespace, opts) -> str:
    """--out, or runs/generate (-2, -3, ...); a folder holding an interrupted run with the same settings is
    continued (the same command again picks it up), not refused."""
    from pathlib import Path

    from ..inference import GenerateOptions
    from ..inference.generate import same_run

    if args.out is not None:
        if not args.overwrite and same_run(args.out, opts):
            return args.out  # continued by generate()
        return output_dir(args, "runs/generate", GenerateOptions.OUTPUTS, "mole generate")
    k, path = 1, "runs/generate"
    while Path(path).exists():
        if same_run(path, opts, unfinished=True):
            logger.warning("%s holds an unfinished run with these settings: continuing it (use --out to choose)", path)
            return path
        k += 1
        path = f"runs/generate-{k}"
    return output_dir(args, "runs/generate", GenerateOptions.OUTPUTS, "mole generate")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ..inference import InspectOptions, inspect

    if not args.mole:  # inspect shows a mixture's gates: without one there is nothing to show
        raise ValueError("mole inspect needs --mole: the MoLE .safetensors (or mole-tiny) whose gates to show")
    check_sampling_args(args)
    out = output_dir(args, "runs/inspect", InspectOptions.OUTPUTS, "mole inspect")
    data = inspect(InspectOptions(
        base=args.base, mole=args.mole, prompts=read_prompts(args), out_dir=out, seed=args.seed, steps=args.steps,
        guidance_scale=args.guidance_scale, scheduler=args.scheduler, height=args.height, width=args.width,
        map_steps=args.map_steps, dtype=args.dtype, device=args.device, strict_base=not args.no_strict_base,
        expert_files=expert_files(args.expert), kinds=args.prompt_kind,
        overwrite=args.overwrite, images=args.image, condition_types=args.condition_type,
    ))  # fmt: skip
    if data.get("kind") == "instruct":  # InstructMoLE: the experts each prompt chose (mean over layers)
        chosen = {r["prompt"]: {data["experts"][i]: round(w, 3) for i, w in enumerate(r["mean_over_layers"]) if w > 0}
                  for r in data["routing"]}  # fmt: skip
        print(json.dumps({"out": out, "routing": chosen}, indent=2))
        return 0
    summary = {
        n: {"first_step": v[0], "last_step": v[-1], "mean": sum(v) / len(v)} for n, v in data["global_mean"].items()
    }
    if args.json:
        print(json.dumps({"out": out, "global_gate": summary, "per_prompt": data["per_prompt"],
                          "per_kind": data["per_kind"]}, indent=2))  # fmt: skip
        return 0
    experts = data["experts"]
    rows = [[(r["kind"] + ": " if r["kind"] else "") + _short(r["prompt"]),
             *(f"{r[n]['mean']:.2f} ({r[n]['first_step']:.2f} -> {r[n]['last_step']:.2f})" for n in experts)]
            for r in data["per_prompt"]]  # fmt: skip
    for kind, gates in (data["per_kind"] or {}).items():
        rows.append([f"kind {kind} ({len(gates[experts[0]]['prompts'])} prompts)",
                     *(f"{gates[n]['mean']:.2f} ({gates[n]['first_step']:.2f} -> {gates[n]['last_step']:.2f})"
                       for n in experts)])  # fmt: skip
    print(f"mole inspect: global gate per prompt, mean over steps (first -> last step) -> {out}")
    print(table(["prompt", *(f"{n} gate" for n in experts)], rows))
    return 0


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
