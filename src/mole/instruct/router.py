"""Instruction-Guided Routing (InstructMoLE): one routing signal per sample from the whole instruction, mapped per
layer to expert weights that apply uniformly to every token of that layer.

    text states T (b, L, d_t), mask M (b, L)
    signal  z = masked_mean(T)                        (POOL_MEAN)
            z = mean_q Attn(Q, T, T)                  (RESAMPLER: q learned queries, Perceiver-style)
    layer l: logits_l = z @ W_l + c_l                 (b, E)
             w_l = softmax top-k (renormalised)  or  sigmoid(logits_l)
    every MoLE layer l then computes X' = F(X) + sum_i w_l[i] * E_i(X)

The router is attached to the denoiser with a forward pre-hook: each denoiser call reads its
encoder_hidden_states / encoder_attention_mask, routes, and hands each layer its weights.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..inject import mole_layers


class Pooling(str, enum.Enum):
    MEAN = "mean"
    RESAMPLER = "resampler"


class Routing(str, enum.Enum):
    SOFTMAX_TOPK = "softmax_topk"
    SIGMOID = "sigmoid"


class Resampler(nn.Module):
    """q learned queries cross-attend to the text states (one attention block + residual MLP); mean over queries."""

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


class InstructRouter(nn.Module):
    def __init__(
        self,
        text_dim: int,
        layer_paths: Sequence[str],
        num_experts: int,
        pooling: Pooling | str = Pooling.MEAN,
        routing: Routing | str = Routing.SOFTMAX_TOPK,
        top_k: int = 2,
        num_queries: int = 8,
    ) -> None:
        super().__init__()
        self.pooling, self.routing = Pooling(pooling), Routing(routing)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k}: use 1..{num_experts} (the number of experts)")
        if not layer_paths:
            raise ValueError("layer_paths is empty: inject experts first, then build the router from mole_layers()")
        self.layer_paths = list(layer_paths)
        self.num_experts, self.top_k = num_experts, top_k
        self.resampler = Resampler(text_dim, num_queries) if self.pooling is Pooling.RESAMPLER else None
        self.norm = nn.LayerNorm(text_dim)
        # one (d_t -> E) head per layer, stored stacked: (layers, d_t, E)
        self.weight = nn.Parameter(torch.randn(len(self.layer_paths), text_dim, num_experts) * 0.02)
        self.bias = nn.Parameter(torch.zeros(len(self.layer_paths), num_experts))
        self.last_probs: torch.Tensor | None = None  # (layers, b, E) dense probabilities of the last call
        self.last_weights: torch.Tensor | None = None  # (layers, b, E) the weights the layers used
        self._handle = None

    def signal(self, text: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(b, L, d_t) text states (+ (b, L) mask, 1 = token) -> (b, d_t) routing signal."""
        if self.resampler is not None:
            z = self.resampler(text.float(), mask)
        elif mask is None:
            z = text.float().mean(1)
        else:
            m = mask.float().unsqueeze(-1)
            z = (text.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.norm(z)

    def forward(self, text: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-layer expert weights (layers, b, E)."""
        z = self.signal(text, mask)
        logits = torch.einsum("bd,lde->lbe", z, self.weight) + self.bias[:, None, :]
        if self.routing is Routing.SIGMOID:
            probs = weights = torch.sigmoid(logits)
        else:
            probs = logits.softmax(-1)
            if self.top_k < self.num_experts:
                top = probs.topk(self.top_k, dim=-1)
                kept = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
                weights = kept / kept.sum(-1, keepdim=True)
            else:
                weights = probs
        self.last_probs, self.last_weights = probs, weights
        return weights

    # ------------------------------------------------------------------ attaching to a denoiser
    def attach(self, model: nn.Module) -> None:
        """Route on every call of `model` from its encoder_hidden_states (+ encoder_attention_mask) keyword args."""
        layers = mole_layers(model)
        missing = [p for p in self.layer_paths if p not in layers]
        if missing:
            raise ValueError(f"the router was built for layers the model does not have: {missing[:3]}")
        self.detach()
        targets = [layers[p] for p in self.layer_paths]

        def hook(module, args, kwargs):
            text = kwargs.get("encoder_hidden_states")
            if text is None:
                raise ValueError("InstructMoLE routing needs encoder_hidden_states passed as a keyword argument")
            mask = kwargs.get("encoder_attention_mask")
            if mask is not None and mask.ndim == 3:  # a bias (b, 1, L): 0 keep, -10000 drop
                mask = mask[:, 0] > -1
            weights = self(text, mask)
            for layer, w in zip(targets, weights):
                layer.routing = w
            return None

        self._handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        self._layers = targets

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            for layer in self._layers:
                layer.routing = None


def load_balance_loss(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Switch-style balance over a batch, averaged over layers: E * sum_i f_i * P_i, where f_i is the fraction of
    routing mass the layer sends to expert i (after top-k) and P_i the mean dense probability; 1.0 when balanced.
    probs, weights: (layers, b, E)."""
    e = probs.shape[-1]
    f = weights.detach().mean(1)  # (layers, E)
    f = f / f.sum(-1, keepdim=True).clamp_min(1e-12)
    p = probs.mean(1)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return (e * (f * p).sum(-1)).mean()


def orthogonality_loss(cosines: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean squared off-diagonal cosine similarity of the experts' outputs, over layers and samples."""
    vals = []
    for c in cosines:  # (b, E, E)
        e = c.shape[-1]
        off = c.pow(2).sum((-1, -2)) - c.diagonal(dim1=1, dim2=2).pow(2).sum(-1)
        vals.append(off / max(1, e * (e - 1)))
    return torch.stack(vals).mean() if vals else torch.zeros(())


def schedule_weight(base: float, step: int, decay: str, decay_steps: int) -> float:
    """A loss weight at `step`: constant ('none'), or decayed to 0 over decay_steps ('linear' / 'cosine')."""
    if decay == "none" or decay_steps <= 0:
        return base
    t = min(1.0, step / decay_steps)
    if decay == "linear":
        return base * (1 - t)
    if decay == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"decay={decay!r}: use none, linear or cosine")
