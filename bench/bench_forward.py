"""MoLE vs peft on an SD1.5-shaped UNet with random weights and the same random rank-r experts.

Inference, one CFG denoising step (batch 2): base, peft with two weighted LoRA adapters, MoLE naive, MoLE fused.
Training (stage 3 vs one peft adapter), one optimizer step (AdamW) on batch 2: peft training one rank-r adapter
(A and B trainable) and MoLE training only the gates of two frozen rank-r experts.

    python bench/bench_forward.py                       # GPU if present (fp16), else CPU (fp32, 32x32 latent)
    python bench/bench_forward.py --rank 256 --hw 64 64 --rounds 20 --out bench/results.json
    python bench/bench_forward.py --compile             # also torch.compile'd peft and MoLE (inference)

The variants run alternately, round by round (the first variant of each round rotates), so that a noisy machine
slows them alike; the report gives the median of the rounds and the spread (min, max) of every ratio over the
rounds. Peak memory of a training step: on a GPU torch.cuda.max_memory_allocated; on a CPU each training variant
runs alone in a subprocess (MALLOC_MMAP_THRESHOLD_ fixed so freed tensors leave the RSS) and a thread samples the
RSS every millisecond; the figure is the peak above the RSS with the model built and the optimizer state created
(activations, gradients, temporaries). Saved-for-backward bytes (autograd's saved tensors, parameters excluded)
are counted in-process for both.

Goals (issue 13): fused MoLE <= 0.90x peft's two weighted adapters at rank 256 (inference); a stage-3 step
<= 1.1x a peft one-adapter step in time and in peak memory (--train-global adds the global-only gating
step, whose exact merged per-sample path needs no rank-R pass over the tokens).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, rounds: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """ms per call of every fn, the variants alternating within each round (rotating which goes first)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1000)
            print(f"round {r}: {name} {times[name][-1]:.0f} ms", file=sys.stderr, flush=True)
    return times


def ratio_stats(times: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    """Median of the ratio num / den over the rounds, with min and max (each round's pair ran back to back)."""
    ratios = [a / b for a, b in zip(times[num], times[den])]
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3)}


def build(args, device, dtype, with_peft_inference=True, with_peft_train=True, with_mole=True, gating="both",
          with_global=False):  # fmt: skip
    """(peft UNet, MoLE UNet or None, inputs, target, global-only MoLE UNet or None); every UNet shares the base
    weights' values and the experts; the MoLE UNet gates with `gating`."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from mole import MoLEConfig, expert_from_peft, inject_mole

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device, dtype)
    unet.requires_grad_(False)
    global_unet = None
    alone = with_mole and not (with_peft_inference or with_peft_train)  # MoLE only: no second copy of the UNet
    mole_unet = copy.deepcopy(unet) if with_mole and not alone else None
    names = (["face", "hand"] if (with_peft_inference or with_mole) else []) + (["trainee"] if with_peft_train else [])
    for name in names:
        unet.add_adapter(
            LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=PEFT_TARGETS, init_lora_weights="gaussian"),
            adapter_name=name,
        )
    with torch.no_grad():  # peft starts B at zero; random B makes the fused-vs-naive check meaningful
        for module in unet.modules():
            if hasattr(module, "lora_B") and isinstance(module.lora_B, torch.nn.ModuleDict):
                for lin in module.lora_B.values():
                    lin.weight.normal_(0, 0.01)
    if with_mole:
        unet.set_adapters(["face", "hand"], weights=[0.8, 0.6])
        experts = [expert_from_peft(unet, "face"), expert_from_peft(unet, "hand")]
        if alone:
            unet.unload_lora()  # back to plain Linear / Conv2d layers
            unet, mole_unet = None, unet
        global_unet = copy.deepcopy(mole_unet) if with_global else None
        if global_unet is not None:
            inject_mole(global_unet, experts, MoLEConfig(gating="global"))
        inject_mole(mole_unet, experts, MoLEConfig(gating=gating))
        if not with_peft_inference and not alone:
            unet.delete_adapters(["face", "hand"])
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = {
        "sample": torch.randn(2, 4, *args.hw, generator=g).to(device, dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn(2, 77, 768, generator=g).to(device, dtype),
    }
    target = torch.randn(2, 4, *args.hw, generator=g).to(device, dtype)
    return unet, mole_unet, inputs, target, global_unet


def peft_train_step_fn(unet, inputs, target):
    unet.set_adapters(["trainee"])
    unet.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if ".trainee." in n and "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-6)

    def step():
        loss = torch.nn.functional.mse_loss(unet(**inputs).sample.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def mole_train_step_fn(mole_unet, inputs, target):
    from mole import gate_parameters, set_fused

    params = gate_parameters(mole_unet)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-6)

    def step():
        set_fused(mole_unet, True)
        loss = torch.nn.functional.mse_loss(mole_unet(**inputs).sample.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def saved_bytes(fn_forward, model) -> int:
    """Bytes autograd saves for the backward of one forward (distinct storages, the model's own tensors excluded)."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn_forward()
    return sum(saved.values())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(args) -> None:
    """One training variant alone: peak RSS above the prepared model during a training step (CPU)."""
    device, dtype = torch.device("cpu"), torch.float32
    peft_v = args.memory_child == "peft_train"
    gating = "global" if args.memory_child == "mole_train_global" else "both"
    unet, mole_unet, inputs, target, _ = build(args, device, dtype, with_peft_inference=False, with_peft_train=peft_v,
                                               with_mole=not peft_v, gating=gating)  # fmt: skip
    step = peft_train_step_fn(unet, inputs, target) if peft_v else mole_train_step_fn(mole_unet, inputs, target)
    step()  # creates the optimizer state
    import gc

    gc.collect()
    base = rss_bytes()
    peak, stop = [base], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    step()
    ms = (time.perf_counter() - t0) * 1000
    stop.set()
    thread.join()
    peak_mb = (peak[0] - base) / 2**20
    report = {"variant": args.memory_child, "rss_base_mb": base / 2**20, "peak_above_mb": peak_mb, "step_ms": ms}
    print(json.dumps(report))


def cpu_memory(args) -> dict:
    out = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    for variant in ("peft_train", "mole_train") + (("mole_train_global",) if args.train_global else ()):
        cmd = [sys.executable, __file__, "--rank", str(args.rank), "--hw", *map(str, args.hw)]
        cmd += ["--memory-child", variant]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--hw", type=int, nargs=2, default=None, help="latent size (default 64 64 GPU, 32 32 CPU)")
    parser.add_argument("--rounds", "--iters", type=int, default=None, help="rounds (default 20 GPU, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None)
    parser.add_argument("--no-train", action="store_true", help="inference only")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd peft and fused MoLE")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--train-global", action="store_true",
                        help="also time a stage-3 step with global-only gating (the merged per-sample path)")
    parser.add_argument("--memory-child", choices=["peft_train", "mole_train", "mole_train_global"], default=None,
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()


    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    args.hw = tuple(args.hw or ((64, 64) if gpu else (32, 32)))
    if args.memory_child:
        memory_child(args)
        return
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if gpu else "fp32")
    ]
    rounds = args.rounds or (20 if gpu else 5)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)

    report = timings(args, device, dtype, rounds, warmup)
    if args.out:  # the timings are kept even if a memory subprocess fails
        args.out.write_text(json.dumps(report, indent=2))
    if not args.no_train and not gpu:
        peaks = cpu_memory(args)
        peaks = {"peft_1_train": peaks["peft_train"], "mole_stage3_train": peaks["mole_train"],
                 **({"mole_stage3_train_global": peaks["mole_train_global"]} if args.train_global else {})}
        report["train_peak_memory"] = peaks
        report["peak_mole_over_peft"] = round(
            peaks["mole_stage3_train"]["peak_above_mb"] / peaks["peft_1_train"]["peak_above_mb"], 3
        )
        if args.train_global:
            report["peak_mole_global_over_peft"] = round(
                peaks["mole_stage3_train_global"]["peak_above_mb"] / peaks["peft_1_train"]["peak_above_mb"], 3
            )
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def timings(args, device, dtype, rounds: int, warmup: int) -> dict:
    from mole import set_fused

    gpu = device.type == "cuda"
    unet, mole_unet, inputs, target, global_unet = build(args, device, dtype,
                                                         with_global=args.train_global and not args.no_train)

    def infer(model):
        def run():
            with torch.inference_mode():
                return model(**inputs).sample

        return run

    def peft_base():
        unet.disable_adapters()
        try:
            return infer(unet)()
        finally:
            unet.enable_adapters()

    def peft_two():
        unet.set_adapters(["face", "hand"], weights=[0.8, 0.6])
        return infer(unet)()

    def mole(fused: bool):
        def run():
            set_fused(mole_unet, fused)
            return infer(mole_unet)()

        return run

    fused_out, naive_out = mole(True)(), mole(False)()
    fns = {"base": peft_base, "peft_2_adapters": peft_two, "mole_naive": mole(False), "mole_fused": mole(True)}
    times = interleaved(fns, rounds, warmup, device)
    report = {
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""),
        "latent_hw": args.hw,
        "batch": 2,
        "rank": args.rank,
        "rounds": rounds,
        "median_ms": {k: round(statistics.median(v), 2) for k, v in times.items()},
        "fused_over_peft": ratio_stats(times, "mole_fused", "peft_2_adapters"),
        "fused_over_naive": ratio_stats(times, "mole_fused", "mole_naive"),
        "peft_over_base": ratio_stats(times, "peft_2_adapters", "base"),
        "max_abs_fused_vs_naive": float((fused_out.float() - naive_out.float()).abs().max()),
    }

    if args.compile:
        unet.set_adapters(["face", "hand"], weights=[0.8, 0.6])
        set_fused(mole_unet, True)
        peft_c, mole_c = torch.compile(unet), torch.compile(mole_unet)
        t0 = time.perf_counter()
        infer(peft_c)(), infer(mole_c)()
        report["compile_s"] = round(time.perf_counter() - t0, 1)
        ctimes = interleaved({"peft_2_compiled": infer(peft_c), "mole_fused_compiled": infer(mole_c)}, rounds, warmup,
                             device)  # fmt: skip
        report["median_ms"].update({k: round(statistics.median(v), 2) for k, v in ctimes.items()})
        report["compiled_fused_over_peft"] = ratio_stats(ctimes, "mole_fused_compiled", "peft_2_compiled")

    if not args.no_train:
        peft_step = peft_train_step_fn(unet, inputs, target)  # activates the "trainee" adapter
        mole_step = mole_train_step_fn(mole_unet, inputs, target)
        steps = {"peft_1_train": peft_step, "mole_stage3_train": mole_step}
        if args.train_global:
            steps["mole_stage3_train_global"] = mole_train_step_fn(global_unet, inputs, target)
        ttimes = interleaved(steps, rounds, warmup, device)
        report["median_ms"].update({k: round(statistics.median(v), 2) for k, v in ttimes.items()})
        report["train_mole_over_peft"] = ratio_stats(ttimes, "mole_stage3_train", "peft_1_train")
        if args.train_global:
            report["train_mole_global_over_peft"] = ratio_stats(ttimes, "mole_stage3_train_global", "peft_1_train")

        def fwd(model):
            return lambda: torch.nn.functional.mse_loss(model(**inputs).sample.float(), target.float())

        unet.set_adapters(["trainee"])
        saved = {"peft_1_train": saved_bytes(fwd(unet), unet), "mole_stage3_train": saved_bytes(fwd(mole_unet),
                                                                                                mole_unet)}  # fmt: skip
        report["saved_for_backward_mb"] = {k: round(v / 2**20, 1) for k, v in saved.items()}
        report["saved_mole_over_peft"] = round(saved["mole_stage3_train"] / saved["peft_1_train"], 3)
        if gpu:  # on a CPU, cpu_memory measures each variant alone in a subprocess
            peaks = {}
            for name, step in (("peft_1_train", peft_step), ("mole_stage3_train", mole_step)):
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                peaks[name] = {"allocated_before_mb": before / 2**20,
                               "peak_above_mb": (torch.cuda.max_memory_allocated() - before) / 2**20}  # fmt: skip
            report["train_peak_memory"] = peaks
            report["peak_mole_over_peft"] = round(
                peaks["mole_stage3_train"]["peak_above_mb"] / peaks["peft_1_train"]["peak_above_mb"], 3
            )
    return report


if __name__ == "__main__":
    main()
