"""Real-size check (issue 13; not in CI): every stage and a gate-recording generation on a full-size backbone.

    python bench/real_size.py sd15 --work /tmp/real            # all phases, native resolution
    python bench/real_size.py sdxl --work /tmp/real --phases stage2,stage3,generate
    python bench/real_size.py sd15 --resolution 256 --phases stage2   # a quick smoke run

Phases, each in a fresh subprocess (peak host RSS sampled every millisecond, wall time measured around the phase):
- prepare:  a full-size random-weight pipeline from mole's shipped configs (`mole.full.build_pipeline`) saved with
            save_pretrained (fp16), the count of wrapped layers, and a folder of real photos (../shared/data COCO
            scenes, resized to the native size) with captions;
- stage1:   one optimizer step of the fine-tune (Lion, UNet + text encoder where the stage trains it), only where
            `mole estimate` says it fits the host;
- stage2:   one optimizer step of a rank-256 face expert through `mole.training.train` (the `mole train` loop);
- stage3:   one optimizer step of the gates over two rank-256 experts (the stage-2 face expert and a perturbed copy
            of it as "hand"), gating = both;
- generate: a 2-step `mole inspect` run (CFG, gate recording on: global gates per step and local maps) at the
            native size.
Precision and gradient checkpointing for each training phase are the first of fp32, fp32 + checkpointing, bf16,
bf16 + checkpointing whose `mole estimate` total fits --budget GiB; the estimate is printed beside the measurement.
Training phases report two host peaks: while the pipeline loads (load_peak_gib: diffusers converting a fp16 file to
bf16 holds both copies of a component for a moment) and from the stage set-up to the end (peak_gib, which the
`mole estimate` figure is compared with).
Writes WORK/KIND/results.json and prints one markdown row per phase for bench/RESULTS.md. No GPU needed; on a GPU
the phases run there (peak memory: torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
NATIVE = {"sd15": 512, "sd21": 768, "sdxl": 1024, "pixart": 512}  # the shipped configs (PixArt-XL-2-512x512)
PROMPT = "a photo of a woman waving her hand, close-up of her face"
PHASES = ("prepare", "stage1", "stage2", "stage3", "generate")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak host RSS (or CUDA allocation) while the block runs, sampled every millisecond."""

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.before, self.peak, self.stop = rss(), rss(), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        import torch

        self.wall_s = time.perf_counter() - self.t0
        self.stop.set()
        self.thread.join()
        self.peak_gib = (torch.cuda.max_memory_allocated() if self.cuda else self.peak) / 2**30


def tokenizer_for(kind: str) -> Path:
    """The real CLIP BPE, or the tiny T5 sentencepiece model for PixArt (its ids fit T5-XXL's vocabulary)."""
    return SHARED / "assets" / ("t5_spiece_unigram1000.model" if kind == "pixart" else "clip_tokenizer")


def prepare(args, work: Path) -> dict:
    import torch
    from PIL import Image

    from mole.full import build_pipeline, count_parameters
    from mole.targets import TARGETS, detect_backbone, target_modules

    pipe = build_pipeline(args.kind, dtype=torch.float16, tokenizer=str(tokenizer_for(args.kind)))
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    wrapped = len(target_modules(denoiser, TARGETS[detect_backbone(denoiser)]))
    pipe.save_pretrained(work / "base", safe_serialization=True)
    data = work / f"data_{args.resolution}"
    data.mkdir(parents=True, exist_ok=True)
    photos = sorted((SHARED / "data" / "scenes" / "coco_mini" / "val2017").glob("*.jpg"))[:2]
    for i, photo in enumerate(photos):
        with Image.open(photo) as im:
            side = min(im.size)
            im = im.convert("RGB").crop((0, 0, side, side)).resize((args.resolution,) * 2, Image.BICUBIC)
            im.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(PROMPT)
    return {"denoiser_parameters": count_parameters(denoiser), "wrapped_layers": wrapped}


def choose_precision(args, stage: int) -> tuple[str, bool, float]:
    """The first (precision, gradient checkpointing) whose estimate fits --budget GiB; and that estimate."""
    from mole.estimate import estimate_memory

    for precision, ckpt in (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)):
        est = estimate_memory(args.kind, stage, batch_size=1, resolution=args.resolution, precision=precision,
                              gradient_checkpointing=ckpt, rank=args.rank, num_experts=2,
                              optimizer="lion" if stage == 1 else "adamw")  # fmt: skip
        total = est.total / 2**30
        if total <= args.budget:
            return precision, ckpt, total
    return "", False, total


def train_phase(args, work: Path, stage: int) -> dict:
    from mole.training import train
    from mole.training.config import TrainConfig

    precision, ckpt, est = choose_precision(args, stage)
    if not precision:
        return {"skipped": f"mole estimate: {est:.1f} GiB at bf16 + checkpointing > budget {args.budget} GiB"}
    cfg = dict(stage=stage, model=str(work / "base"), output_dir=str(work / f"stage{stage}"), max_steps=1,
               batch_size=1, mixed_precision="no" if precision == "fp32" else precision,
               gradient_checkpointing=ckpt, tensorboard=False, log_every=1,
               data=dict(path=str(work / f"data_{args.resolution}"), resolution=args.resolution,
                         caption_dropout=0.0))  # fmt: skip
    if stage == 1:
        cfg.update(optim=dict(name="lion", lr=2e-6), train_text_encoder=args.kind in ("sd15", "sd21"))
    elif stage == 2:
        cfg.update(expert=dict(name="face", rank=args.rank))
    else:
        cfg.update(mixture=dict(experts=_experts(work), gating="both"))
    config = TrainConfig.from_dict(cfg)
    from mole.training import loop

    marks = {}
    setup_stage = loop.setup_stage

    def marked_setup(*a, **kw):  # the pipeline is loaded: what follows is the stage itself
        marks["load_peak"] = mem.peak
        mem.peak = rss()
        return setup_stage(*a, **kw)

    loop.setup_stage = marked_setup
    with PeakMemory() as mem:
        result = train(config, overwrite=True)
    return {"precision": precision, "gradient_checkpointing": ckpt, "estimate_gib": round(est, 2),
            "loss": result.losses[-1], "final": [str(p) for p in result.final],
            "load_peak_gib": round(marks.get("load_peak", 0) / 2**30, 2),
            "wall_s": round(mem.wall_s, 1), "peak_gib": round(mem.peak_gib, 2)}  # fmt: skip


def _experts(work: Path) -> dict[str, str]:
    """face: the stage-2 expert; hand: a copy of it with its up-projections perturbed (another expert, same shapes)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    face = work / "stage2" / "final" / "face.safetensors"
    hand = work / "stage2" / "final" / "hand.safetensors"
    if not hand.exists():
        with safe_open(str(face), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(face))
        gen = torch.Generator().manual_seed(1)
        for key, t in tensors.items():
            if "lora_B" in key or "lora_up" in key:
                tensors[key] = t + 0.01 * torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype)
        meta = {k: v.replace('"face"', '"hand"') for k, v in meta.items()}
        save_file(tensors, str(hand), metadata=meta)
    return {"face": str(face), "hand": str(hand)}


def generate_phase(args, work: Path) -> dict:
    from mole.inference.inspect import InspectOptions, inspect

    mole_file = next((work / "stage3" / "final").glob("*.safetensors"))
    dtype = "bf16" if args.kind in ("sdxl", "pixart") else "fp32"
    opts = InspectOptions(base=str(work / "base"), mole=str(mole_file), prompts=[PROMPT], steps=2, map_steps=2,
                          out_dir=str(work / "inspect"), overwrite=True, dtype=dtype)  # fmt: skip
    with PeakMemory() as mem:
        index = inspect(opts)
    files = sorted(str(p.relative_to(work)) for p in (work / "inspect").rglob("*") if p.is_file())
    return {"dtype": dtype, "files": files, "index_keys": sorted(index)[:8],
            "wall_s": round(mem.wall_s, 1), "peak_gib": round(mem.peak_gib, 2)}  # fmt: skip


def child(args) -> dict:
    import logging

    import diffusers  # noqa: F401  (imported before any measurement)

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work) / args.kind
    work.mkdir(parents=True, exist_ok=True)
    if args.child == "prepare":
        with PeakMemory() as mem:
            out = prepare(args, work)
        return {**out, "wall_s": round(mem.wall_s, 1), "peak_gib": round(mem.peak_gib, 2)}
    if args.child.startswith("stage"):
        return train_phase(args, work, int(args.child[-1]))
    return generate_phase(args, work)


def table(work: Path) -> str:
    """One row per backbone and phase from WORK/KIND/results.json."""
    rows = ["| model | px | wrapped layers | phase | precision | checkpointing | step s | phase wall s | "
            "load peak GiB | peak GiB | estimate GiB | estimate / peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in NATIVE:
        f = work / kind / "results.json"
        if not f.exists():
            continue
        res = json.loads(f.read_text())
        layers = res.get("prepare", {}).get("wrapped_layers", "?")
        for phase in PHASES[1:]:
            r = res.get(phase)
            if r is None:
                continue
            if "skipped" in r or "error" in r:
                note = r.get("skipped") or "error: " + " ".join(r["error"][-1:])
                rows.append(f"| {kind} | {r['resolution']} | {layers} | {phase} | {note} | | | | | | | |")
                continue
            step = ""
            metrics = work / kind / phase / "metrics.jsonl"
            if metrics.exists():  # seconds from after the first probe to the end of optimizer step 1
                step = json.loads(metrics.read_text().splitlines()[0])["seconds"]
            est = r.get("estimate_gib")
            ratio = f"{est / r['peak_gib']:.2f}" if est else ""
            ckpt = "on" if r.get("gradient_checkpointing") else "off"
            rows.append(f"| {kind} | {r['resolution']} | {layers} | {phase} | {r.get('precision', r.get('dtype'))} | "
                        f"{ckpt} | {step} | {r['wall_s']} | {r.get('load_peak_gib', '')} | {r['peak_gib']} | "
                        f"{est or ''} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(NATIVE), nargs="?", default="sd15")
    parser.add_argument("--work", default="/tmp/mole-real-size")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--budget", type=float, default=20.0, help="GiB a training phase's estimate may use")
    parser.add_argument("--table", action="store_true", help="print the markdown table of WORK/*/results.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.work)))
        return
    args.resolution = args.resolution or NATIVE[args.kind]
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    work = Path(args.work) / args.kind
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    for phase in args.phases.split(","):
        if phase not in PHASES:
            parser.error(f"--phases: {phase!r} is not one of {PHASES}")
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, args.kind, "--work", args.work, "--resolution", str(args.resolution),
               "--rank", str(args.rank), "--budget", str(args.budget), "--child", phase]  # fmt: skip
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode or not lines:
            out = {"error": (res.stderr or res.stdout).strip().splitlines()[-12:], "returncode": res.returncode}
        else:
            out = json.loads(lines[-1][len("RESULT "):])
        out["process_wall_s"] = round(time.perf_counter() - t0, 1)
        out["resolution"] = args.resolution
        results[phase] = out
        results_file.write_text(json.dumps(results, indent=2))
        print(f"| {args.kind} | {phase} | " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
