"""`mole pretrain`: train mole-tiny from scratch on real faces, hands and scenes, on a CPU, reproducibly.

    images (64 px) --phase 1--> VAE (f=4, L1 + tiny KL)
    latents cached --phase 2--> UNet + CLIP text encoder jointly (epsilon, Min-SNR-5, AdamW, EMA, 10 % empty captions)
    export        --> out/pipeline (a StableDiffusionPipeline folder), out/data/{face,hand,mix,*_test} for stages 2-3

Every random draw of step k is a function of (seed, phase, k), and checkpoints hold the models, the EMA, the
optimizer and the loss history, so `resume=True` continues a killed run to the same weights. Loss curves (jsonl and
PNG) and sample sheets land in out/.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .corpus import KINDS, Item, collect_corpus, summarize
from .model import RESOLUTION, build_scheduler, build_text_encoder, build_unet, build_vae, pruned_clip_tokenizer

logger = logging.getLogger(__name__)

SAMPLE_PROMPTS = [
    "a close-up photo of a face", "a black and white close-up photo of a man's face",
    "a close-up photo of a hand showing two fingers", "a close-up photo of the palm of a woman's right hand",
    "a man riding a skateboard down the street", "a group of people standing on a beach",
]  # fmt: skip


class PretrainError(ValueError):
    """A pretraining option or input is invalid; the message names it and the fix."""


@dataclass
class PretrainOptions:
    data: str  # a folder laid out like ../shared/data (see mole.pretrain.corpus)
    tokenizer: str  # a folder with CLIP's vocab.json + merges.txt
    out: str = "runs/mole-tiny"
    vae_steps: int = 2400  # mole-tiny v2 (v1: 600 steps, 4 latent channels, no edge term; steps 2200)
    steps: int = 3200
    batch_size: int = 32
    vae_batch_size: int = 16
    lr: float = 3e-4
    vae_lr: float = 1e-3
    latent_channels: int = 8
    vae_edge_weight: float = 1.0  # weight of the image-gradient L1 term (edges, see edge_l1); 0 = v1's objective
    warmup: int = 100
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    base_fraction: float = 0.25  # of the training close-ups the base sees (the experts see all)
    mix: dict[str, float] = field(default_factory=lambda: {"scene": 0.4, "face": 0.3, "hand": 0.3})
    checkpoint_every: int = 250
    sample_every: int = 1000
    sample_steps: int = 25  # DDIM steps of the sample sheets
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    threads: int | None = None
    limit: int | None = None  # at most this many images per (kind, split) group: quick runs and tests

    def __post_init__(self) -> None:
        for name, least in (("vae_steps", 0), ("steps", 0), ("batch_size", 1), ("vae_batch_size", 1),
                            ("checkpoint_every", 1), ("sample_every", 1), ("latent_channels", 1)):  # fmt: skip
            if getattr(self, name) < least:
                raise PretrainError(f"{name}={getattr(self, name)}: use a positive number")
        if self.vae_edge_weight < 0:
            raise PretrainError(f"vae_edge_weight={self.vae_edge_weight}: use 0 (no edge term) or a positive weight")
        for name in ("lr", "vae_lr"):
            if not 0 < getattr(self, name) < 1:
                raise PretrainError(f"{name}={getattr(self, name)}: use a learning rate in (0, 1), e.g. 3e-4")
        if not 0 <= self.caption_dropout < 1 or not 0 < self.base_fraction <= 1 or not 0 < self.ema_decay < 1:
            raise PretrainError("caption_dropout must be in [0, 1), base_fraction in (0, 1], ema_decay in (0, 1)")
        if set(self.mix) != set(KINDS) or any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise PretrainError(f"mix={self.mix}: give a non-negative weight for each of {KINDS}")
        if self.resume and self.overwrite:
            raise PretrainError("resume and overwrite exclude each other: resume continues the run, overwrite "
                                "starts it again")  # fmt: skip


# ------------------------------------------------------------------------------------------------------ images
def _square_crops(img: Image.Image, kind: str) -> list[Image.Image]:
    """Close-ups: the centred square. Scenes: three squares along the long side (sliding windows)."""
    w, h = img.size
    s = min(w, h)
    if kind != "scene":
        # ORL faces are taller than wide: keep the upper-middle square, where the face is
        top = (h - s) // 3 if h > w else 0
        left = (w - s) // 2
        return [img.crop((left, top, left + s, top + s))]
    offsets = [0, (max(w, h) - s) // 2, max(w, h) - s]
    return [img.crop((o, 0, o + s, s)) if w >= h else img.crop((0, o, s, o + s)) for o in dict.fromkeys(offsets)]


def load_images(items: list[Item]) -> tuple[torch.Tensor, list[int]]:
    """uint8 (n, 3, 64, 64) tensor of every crop and, per crop, the index of its item."""
    from ..data.dataset import load_rgb

    crops, owner = [], []
    for idx, item in enumerate(items):
        try:
            img = load_rgb(item.path)
        except (OSError, ValueError) as exc:
            logger.warning("skipping unreadable %s (%s)", item.path, exc)
            continue
        for crop in _square_crops(img, item.kind):
            arr = np.asarray(crop.resize((RESOLUTION, RESOLUTION), Image.BICUBIC), dtype=np.uint8)
            crops.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
            owner.append(idx)
    if not crops:
        raise PretrainError("no readable image in the corpus")
    return torch.stack(crops), owner


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def _gen(seed: int, phase: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + phase * 100_000_007 + step)


# ------------------------------------------------------------------------------------------------ checkpoints
def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------- phases
def edge_l1(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the horizontal and vertical image gradients of rec and x, (n, c, h, w) each.

    A plain L1 / L2 objective lets the decoder average away fine detail (eyes, fingers), which costs little in pixel
    error but is what the face / hand detectors look at; this term charges a blurred edge directly. It is 0 for
    rec = x + constant and grows as rec's edges are smoothed.
    """
    dx = (rec[..., :, 1:] - rec[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])  # (n, c, h, w-1)
    dy = (rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])  # (n, c, h-1, w)
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


def train_vae(vae, images: torch.Tensor, o: PretrainOptions, out: Path, progress: Callable | None = None) -> list:
    ckpt_path = out / "checkpoints" / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=o.vae_lr, weight_decay=0.0)
    state = _load(ckpt_path) if o.resume else None
    start, history = 0, []
    if state:
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        start, history = state["step"], state["history"]
    vae.train()
    for step in range(start, o.vae_steps):
        g = _gen(o.seed, 1, step)
        idx = torch.randint(len(images), (o.vae_batch_size,), generator=g)
        x = to_unit(images[idx])
        flip = torch.rand(len(idx), generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        for group in opt.param_groups:
            group["lr"] = o.vae_lr * 0.5 * (1 + math.cos(math.pi * step / max(o.vae_steps, 1)))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        loss = l1 + 0.5 * (rec - x).pow(2).mean() + 1e-6 * post.kl().mean()
        if o.vae_edge_weight:
            loss = loss + o.vae_edge_weight * edge_l1(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        history.append({"step": step + 1, "l1": round(l1.item(), 5)})
        if progress:
            progress("vae", step + 1, o.vae_steps, float(l1))
        if (step + 1) % o.checkpoint_every == 0 or step + 1 == o.vae_steps:
            _save_atomic({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1, "history": history},
                         ckpt_path)  # fmt: skip
    vae.eval()
    return history


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image and of its mirror image: (2n, C, 16, 16) each."""
    means, stds = [], []
    for flip in (False, True):
        for i in range(0, len(images), batch):
            x = to_unit(images[i : i + batch])
            post = vae.encode(x.flip(-1) if flip else x).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


class _EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.shadow = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]

    @torch.no_grad()
    def update(self, modules: list[torch.nn.Module], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for shadow, m in zip(self.shadow, modules):
            for k, v in m.state_dict().items():
                if v.is_floating_point():
                    shadow[k].lerp_(v, 1 - d)
                else:
                    shadow[k].copy_(v)


def train_denoiser(unet, text_encoder, tokenizer, vae, latents, lat_std, captions, kinds, o: PretrainOptions,
                   out: Path, scaling: float, progress: Callable | None = None) -> tuple[_EMA, list]:  # fmt: skip
    """latents/lat_std (n, C, 16, 16): posterior of each training crop; captions[i], kinds[i] of crop i."""
    from ..training.loss import diffusion_loss

    sched = build_scheduler()
    alphas = sched.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=1e-2)
    ema = _EMA([unet, text_encoder], o.ema_decay)
    ckpt_path = out / "checkpoints" / "denoiser.pt"
    state = _load(ckpt_path) if o.resume else None
    start, history = 0, []
    if state:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        ema.shadow = state["ema"]
        start, history = state["step"], state["history"]
    pools = {k: torch.tensor([i for i, kk in enumerate(kinds) if kk == k]) for k in KINDS}
    names = [k for k in KINDS if len(pools[k]) and o.mix[k] > 0]
    weights = torch.tensor([o.mix[k] for k in names])
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    unet.train()
    text_encoder.train()
    t0 = time.perf_counter()
    for step in range(start, o.steps):
        g = _gen(o.seed, 2, step)
        which = torch.multinomial(weights, o.batch_size, replacement=True, generator=g)
        idx = torch.stack([pools[names[w]][torch.randint(len(pools[names[w]]), (1,), generator=g)][0] for w in which])
        z0 = (latents[idx] + lat_std[idx] * torch.randn(latents[idx].shape, generator=g)) * scaling
        caps = []
        for i in idx.tolist():
            options = captions[i]
            caps.append(options[int(torch.randint(len(options), (1,), generator=g))])
        ids = tokenizer(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        drop = torch.rand(len(caps), generator=g) < o.caption_dropout
        ids[drop] = empty
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(caps),), generator=g)
        noisy = sched.add_noise(z0, noise, t)
        lr = o.lr * min(1.0, (step + 1) / max(o.warmup, 1))
        lr *= 0.55 + 0.45 * math.cos(math.pi * step / max(o.steps, 1))  # cosine to 10 % of the peak
        for group in opt.param_groups:
            group["lr"] = lr
        hidden = text_encoder(ids)[0]
        pred = unet(noisy, t, hidden).sample
        loss = diffusion_loss(pred, noise, t, alphas, "epsilon", o.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update([unet, text_encoder], step)
        history.append({"step": step + 1, "loss": round(loss.item(), 5), "lr": lr})
        if progress:
            progress("denoiser", step + 1, o.steps, float(loss))
        done = step + 1
        if done % o.checkpoint_every == 0 or done == o.steps:
            _save_atomic({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "opt": opt.state_dict(),
                          "ema": ema.shadow, "step": done, "history": history}, ckpt_path)  # fmt: skip
            logger.info("step %d/%d loss %.4f (%.2f s/step)", done, o.steps, loss, (time.perf_counter() - t0) /
                        max(done - start, 1))  # fmt: skip
        if done % o.sample_every == 0 and done != o.steps:
            _sample_sheet(unet, text_encoder, tokenizer, vae, ema, out / "samples" / f"step{done:06d}.png", o.seed,
                          o.sample_steps)
            unet.train()
            text_encoder.train()
    unet.eval()
    text_encoder.eval()
    return ema, history


# ------------------------------------------------------------------------------------------------- pipelines
def _assemble(unet, text_encoder, tokenizer, vae):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


@torch.no_grad()
def _sample_sheet(unet, text_encoder, tokenizer, vae, ema: _EMA | None, path: Path, seed: int, steps: int = 25) -> Path:
    import copy

    from ..inference.plot import grid

    u, te = unet, text_encoder
    if ema is not None:
        u, te = copy.deepcopy(unet), copy.deepcopy(text_encoder)
        u.load_state_dict(ema.shadow[0])
        te.load_state_dict(ema.shadow[1])
    pipe = _assemble(u.eval(), te.eval(), tokenizer, vae)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for k, prompt in enumerate(SAMPLE_PROMPTS):
        images += pipe([prompt] * 2, num_inference_steps=steps, guidance_scale=4.0, height=RESOLUTION, width=RESOLUTION,
                       generator=torch.Generator().manual_seed(seed + k)).images  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, cols=4, labels=[p[:28] for p in SAMPLE_PROMPTS for _ in range(2)]).save(path)
    return path


# ------------------------------------------------------------------------------------------------- data export
def export_sets(items: list[Item], images: torch.Tensor, owner: list[int], out: Path) -> dict[str, str]:
    """The stage-2/3 sets as captioned 64 px folders (one .txt beside each .png): face, hand (all training
    close-ups), mix (the base's own mix: scenes + the close-ups it saw), and the held-out *_test sets."""
    sets = {"face": lambda i: i.kind == "face" and i.split == "train",
            "hand": lambda i: i.kind == "hand" and i.split == "train",
            "mix": lambda i: i.split == "train" and i.in_base,
            "face_test": lambda i: i.kind == "face" and i.split == "test",
            "hand_test": lambda i: i.kind == "hand" and i.split == "test",
            "scene_test": lambda i: i.kind == "scene" and i.split == "test"}  # fmt: skip
    paths = {}
    for name, keep in sets.items():
        folder = out / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        for n, (img, idx) in enumerate(zip(images, owner)):
            item = items[idx]
            if not keep(item):
                continue
            stem = f"{item.kind}_{n:05d}"
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(item.captions[n % len(item.captions)], encoding="utf-8")
        paths[name] = str(folder)
    return paths


# ---------------------------------------------------------------------------------------------------- driver
def pretrain(o: PretrainOptions, progress: Callable | None = None) -> dict:
    """Run both phases (or continue them with resume=True); return a JSON-ready summary (also out/pretrain.json)."""
    out = Path(o.out)
    if o.threads:
        torch.set_num_threads(o.threads)
    marker = out / "pretrain_options.json"
    if out.exists() and any(out.iterdir()) and not (o.resume or o.overwrite):
        raise PretrainError(f"output folder {str(out)!r} already holds a run: pass resume to continue it, overwrite "
                            "to start again, or another out folder")  # fmt: skip
    if o.resume and marker.is_file():
        old = json.loads(marker.read_text())
        changed = [k for k in ("data", "seed", "batch_size", "vae_batch_size", "base_fraction", "mix", "lr", "limit",
                               "latent_channels", "vae_edge_weight", "vae_lr")
                   if old.get(k) != asdict(o).get(k)]  # fmt: skip
        if changed:
            raise PretrainError(f"resume with changed options {changed}: the run in {str(out)!r} was made with "
                                f"{ {k: old.get(k) for k in changed} }; use the same values or a new out folder")
    if o.overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(asdict(o), indent=2))
    t0 = time.perf_counter()

    items = collect_corpus(o.data, o.base_fraction, o.limit)
    images, owner = load_images(items)
    texts = [c for i in items for c in i.captions] + SAMPLE_PROMPTS
    coco = Path(o.data) / "prompts" / "coco_captions_val2017.json"
    if coco.is_file():  # the evaluation prompts' words, so COCO Human Prompts tokenize into known pieces
        texts += [a["caption"] for a in json.loads(coco.read_text())["annotations"]]
    from ..experiment import FACE_PROMPTS, HAND_PROMPTS

    tokenizer = pruned_clip_tokenizer(o.tokenizer, texts + FACE_PROMPTS + HAND_PROMPTS)
    logger.info("corpus %s, %d crops, vocabulary %d", summarize(items), len(images), len(tokenizer))

    vae = build_vae(o.seed, o.latent_channels)
    train_idx = [n for n, i in enumerate(owner) if items[i].split == "train"]
    vae_hist = train_vae(vae, images[train_idx], o, out, progress)

    base_idx = [n for n in range(len(owner)) if items[owner[n]].in_base]
    means, stds = encode_latents(vae, images[base_idx])
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    caps = [items[owner[n]].captions for n in base_idx] * 2
    kinds = [items[owner[n]].kind for n in base_idx] * 2

    unet = build_unet(o.seed, o.latent_channels)
    text_encoder = build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, o.seed)
    ema, hist = train_denoiser(unet, text_encoder, tokenizer, vae, means, stds, caps, kinds, o, out, scaling, progress)
    unet.load_state_dict(ema.shadow[0])
    text_encoder.load_state_dict(ema.shadow[1])

    pipe = _assemble(unet, text_encoder, tokenizer, vae)
    # stored in fp16 (half the package size); every later stage trains on, and fingerprints, these rounded weights
    pipe.to(torch.float16).save_pretrained(out / "pipeline")
    pipe.to(torch.float32)  # back in fp32 with the rounded values: the final sample sheet shows what ships
    sheet = _sample_sheet(unet, text_encoder, tokenizer, vae, None, out / "samples" / "final.png", o.seed,
                          o.sample_steps)
    with (out / "losses.jsonl").open("w") as fh:
        for row in hist:
            fh.write(json.dumps(row) + "\n")
    from ..inference.plot import line_chart

    smooth = np.convolve([r["loss"] for r in hist], np.ones(50) / 50, mode="valid").tolist() if len(hist) > 50 else \
        [r["loss"] for r in hist]  # fmt: skip
    line_chart({"loss (50-step mean)": smooth}, out / "loss.png", title="mole-tiny denoiser loss", xlabel="step")
    sets = export_sets(items, images, owner, out)
    summary = {
        "pipeline": str(out / "pipeline"), "samples": str(sheet), "data": sets, "corpus": summarize(items),
        "crops": len(images), "vocabulary": len(tokenizer), "scaling_factor": scaling,
        "vae_l1_last100": float(np.mean([r["l1"] for r in vae_hist[-100:]])) if vae_hist else None,
        "loss_first100": float(np.mean([r["loss"] for r in hist[:100]])),
        "loss_last100": float(np.mean([r["loss"] for r in hist[-100:]])),
        "steps": o.steps, "vae_steps": o.vae_steps, "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2))
    return summary
