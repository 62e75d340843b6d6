"""The mole-tiny architecture: a standard StableDiffusionPipeline, small enough to train on two CPU cores.

    64x64 px  --VAE (f=4)-->  Cx16x16 latents (C: 4 in v1, 8 in v2)  --UNet (SD1.5 layout, conv proj_in/out,
    3 levels, attention at 8x8 and 4x4)-->  epsilon
    captions  --CLIP BPE tokenizer (the real merges, vocabulary pruned to the corpus)-->  2-layer CLIP text encoder

Every component is a diffusers / transformers class with a plain config, so the saved folder loads with
`StableDiffusionPipeline.from_pretrained` and every mole command runs on it unchanged.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

RESOLUTION = 64
TEXT_DIM = 128


def pruned_clip_tokenizer(clip_folder: str | Path, texts: Iterable[str]):
    """The real CLIP BPE tokenizer with its vocabulary cut to the tokens `texts` use, every merge ancestor of those
    tokens and the 512 byte symbols; merges that produce a dropped token are dropped too, so an unseen word falls
    apart into smaller known pieces instead of becoming <unk>. Token ids are renumbered densely."""
    from transformers import CLIPTokenizer

    clip_folder = Path(clip_folder)
    full = CLIPTokenizer(str(clip_folder / "vocab.json"), str(clip_folder / "merges.txt"), model_max_length=77)
    merges = [
        tuple(line.split())
        for line in (clip_folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
        if line.strip()
    ]
    parents = {a + b: (a, b) for a, b in merges}
    encoder = json.loads((clip_folder / "vocab.json").read_text(encoding="utf-8"))
    order = sorted(encoder, key=encoder.get)
    keep: set[str] = set(order[:512])  # the byte symbols and their </w> forms come first
    keep.update(("<|startoftext|>", "<|endoftext|>"))
    stack = []
    for text in texts:
        stack.extend(full.tokenize(text))
    while stack:
        tok = stack.pop()
        if tok in keep:
            continue
        keep.add(tok)
        if tok in parents:
            stack.extend(parents[tok])
    kept_merges = [m for m in merges if m[0] + m[1] in keep]
    vocab = {tok: i for i, tok in enumerate(t for t in order if t in keep)}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(d) / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(" ".join(m) for m in kept_merges) + "\n", encoding="utf-8"
        )
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=77)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def build_vae(seed: int = 0, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
    )  # fmt: skip


def build_unet(seed: int = 0, latent_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1,
        block_out_channels=(32, 64, 128),  # attention at 8x8 and 4x4: 4.2 M parameters, ~0.5 s a batch of 32
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16, attention_head_dim=32, cross_attention_dim=TEXT_DIM,
    )  # fmt: skip


def build_text_encoder(vocab_size: int, bos: int, eos: int, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    ))  # fmt: skip


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )  # fmt: skip
