"""Routing signals from the instruction: the official Perceiver resampler and the package's pooling options.

PerceiverResampler (official, Flamingo/IP-Adapter style; InstructMoLE src/resampler.py):
    latents (1, q, dim) learned; x = proj_in(T5 states)        no padding mask
    depth x:  latents += PerceiverAttention(x, latents)          keys/values over [x ; latents]
              latents += FeedForward(latents)                    LayerNorm, Linear(no bias), GELU, Linear(no bias)
    signal = dropout(norm_out(proj_out(latents))) + clip_pooled   (b, q, out)

MaskedResampler (the package's option): q learned queries cross-attend to the text states with the padding mask.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))  # fmt: skip


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, q_len, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (b, n, h*d) -> (b, h, n, d)
            return t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = ((q * scale) @ (k * scale).transpose(-2, -1)).float().softmax(-1).to(q.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(b, q_len, -1)
        return self.to_out(out)


class PerceiverResampler(nn.Module):
    """The official routing-signal network: 1 query, depth 2, 768-d, 12 heads of 64 by default."""

    def __init__(self, embedding_dim: int, output_dim: int, dim: int = 768, depth: int = 2, dim_head: int = 64,
                 heads: int = 12, num_queries: int = 1, ff_mult: int = 4, dropout: float = 0.1) -> None:  # fmt: skip
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )
        self.dropout = nn.Dropout(p=dropout)
        # one seed per sample of the next calls (the training loop sets them): sample i's dropout mask comes from
        # its own generator, so it does not depend on the batch split or global RNG; None: nn.Dropout (global RNG)
        self.dropout_seeds: list[int] | None = None

    def forward(self, x: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, L, embedding_dim) text states, pooled (b, output_dim) CLIP pooled vector or None -> (b, q, out)."""
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        out = self._dropout(self.norm_out(self.proj_out(latents)))
        return out if pooled is None else out + pooled.unsqueeze(1)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """nn.Dropout's rule (zero with probability p, scale the rest by 1 / (1 - p)), per sample from dropout_seeds."""
        seeds, p = self.dropout_seeds, self.dropout.p
        if seeds is None or not self.training or p == 0:
            return self.dropout(x)
        if len(seeds) != x.shape[0]:
            raise ValueError(f"PerceiverResampler: {x.shape[0]} samples but {len(seeds)} dropout seeds; set one per "
                             "sample or None")  # fmt: skip
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        keep = torch.stack([torch.rand(x.shape[1:], generator=g) >= p for g in gens]).to(x.device)
        return x * keep.to(x.dtype) / (1 - p)


class MaskedResampler(nn.Module):
    """The package's option: q learned queries cross-attend to the text states (one attention block + residual
    MLP) honouring the padding mask; mean over queries."""

    def __init__(self, dim: int, num_queries: int = 8, heads: int = 4) -> None:
        super().__init__()
        if dim % heads:
            heads = 1
        self.queries = nn.Parameter(torch.randn(num_queries, dim) / math.sqrt(dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_q, self.norm_kv, self.norm_out = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b = text.shape[0]
        q = self.norm_q(self.queries).unsqueeze(0).expand(b, -1, -1)  # (b, q, d)
        kv = self.norm_kv(text)
        pad = None if mask is None else ~mask.bool()  # True = ignore
        out, _ = self.attn(q, kv, kv, key_padding_mask=pad, need_weights=False)  # (b, q, d)
        out = out + self.mlp(self.norm_out(out))
        return out.mean(1)  # (b, d)
