"""InstructMoLE's claim in small: on multi-task, image-conditioned editing, instruction-routed experts (InstructMoLE,
official variant) against one LoRA and against token-routed MoLE (per-token local gates), at the same trainable-
parameter budget, on a small Flux-Kontext-style DiT trained here from ../shared/data.

    .venv/bin/python bench/instruct_claim.py                    # the full run (about 25 minutes on 2 shared CPU cores)
    .venv/bin/python bench/instruct_claim.py --quick            # a smoke run (a minute): same code, tiny numbers
    .venv/bin/python bench/instruct_claim.py --out DIR          # results in DIR/results.json and DIR/table.md

Set-up (every draw is a function of the seed):
  data      real RGB photos of ../shared/data at 32 px: hands (sign-language digits, 11k Hands; every 10th held out)
            and COCO scenes (train2017 -> 8 random crops each for training; val2017 -> held out, one centre crop).
  base      a FluxTransformer2DModel (1 double + 2 single blocks, 64-d, pixel space: 4x4 patches of RGB, 64 tokens)
            trained with rectified flow on "copy this photo" (the condition image is the target) and on plain
            generation ("a photo", no condition), the Kontext way: condition tokens appended after the image tokens,
            position ids with a first coordinate of 1. It has never seen the three tasks below.
  tasks     colorize (condition: the grey image), deblur (a Gaussian blur, sigma 1.2), edges -> photo (a Sobel edge
            map); each with two phrasings of its instruction, mixed in every batch (the multi-condition setting
            where one adapter must serve every task).
  methods   lora: one LoRA on the expert layers + the shared LoRA layers;
            token-moe: InstructConfig(token_routing=True): the same experts, routed per token by MoLE's local
            sigmoid gates, + the shared LoRA;
            instruct-moe: InstructConfig(variant="official") scaled down: experts on ff.net.2 + single proj_out,
            top-k softmax routing from the Perceiver resampler over the whole instruction, load-balance and
            output-space orthogonality losses with the cosine decay, + the shared LoRA.
            The ranks are set so every method trains the same number of parameters (within 2 %; printed).
  measure   on held-out images, each task: sample from noise (Euler, --sample-steps) with the condition and the
            instruction; PSNR and SSIM against the target; mean +- s.e. over held-out images x sampling seeds,
            per training seed; then the paired difference instruct-moe - lora per image and seed, and its mean per
            training seed with the s.e. across training seeds (the stricter error bar).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from mole.cli._common import finite_float
from mole.config import MoLEConfig
from mole.inject import expert_parameters, inject_mole
from mole.instruct import InstructConfig, InstructMoLE, SharedLoRA, fresh_experts
from mole.instruct.variants import expert_targets, shared_targets
from mole.targets import target_modules

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RES, PATCH, TEXT_DIM, TEXT_LEN = 32, 4, 32, 8
GRID = RES // PATCH  # 8 x 8 = 64 image tokens
TASKS = ("colorize", "deblur", "edges")
INSTRUCTIONS = {
    "copy": ("copy this photo", "keep the photo as it is"),
    "generate": ("a photo",),
    "colorize": ("colorize this grey photo", "add colour to the black and white image"),
    "deblur": ("sharpen this blurry photo", "remove the blur from the image"),
    "edges": ("turn these edges into a photo", "draw a photo from the edge map"),
}
METHODS = ("lora", "token-moe", "instruct-moe")
ROUTER_DIM = 64  # instruct-moe's Perceiver router width (--router-dim)


# ---------------------------------------------------------------------------------------------------- data
def _square(img: Image.Image, box: tuple[int, int, int] | None = None) -> torch.Tensor:
    """A square crop (x, y, side; default: the centre) at RES px -> (3, RES, RES) in [-1, 1]."""
    w, h = img.size
    if box is None:
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, s)
    x, y, s = box
    img = img.crop((x, y, x + s, y + s)).resize((RES, RES), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def build_data(cache: Path) -> dict[str, torch.Tensor]:
    if cache.is_file():
        return torch.load(cache)
    rng = np.random.default_rng(0)
    train, held = [], []
    hands = sorted(p for p in (SHARED / "hands").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for i, p in enumerate(hands):
        (held if i % 10 == 0 else train).append(_square(Image.open(p).convert("RGB")))
    for p in sorted((SHARED / "scenes" / "coco_mini" / "train2017").glob("*.jpg")):
        img = Image.open(p).convert("RGB")
        w, h = img.size
        for _ in range(8):
            s = int(rng.integers(min(w, h) // 3, min(w, h) + 1))
            train.append(_square(img, (int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1)), s)))
    for p in sorted((SHARED / "scenes" / "coco_mini" / "val2017").glob("*.jpg")):
        held.append(_square(Image.open(p).convert("RGB")))
    data = {"train": torch.stack(train), "held": torch.stack(held)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


def _gauss_kernel(sigma: float, size: int) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(x: torch.Tensor, sigma: float, size: int) -> torch.Tensor:
    """Separable Gaussian blur of (b, c, h, w), reflect padding."""
    k = _gauss_kernel(sigma, size).to(x)
    c = x.shape[1]
    x = nn.functional.pad(x, (size // 2,) * 4, mode="reflect")
    x = nn.functional.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return nn.functional.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).repeat(1, 3, 1, 1)


def condition(task: str, x: torch.Tensor) -> torch.Tensor:
    """The condition image of `task` for targets x (b, 3, RES, RES) in [-1, 1]."""
    if task == "copy":
        return x
    if task == "colorize":
        return _grey(x)
    if task == "deblur":
        return _blur(x, 1.2, 7)
    if task == "edges":
        g = _grey(x)[:, :1]
        sx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
        gp = nn.functional.pad(g, (1, 1, 1, 1), mode="replicate")
        mag = torch.sqrt(nn.functional.conv2d(gp, sx) ** 2 + nn.functional.conv2d(gp, sx.transpose(2, 3)) ** 2)
        return ((mag / 2).clamp(0, 1) * 2 - 1).repeat(1, 3, 1, 1)
    raise ValueError(f"task={task!r}: use one of {('copy', *TASKS)}")


# ---------------------------------------------------------------------------------------------------- the model
def patchify(x: torch.Tensor) -> torch.Tensor:
    """(b, 3, RES, RES) -> (b, GRID*GRID, 3*PATCH*PATCH) tokens."""
    b = x.shape[0]
    x = x.view(b, 3, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, GRID * GRID, 3 * PATCH * PATCH)


def unpatchify(t: torch.Tensor) -> torch.Tensor:
    b = t.shape[0]
    t = t.view(b, GRID, GRID, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return t.reshape(b, 3, RES, RES)


class TextEncoder:
    """A frozen word-level text encoder: a seeded random embedding per word plus a sinusoidal position; the pooled
    vector is the mean over the words. Stands in for T5 / CLIP (none can be downloaded here): what routing needs is
    a representation of the whole instruction."""

    def __init__(self, seed: int = 0) -> None:
        words = sorted({w for phr in INSTRUCTIONS.values() for p in phr for w in p.split()})
        self.vocab = {w: i + 1 for i, w in enumerate(words)}  # 0: padding
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(len(words) + 1, TEXT_DIM, generator=g)
        self.table[0] = 0
        pos = torch.arange(TEXT_LEN, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(100.0) * torch.arange(0, TEXT_DIM, 2) / TEXT_DIM)
        self.pos = torch.zeros(TEXT_LEN, TEXT_DIM)
        self.pos[:, 0::2], self.pos[:, 1::2] = torch.sin(pos * freq) * 0.3, torch.cos(pos * freq) * 0.3

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(prompts), TEXT_LEN, dtype=torch.long)
        for i, p in enumerate(prompts):
            w = [self.vocab[x] for x in p.split()][:TEXT_LEN]
            ids[i, : len(w)] = torch.tensor(w)
        mask = (ids > 0).float().unsqueeze(-1)
        states = (self.table[ids] + self.pos) * mask
        return states, states.sum(1) / mask.sum(1)


def make_base(seed: int) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=3 * PATCH * PATCH, num_layers=1, num_single_layers=2,
                                  attention_head_dim=32, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                  pooled_projection_dim=TEXT_DIM, guidance_embeds=False,
                                  axes_dims_rope=(8, 12, 12))  # fmt: skip


def _ids(first: float) -> torch.Tensor:
    ij = torch.stack(torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij"), -1).reshape(-1, 2)
    return torch.cat([torch.full((GRID * GRID, 1), first), ij.float()], 1)


IMG_IDS, COND_IDS, TXT_IDS = _ids(0.0), _ids(1.0), torch.zeros(TEXT_LEN, 3)


def velocity(model: nn.Module, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
             text: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """Rectified-flow velocity (b, n, c) for noisy tokens xt at times t (b,), condition tokens appended (Kontext)."""
    states, pooled = text
    hs, ids = (xt, IMG_IDS) if cond is None else (torch.cat([xt, cond], 1), torch.cat([IMG_IDS, COND_IDS]))
    out = model(hidden_states=hs, encoder_hidden_states=states, pooled_projections=pooled, timestep=t, img_ids=ids,
                txt_ids=TXT_IDS, return_dict=False)[0]  # fmt: skip
    return out[:, : xt.shape[1]]


def flow_loss(model, x0, cond, text, g: torch.Generator) -> torch.Tensor:
    """x_t = (1 - t) x0 + t e, target e - x0, t ~ logit-normal (as SD3 / Flux train)."""
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=g))
    e = torch.randn(x0.shape, generator=g)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * e
    return (velocity(model, xt, t, cond, text) - (e - x0)).pow(2).mean()


@torch.no_grad()
def sample(model, cond, text, steps: int, seed: int) -> torch.Tensor:
    """Euler from t = 1 (noise) to 0; (b, n, c) tokens in, images (b, 3, RES, RES) out."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cond.shape, generator=g)
    ts = torch.linspace(1, 0, steps + 1)
    for a, b in zip(ts[:-1], ts[1:]):
        x = x + (b - a) * velocity(model, x, a.expand(x.shape[0]), cond, text)
    return unpatchify(x).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------- metrics
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image PSNR in dB of images in [-1, 1] (peak 2)."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image SSIM (Wang et al. 2004: 7x7 Gaussian window, sigma 1.5, on [0, 1], channels averaged)."""
    a, b = (a + 1) / 2, (b + 1) / 2
    c1, c2 = 0.01**2, 0.03**2
    k = _gauss_kernel(1.5, 7)
    w = (k[:, None] * k[None, :]).view(1, 1, 7, 7).repeat(3, 1, 1, 1)
    f = lambda x: nn.functional.conv2d(x, w, groups=3)  # noqa: E731  valid windows only
    ma, mb = f(a), f(b)
    va, vb, cov = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return s.flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------------- methods
def instruct_config(method: str, shared_rank: int, rank: int, experts: int, top_k: int,
                    router_dim: int = ROUTER_DIM) -> InstructConfig:  # fmt: skip
    small_router = dict(resampler_dim=router_dim, resampler_depth=1, resampler_heads=2)
    return InstructConfig(variant="official", num_experts=experts, top_k=top_k, rank=rank, alpha=float(rank),
                          shared_rank=shared_rank, shared_alpha=float(shared_rank),
                          token_routing=method == "token-moe", **small_router)  # fmt: skip


class Adapter:
    """One method attached to a fresh copy of the base: its trainable parameter groups and its auxiliary loss."""

    def __init__(self, method: str, model: nn.Module, ranks: dict, seed: int, steps: int, lr: float) -> None:
        self.method, self.im = method, None
        if method == "lora":
            cfg = instruct_config("instruct-moe", ranks["shared"], ranks["lora"], 1, 1)
            patterns = expert_targets(model, cfg)
            experts = fresh_experts(model, cfg, target_modules(model, patterns), seed)
            inject_mole(model, experts, MoLEConfig(gating="none", targets=list(patterns)), seed=seed)
            self.shared = SharedLoRA(model, target_modules(model, shared_targets(model, cfg)), cfg.shared_rank,
                                     cfg.shared_alpha, seed=seed + 1000)  # fmt: skip
            params = expert_parameters(model) + list(self.shared.parameters())
            for p in params:
                p.requires_grad_(True)
            self.groups = [{"params": params, "lr": lr}]
        else:
            cfg = instruct_config(method, ranks["shared"], ranks["expert"], ranks["experts"], ranks["top_k"],
                                  ranks["router_dim"])  # fmt: skip
            self.im = InstructMoLE(model, cfg, text_dim=TEXT_DIM, pooled_dim=TEXT_DIM, seed=seed, total_steps=steps)
            # official: gate lr 5e-5 beside the experts' 1e-4; kept as that ratio at this run's lr
            self.groups = self.im.param_groups(lr)
            if len(self.groups) > 1:
                self.groups[1]["lr"] = lr * cfg.gate_lr / 1e-4
        self.cfg = cfg

    def count(self) -> int:
        return sum(p.numel() for g in self.groups for p in g["params"])

    def aux(self, step: int) -> torch.Tensor:
        return self.im.aux_loss(step)[0] if self.im is not None else torch.zeros(())


def method_ranks(scale: int, router_dim: int) -> dict[str, dict]:
    """Ranks per method at one budget: instruct-moe sets it (4 experts of rank 2*scale, top 2, shared rank 4*scale);
    token-moe and lora match its count with their shared-LoRA / LoRA ranks (solved by counting on the real model)."""
    return {"experts": 4, "top_k": 2, "expert": 2 * scale, "shared": 4 * scale, "router_dim": router_dim}


def matched_ranks(scale: int, seed: int, router_dim: int) -> dict[str, dict]:
    base = method_ranks(scale, router_dim)
    counts = {}

    def count(method, ranks):
        m = make_base(seed)
        return Adapter(method, m, ranks, seed, 10, 1e-3).count()

    target = count("instruct-moe", base)
    counts["instruct-moe"] = (base, target)
    # token-moe: same experts; its local gates are smaller than the router: raise the shared rank to match
    best = min(((abs(count("token-moe", dict(base, shared=s)) - target), s) for s in
                range(base["shared"], 8 * base["shared"] + 1)), key=lambda t: t[0])  # fmt: skip
    r = dict(base, shared=best[1])
    counts["token-moe"] = (r, count("token-moe", r))
    # lora: one expert of rank R beside the same shared LoRA as token-moe
    best = min(((abs(count("lora", dict(r, lora=k)) - target), k) for k in range(1, 64 * scale)), key=lambda t: t[0])
    r2 = dict(r, lora=best[1])
    counts["lora"] = (r2, count("lora", r2))
    return counts


# ---------------------------------------------------------------------------------------------------- runs
def batch(data: torch.Tensor, tasks: tuple[str, ...], n: int, g: torch.Generator, text: TextEncoder, drop: bool):
    """n random targets, each with a random task of `tasks` and a random phrasing; conditions dropped if `drop`."""
    idx = torch.randint(0, data.shape[0], (n,), generator=g)
    x = data[idx]
    x = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.5, x, x.flip(-1))  # horizontal flips
    which = torch.randint(0, len(tasks), (n,), generator=g).tolist()
    conds, prompts = torch.empty_like(x), []
    for i, k in enumerate(which):
        conds[i] = condition(tasks[k], x[i : i + 1])[0]
        phr = INSTRUCTIONS[tasks[k]]
        prompts.append(phr[int(torch.randint(0, len(phr), (1,), generator=g))])
    cond = None if drop else patchify(conds)
    return patchify(x), cond, text(prompts)


def train_base(data, steps: int, bs: int, seed: int, out: Path, text: TextEncoder, log) -> nn.Module:
    path = out / f"base-s{seed}-{steps}.pt"
    model = make_base(seed)
    if path.is_file():
        model.load_state_dict(torch.load(path))
        return model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    warm_cos = lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm_cos)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        generate = bool(torch.rand((), generator=g) < 0.3)  # one draw per step: plain generation, no condition
        x, cond, txt = batch(data, ("copy",), bs, g, text, drop=generate)
        if generate:
            txt = text(["a photo"] * bs)
        loss = flow_loss(model, x, cond, txt, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"base step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    torch.save(model.state_dict(), path)
    return model.eval()


def train_method(method, base_state, data, ranks, steps, bs, seed, text, lr, log) -> tuple[nn.Module, Adapter, float]:
    model = make_base(0)
    model.load_state_dict(base_state)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)  # router noise and resampler dropout draw from the global generator
    ad = Adapter(method, model, ranks, seed, steps, lr)
    opt = torch.optim.AdamW(ad.groups, weight_decay=1e-4)  # official weight decay
    base_lrs = [gr["lr"] for gr in opt.param_groups]
    g = torch.Generator().manual_seed(10_000 + seed)  # the same batches, noise and dropout draws for every method
    model.train()
    t0 = time.time()
    for step in range(steps):
        f = min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for gr, b in zip(opt.param_groups, base_lrs):
            gr["lr"] = b * f
        drop = bool(torch.rand((), generator=g) < 0.05)  # official condition dropout: 5 % of steps
        x, cond, txt = batch(data, TASKS, bs, g, text, drop)
        loss = flow_loss(model, x, cond, txt, g)
        total = loss + ad.aux(step)
        opt.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_([p for gr in ad.groups for p in gr["params"]], 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"{method} s{seed} step {step}/{steps} loss {loss.item():.4f} aux {float((total - loss).detach()):.4f} "
                f"({time.time() - t0:.0f} s)")  # fmt: skip
    model.eval()
    return model, ad, time.time() - t0


@torch.no_grad()
def evaluate(model, held, text, sample_steps: int, seeds: list[int], routing: InstructMoLE | None = None) -> dict:
    """Per task: per (image, seed) PSNR / SSIM lists; with a router, the mean expert weights per task."""
    out = {}
    for task in TASKS:
        cond = patchify(condition(task, held))
        txt = text([INSTRUCTIONS[task][i % len(INSTRUCTIONS[task])] for i in range(held.shape[0])])
        ps, ss, w = [], [], []
        for s in seeds:
            for i in range(0, held.shape[0], 64):
                part = (txt[0][i : i + 64], txt[1][i : i + 64])
                y = sample(model, cond[i : i + 64], part, sample_steps, s * 7919 + i)
                ps += psnr(y, held[i : i + 64]).tolist()
                ss += ssim(y, held[i : i + 64]).tolist()
                if routing is not None and routing.router is not None and routing.router.last_weights is not None:
                    w.append(routing.router.last_weights.float().mean((0, 1)))
        out[task] = {"psnr": ps, "ssim": ss}
        if w:
            out[task]["routing"] = torch.stack(w).mean(0).tolist()
    return out


def held_split(n: int, size: int, split: str) -> torch.Tensor:
    """Indices of `size` of the n held-out images: test = the first `size` of a seed-0 permutation (the reported
    numbers), val = the next `size` (disjoint from test: for choosing settings such as the learning rate)."""
    first = {"test": 0, "val": size}[split]
    if first + size > n:
        raise ValueError(f"--held {size}: {split} needs {first + size} held-out images, there are {n}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[first : first + size]


def mean_se(v) -> tuple[float, float]:
    a = np.asarray(v, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0


def learning_rate(text: str) -> float:
    """argparse type: a positive, finite learning rate (nan, inf, 0 and negatives are refused, naming the value)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number; give a learning rate such as 1e-3")
    return value


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/instruct-claim")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny step counts")
    ap.add_argument("--base-steps", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=learning_rate, default=1e-3,
                    help="learning rate of every method without a --method-lr")  # fmt: skip
    ap.add_argument("--method-lr", action="append", default=[], metavar="METHOD=LR",
                    help="one method's learning rate (repeatable), e.g. instruct-moe=3e-3: chosen on --split val")
    ap.add_argument("--split", choices=("test", "val"), default="test",
                    help="test: the reported held-out images; val: a disjoint held-out set, for choosing settings")
    ap.add_argument("--scale", type=int, default=2, help="rank scale: instruct-moe experts 2*scale, shared 4*scale")
    ap.add_argument("--router-dim", type=int, default=ROUTER_DIM,
                    help="width of instruct-moe's Perceiver router (2 heads): the router counts in the budget")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="the methods to train")
    ap.add_argument("--train-seeds", type=int, default=1)
    ap.add_argument("--sample-seeds", type=int, default=2)
    ap.add_argument("--sample-steps", type=int, default=12)
    ap.add_argument("--held", type=int, default=96, help="held-out images per task")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.quick:
        args.base_steps, args.steps, args.train_seeds, args.sample_seeds, args.held = 40, 20, 1, 1, 16
        args.sample_steps = 4
    lrs = {m: args.lr for m in METHODS}
    for item in args.method_lr:
        m, _, v = item.partition("=")
        if m not in METHODS:
            ap.error(f"--method-lr {item!r}: the method must be one of {METHODS}")
        try:
            lrs[m] = learning_rate(v)
        except argparse.ArgumentTypeError as e:
            ap.error(f"--method-lr {item!r}: {e} (e.g. {m}=3e-3)")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    # a rerun resumes only the same settings: results of other settings are never mixed into one table
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    config = {k: v for k, v in vars(args).items() if k not in ("out", "threads", "train_seeds", "methods")}
    changed = {k: (results["config"].get(k), v) for k, v in config.items()
               if "config" in results and results["config"].get(k) != v}  # fmt: skip
    if changed:
        diff = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
        ap.error(f"{res_path} holds results of other settings ({diff}): pass a new --out, or delete it to start again")
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    text = TextEncoder(0)
    data = build_data(out / "data.pt")
    try:
        held = data["held"][held_split(data["held"].shape[0], args.held, args.split)]
    except ValueError as e:
        ap.error(str(e))
    log(f"data: {data['train'].shape[0]} training images, {held.shape[0]} held-out ({args.split}) "
        f"of {data['held'].shape[0]}")  # fmt: skip
    counts = matched_ranks(args.scale, 0, args.router_dim)
    for m, (r, c) in counts.items():
        log(f"{m}: ranks {r}, {c} trainable parameters")
    results["config"], results["lr"] = config, lrs
    results["params"] = {m: c for m, (r, c) in counts.items()}
    results["ranks"] = {m: r for m, (r, c) in counts.items()}
    sample_seeds = list(range(args.sample_seeds))
    base = train_base(data["train"], args.base_steps, args.batch, 0, out, text, log)
    if "base" not in results:
        results["base"] = evaluate(base, held, text, args.sample_steps, sample_seeds)
        results["identity"] = {t: {"psnr": psnr(condition(t, held), held).tolist(),
                                   "ssim": ssim(condition(t, held), held).tolist()} for t in TASKS}  # fmt: skip
        res_path.write_text(json.dumps(results))
    base_state = base.state_dict()
    for seed in range(args.train_seeds):
        for method in args.methods:
            key = f"{method}/s{seed}"
            if key in results:
                continue
            model, ad, secs = train_method(method, base_state, data["train"], counts[method][0], args.steps,
                                           args.batch, seed, text, lrs[method], log)  # fmt: skip
            results[key] = evaluate(model, held, text, args.sample_steps, sample_seeds, ad.im)
            results[key]["train_seconds"] = secs
            res_path.write_text(json.dumps(results))
            log(f"{key}: " + ", ".join(f"{t} {mean_se(results[key][t]['psnr'])[0]:.2f} dB" for t in TASKS))
    (out / "table.md").write_text(table(results))
    log("\n" + table(results))


def table(results: dict) -> str:
    """Markdown: PSNR / SSIM mean +- s.e. per task and averaged, per method (training seeds pooled), and the paired
    differences instruct-moe - lora / token-moe over the training seeds both have, with the s.e. across seeds."""
    seeds = sorted({k.split("/s")[1] for k in results if "/s" in k})
    rows = ["| method | trainable params | " + " | ".join(f"{t} PSNR dB" for t in TASKS) + " | average PSNR dB | "
            + " | ".join(f"{t} SSIM" for t in TASKS) + " | average SSIM |",
            "|---|---|" + "---|" * (2 * len(TASKS) + 2)]  # fmt: skip

    def pooled(name: str, metric: str, task: str) -> list[float]:
        if name in ("base", "identity"):
            return results[name][task][metric]
        return [v for s in seeds if f"{name}/s{s}" in results for v in results[f"{name}/s{s}"][task][metric]]

    for name in ("identity", "base", *METHODS):
        if name not in results and not any(f"{name}/s{s}" in results for s in seeds):
            continue
        cells = []
        for metric in ("psnr", "ssim"):
            per = [pooled(name, metric, t) for t in TASKS]
            avg = np.mean(np.stack([np.asarray(p) for p in per]), 0)  # per (image, seed) average over the tasks
            fmt = "{:.2f} ± {:.2f}" if metric == "psnr" else "{:.3f} ± {:.3f}"
            cells += [fmt.format(*mean_se(p)) for p in per] + [fmt.format(*mean_se(avg))]
        label = {"identity": "condition as output", "base": "base (no adapter)"}.get(name, name)
        params = str(results["params"].get(name, "-"))
        rows.append(f"| {label} | {params} | " + " | ".join(cells) + " |")
    def diff(other: str, metric: str, task: str, seeds_: list[str]) -> np.ndarray:  # (images x samplings x seeds_,)
        return np.concatenate([np.asarray(results[f"instruct-moe/s{s}"][task][metric])
                               - np.asarray(results[f"{other}/s{s}"][task][metric]) for s in seeds_])  # fmt: skip

    paired = []
    for other in ("lora", "token-moe"):
        # pairs need the same training seeds on both sides: a partial run pairs only the seeds both have
        common = [s for s in seeds if f"instruct-moe/s{s}" in results and f"{other}/s{s}" in results]
        if not common:
            continue
        cells = ["{:+.2f} ± {:.2f}".format(*mean_se(diff(other, "psnr", t, common))) for t in TASKS]
        for metric in ("psnr", "ssim"):
            d = np.mean([diff(other, metric, t, common) for t in TASKS], 0)
            cells.append(("{:+.2f} ± {:.2f}" if metric == "psnr" else "{:+.4f} ± {:.4f}").format(*mean_se(d)))
        per_seed = [float(np.mean([diff(other, "psnr", t, [s]) for t in TASKS])) for s in common]
        cells.append("{:+.2f} ± {:.2f} (n = {})".format(*mean_se(per_seed), len(common)) if len(common) > 1 else "-")
        paired.append(f"| instruct-moe - {other} | " + " | ".join(cells) + " |")
    if paired:
        rows += ["", "Paired differences (same held-out image, sampling seed and training seed), mean ± s.e.; the last "
                 "column: the mean of each training seed, s.e. across those seeds:", "",
                 "| difference | " + " | ".join(f"{t} PSNR dB" for t in TASKS)
                 + " | average PSNR dB | average SSIM | average PSNR dB, across training seeds |",
                 "|---|" + "---|" * (len(TASKS) + 3), *paired]  # fmt: skip
    routed = [k for k in results if k.startswith("instruct-moe/") and "routing" in results[k][TASKS[0]]]
    if routed:
        rows.append("")
        rows.append("Mean expert weight per task (instruct-moe, all layers, " + routed[0] + "):")
        rows.append("")
        for t in TASKS:
            rows.append(f"- {t}: " + ", ".join(f"{w:.2f}" for w in results[routed[0]][t]["routing"]))
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
