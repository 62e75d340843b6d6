"""Multi-conditional inputs for DiTs: condition images, encoded by the VAE, join the image tokens as extra tokens.

    tokens = [patch_embed(x_t) ; patch_embed(c) + type_embedding[condition type]]     (b, n + n_c, d)
    ... the transformer blocks see both (self-attention mixes them) ...
    output = unpatchify(final_layer(tokens[:, :n]))                                  (condition tokens dropped)

Implemented with two hooks on a diffusers PixArtTransformer2DModel (the forward itself is untouched): the
patch-embedding's output gets the condition tokens appended; the output norm's input gets them removed. The same
pattern fits SD3 / Flux blocks (append after x_embedder, drop before norm_out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ConditionTokens(nn.Module):
    """Learned per-type embeddings plus the hooks that carry condition tokens through a DiT."""

    def __init__(self, transformer: nn.Module, condition_types: Sequence[str]) -> None:
        super().__init__()
        for attr in ("pos_embed", "norm_out"):
            if not hasattr(transformer, attr):
                raise ValueError(
                    f"{type(transformer).__name__} has no {attr}: condition tokens need a PixArt-style DiT"
                )
        if not condition_types:
            raise ValueError("condition_types is empty: name the condition kinds, e.g. ['pose', 'edge']")
        self.types = list(condition_types)
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.type_embedding = nn.Embedding(len(self.types), dim)
        nn.init.normal_(self.type_embedding.weight, std=0.02)
        self.transformer = [transformer]  # a list: not registered as a submodule (it is not ours to save)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._n_image: int | None = None
        self._handles = [
            transformer.pos_embed.register_forward_hook(self._append),
            transformer.norm_out.register_forward_pre_hook(self._drop),
        ]

    def type_ids(self, names: Sequence[str]) -> torch.Tensor:
        unknown = sorted(set(names) - set(self.types))
        if unknown:
            raise ValueError(f"condition types {unknown} are unknown; this model knows {self.types}")
        return torch.tensor([self.types.index(n) for n in names])

    def set(self, latents: torch.Tensor | Sequence[torch.Tensor] | None,
            types: torch.Tensor | Sequence[str] | Sequence[Sequence[str]] | None = None) -> None:  # fmt: skip
        """Condition the next denoiser calls on `latents` (b, c, h, w) of `types` (b,); several conditions per
        sample: a list of latents (b, c, h_k, w_k) and a list of type lists, one per condition; None clears."""
        if latents is None:
            self._pending = None
            return
        if types is None:
            raise ValueError("types is missing: one condition type per sample")
        if isinstance(latents, torch.Tensor):
            latents, types = [latents], [types]
        if len(latents) != len(types):
            raise ValueError(f"{len(latents)} condition latents but {len(types)} lists of condition types")
        pending = []
        for x, t in zip(latents, types):
            ids = t if isinstance(t, torch.Tensor) else self.type_ids(t)
            if ids.shape[0] != x.shape[0]:
                raise ValueError(f"{x.shape[0]} condition latents but {ids.shape[0]} condition types")
            pending.append((x, ids))
        self._pending = pending

    def _append(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        self._n_image = output.shape[1]
        if self._pending is None:
            return output
        parts = [output]
        for latents, ids in self._pending:
            if latents.shape[0] != output.shape[0]:  # classifier-free guidance doubles the batch
                reps = output.shape[0] // latents.shape[0]
                latents, ids = latents.repeat(reps, 1, 1, 1), ids.repeat(reps)
            cond = module.forward(latents.to(output.dtype))  # the same patch embedding (and positions), no hooks
            parts.append(cond + self.type_embedding(ids.to(output.device)).to(output.dtype)[:, None, :])
        return torch.cat(parts, dim=1)

    def _drop(self, module: nn.Module, args):
        hidden = args[0]
        if self._n_image is not None and hidden.shape[1] > self._n_image:
            return (hidden[:, : self._n_image],) + tuple(args[1:])
        return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def routing_heatmap(
    weights_by_type: dict[str, torch.Tensor], expert_names: Sequence[str], path, title: str = "routing"
) -> None:
    """PNG heat map, experts (columns) x condition types (rows), of mean routing weight; values printed."""
    from PIL import Image, ImageDraw

    from ..inference.plot import _font, colormap

    rows = list(weights_by_type)
    cell, left, top = 56, 90, 40
    w = left + cell * len(expert_names) + 10
    h = top + cell * len(rows) + 10
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    values = torch.stack([weights_by_type[r].float() for r in rows])  # (types, E)
    lo, hi = float(values.min()), float(values.max())
    colors = colormap((values.numpy() - lo) / max(hi - lo, 1e-9))
    for i, r in enumerate(rows):
        d.text((4, top + i * cell + cell // 2 - 6), r[:14], fill=(0, 0, 0), font=_font(11))
        for j in range(len(expert_names)):
            x, y = left + j * cell, top + i * cell
            d.rectangle([x, y, x + cell - 2, y + cell - 2], fill=tuple(int(c) for c in colors[i, j]))
            d.text((x + 8, y + cell // 2 - 6), f"{float(values[i, j]):.2f}", fill=(0, 0, 0), font=_font(11))
    for j, name in enumerate(expert_names):
        d.text((left + j * cell + 4, top - 16), str(name)[:8], fill=(0, 0, 0), font=_font(11))
    d.text((4, 6), title, fill=(0, 0, 0), font=_font(13))
    img.save(path)


class KontextConditions:
    """Flux-Kontext conditions for training: condition latents (b, c, h, w) are packed into 2x2 patches, appended to
    the image tokens (the transformer's x_embedder embeds both) with RoPE ids whose first coordinate is 1, and the
    prediction keeps the image tokens only; FluxKontextPipeline(image=...) does the same at generation."""

    def __init__(self, transformer: nn.Module) -> None:
        if type(transformer).__name__ != "FluxTransformer2DModel":
            raise ValueError(f"Kontext conditions need a FluxTransformer2DModel, not {type(transformer).__name__}")
        self._pending: list[torch.Tensor] | None = None
        self._n_image: int | None = None
        self._handles = [
            transformer.register_forward_pre_hook(self._append, with_kwargs=True),
            transformer.register_forward_hook(self._drop),
        ]

    def set(self, latents: torch.Tensor | Sequence[torch.Tensor] | None) -> None:
        """Condition the next denoiser calls on `latents` (b, c, h, w) (even h, w), or on several condition
        latents of different sizes (a list, each (b, c, h_k, w_k)); None clears."""
        if latents is None:
            self._pending = None
            return
        items = [latents] if isinstance(latents, torch.Tensor) else list(latents)
        if not items:
            raise ValueError("condition latents: the list is empty; pass None for no condition")
        for k, x in enumerate(items):
            if x.ndim != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
                raise ValueError(f"condition latents must be (b, c, h, w) with even h, w; got {tuple(x.shape)}"
                                 f" (condition {k})")  # fmt: skip
            if x.shape[:2] != items[0].shape[:2]:
                raise ValueError(f"condition {k} has batch and channels {tuple(x.shape[:2])}, condition 0 has "
                                 f"{tuple(items[0].shape[:2])}; give every condition the same b and c")  # fmt: skip
        self._pending = items

    @staticmethod
    def pack(latents: torch.Tensor, w_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, c, h, w) -> tokens (b, h/2 * w/2, 4c) and their ids (h/2 * w/2, 3) with id[:, 0] = 1 and the
        width coordinate shifted by `w_offset` tokens."""
        from diffusers import FluxKontextPipeline

        b, c, h, w = latents.shape
        tokens = FluxKontextPipeline._pack_latents(latents, b, c, h, w)
        ids = FluxKontextPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        ids[..., 0] = 1
        ids[..., 2] += w_offset
        return tokens, ids

    @classmethod
    def pack_all(cls, items: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Several conditions: packed one after the other, placed side by side (the k-th one's width ids start
        where the (k-1)-th ended), as if stitched into one wide condition image; one condition = Kontext's own."""
        tokens, ids, offset = [], [], 0
        for x in items:
            t, i = cls.pack(x, offset)
            tokens.append(t)
            ids.append(i)
            offset += x.shape[-1] // 2
        return torch.cat(tokens, 1), torch.cat(ids, 0)

    def _append(self, module, args, kwargs):
        positional = "hidden_states" not in kwargs and bool(args)
        hidden = args[0] if positional else kwargs.get("hidden_states")
        self._n_image = None
        if self._pending is None or hidden is None:
            return None
        items = [x.to(hidden.device, hidden.dtype) for x in self._pending]
        if items[0].shape[0] != hidden.shape[0]:  # guidance doubles the batch
            items = [x.repeat(hidden.shape[0] // x.shape[0], 1, 1, 1) for x in items]
        tokens, ids = self.pack_all(items)
        self._n_image = hidden.shape[1]
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = torch.cat([hidden, tokens], dim=1)
        img_ids = kwargs["img_ids"]
        kwargs["img_ids"] = torch.cat([img_ids, ids.to(img_ids.device, img_ids.dtype)], dim=-2)
        return (tuple(args[1:]) if positional else tuple(args)), kwargs

    def _drop(self, module, args, output):
        n, self._n_image = self._n_image, None
        if n is None:
            return None
        if isinstance(output, tuple):
            return (output[0][:, :n],) + tuple(output[1:])
        output.sample = output.sample[:, :n]
        return output

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
