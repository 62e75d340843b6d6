"""The official InstructMoLE routing pieces and losses (yanq095/InstructMoLE, src/lora_moe.py), same interfaces.

    TopKGate(embed_dim, num_experts, top_k, aux_loss_alpha)       weight (E, D), kaiming-uniform, no bias
        logits = h @ W^T  (+ randn / E in training)
        scores = softmax(logits);  weights, indices = topk(scores, k)       (NOT renormalised: sum < 1)
        aux    = alpha * E * sum_i f_i P_i   (training, alpha > 0)
                 f_i = hard top-k count of expert i averaged over rows (sums to k),  P_i = mean_rows scores_i
    expert_orthogonality(Y)   Y (E, N, D): sum_{i != j} cos(Y_i, Y_j)^2 / (E (E - 1)), each Y_i flattened
    cosine_decay(step, total) = min + (1 - min) (1 + cos(pi step / total)) / 2, then min (min = 1e-5)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init


class TopKGate(nn.Module):
    """Top-k softmax gate; rows of `h` (..., D) are routed independently (one row per sample for instruction
    routing, one per token for token routing). forward(h) -> (indices (N, k), weights (N, k), aux_loss | None)."""

    def __init__(self, embed_dim: int, num_experts: int = 16, top_k: int = 2, aux_loss_alpha: float = 0.01,
                 renormalize: bool = False, noise: bool = True) -> None:  # fmt: skip
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k}: use 1..num_experts ({num_experts})")
        if aux_loss_alpha < 0:
            raise ValueError(f"aux_loss_alpha={aux_loss_alpha}: use 0 or more")
        self.embed_dim, self.num_experts, self.top_k, self.alpha = embed_dim, num_experts, top_k, aux_loss_alpha
        self.renormalize = renormalize  # the package's option: top-k weights rescaled to sum to 1
        self.noise = noise  # training-time logit noise randn / E
        self.weight = nn.Parameter(torch.empty(num_experts, embed_dim))
        self.last_scores: torch.Tensor | None = None  # (N, E) dense softmax scores of the last call
        # one seed per sample of the next calls (the training loop sets them): the logit noise of sample i's rows
        # comes from its own generator, so it does not depend on the batch split or global RNG; None: global RNG
        self.noise_seeds: list[int] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"aux_loss_alpha={self.alpha}, renormalize={self.renormalize}")  # fmt: skip

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if hidden_states.shape[-1] != self.embed_dim:
            raise ValueError(f"TopKGate: input has {hidden_states.shape[-1]} features, expected {self.embed_dim}")
        logits = F.linear(hidden_states.reshape(-1, self.embed_dim), self.weight.to(hidden_states.dtype))
        if self.training and self.noise:
            logits = logits + self._noise(logits) * (1.0 / self.num_experts)
        scores = logits.softmax(dim=-1)
        weights, indices = torch.topk(scores, k=self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        self.last_scores = scores
        aux = None
        if self.training and self.alpha > 0.0:
            aux = self.alpha * balance_from_counts(indices, scores)
        return indices, weights, aux


    def _noise(self, logits: torch.Tensor) -> torch.Tensor:
        """N(0, 1) like logits (N, E): from the global RNG, or per sample from noise_seeds (N = b * rows each)."""
        seeds = self.noise_seeds
        if seeds is None:
            return torch.randn_like(logits)
        if not seeds or logits.shape[0] % len(seeds):
            raise ValueError(f"TopKGate: {logits.shape[0]} rows of logits do not split over {len(seeds)} noise seeds "
                             "(one per sample); set noise_seeds for this batch or None")  # fmt: skip
        rows = logits.shape[0] // len(seeds)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return torch.cat([torch.randn(rows, logits.shape[1], generator=g) for g in gens]).to(logits)


def balance_from_counts(indices: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i P_i with f_i = hard top-k counts per row averaged over rows (sums to k), P_i = mean scores.
    indices (N, k), scores (N, E). No gradient flows through f (counts), only through P."""
    e = scores.shape[-1]
    f = F.one_hot(indices, num_classes=e).sum(dim=1).float().mean(dim=0)  # (E,)
    return e * (f * scores.float().mean(dim=0)).sum()


def balance_from_mass(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The package's option: E * sum_i f_i P_i with f_i the (detached) routed weight mass per expert normalised to
    1 and P_i the mean probability normalised to 1; 1.0 when balanced. probs, weights (N, E)."""
    e = probs.shape[-1]
    f = weights.detach().float().mean(0)
    f = f / f.sum().clamp_min(1e-12)
    p = probs.float().mean(0)
    p = p / p.sum().clamp_min(1e-12)
    return e * (f * p).sum()


def dense(indices: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N, k) indices + weights -> (N, E) with zeros for the experts not chosen (differentiable in weights)."""
    return torch.zeros(*indices.shape[:-1], num_experts, dtype=weights.dtype, device=weights.device).scatter(
        -1, indices, weights
    )


def expert_orthogonality(expert_outputs: torch.Tensor) -> torch.Tensor:
    """expert_outputs (E, N, D), ungated: mean over ordered pairs i != j of cos(Y_i, Y_j)^2, each Y_i flattened."""
    e = expert_outputs.shape[0]
    flat = expert_outputs.reshape(e, -1).float()
    return cosine_penalty((flat @ flat.t())[None])[0]


def cosine_penalty(inner: torch.Tensor) -> torch.Tensor:
    """(..., E, E) inner products of flattened outputs -> (...) sum of squared off-diagonal cosines / (E (E - 1));
    norms clamped at 1e-12 as F.normalize does."""
    e = inner.shape[-1]
    if e < 2:
        return inner.new_zeros(inner.shape[:-2])
    norms = inner.diagonal(dim1=-2, dim2=-1).clamp_min(1e-24).sqrt()
    cos = inner / (norms[..., :, None] * norms[..., None, :])
    off = 1 - torch.eye(e, device=inner.device, dtype=cos.dtype)
    return (cos * off).pow(2).sum((-1, -2)) / (e * (e - 1))


def decay_weight(step: int, total: int, shape: str = "cosine", min_value: float = 1e-5) -> float:
    """The aux-loss multiplier at `step` (optimizer steps done): 'cosine' (official: 1 -> min_value), 'linear', or
    'none' (1); min_value from `total` on."""
    if shape == "none":
        return 1.0
    if shape not in ("cosine", "linear"):
        raise ValueError(f"decay={shape!r}: use none, linear or cosine")
    if total <= 0:
        raise ValueError(f"decay={shape!r} needs the number of decay steps (got {total}); set instruct.decay_steps")
    if step >= total:
        return min_value
    t = step / total
    frac = 0.5 * (1 + math.cos(math.pi * t)) if shape == "cosine" else 1 - t
    return min_value + (1.0 - min_value) * frac


def cosine_decay(current_step: int, total_steps: int, min_value: float = 1e-5) -> float:
    """The official schedule of the aux-loss weight (train_kontext.py get_cosine_decay_schedule)."""
    return decay_weight(current_step, total_steps, "cosine", min_value)
