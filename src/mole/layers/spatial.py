"""MoLE on a spatial convolution (3x3, strided: the resnet and down/upsampler convs LoCon experts cover).

A LoCon expert is a conv A_i like the base's (kernel, stride, padding) followed by a 1x1 conv B_i:
E_i(X) = B_i * (A_i * X) * alpha_i / r_i. The local gate s_i is per input pixel, and because A_i mixes
neighbouring pixels, E_i(X * s_i) is NOT s_i * E_i(X): every expert's down-conv runs on its own gated input.

    s   = sigmoid(X @ phi + b)                 per input pixel   (b, n_in, E)
    g   = sigmoid(mean(X) @ w + c)             or, official variant, sigmoid(w_i . mean(scale_i * E_i(X)) + c_i)
    X'  = F(X) + sum_i g_i * E_i(X * s_i)

Fused path: the gate projections of all experts in one GEMM over the pixels; the down-convs of all experts in one
grouped conv over [X * s_1, ..., X * s_E] (a loop when ranks differ); every B_i in one GEMM. The global gate of the
official variant pools each expert's ungated output without forming it: (B_i^T w_i) . mean(A_i * X).
`forward_naive` is the literal formula, expert by expert, with F.conv2d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import GlobalSource
from .lora import LoraPair
from .mole_layer import MoLELayer, is_pointwise


class SpatialMoLELayer(MoLELayer):
    """A MoLELayer around a spatial nn.Conv2d (any kernel, stride, padding, dilation; groups 1)."""

    def __init__(self, base, expert_names, experts, config, path: str = "", seed: int = 0) -> None:
        if is_pointwise(base):
            raise ValueError(f"layer {path!r}: {base} is pointwise; wrap it with MoLELayer")
        super().__init__(base, expert_names, experts, config, path, seed)

    def _down(self, x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The base conv's geometry with `weight` (no bias): the down factor of every expert."""
        b = self.base
        return F.conv2d(x, weight, None, b.stride, b.padding, b.dilation, groups)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"layer {self.path!r}: a Conv2d input must be (b, c, h, w), got {tuple(x.shape)}")

    def _gate_logits(self, tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(local (b, n, e), global (b, e) from the input) in one GEMM over the input pixels."""
        parts, dtype, e = [], tokens.dtype, self.num_experts
        if self.gating.uses_local:
            parts.append(self.gates.local_weight)
        input_global = self.gating.uses_global and self.global_source is GlobalSource.INPUT
        if input_global:
            parts.append(self.gates.global_weight)
        if not parts:
            return None, None
        z = F.linear(tokens, torch.cat([p.to(dtype) for p in parts], 0))  # (b, n, e | 2e)
        local = glob = None
        col = 0
        if self.gating.uses_local:
            local = torch.sigmoid(z[..., :e] + self.gates.local_bias.to(dtype))
            col = e
        if input_global:
            glob = torch.sigmoid(z[..., col : col + e].mean(1) + self.gates.global_bias.to(dtype))
        return local, glob

    def _gated_down(self, x: torch.Tensor, local: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Every expert's down-conv on X * s_i, stacked on the channel axis: (b, R, h', w')."""
        b, c, h, w = x.shape
        s = local.transpose(1, 2).reshape(b, -1, 1, h, w)  # (b, e, 1, h, w)
        if self._uniform_rank:  # one grouped conv: group i sees X * s_i and holds expert i's rows of A
            xs = (x.unsqueeze(1) * s).reshape(b, -1, h, w)  # (b, e*c, h, w)
            return self._down(xs, weight, groups=self.num_experts)
        parts, start = [], 0
        for i, r in enumerate(self.ranks):
            if r:
                parts.append(self._down(x * s[:, i], weight[start : start + r]))
                start += r
        return torch.cat(parts, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.forward_naive(x)
        self._check_input(x)
        out = self.base(x)
        dtype = x.dtype
        tokens = x.flatten(2).transpose(1, 2)  # (b, n, c) input pixels
        weight = self.lora_A.to(dtype)  # (R, c, kh, kw)
        local, glob = self._gate_logits(tokens)
        plain = None  # (b, R, h', w') ungated down activations, when needed
        if local is not None:
            h = self._gated_down(x, local, weight)
        else:
            h = plain = self._down(x, weight)
        needs_plain = (self.gating.uses_global and self.global_source is GlobalSource.EXPERT_OUTPUT) or (
            self.track_orthogonality
        )
        if needs_plain and plain is None:
            plain = self._down(x, weight)
        plain_tokens = plain.flatten(2).transpose(1, 2) if plain is not None else None  # (b, n', R)
        if self.gating.uses_global and self.global_source is GlobalSource.EXPERT_OUTPUT:
            glob = self._global_from_expert_output(plain_tokens, dtype)
        coef = (self.expert_scale * self.expert_weight).to(dtype).view(1, 1, -1)  # (1, 1, e)
        if glob is not None:
            coef = coef * glob[:, None, :]
        if self.routing is not None:
            coef = coef * self.routing.to(dtype)[:, None, :]
            glob = self.routing if glob is None else glob
        if self.recorder is not None:
            self.recorder.record(self, local, glob, x)
        if self.track_orthogonality:
            self._track(self._output_inner(plain_tokens))
        ho, wo = h.shape[-2:]
        hc = self._expand_rows(coef, h.flatten(2).transpose(1, 2))  # (b, n', R)
        y = F.linear(hc, self.lora_B.to(dtype))  # (b, n', o)
        return out + y.transpose(1, 2).reshape(out.shape[0], -1, ho, wo)

    def forward_naive(self, x: torch.Tensor) -> torch.Tensor:
        """The formula literally, one expert at a time: F(X) + sum_i g_i * E_i(X * s_i), E_i a conv pair."""
        self._check_input(x)
        out = self.base(x)
        b, _, h, w = x.shape
        dtype = x.dtype
        tokens = x.flatten(2).transpose(1, 2)  # (b, n, c)
        gates = self.gates
        total = torch.zeros_like(out)
        locals_, globals_, ungated = [], [], []
        for i, name in enumerate(self.expert_names):
            pair = self.expert(name)
            s_i = g_i = None
            if self.gating.uses_local:
                s_i = torch.sigmoid(tokens @ gates.local_weight[i].to(dtype) + gates.local_bias[i].to(dtype))  # (b, n)
            if self.gating.uses_global and self.global_source is GlobalSource.INPUT:
                g_i = torch.sigmoid(tokens.mean(1) @ gates.global_weight[i].to(dtype) + gates.global_bias[i].to(dtype))
            if pair is None:
                if self.gating.uses_global and g_i is None:
                    g_i = torch.sigmoid(gates.global_bias[i].to(dtype)).expand(b)
                locals_.append(s_i)
                globals_.append(g_i)
                ungated.append(None)
                continue
            gated = x * s_i.view(b, 1, h, w) if s_i is not None else x
            y_i = self._lora_conv(pair, gated)  # (b, o, h', w')
            if self.track_orthogonality:
                ungated.append(self._lora_conv(pair, x))
            if self.gating.uses_global and g_i is None:  # official variant: pool the expert's own scaled output
                pooled = self._lora_conv(pair, x).mean((2, 3))  # (b, o)
                g_i = torch.sigmoid(pooled @ gates.global_weight[i].to(dtype) + gates.global_bias[i].to(dtype))
            if g_i is not None:
                y_i = y_i * g_i[:, None, None, None]
            if self.routing is not None:
                y_i = y_i * self.routing[:, i].to(dtype)[:, None, None, None]
            total = total + y_i * self.expert_weight[i].to(dtype)
            locals_.append(s_i)
            globals_.append(g_i)
        if self.recorder is not None:
            local = torch.stack(locals_, -1) if self.gating.uses_local else None
            glob = torch.stack(globals_, -1) if self.gating.uses_global else None
            self.recorder.record(self, local, glob, x)
        if self.track_orthogonality:
            flat = torch.stack([torch.zeros_like(out) if u is None else u for u in ungated], 1).flatten(2).float()
            self._track(flat @ flat.transpose(1, 2))  # (b, e, e) inner products of the ungated outputs
        return out + total

    def _lora_conv(self, pair: LoraPair, x: torch.Tensor) -> torch.Tensor:
        """E(x) = up * (down * x) * alpha / r with the base conv's geometry for down and a 1x1 up."""
        down, up = pair.factors_for_file()
        return F.conv2d(self._down(x, down.to(x.dtype)), up.to(x.dtype)) * pair.scale


def mole_layer_for(base, expert_names, experts, config, path: str = "", seed: int = 0) -> MoLELayer:
    """A MoLELayer for a Linear or pointwise conv, a SpatialMoLELayer for any other Conv2d; `seed` seeds the gates."""
    cls = MoLELayer if is_pointwise(base) else SpatialMoLELayer
    return cls(base, expert_names, experts, config, path, seed)
