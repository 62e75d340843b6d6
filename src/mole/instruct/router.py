"""Instruction-Guided Routing (InstructMoLE): one routing signal per sample from the whole instruction, computed once
per denoiser call and shared by all layers, mapped per layer by that layer's gate to expert weights that apply
uniformly to every token of the layer.

    text states T (b, L, d_t), padding mask M (b, L), CLIP pooled vector p (b, d_p) when the model has one
    signal  z = PerceiverResampler(T) + p             (PERCEIVER, official: no padding mask)
            z = LayerNorm(masked_mean(T))             (MEAN, the package's option)
            z = LayerNorm(MaskedResampler(T, M))      (RESAMPLER, the package's option)
    layer l: indices, weights, aux_l = TopKGate_l(z)  softmax top-k (official: not renormalised) or sigmoid
    every MoLE layer l then computes X' = F(X) + sum_i w_l[i] * E_i(X)

Layers listed in `token_layers` route per token instead (the official token_route_overrides): their own TopKGate
over the layer's input tokens. The router is attached with forward pre-hooks; it follows the denoiser's train/eval
mode (noise, dropout and the balance loss are training-only, as in the official code).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..inject import mole_layers
from .gate import TopKGate, balance_from_mass, dense
from .resampler import MaskedResampler, PerceiverResampler


class Pooling(str, enum.Enum):
    PERCEIVER = "perceiver"
    MEAN = "mean"
    RESAMPLER = "resampler"


class Routing(str, enum.Enum):
    SOFTMAX_TOPK = "softmax_topk"
    SIGMOID = "sigmoid"


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
        *,
        pooled_dim: int | None = None,
        renormalize: bool = True,
        noise: bool = False,
        aux_loss_alpha: float = 0.0,
        balance: str = "counts",
        resampler: Mapping | None = None,
        token_layers: Mapping[str, int] | None = None,
        token_aux_loss_alpha: float = 0.01,
    ) -> None:
        super().__init__()
        self.pooling, self.routing = Pooling(pooling), Routing(routing)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k}: use 1..{num_experts} (the number of experts)")
        if balance not in ("counts", "mass"):
            raise ValueError(f"balance={balance!r}: use 'counts' (official) or 'mass'")
        token_layers = dict(token_layers or {})
        self.layer_paths = [p for p in layer_paths if p not in token_layers]
        self.token_paths = list(token_layers)
        if not self.layer_paths and not self.token_paths:
            raise ValueError("layer_paths is empty: inject experts first, then build the router from mole_layers()")
        self.num_experts, self.top_k, self.balance = num_experts, top_k, balance
        self.resampler: nn.Module | None = None
        self.norm: nn.Module | None = None
        if self.pooling is Pooling.PERCEIVER:
            signal_dim = pooled_dim or text_dim
            self.resampler = PerceiverResampler(text_dim, signal_dim, **dict(resampler or {}))
        else:
            signal_dim = text_dim
            if self.pooling is Pooling.RESAMPLER:
                self.resampler = MaskedResampler(text_dim, num_queries)
            self.norm = nn.LayerNorm(text_dim)
        self.signal_dim = signal_dim
        gate = lambda dim, alpha: TopKGate(dim, num_experts, top_k, alpha, renormalize, noise)  # noqa: E731
        self.gates = nn.ModuleList(gate(signal_dim, aux_loss_alpha) for _ in self.layer_paths)
        self.token_gates = nn.ModuleList(gate(token_layers[p], token_aux_loss_alpha) for p in self.token_paths)
        self.last_probs: torch.Tensor | None = None  # (layers, b, E) dense probabilities of the last call
        self.last_weights: torch.Tensor | None = None  # (layers, b, E) the weights the layers used
        self.last_aux: dict[str, torch.Tensor] = {}  # layer path -> its balance loss (training only)
        self._handles: list = []
        self._layers: list = []

    # ------------------------------------------------------------------ the signal and the per-layer weights
    def signal(self, text: torch.Tensor, mask: torch.Tensor | None = None,
               pooled: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """(b, L, d_t) text states (+ (b, L) mask, 1 = token; + (b, d_p) pooled) -> (b, d) routing signal."""
        text = text.float()
        if self.pooling is Pooling.PERCEIVER:  # official: every position attended to, the pooled vector added
            if pooled is not None and pooled.shape[-1] != self.signal_dim:
                raise ValueError(f"pooled vector has {pooled.shape[-1]} features, the router expects {self.signal_dim}")
            return self.resampler(text, None if pooled is None else pooled.float()).squeeze(1)
        if self.resampler is not None:
            z = self.resampler(text, mask)
        elif mask is None:
            z = text.mean(1)
        else:
            m = mask.float().unsqueeze(-1)
            z = (text * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.norm(z)

    def forward(self, text: torch.Tensor, mask: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Per-layer expert weights (layers, b, E) of the instruction-routed layers; balance losses in last_aux."""
        z = self.signal(text, mask, pooled)
        probs, weights = [], []
        self.last_aux = {}
        for path, gate in zip(self.layer_paths, self.gates):
            if self.routing is Routing.SIGMOID:
                p = w = torch.sigmoid(nn.functional.linear(z, gate.weight))
                if self.training and gate.alpha > 0:
                    self.last_aux[path] = gate.alpha * balance_from_mass(p, w)
            else:
                idx, topw, aux = gate(z)
                p, w = gate.last_scores, dense(idx, topw, self.num_experts)
                if aux is not None:
                    self.last_aux[path] = aux if self.balance == "counts" else gate.alpha * balance_from_mass(p, w)
            probs.append(p)
            weights.append(w)
        if not weights:
            return z.new_zeros(0, z.shape[0], self.num_experts)
        self.last_probs, self.last_weights = torch.stack(probs), torch.stack(weights)
        return self.last_weights

    def set_noise_seeds(self, seeds: list[int] | None) -> None:
        """One seed per sample of the next calls: each gate draws its training logit noise for sample i from a
        generator of (seeds[i], gate), the Perceiver resampler its dropout mask; None: the global RNG."""
        for i, gate in enumerate([*self.gates, *self.token_gates]):
            gate.noise_seeds = None if seeds is None else [(s * 1_000_003 + i) % 2**63 for s in seeds]
        if hasattr(self.resampler, "dropout_seeds"):  # the Perceiver's dropout mask, per sample too
            self.resampler.dropout_seeds = None if seeds is None else [(s * 1_000_003 - 1) % 2**63 for s in seeds]

    def route_tokens(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """Token-routed layer `path`: (b, n, d) input tokens -> (b, n, E) weights; its balance loss in last_aux."""
        gate = self.token_gates[self.token_paths.index(path)]
        tokens = x if x.ndim == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
        idx, topw, aux = gate(tokens)
        w = dense(idx, topw, self.num_experts)
        if aux is not None:
            mass = self.balance == "mass"
            self.last_aux[path] = gate.alpha * balance_from_mass(gate.last_scores, w) if mass else aux
        return w.view(*tokens.shape[:2], self.num_experts)

    # ------------------------------------------------------------------ attaching to a denoiser
    def attach(self, model: nn.Module) -> None:
        """Route on every call of `model` from its encoder_hidden_states (+ encoder_attention_mask, +
        pooled_projections) keyword arguments."""
        layers = mole_layers(model)
        missing = [p for p in self.layer_paths + self.token_paths if p not in layers]
        if missing:
            raise ValueError(f"the router was built for layers the model does not have: {missing[:3]}")
        self.detach()
        targets = [layers[p] for p in self.layer_paths]

        def hook(module, args, kwargs):
            if self.training != module.training:  # noise, dropout and balance follow the denoiser's mode
                self.train(module.training)
            text = kwargs.get("encoder_hidden_states")
            if text is None:
                raise ValueError("InstructMoLE routing needs encoder_hidden_states passed as a keyword argument")
            mask = kwargs.get("encoder_attention_mask")
            if mask is not None and mask.ndim == 3:  # a bias (b, 1, L): 0 keep, -10000 drop
                mask = mask[:, 0] > -1
            weights = self(text, mask, kwargs.get("pooled_projections"))
            for layer, w in zip(targets, weights):
                layer.routing = w
            return None

        def token_hook(path):
            def run(layer, args):
                layer.routing = self.route_tokens(path, args[0])
                return None

            return run

        self._handles = [model.register_forward_pre_hook(hook, with_kwargs=True)]
        self._handles += [layers[p].register_forward_pre_hook(token_hook(p)) for p in self.token_paths]
        self._layers = targets + [layers[p] for p in self.token_paths]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self._layers:
            layer.routing = None
        self._layers = []
