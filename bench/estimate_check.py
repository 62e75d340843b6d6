"""Check `mole estimate` against a measured CPU training step (fp32) of a full-size denoiser at a small resolution.

    python bench/estimate_check.py --kind sd15 --stage 3 --resolution 256
    python bench/estimate_check.py --kind sd15 --stage 2 --resolution 256 --checkpointing

Each measurement runs in a fresh subprocess with MALLOC_MMAP_THRESHOLD_ fixed (freed tensors leave the RSS); a
thread samples the RSS every millisecond. Measured: setup = RSS with the model built, the experts injected and the
optimizer state made by a first step, minus the RSS before; step = peak RSS during a second forward + backward +
AdamW step minus the RSS before it (the steady state of training). Estimated: the same parts of mole.estimate
(denoiser weights, experts, gates, gradients, optimizer state, activations, workspace; no VAE / text encoders,
which this check does not load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> dict:
    import diffusers  # noqa: F401  (imports before the baseline)

    from mole import MoLEConfig, inject_mole
    from mole.estimate import denoiser_inputs
    from mole.full import build_denoiser
    from mole.inject import expert_parameters, gate_parameters, new_expert
    from mole.tiny import random_expert

    base = rss()
    model = build_denoiser(args.kind)
    model.requires_grad_(False)
    if args.stage == 2:
        inject_mole(model, [new_expert(model, "face", args.rank)], MoLEConfig(gating="none"))
        params = expert_parameters(model)
    elif args.stage == 3:
        experts = [random_expert(model, f"expert{i}", args.rank, seed=i) for i in range(args.experts)]
        inject_mole(model, experts, MoLEConfig(gating="both"))
        del experts
        params = gate_parameters(model)
    else:
        params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-6)
    latent = (args.resolution // 8, args.resolution // 8)
    inputs = denoiser_inputs(model, args.batch_size, latent, "cpu", torch.float32)
    import gc

    def train_step():
        out = model(**inputs)
        out = out.sample if hasattr(out, "sample") else out[0]
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()  # creates the optimizer state; the measured step is the steady state, as on a GPU
    gc.collect()
    before_step = rss()
    peak, stop = [before_step], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    train_step()
    step_s = time.perf_counter() - t0
    stop.set()
    thread.join()
    setup, step = (before_step - base) / 2**30, (peak[0] - before_step) / 2**30
    return {"measured_gib": setup + step, "measured_setup_gib": setup, "measured_step_gib": step, "step_s": step_s}


def estimate(args) -> dict:
    from mole.estimate import estimate_memory

    est = estimate_memory(args.kind, args.stage, batch_size=args.batch_size, resolution=args.resolution,
                          precision="fp32", gradient_checkpointing=args.checkpointing, rank=args.rank,
                          num_experts=args.experts)  # fmt: skip
    loaded = {k: v for k, v in est.weights.items() if not k.startswith(("vae", "text_encoder"))}
    total = sum(loaded.values()) + est.gradients + est.optimizer_state + est.activations + est.workspace
    setup = sum(loaded.values()) + est.optimizer_state
    return {"estimated_gib": total / 2**30, "estimated_setup_gib": setup / 2**30,
            "estimated_step_gib": (total - setup) / 2**30}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="sd15")
    parser.add_argument("--stage", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    res = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child"], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    measured = json.loads(res.stdout.strip().splitlines()[-1])
    est = estimate(args)
    report = {**vars(args), **measured, **est,
              "estimate_over_measured": round(est["estimated_gib"] / measured["measured_gib"], 3),
              "step_estimate_over_measured":
                  round(est["estimated_step_gib"] / measured["measured_step_gib"], 3)}  # fmt: skip
    report.pop("child")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
