"""Real-size check of single-file loading (not in CI): a full-size random-weight pipeline of KIND, written in the
original layout, loads back with the shipped configs (config=None) to the same weights and base fingerprint.

    python bench/single_file_full.py sd15 --tokenizer ../shared/assets/clip_tokenizer [--dtype fp16]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import tempfile
import time
from pathlib import Path

import torch

from mole.formats.ldm import save_single_file
from mole.full import build_pipeline, count_parameters
from mole.identity import structure_hash, weight_signature
from mole.models import DiffusionModel
from mole.targets import TARGETS, detect_backbone, target_modules


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["sd15", "sd21", "sdxl"])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--low-memory", action="store_true", help="compare sha1 digests; free the original first (SDXL)")
    args = ap.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    t = time.perf_counter()
    pipe = build_pipeline(args.kind, dtype=dtype, tokenizer=args.tokenizer)
    print(f"built {args.kind} ({count_parameters(pipe.unet):,} UNet parameters) in {time.perf_counter() - t:.1f} s")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        t = time.perf_counter()
        save_single_file(pipe, path)
        print(f"wrote {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s")
        names = [n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
        layers = target_modules(pipe.unet, TARGETS[detect_backbone(pipe.unet)])
        ref = {n: {k: _digest(v) for k, v in getattr(pipe, n).state_dict().items()} for n in names}
        ref_fp = structure_hash(pipe.unet), weight_signature(pipe.unet, layers)
        if args.low_memory:
            del pipe
            gc.collect()
        t = time.perf_counter()
        loaded = DiffusionModel.from_pretrained(path, dtype=dtype, tokenizer=args.tokenizer)
        print(f"loaded with the shipped configs in {time.perf_counter() - t:.1f} s")
        for name in names:
            got = {k: _digest(v) for k, v in getattr(loaded.pipe, name).state_dict().items()}
            print(f"{name}: {len(got)} tensors, identical={got == ref[name]}")
        print(f"wrapped layers {len(layers)}; structure hash equal {structure_hash(loaded.denoiser) == ref_fp[0]}; "
              f"weight signature equal {weight_signature(loaded.denoiser, layers) == ref_fp[1]}")
        print(f"scheduler {type(loaded.pipe.scheduler).__name__} prediction={loaded.prediction_type}, tokenizer pad "
              f"{[getattr(loaded.pipe, n).pad_token for n in ('tokenizer', 'tokenizer_2') if hasattr(loaded.pipe, n)]}")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


if __name__ == "__main__":
    main()
