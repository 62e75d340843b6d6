"""The `mole` command line. Each subcommand turns its arguments into an options dataclass and calls the library;
only this module prints or sets exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger("mole")


def _quiet_dependencies(verbose: int, load: bool = True) -> None:
    """transformers / diffusers / huggingface_hub / absl (mediapipe) / TFLite: errors only and no loading bars,
    unless -vv. Environment settings the user made win."""
    if verbose >= 2:
        os.environ.setdefault("MOLE_NATIVE_LOGS", "1")  # mediapipe's C++ warnings too (mole.native_logs)
        return
    quiet_env = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                 "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "DIFFUSERS_NO_ADVISORY_WARNINGS": "1",
                 "GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "3"}  # fmt: skip
    for key, value in quiet_env.items():
        os.environ.setdefault(key, value)
    import warnings

    for module in ("transformers", "diffusers", "huggingface_hub", "accelerate", "torch", "timm", "open_clip",
                   "google", "absl", "mediapipe", "tensorboard"):  # fmt: skip
        warnings.filterwarnings("ignore", module=module)
        logging.getLogger(module).setLevel(logging.ERROR)
    if not load and "diffusers" not in sys.modules:  # a light command (info): the environment above suffices
        return
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - optional
        pass
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _check_file(path: str | None, what: str, flag: str) -> None:
    """An input file that must exist and be a readable file (not a folder), checked before anything heavy."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist; check the path")
    if not p.is_file():
        raise ValueError(f"{flag} {path} is a folder; give the {what} file inside it")
    if not os.access(p, os.R_OK):
        raise PermissionError(f"{flag} {path}: not readable (permissions)")


def _check_mole_arg(path: str | None) -> None:
    """--mole: a readable MoLE file with a manifest (header only, cheap)."""
    from .mole_tiny import is_mole_tiny

    if path is None or is_mole_tiny(path):
        return
    _check_file(path, "MoLE .safetensors", "--mole")
    from .formats.official import is_official_gate_file
    from .io import read_mole_manifest

    if is_official_gate_file(path):  # the paper's released gate file: read with its --expert files
        return
    read_mole_manifest(path)


def _check_base_arg(base: str, flag: str = "--base") -> None:
    """A local base must be a diffusers pipeline folder or a single-file checkpoint; `mole-tiny` names the shipped
    model; anything else must look like a hub id (org/name)."""
    from .mole_tiny import is_mole_tiny
    from .single_file import SUFFIXES

    if is_mole_tiny(base):
        return
    p = Path(base).expanduser()
    if p.is_file() and p.suffix.lower() in SUFFIXES:  # a single-file checkpoint: read when the model loads
        return
    if p.exists():
        if not p.is_dir() or not (p / "model_index.json").is_file():
            raise ValueError(f"{flag} {base} is not a diffusers pipeline folder (no model_index.json); give the "
                             "folder written by save_pretrained, or a hub id such as runwayml/stable-diffusion-v1-5")
        return
    if base.startswith((".", "/", "~")) or base.count("/") > 1 or "\\" in base:
        raise FileNotFoundError(f"{flag} {base}: no such folder; check the path (or give a hub id)")


def _output_dir(args: argparse.Namespace, default: str, names: list[str], what: str) -> str:
    """--out given: refuse a used folder unless --overwrite (then remove exactly `names`). Not given: the default,
    or default-2, -3, ... when that holds an earlier run."""
    from .outputs import check_output_dir, fresh_dir

    if args.out is None:
        out = str(fresh_dir(default, names))
        if out != default:
            logger.warning("%s exists; writing to %s (use --out to choose)", default, out)
        return out
    check_output_dir(args.out, names, args.overwrite, what)
    return args.out


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo, summary_table

    opts = DemoOptions(out_dir=args.out or "runs/demo", base=args.base, mole=args.mole, train=args.train,
                       train_steps=args.train_steps, sample_steps=args.steps, rank=args.rank, seeds=args.seeds,
                       seed=args.seed)  # fmt: skip (checked before any folder is touched)
    if args.out is None:
        from .outputs import fresh_dir

        args.out = str(fresh_dir("runs/demo"))
    elif Path(args.out).is_dir() and any(Path(args.out).iterdir()):
        out = Path(args.out)
        if not args.overwrite:
            raise ValueError(f"mole demo: output folder {args.out!r} is not empty; pass --overwrite to replace an "
                             "earlier demo there, or choose another --out")  # fmt: skip
        if not ((out / "summary.json").is_file() or (out / "base" / "model_index.json").is_file()):
            raise ValueError(f"mole demo --overwrite: {args.out!r} does not hold an earlier demo (no summary.json, "
                             "no base/); choose an empty or new --out")  # fmt: skip
        import shutil

        logger.warning("--overwrite: removing the earlier demo in %s", out)
        shutil.rmtree(out)
    opts.out_dir = Path(args.out)
    summary = run_demo(opts)
    print(json.dumps(summary, indent=2) if args.json else summary_table(summary))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretrain.train import PretrainOptions, pretrain

    summary = pretrain(PretrainOptions(data=args.data, tokenizer=args.tokenizer, out=args.out, steps=args.steps,
                                       vae_steps=args.vae_steps, batch_size=args.batch_size, seed=args.seed,
                                       checkpoint_every=args.checkpoint_every, sample_every=args.sample_every,
                                       resume=args.resume, overwrite=args.overwrite))  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .io import read_mole_file
    from .mole_tiny import is_mole_tiny

    if not is_mole_tiny(args.file):
        _check_file(args.file, "MoLE .safetensors", "file")
    manifest, tensors = read_mole_file(args.file)
    gates = sum(t.numel() for k, t in tensors.items() if k.startswith("gates."))
    experts = sum(t.numel() for k, t in tensors.items() if k.startswith("experts."))
    if args.json:
        print(json.dumps({**manifest, "tensor_counts": {"gate_values": gates, "expert_values": experts}}, indent=2))
        return 0
    print(_info_summary(args.file, manifest, gates, experts))
    return 0


def _info_summary(path: str, manifest: dict, gates: int, experts: int) -> str:
    """A few readable lines: base, experts, gating, layers, sizes, versions."""
    base = manifest.get("base_model") or {}
    cfg = manifest.get("config") or {}
    lines = [f"{path}"]
    lines.append(f"  base      {base.get('name') or '?'} ({base.get('backbone', '?')})")
    ex = manifest.get("experts") or []
    def ranks(e: dict) -> str:
        r = e.get("ranks") or []
        return "/".join(str(x) for x in r) if isinstance(r, list) and r else "?"

    names = ", ".join(f"{e.get('name')} (r={ranks(e)}, {e.get('num_layers', '?')} layers)" for e in ex) or "none"
    lines.append(f"  experts   {names}")
    if cfg:
        lines.append(f"  gating    {cfg.get('gating', '?')}, global source {cfg.get('global_source', '?')}")
    layers = manifest.get("layers")
    if layers is not None:
        lines.append(f"  layers    {len(layers)}")
    lines.append(f"  values    {gates:,} gate, {experts:,} expert")
    extra = manifest.get("extra") or {}
    if "instruct" in extra:
        lines.append("  kind      InstructMoLE (experts + instruction router)")
    versions = manifest.get("versions") or {}
    if versions:
        lines.append("  written   " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append("  (full manifest: mole info --json FILE)")
    return "\n".join(lines)


def _cmd_estimate(args: argparse.Namespace) -> int:
    from .estimate import estimate_for_preset, estimate_from_config, max_batch_size

    kw = {"stage": args.stage, "batch_size": args.batch_size, "resolution": args.resolution,
          "precision": args.precision, "optimizer": args.optimizer, "gradient_checkpointing": args.checkpointing,
          "rank": args.rank, "num_experts": args.experts}  # fmt: skip
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
                                             "gradient_checkpointing", "rank", "num_experts", "wrapped_layers")}
    fits = {}
    if args.fits:
        for budget in args.fits:
            fits[f"{budget:g}"] = max_batch_size(est.kind, est.stage, budget, resolution=est.resolution,
                                                 precision=est.precision, optimizer=est.optimizer,
                                                 gradient_checkpointing=est.gradient_checkpointing,
                                                 rank=max(est.rank, 1), num_experts=max(est.num_experts, 1))
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


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import annotated_toml, load_config, train
    from .training.interrupt import TrainingInterrupted

    cfg = load_config(args.config, preset=args.preset, overrides=args.set or [])
    if args.print_config:  # the batch arithmetic for the processes this command runs on (WORLD_SIZE under launch)
        print(annotated_toml(cfg, args.preset, int(os.environ.get("WORLD_SIZE", "1"))), end="")
        return 0
    try:
        result = train(cfg, overwrite=args.overwrite)
    except TrainingInterrupted as exc:
        if os.environ.get("RANK", "0") == "0":
            cmd = _resume_command(args.argv)
            print(f"stopped by {exc.signal_name} at step {exc.step}; checkpoint: {exc.checkpoint}\n"
                  f"resume with: {cmd}", file=sys.stderr)  # fmt: skip
        return exc.exit_code
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch only the first process reports
        return 0
    print(json.dumps({
        "steps": result.steps, "start_step": result.start_step, "skipped_images": result.skipped_images,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "probe_loss_first": result.probe_loss_first, "probe_loss_last": result.probe_loss_last,
        "final": [str(p) for p in result.final], "checkpoints": [str(p) for p in result.checkpoints],
        "gate_log": result.gate_log[-1:] , "batch": result.batch,
    }, indent=2))  # fmt: skip
    return 0


def _resume_command(argv: list[str]) -> str:
    """The command line that was run, with --overwrite dropped and resume=latest added."""
    import shlex

    kept = [a for a in argv if a != "--overwrite"]
    return "mole " + " ".join(shlex.quote(a) for a in kept) + " --set resume=latest"


def _prompts(args: argparse.Namespace) -> list[str]:
    from .inference import read_prompt_file

    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    return prompts


def _expert_weights(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    out = {}
    for item in items:
        for part in item.split(","):
            name, _, value = part.partition("=")
            try:
                out[name.strip()] = float(value) if value else 1.0
            except ValueError:
                raise ValueError(f"--experts {part!r}: use name=weight, e.g. face=1.0") from None
    return out


def _expert_files(items: list[str] | None) -> dict[str, str] | None:
    """--expert NAME=FILE (repeatable) -> {name: file}."""
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--expert {item!r}: use NAME=FILE, e.g. --expert face=face_lora.safetensors")
        if name.strip() in out:
            raise ValueError(f"--expert {name.strip()!r} is given twice; give each expert once")
        out[name.strip()] = path.strip()
    return out


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import mole_to_official, official_to_mole
    from .formats.official import is_official_gate_file
    from .inference.pipeline import load_pipeline

    model = load_pipeline(args.base, device="cpu").denoiser if args.base else None
    if is_official_gate_file(args.mole):
        if model is None:
            raise ValueError("--base is required to convert the paper's files: the manifest identifies the base model")
        files = _expert_files(args.expert) or {}
        out = official_to_mole(model, args.mole, files, args.out, base_model=args.base, overwrite=args.force)
        print(json.dumps({"mole": str(out)}, indent=2))
    else:
        if args.expert:
            raise ValueError("--expert is for converting the paper's gate file; a mole file embeds its experts")
        written = mole_to_official(args.mole, args.out, model=model, overwrite=args.force)
        print(json.dumps({k: str(v) for k, v in written.items()}, indent=2))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .inference import GenerateOptions, MixMode, generate

    weights = _expert_weights(args.experts)
    _check_sampling_args(args)
    out = _output_dir(args, "runs/generate", GenerateOptions.OUTPUTS, "mole generate")
    if args.compare:
        modes = [MixMode.NONE, MixMode.FIXED, MixMode.MOLE]
    elif args.no_mole:
        modes = [MixMode.NONE]
    elif weights is not None:
        modes = [MixMode.FIXED]
    else:
        modes = [MixMode.MOLE]
    seeds = args.seeds if args.seeds else list(range(args.seed, args.seed + args.num_images))
    preset = {}
    if args.preset:
        from .inference.presets import generate_preset

        preset = generate_preset(args.preset)
        # explicit flags win; the parser's defaults give way to the preset's
        for key, default in (("steps", 50), ("guidance_scale", 7.5), ("scheduler", "ddim")):
            if getattr(args, key) == default:
                setattr(args, key, preset[key])
    index = generate(GenerateOptions(
        base=args.base, prompts=_prompts(args), mole=args.mole, out_dir=out, seeds=seeds,
        negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
        scheduler=args.scheduler, height=args.height, width=args.width, batch_size=args.batch_size,
        dtype=args.dtype, device=args.device, modes=modes, expert_weights=weights, strict_base=not args.no_strict_base,
        expert_files=_expert_files(args.expert), prompt_suffix=preset.get("prompt_suffix", ""),
        negative_suffix=preset.get("negative_suffix", ""), scheduler_config=preset.get("scheduler_config"),
        overwrite=args.overwrite,
    ))  # fmt: skip
    print(json.dumps({"images": len(index["images"]), "out": out,
                      "truncated_prompts": [p for p in index["prompts"] if p["truncated"]]}, indent=2))  # fmt: skip
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inference import InspectOptions, inspect

    _check_sampling_args(args)
    out = _output_dir(args, "runs/inspect", InspectOptions.OUTPUTS, "mole inspect")
    data = inspect(InspectOptions(
        base=args.base, mole=args.mole, prompts=_prompts(args), out_dir=out, seed=args.seed, steps=args.steps,
        guidance_scale=args.guidance_scale, scheduler=args.scheduler, height=args.height, width=args.width,
        map_steps=args.map_steps, dtype=args.dtype, device=args.device, strict_base=not args.no_strict_base,
        expert_files=_expert_files(args.expert),
        overwrite=args.overwrite,
    ))  # fmt: skip
    summary = {
        n: {"first_step": v[0], "last_step": v[-1], "mean": sum(v) / len(v)} for n, v in data["global_mean"].items()
    }
    print(json.dumps({"out": out, "global_gate": summary}, indent=2))
    return 0


def _cmd_eval_prompts(args: argparse.Namespace) -> int:
    from .eval import build_benchmark
    from .outputs import check_output_file

    _check_file(args.source, "prompt source", "source")
    check_output_file(args.out, args.overwrite, "mole eval prompts --out")
    path = build_benchmark(args.kind, args.source, args.out, limit=args.limit, seed=args.seed)
    meta = json.loads(Path(str(path) + ".meta.json").read_text())
    print(json.dumps({"benchmark": str(path), "count": meta["count"], "stats": meta["stats"]}, indent=2))
    return 0


def _cmd_eval_run(args: argparse.Namespace) -> int:
    from .eval import load_eval_config, run_eval

    _check_file(args.config, "eval TOML", "--config")
    overrides = {}
    if args.num_prompts is not None:
        overrides["num_prompts"] = args.num_prompts
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.out is not None:
        overrides["out_dir"] = args.out
    opts = load_eval_config(args.config, overrides)
    opts.overwrite = args.overwrite
    report = run_eval(opts)
    print(json.dumps({"summary": report["summary"], "run": report["run"]}, indent=2, default=float))
    return 0


def _cmd_data_build(args: argparse.Namespace) -> int:
    from .data.build import BuildOptions, build_dataset

    default_caption = "template:a close-up photo of a {part}" if args.data_command == "closeups" else "sidecar"
    # options only one of the two subcommands has (scenes: window, pose thresholds; closeups: part, margin): the
    # other takes BuildOptions' defaults
    mode_only = {k: getattr(args, k) for k in ("part", "margin", "window", "stride", "min_pose_presence",
                                               "min_person", "little_person", "pose_tiles", "min_person_agreement",
                                               "tile_landmarks") if hasattr(args, k)}  # fmt: skip
    stats = build_dataset(BuildOptions(
        source=args.source, out_dir=args.out, mode=args.data_command, size=args.size,
        min_sharpness=args.min_sharpness, blur_filter=args.blur_filter, min_blur_score=args.min_blur_score,
        captioner=args.captioner or default_caption, captions_json=args.captions_json, tokenizer=args.tokenizer,
        clip_filter=args.clip_filter, min_clip=args.min_clip, workers=args.workers, shard_size=args.shard_size,
        caption_prompt=_caption_prompt(args.caption_prompt), min_confidence=args.min_confidence,
        min_face_confidence=args.min_face_confidence, min_scale=args.min_scale, overwrite=args.overwrite, **mode_only,
    ))  # fmt: skip
    print(json.dumps({k: v for k, v in stats.items() if k != "options"}, indent=2))
    return 0


def _caption_prompt(value: str | None) -> str | None:
    from .data.captions import PAPER_CAPTION_PROMPT

    return PAPER_CAPTION_PROMPT if value == "paper" else value


def _cmd_data_filter(args: argparse.Namespace) -> int:
    from .data.quality import train_blur_filter
    from .outputs import check_output_file

    check_output_file(args.out, args.overwrite, "mole data train-filter --out")
    result = train_blur_filter(args.good, args.bad, args.out, epochs=args.epochs, synthetic_blur=not args.no_synthetic)
    print(json.dumps(result, indent=2))
    return 0


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="folder of raw images (searched recursively)")
    p.add_argument("out", help="output folder: images/, manifest.jsonl, stats.json")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--min-sharpness", type=float, default=30.0, help="variance-of-Laplacian floor (0: off)")
    p.add_argument("--blur-filter", help="a BlurNet from `mole data train-filter`")
    p.add_argument("--min-blur-score", type=float, default=0.5)
    p.add_argument("--captioner", action="append",
                   help="template:<text with {part}> | sidecar | hf:<model>; repeat for several (first caption wins)")
    p.add_argument("--captions-json", action="append",
                   help="for sidecar: COCO captions json or {file name: caption}; repeat for several")
    p.add_argument("--caption-prompt", help="prompt for hf: captioners that take one ('paper': the paper's "
                   "'Describe this image in one sentence with details.')")
    p.add_argument("--tokenizer", default="auto", help="CLIP tokenizer folder (vocab.json, merges.txt) to truncate "
                   "captions; auto (default): the real CLIP tokenizer when one is on this machine; none: words")
    p.add_argument("--min-confidence", type=float,
                   help="detector confidence floor: the face / hand detection a close-up needs (default: 0.8 for "
                   "face close-ups, else 0.5)")
    p.add_argument("--min-face-confidence", type=float, default=0.8,
                   help="scenes: a face this confident marks a window as holding a person (default 0.8)")
    p.add_argument("--min-scale", type=float, default=0.7,
                   help="upscale floor: windows / crops whose source side is below MIN_SCALE x --size are dropped "
                   "('upscale_floor'), never upscaled more than 1/MIN_SCALE (default 0.7: at most 1.43x, so a 375-px "
                   "window still makes a 512 crop); larger ones are downscaled (a 1024 window -> 512); 0: any upscale")
    p.add_argument("--clip-filter", help="CLIP weights (folder or hub id) for the CLIP-score filter")
    p.add_argument("--min-clip", type=float, default=20.0)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--shard-size", type=int, default=0, help="also write webdataset tar shards of N samples")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier build in OUT made with other options")
    p.set_defaults(func=_cmd_data_build)


def _cmd_eval_ablation(args: argparse.Namespace) -> int:
    from .eval import EvalOptions, MetricSpec, ablation_models, run_eval

    gating = dict(item.split("=", 1) for item in (args.gating or []))
    bad = sorted(set(gating) - {"local", "global", "both"})
    if bad:
        raise ValueError(f"--gating {bad}: use local=FILE, global=FILE, both=FILE")
    _check_base_arg(args.base)
    for path in [args.mole, *gating.values()]:
        _check_mole_arg(path)
    models = ablation_models(args.base, stage1=args.stage1, mole=args.mole, gating=gating,
                             expert_weights=_expert_weights(args.experts))  # fmt: skip
    metrics = [MetricSpec(*(m.split("=", 1) if "=" in m else (m, None))) for m in (args.metric or ["facehand"])]
    report = run_eval(EvalOptions(
        benchmark=args.benchmark, models=models, metrics=metrics, out_dir=args.out, num_prompts=args.num_prompts,
        repeats=args.repeats, steps=args.steps, seed=args.seed, overwrite=args.overwrite,
    ))  # fmt: skip
    print(json.dumps({"models": [m.name for m in models], "summary": report["summary"], "run": report["run"]},
                     indent=2, default=float))  # fmt: skip
    return 0


def _tokenizer_arg(p: argparse.ArgumentParser) -> None:
    from .single_file import TOKENIZER_ENV

    p.add_argument("--tokenizer", dest="base_tokenizer", metavar="DIR",
                   help="CLIP tokenizer folder (vocab.json + merges.txt) for a single-file --base / model "
                        f"checkpoint (same as {TOKENIZER_ENV}=DIR)")  # fmt: skip


def _check_sampling_args(args: argparse.Namespace) -> None:
    """Everything a sampling command can check in milliseconds, before the pipeline loads (minutes on SD1.5)."""
    from .inference.pipeline import check_device

    _check_base_arg(args.base)
    if not getattr(args, "no_mole", False):
        _check_mole_arg(args.mole)
    if args.prompt_file:
        _check_file(args.prompt_file, "prompt", "--prompt-file")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v < 8 or v % 8):
            raise ValueError(f"--{name} {v}: use a positive multiple of 8 (e.g. 512)")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: use at least 1")
    check_device(args.device)
    if not _prompts(args):
        raise ValueError("no prompt: pass --prompt TEXT or --prompt-file FILE")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    from .inference import SCHEDULERS

    p.add_argument("--base", required=True, help="hub id, local diffusers pipeline folder or model.safetensors")
    _tokenizer_arg(p)
    p.add_argument("--mole", help="MoLE .safetensors (gates + experts), or the paper's gate file (then --expert)")
    p.add_argument("--expert", action="append", metavar="NAME=FILE",
                   help="an expert LoRA by name, e.g. --expert face=face.safetensors (needed with the paper's gate "
                        "file; else replaces the file's embedded expert)")  # fmt: skip
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="prompts, one per line (or .json / .jsonl with a 'prompt' key)")
    p.add_argument("--steps", type=int, default=50, help="inference steps (default 50, as the paper)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS))
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if present)")
    p.add_argument("--no-strict-base", action="store_true", help="accept a base whose weights differ (fine-tunes)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mole", description="Mixture of Low-rank Experts for diffusion models")
    _common_args(parser, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="MoLE on mole-tiny (a small real model): base / fixed / MoLE, gates, checks")
    demo.add_argument("--out", help="output folder (default: runs/demo, or runs/demo-2, ... when that is used)")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    demo.add_argument("--base", default="mole-tiny", help="base pipeline (default: mole-tiny)")
    demo.add_argument("--mole", default="mole-tiny", help="MoLE file (default: mole-tiny's)")
    demo.add_argument("--train", metavar="DATA", help="re-run stages 2 and 3 from DATA/face, DATA/hand, DATA/mix")
    demo.add_argument("--train-steps", type=int, default=300, help="steps per stage with --train (default: 300)")
    demo.add_argument("--rank", type=int, default=16, help="expert rank with --train (default: 16)")
    demo.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    demo.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default: 2)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    demo.set_defaults(func=_cmd_demo)

    pre = sub.add_parser("pretrain", help="train a small text-to-image base from scratch (how mole-tiny is made)")
    pre.add_argument("--data", required=True, help="data root laid out like ../shared/data (faces/, hands/, scenes/)")
    pre.add_argument("--tokenizer", required=True, help="CLIP tokenizer folder (vocab.json, merges.txt)")
    pre.add_argument("--out", default="runs/mole-tiny")
    pre.add_argument("--steps", type=int, default=2200, help="UNet + text encoder steps (default: 2200)")
    pre.add_argument("--vae-steps", type=int, default=600, help="VAE steps (default: 600)")
    pre.add_argument("--batch-size", type=int, default=32)
    pre.add_argument("--checkpoint-every", type=int, default=250)
    pre.add_argument("--sample-every", type=int, default=1000)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    pre.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")
    pre.set_defaults(func=_cmd_pretrain)

    from .training.config import PRESETS

    tr = sub.add_parser("train", help="train one MoLE stage (1 fine-tune, 2 expert, 3 mixture)")
    tr.add_argument("--config", help="TOML file (see configs/)")
    tr.add_argument("--preset", choices=sorted(PRESETS),
                    help="the paper's settings for a stage (steps, batch 64 by accumulation, optimizer, lr, rank, "
                         "alpha, clip skip); --print-config names each one's source")  # fmt: skip
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set optim.lr=1e-4")
    tr.add_argument("--print-config", action="store_true",
                    help="print the resolved config (each preset option's source, the batch arithmetic) and exit")
    _tokenizer_arg(tr)
    tr.add_argument("--overwrite", action="store_true",
                    help="start afresh in an output_dir that holds an earlier run (its checkpoints, final/ and "
                         "metrics are removed); to continue that run use --set resume=latest")  # fmt: skip
    tr.set_defaults(func=_cmd_train)

    gen = sub.add_parser("generate", help="generate images with MoLE (or the base / fixed-weight experts)")
    _sampling_args(gen)
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
    _sampling_args(ins)
    ins.add_argument("--out", help="output folder (default: runs/inspect, or runs/inspect-2, ... when used)")
    ins.add_argument("--map-steps", type=int, default=5, help="steps shown in the local score maps")
    ins.set_defaults(func=_cmd_inspect)

    ev = sub.add_parser("eval", help="human-centric benchmarks, metrics, repeats with standard errors")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    evp = ev_sub.add_parser(
        "prompts", help="build COCO / DiffusionDB Human Prompts (jsonl + provenance)",
        description="The paper's selection rule: keep the captions / prompts about people (a person word, whole word, "
        "case-insensitive: woman, man, kid, girl, boy, person, teenager, ... see mole.eval.HUMAN_WORDS; or a body "
        "part or a person's name in the subject; not artist credits, 'no people' or 'a couple of elephants'), drop "
        "duplicates; for DiffusionDB also drop NSFW-flagged prompts and prompts with [ ] { } ( ) | < >. COCO 2017 "
        "val captions (25,014) give 10,751 prompts; the paper's ~60k come from COCO 2014 captions. Keep all prompts "
        "here: `mole eval run` samples 3k per repeat (num_prompts), three repeats.",
    )  # fmt: skip
    evp.add_argument("kind", choices=["coco", "diffusiondb"])
    evp.add_argument("source", help="coco_captions_val2017.json or diffusiondb_prompts_10k.json (or your own)")
    evp.add_argument("--out", required=True, help="output .jsonl (+ .meta.json: rules, counts, source sha256)")
    evp.add_argument("--limit", type=int, help="keep a fixed sample of this many prompts (default: all)")
    evp.add_argument("--seed", type=int, default=0)
    evp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    evp.set_defaults(func=_cmd_eval_prompts)
    evr = ev_sub.add_parser("run", help="generate, score and report the models of an eval TOML (resumable)")
    evr.add_argument("--config", required=True, help="TOML with benchmark, [[models]], [[metrics]] (see configs/)")
    evr.add_argument("--num-prompts", type=int)
    evr.add_argument("--repeats", type=int)
    evr.add_argument("--out")
    _tokenizer_arg(evr)
    evr.add_argument("--overwrite", action="store_true",
                     help="replace the results in the output folder when they were made with other settings")
    evr.set_defaults(func=_cmd_eval_run)
    eva = ev_sub.add_parser("ablation", help="the paper's ablations: stage ladder and local/global/both gating")
    eva.add_argument("--benchmark", required=True, help="a benchmark .jsonl from `mole eval prompts`")
    eva.add_argument("--base", required=True, help="the original base model")
    _tokenizer_arg(eva)
    eva.add_argument("--stage1", help="the stage-1 fine-tuned model (pipeline folder)")
    eva.add_argument("--mole", help="the stage-3 MoLE file (its experts also give the fixed-weight stage-2 rung)")
    eva.add_argument("--experts", action="append", metavar="NAME=W", help="stage-2 rung weights (default: all 1)")
    eva.add_argument("--gating", action="append", metavar="MODE=FILE", help="a MoLE file per gating mode")
    eva.add_argument("--metric", action="append", metavar="NAME[=WEIGHTS]", help="facehand, clip=..., hps=...")
    eva.add_argument("--out", default="runs/eval/ablation")
    eva.add_argument("--num-prompts", type=int, default=3000)
    eva.add_argument("--repeats", type=int, default=3)
    eva.add_argument("--steps", type=int, default=50)
    eva.add_argument("--seed", type=int, default=0)
    eva.add_argument("--overwrite", action="store_true",
                     help="replace the results in --out when they were made with other settings")
    eva.set_defaults(func=_cmd_eval_ablation)

    data = sub.add_parser("data", help="build training sets: scene crops, face / hand close-ups, blur filter")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    scenes = data_sub.add_parser("scenes", help="human-in-the-scene: sliding-window crops with a person")
    _data_args(scenes)
    scenes.add_argument("--window", type=int, default=1024)
    scenes.add_argument("--stride", type=int, default=512)
    scenes.add_argument("--min-pose-presence", type=float, default=0.8,
                        help="pose-presence score a pose found in a window needs (default 0.8; 0.5 lets through poses "
                        "on animals, food and beds)")
    scenes.add_argument("--min-person", type=float, default=0.03,
                        help="the posed person's pixels a window needs, as a fraction of it (default 0.03)")
    scenes.add_argument("--little-person", type=float, default=0.05,
                        help="drop windows whose person covers less than this and hold no confident face of >= 6 %% "
                        "of the window side (default 0.05)")
    scenes.add_argument("--min-person-agreement", type=float, default=0.2,
                        help="share of the posed person's pixels the person segmenter must also mark as person for "
                        "the pose to count (default 0.2; poses found on objects sit on background: 0.0)")
    scenes.add_argument("--pose-tiles", action=argparse.BooleanOptionalAction, default=True,
                        help="search the four 3/4 tiles of a window without a confirmed big pose (default on; "
                        "--no-pose-tiles: the window alone)")
    scenes.add_argument("--tile-landmarks", type=int, default=22,
                        help="visible landmarks (of 33) a pose found in a tile needs (default 22)")
    close = data_sub.add_parser("closeups", help="face or hand close-ups from detections")
    _data_args(close)
    close.add_argument("--part", choices=["face", "hand"], default="face")
    close.add_argument("--margin", type=float, default=0.4)
    flt = data_sub.add_parser("train-filter", help="train the blur / low-quality CNN from labelled folders")
    flt.add_argument("--good", required=True, help="sharp, good images")
    flt.add_argument("--bad", help="blurry / low-quality images (optional with synthetic blur)")
    flt.add_argument("--out", required=True, help="output .safetensors")
    flt.add_argument("--epochs", type=int, default=10)
    flt.add_argument("--no-synthetic", action="store_true", help="do not add blurred copies of the good images")
    flt.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    flt.set_defaults(func=_cmd_data_filter)

    conv = sub.add_parser("convert", help="the paper's three files (face, hand, gate) <-> one mole file")
    conv.add_argument("--mole", required=True, help="the paper's gate file (-> one mole file) or a mole file "
                      "(-> the official layout)")  # fmt: skip
    conv.add_argument("--expert", action="append", metavar="NAME=FILE", help="face=FILE and hand=FILE (paper's files)")
    conv.add_argument("--base", help="the base model (required for the paper's files; for SDXL mole files)")
    conv.add_argument("--out", required=True, help="mole .safetensors, or a folder for the official layout")
    _tokenizer_arg(conv)
    conv.add_argument("--force", action="store_true", help="replace existing output files")
    conv.set_defaults(func=_cmd_convert)

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
    est.add_argument("--fits", type=float, nargs="+", metavar="GIB", help="also the largest batch size per budget")
    est.add_argument("--json", action="store_true")
    est.set_defaults(func=_cmd_estimate)

    info = sub.add_parser("info", help="a short summary of a MoLE .safetensors file (--json: the full manifest)")
    info.add_argument("file")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.set_defaults(func=_cmd_info)
    for action in _leaf_parsers(parser):
        _common_args(action, argparse.SUPPRESS)
    return parser


def _common_args(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="count", default=default, help="more output (-v info, -vv debug)")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="errors only")
    p.add_argument("--debug", action="store_true", default=default, help="show the traceback of an error")


def _leaf_parsers(parser: argparse.ArgumentParser):
    """Every subcommand parser (so -v / -q / --debug also work after the subcommand)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _leaf_parsers(sub)


# errors a user causes (bad arguments, files, settings); anything else is reported as an internal error
USER_ERRORS = (ValueError, OSError, LookupError, FloatingPointError)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    verbose = getattr(args, "verbose", 0) or 0
    quiet = bool(getattr(args, "quiet", False))
    debug = bool(getattr(args, "debug", False))
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("mole").setLevel(level)
    _quiet_dependencies(verbose if not debug else max(verbose, 2), load=args.command != "info")
    if quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    func: Callable[[argparse.Namespace], int] = args.func
    saved_env = dict(os.environ)
    if getattr(args, "base_tokenizer", None):  # read wherever a single-file base is loaded (also in workers)
        from .single_file import TOKENIZER_ENV

        os.environ[TOKENIZER_ENV] = args.base_tokenizer
    try:
        return func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        logger.error("interrupted")
        return 130
    except Exception as exc:
        if debug:
            raise
        from .eval.metrics import MetricUnavailable

        if isinstance(exc, USER_ERRORS + (MetricUnavailable,)):  # ours name the field, value and fix
            logger.error("%s", _one_line(exc))
            return 2
        if isinstance(exc, RuntimeError) and "out of memory" in str(exc):
            logger.error("out of memory: lower --batch-size / the resolution, or use --dtype fp16")
            return 2
        logger.error("internal error %s: %s (run with --debug for the traceback; please report it)",
                     type(exc).__name__, _one_line(exc))  # fmt: skip
        return 1
    finally:
        if getattr(args, "base_tokenizer", None):  # main() called as a function leaves the environment as it was
            os.environ.clear()
            os.environ.update(saved_env)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
