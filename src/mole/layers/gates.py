"""Gate parameters of one MoLE layer: the local (per-token) and global (per-sample) projections."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import GateInit, Gating, GlobalSource


class MoLEGates(nn.Module):
    """Learnable gate projections for E experts.

    local_weight  (E, d_in),  local_bias  (E,)  : s = sigmoid(X @ local_weight.T + local_bias)       -> (n, E)
    global_weight (E, d_in),  global_bias (E,)  : g = sigmoid(mean_n(X) @ global_weight.T + bias)     -> (E,)
      or, with GlobalSource.EXPERT_OUTPUT, global_weight (E, d_out): g_i = sigmoid(mean_n(Y_i) . w_i + c_i)
    Only the tensors the gating mode uses exist, so a saved file holds exactly what was trained.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        gating: Gating,
        global_source: GlobalSource,
        init: GateInit = GateInit.DEFAULT,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gating = gating
        self.global_source = global_source
        kw = {"dtype": dtype, "device": device}
        if gating.uses_local:
            self.local_weight = nn.Parameter(torch.empty(num_experts, in_features, **kw))
            self.local_bias = nn.Parameter(torch.empty(num_experts, **kw))
        if gating.uses_global:
            dim = in_features if global_source is GlobalSource.INPUT else out_features
            self.global_weight = nn.Parameter(torch.empty(num_experts, dim, **kw))
            self.global_bias = nn.Parameter(torch.empty(num_experts, **kw))
        self.reset_parameters(init, generator=generator)

    @torch.no_grad()
    def reset_parameters(self, init: GateInit = GateInit.DEFAULT, generator: torch.Generator | None = None) -> None:
        # generator: a seeded torch.Generator (CPU) makes the init a function of the run seed, not of global state
        for weight, bias in self._pairs():
            if init is GateInit.ZERO:
                weight.zero_()
                bias.zero_()
            else:  # torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
                bound = 1.0 / math.sqrt(weight.shape[1])
                weight.copy_(torch.empty(weight.shape).uniform_(-bound, bound, generator=generator))
                bias.copy_(torch.empty(bias.shape).uniform_(-bound, bound, generator=generator))

    def _pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        pairs = []
        if self.gating.uses_local:
            pairs.append((self.local_weight, self.local_bias))
        if self.gating.uses_global:
            pairs.append((self.global_weight, self.global_bias))
        return pairs

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, gating={self.gating.value}, global_source={self.global_source.value}"
