"""`mole ui`: the local web app (gradio, the optional extra `[ui]`): base | fixed | MoLE side by side, the gates
live, a training run's curves."""

from __future__ import annotations

import argparse

from ._common import check_base_arg, check_mole_arg, expert_files, logger, tokenizer_arg

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="a local web app: base | fixed | MoLE side by side, the gates live (needs [ui])")
    p.add_argument("--base", default="mole-tiny", help="hub id, pipeline folder or model.safetensors "
                   "(default: mole-tiny)")  # fmt: skip
    tokenizer_arg(p)
    p.add_argument("--mole", help="MoLE .safetensors or the paper's gate file (then --expert); default: mole-tiny "
                   "with --base mole-tiny, else none (the base alone)")  # fmt: skip
    p.add_argument("--expert", action="append", metavar="NAME=FILE", help="an expert LoRA by name (the paper's "
                   "gate file), e.g. --expert face=face.safetensors")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (default: 7860, or the next free one)")
    p.add_argument("--steps", type=int, default=25, help="the page's default number of steps")
    p.add_argument("--max-side", type=int, default=1024, help="the largest height / width the page accepts")
    p.add_argument("--run", metavar="FOLDER", help="a training run folder to show in the 'Training run' tab")
    p.add_argument("--out", help="where the generated images go (default: a fresh temporary folder)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if present)")
    p.add_argument("--no-strict-base", action="store_true", help="accept a base whose weights differ (fine-tunes)")
    p.set_defaults(func=_cmd_ui)


def _cmd_ui(args: argparse.Namespace) -> int:
    from ..mole_tiny import is_mole_tiny

    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: use 1 to 65535")
    mole = args.mole or ("mole-tiny" if is_mole_tiny(args.base) else None)
    check_base_arg(args.base)
    check_mole_arg(mole)
    from ..ui import Studio, UIOptions, UIUnavailable, launch, require_gradio

    try:
        require_gradio()  # (seconds to import: after the cheap checks)
    except UIUnavailable as exc:
        logger.error("%s", exc)
        return 2
    if args.host not in LOCAL_HOSTS:
        logger.warning("--host %s: the page is reachable from other machines, with no password", args.host)
    studio = Studio(UIOptions(
        base=args.base, mole=mole, expert_files=expert_files(args.expert), strict_base=not args.no_strict_base,
        dtype=args.dtype, device=args.device, steps=args.steps, max_side=args.max_side, out_dir=args.out,
    ))  # fmt: skip
    app = launch(studio, host=args.host, port=args.port, run_folder=args.run, block=False)
    studio.preload()  # the page is up; the model loads behind it
    print(f"mole ui: {app.local_url} (base {args.base}, MoLE {mole or 'none'}; images in {studio.out_dir}; "
          "Ctrl+C stops it)", flush=True)  # fmt: skip
    try:
        app.block_thread()
    finally:
        app.close()
    return 0
