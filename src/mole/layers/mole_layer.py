"""The MoLE layer: a frozen base layer F plus E frozen low-rank experts mixed by learnable gates.

    s   = sigmoid(X @ phi + b)                    (n, E)  local gate, per token
    g   = sigmoid(mean_n(X) @ w + c)              (E,)    global gate, per sample
    Y_i = g_i * E_i(X * s_i),  E_i = B_i A_i * alpha_i / r_i
    X'  = F(X) + sum_i Y_i

Since E_i is linear, E_i(X * s_i) = s_i * E_i(X): the fused path runs every expert's A and the gate projections
in one GEMM over X, scales the low-rank activations by s * g * alpha / r, and runs every expert's B in a second
GEMM that also adds F(X). `forward_naive` computes the formula above literally, expert by expert; it is the
reference the fused path is tested against.

Axis names used in shape comments: b batch, n tokens, d input features, o output features, e experts,
r stacked rank rows of all experts (R = sum of the experts' ranks at this layer).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Gating, GlobalSource, MoLEConfig
from .fused import LowRankMix, MergedMix, choose_path, dense_experts, expand_rows, merged_per_sample
from .gates import MoLEGates
from .lora import LoraPair


def is_pointwise(module: nn.Module) -> bool:
    """A Linear, or a Conv2d that acts on every pixel alone (1x1, stride 1, unpadded, ungrouped): MoLELayer's case."""
    if type(module) is nn.Linear:
        return True
    return (
        type(module) is nn.Conv2d
        and tuple(module.kernel_size) == (1, 1)
        and tuple(module.stride) == (1, 1)
        and module.groups == 1
        and tuple(module.dilation) == (1, 1)
        and module.padding in (0, (0, 0), "valid")
    )


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear, channels of a Conv2d; a wrapped layer's base is looked through."""
    module = getattr(module, "base", module)
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return module.in_features, module.out_features


def check_wrappable(module: nn.Module, path: str) -> None:
    """Raise a ValueError naming `path` when `module` cannot be wrapped (Linear and ungrouped Conv2d can)."""
    if type(module) is nn.Conv2d:
        bad = []
        if module.groups != 1:
            bad.append(f"groups={module.groups}")
        if module.padding_mode != "zeros":
            bad.append(f"padding_mode={module.padding_mode!r}")
        if bad:
            raise ValueError(
                f"module {path!r} is a Conv2d with {', '.join(bad)}; MoLE wraps ungrouped, zero-padded "
                "convolutions only. Remove it from the targets."
            )
    elif type(module) is not nn.Linear:  # subclasses (peft, quantised layers) compute something else
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        hint = " (a peft LoRA layer: call unload_lora() / unload() first)" if "peft" in kind else ""
        raise ValueError(
            f"module {path!r} is a {kind}{hint}; MoLE wraps torch.nn.Linear and torch.nn.Conv2d only. "
            "Remove it from the targets."
        )


def gate_seed(path: str, seed: int = 0) -> int:
    """The seed of a layer's gate init: the run seed and the layer path, so every process and every run with the
    same seed starts from the same gates, whatever the global RNG holds. 32 bits: torch's CPU generator (mt19937)
    keeps only the low 32 bits of a seed. Seed 0 gives crc32(path), the init of files trained before the seed."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed}: use an integer in [0, 2**32)")
    return zlib.crc32(path.encode(), seed)


class MoLELayer(nn.Module):
    """Wraps one nn.Linear or 1x1 nn.Conv2d (kept as `.base`, untouched) with named low-rank experts and gates.

    Spatial convolutions (3x3, strided: LoCon experts) use the subclass `SpatialMoLELayer`; `mole_layer_for` picks.
    """

    def __init__(
        self,
        base: nn.Module,
        expert_names: Sequence[str],
        experts: Mapping[str, LoraPair],
        config: MoLEConfig,
        path: str = "",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_wrappable(base, path)
        if type(self) is MoLELayer and not is_pointwise(base):
            raise ValueError(
                f"layer {path!r}: a Conv2d with kernel_size={tuple(base.kernel_size)}, stride={tuple(base.stride)}, "
                f"padding={base.padding!r} is spatial; MoLELayer wraps Linear and pointwise convs, SpatialMoLELayer "
                "the others (mole.layers.mole_layer_for picks)"
            )
        if not expert_names:
            raise ValueError(f"layer {path!r}: a MoLE layer needs at least one expert name")
        unknown = sorted(set(experts) - set(expert_names))
        if unknown:
            raise ValueError(
                f"layer {path!r}: experts {unknown} are not among the layer's expert names {list(expert_names)}"
            )
        if not any(experts.get(n) is not None for n in expert_names):
            raise ValueError(f"layer {path!r}: none of the experts {list(expert_names)} has weights for this layer")
        self.base = base
        self.path = path
        self.is_conv = isinstance(base, nn.Conv2d)
        self.in_features = base.in_channels if self.is_conv else base.in_features
        self.out_features = base.out_channels if self.is_conv else base.out_features
        self.expert_names: tuple[str, ...] = tuple(expert_names)
        self.gating: Gating = config.gating
        self.global_source: GlobalSource = config.global_source
        self.fused = True  # False routes forward() through forward_naive()
        self.recorder = None  # set by mole.recording.record_gates
        # (b, e) per-sample or (b, n, e) per-token expert weights set by an external router
        self.routing: torch.Tensor | None = None
        # True: forward() leaves the experts' output inner products in last_inner and cosines in last_cosine
        self.track_orthogonality = False
        self.last_inner: torch.Tensor | None = None  # (b, e, e) <Y_i, Y_j> per sample, Y_i ungated
        self.last_cosine: torch.Tensor | None = None  # (b, e, e)

        ref = base.weight
        downs, ups, ranks, scales = [], [], [], []
        for name in self.expert_names:
            pair = experts.get(name)
            if pair is None:  # this expert has no weights here: rank 0, contributes nothing
                ranks.append(0)
                scales.append(0.0)
                continue
            if pair.in_features != self.in_features or pair.out_features != self.out_features:
                raise ValueError(
                    f"layer {path!r}: expert {name!r} has shape (in {pair.in_features}, out {pair.out_features}) "
                    f"but the base layer is (in {self.in_features}, out {self.out_features}); "
                    "the expert was trained for another model"
                )
            kernel = tuple(base.kernel_size) if self.is_conv else (1, 1)
            if pair.kernel_size != kernel:
                raise ValueError(
                    f"layer {path!r}: expert {name!r} has a {pair.kernel_size} down kernel but the base layer's "
                    f"kernel is {kernel}; the expert was trained for another model"
                )
            downs.append(pair.down.detach().to(device=ref.device, dtype=ref.dtype))
            ups.append(pair.up.detach().to(device=ref.device, dtype=ref.dtype))
            ranks.append(pair.rank)
            scales.append(pair.scale)
        self.ranks: tuple[int, ...] = tuple(ranks)
        self.alphas: tuple[float, ...] = tuple(s * r for s, r in zip(scales, ranks))
        # Stacked factors: rows of lora_A / columns of lora_B are grouped expert by expert in expert_names order.
        self.lora_A = nn.Parameter(torch.cat(downs, 0), requires_grad=False)  # (r, d)
        self.lora_B = nn.Parameter(torch.cat(ups, 1), requires_grad=False)  # (o, r)
        owner = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks))  # (r,) expert of each row
        self.register_buffer("rank_owner", owner.to(ref.device), persistent=False)
        self.register_buffer(
            "expert_scale", torch.tensor(scales, dtype=torch.float32, device=ref.device), persistent=False
        )  # (e,) alpha_i / r_i
        # (e,) user multipliers on top of the gates (fixed-weight mixing, ablations); 1 = as trained
        self.register_buffer("expert_weight", torch.ones(len(ranks), device=ref.device), persistent=False)
        active = [r for r in ranks if r > 0]
        self._uniform_rank = active[0] if len(active) == len(ranks) and len(set(active)) == 1 else 0
        self.gates = MoLEGates(
            len(self.expert_names),
            self.in_features,
            self.out_features,
            config.gating,
            config.global_source,
            config.gate_init,
            dtype=ref.dtype,
            device=ref.device,
            # a function of the run seed and the layer name, never of global RNG state (seed 0: crc32 of the path)
            generator=torch.Generator().manual_seed(gate_seed(path, seed)),
        )
        self._aug_cache: tuple[tuple, torch.Tensor] | None = None
        self._dense_cache: tuple[tuple, torch.Tensor] | None = None
        # Speed / memory switches of the fused path (results are the same either way, up to rounding):
        self.keep_activations = False  # training: keep h = X A^T for the backward (more memory, one GEMM less)
        self.dense_ok = True  # inference: cache dense expert weights where they cost fewer FLOPs than rank R

    # ------------------------------------------------------------------ conveniences
    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    @property
    def weight(self) -> torch.Tensor:  # code that reads `layer.weight` (dtype checks, fusing) sees the base's
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def expert(self, name: str) -> LoraPair | None:
        """The named expert's factors at this layer (views of the stacked weights), or None if it has none here."""
        if name not in self.expert_names:
            raise KeyError(f"layer {self.path!r} has no expert {name!r}; experts are {list(self.expert_names)}")
        i = self.expert_names.index(name)
        if self.ranks[i] == 0:
            return None
        start = sum(self.ranks[:i])
        rows = slice(start, start + self.ranks[i])
        return LoraPair(self.lora_A[rows], self.lora_B[:, rows], self.alphas[i], conv=self.is_conv)

    def extra_repr(self) -> str:
        experts = ", ".join(f"{n}(r={r})" for n, r in zip(self.expert_names, self.ranks))
        return f"experts=[{experts}], gating={self.gating.value}, fused={self.fused}"

    # ------------------------------------------------------------------ shapes
    def _to_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """View x as (b, n, d) tokens; return the tokens and a function mapping (b, n, o) back to F(x)'s layout."""
        if self.is_conv:
            if x.ndim != 4:
                raise ValueError(f"layer {self.path!r}: a Conv2d input must be (b, c, h, w), got {tuple(x.shape)}")
            b, _, h, w = x.shape
            return x.flatten(2).transpose(1, 2), lambda y: y.transpose(1, 2).reshape(b, -1, h, w)
        if x.ndim < 2:
            raise ValueError(f"layer {self.path!r}: input must have a batch axis, got shape {tuple(x.shape)}")
        if x.ndim == 2:  # (b, d): one token per sample
            return x[:, None, :], lambda y: y[:, 0, :]
        lead = x.shape[:-1]
        return x.reshape(x.shape[0], -1, x.shape[-1]), lambda y: y.reshape(*lead, y.shape[-1])

    # ------------------------------------------------------------------ fused path
    def _augmented_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """[A; phi; w] stacked on the output axis, shape (r + e_local + e_global, d), so one GEMM computes all."""
        parts = [self.lora_A]
        if self.gating.uses_local:
            parts.append(self.gates.local_weight)
        if self.gating.uses_global and self.global_source is GlobalSource.INPUT:
            parts.append(self.gates.global_weight)
        if len(parts) == 1:
            return parts[0].to(dtype)
        if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
            return torch.cat([p.to(dtype) for p in parts], 0)
        # Inference: the stack only changes when a part does (in-place updates bump _version).
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in parts) + (dtype,)
        if self._aug_cache is None or self._aug_cache[0] != key:
            with torch.no_grad():
                self._aug_cache = (key, torch.cat([p.to(dtype) for p in parts], 0))
        return self._aug_cache[1]

    def _expand_rows(self, coef: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h (b, n, r) times the per-expert coefficient coef (b, n|1, e), broadcast to each expert's rank rows."""
        r = self._uniform_rank
        if r:
            b, n, rows = h.shape
            return (h.view(b, n, -1, r) * coef.unsqueeze(-1)).view(b, n, rows)
        return h * coef.index_select(-1, self.rank_owner)

    def _global_from_expert_output(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Official variant, computed without forming each expert's output:
        logit_i = w_i . mean_n(scale_i * B_i h_i) + c_i = scale_i * (B_i^T w_i) . mean_n(h_i) + c_i."""
        w_rows = self.gates.global_weight.to(dtype).index_select(0, self.rank_owner)  # (r, o)
        v = (self.lora_B.to(dtype).t() * w_rows).sum(-1)  # (r,)  B_i^T w_i for every row
        row_scale = self.expert_scale.to(dtype).index_select(0, self.rank_owner)  # (r,)
        pooled = h.mean(1) * (v * row_scale)  # (b, r)
        logits = h.new_zeros(h.shape[0], self.num_experts).index_add(1, self.rank_owner, pooled)  # (b, e)
        return torch.sigmoid(logits + self.gates.global_bias.to(dtype))

    def _output_inner(self, h: torch.Tensor) -> torch.Tensor:
        """(b, e, e) inner products of the experts' flattened (ungated) outputs Y_i = scale_i B_i h_i, per sample,
        without forming them: <Y_i, Y_j> = scale_i scale_j sum_{r in i, s in j} (H^T H)_{rs} (B^T B)_{rs}."""
        hf = h.float()
        gram_h = torch.einsum("bnr,bns->brs", hf, hf)  # (b, r, r)
        bf = self.lora_B.float()
        gram_b = bf.t() @ bf  # (r, r)
        onehot = torch.nn.functional.one_hot(self.rank_owner, self.num_experts).float()  # (r, e)
        inner = torch.einsum("brs,re,sf->bef", gram_h * gram_b, onehot, onehot)  # (b, e, e) block sums
        scale = self.expert_scale.float()
        return inner * scale[:, None] * scale[None, :]

    def _track(self, inner: torch.Tensor) -> None:
        self.last_inner = inner
        norms = inner.diagonal(dim1=1, dim2=2).clamp_min(1e-24).sqrt()  # (b, e): max(|Y_i|, 1e-12)
        self.last_cosine = inner / (norms[:, :, None] * norms[:, None, :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.forward_naive(x)
        if (
            self.track_orthogonality
            or (self.gating.uses_global and self.global_source is GlobalSource.EXPERT_OUTPUT)
            or self.lora_A.requires_grad
            or self.lora_B.requires_grad
        ):  # these need every expert's low-rank activations h, or weight gradients for the experts (stage 2)
            return self._forward_stacked(x)
        return self._forward_fast(x)

    # ------------------------------------------------------------------ fast paths (frozen experts)
    def _gate_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        """[phi; w] (e_local + e_global, d): the gate projections that read the input, or None."""
        parts = []
        if self.gating.uses_local:
            parts.append(self.gates.local_weight)
        if self.gating.uses_global:
            parts.append(self.gates.global_weight)
        if not parts:
            return None
        return parts[0].to(dtype) if len(parts) == 1 else torch.cat([p.to(dtype) for p in parts], 0)

    def _coefficients(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """coef (b, n|1, e) = alpha_i / r_i * expert_weight_i * s_i * g_i * routing_i, and the gates (local, global)."""
        dtype = tokens.dtype
        e = self.num_experts
        coef = (self.expert_scale * self.expert_weight).to(dtype).view(1, 1, e)
        local = glob = None
        gate_w = self._gate_weight(dtype)
        if gate_w is not None:
            col = 0
            if self.gating.uses_local:
                z = F.linear(tokens, gate_w)  # (b, n, e_local + e_global): one pass over x for both gates
                local = torch.sigmoid(z[..., :e] + self.gates.local_bias.to(dtype))  # (b, n, e)
                coef = coef * local
                col = e
                pooled = z[..., col:].mean(1) if self.gating.uses_global else None
            else:
                pooled = F.linear(tokens.mean(1), gate_w)  # mean_n(X) @ w: the global gate needs no per-token GEMM
            if self.gating.uses_global:
                glob = torch.sigmoid(pooled + self.gates.global_bias.to(dtype))  # (b, e)
                coef = coef * glob[:, None, :]
        if self.routing is not None:
            coef = coef * self.routing.to(dtype)[:, None, :]
            glob = self.routing if glob is None else glob
        return coef, local, glob

    def _base_weight_2d(self) -> torch.Tensor:
        w = self.base.weight
        return w[:, :, 0, 0] if self.is_conv else w

    def _dense_stack(self, dtype: torch.dtype) -> torch.Tensor:
        """[W; B_1 A_1; ...; B_e A_e] ((1 + e) o, d), cached until the base or the experts change."""
        w = self._base_weight_2d()
        key = tuple((p.data_ptr(), p._version) for p in (w, self.lora_A, self.lora_B)) + (dtype,)
        if self._dense_cache is None or self._dense_cache[0] != key:
            with torch.no_grad():
                dense = [w.to(dtype)]
                for name in self.expert_names:
                    pair = self.expert(name)
                    # unscaled B_i A_i: coef carries alpha_i / r_i
                    d_i = torch.zeros_like(dense[0]) if pair is None else pair.up.float() @ pair.down.float()
                    dense.append(d_i.to(dtype))
                self._dense_cache = (key, torch.cat(dense, 0))
        return self._dense_cache[1]

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        tokens, restore = self._to_tokens(x)  # (b, n, d)
        dtype = tokens.dtype
        b, n, d = tokens.shape
        o, rows, e = self.out_features, self.lora_A.shape[0], self.num_experts
        coef, local, glob = self._coefficients(tokens)
        if self.recorder is not None:
            self.recorder.record(self, local, glob, x)
        if torch.is_grad_enabled() and (tokens.requires_grad or coef.requires_grad):
            frozen_base = not any(p.requires_grad for p in self.base.parameters())
            if frozen_base and coef.shape[1] == 1 and choose_path(n, d, o, rows, e, True, False) == "merged":
                bias = None if self.base.bias is None else self.base.bias.to(dtype)
                y = MergedMix.apply(tokens, self._base_weight_2d().to(dtype), bias, self.lora_A.to(dtype),
                                    self.lora_B.to(dtype), coef.expand(b, 1, e), self.rank_owner,
                                    self._uniform_rank)  # fmt: skip
                return restore(y)
            out = self.base(x)
            fuse = not self.is_conv and out.is_contiguous()
            y = LowRankMix.apply(
                out.reshape(-1, o) if fuse else None, tokens, self.lora_A.to(dtype), self.lora_B.to(dtype), coef,
                self.rank_owner, self._uniform_rank, self.keep_activations,
            )
            return y.view(out.shape) if fuse else out + restore(y)
        bias = None if self.base.bias is None else self.base.bias.to(dtype)
        # no dense cache under torch.compile (its invalidation check is Python state); merged needs none
        path = choose_path(n, d, o, rows, e, coef.shape[1] == 1, self.dense_ok and not torch.compiler.is_compiling())
        if path == "merged":  # one coefficient per sample, many tokens
            y = merged_per_sample(tokens, self._base_weight_2d().to(dtype), bias, self.lora_A.to(dtype),
                                  self.lora_B.to(dtype), coef.expand(b, 1, e), self.rank_owner)  # fmt: skip
            return restore(y)
        if path == "dense":
            return restore(dense_experts(tokens, self._dense_stack(dtype), bias, coef.expand(b, -1, e)))
        out = self.base(x)
        hc = expand_rows(F.linear(tokens, self.lora_A.to(dtype)), coef, self.rank_owner, self._uniform_rank)
        if not self.is_conv and out.is_contiguous():
            return torch.addmm(out.reshape(-1, o), hc.reshape(-1, rows), self.lora_B.to(dtype).t()).view(out.shape)
        return out + restore(F.linear(hc, self.lora_B.to(dtype)))

    # ------------------------------------------------------------------ stacked path (needs h or expert grads)
    def _forward_stacked(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        tokens, restore = self._to_tokens(x)  # (b, n, d)
        dtype = tokens.dtype
        rows = self.lora_A.shape[0]
        e = self.num_experts
        z = F.linear(tokens, self._augmented_weight(dtype))  # (b, n, r + e_local + e_global)
        h = z[..., :rows]  # (b, n, r) low-rank activations of every expert
        coef = (self.expert_scale * self.expert_weight).to(dtype)  # (e,)
        local = glob = None
        col = rows
        if self.gating.uses_local:
            local = torch.sigmoid(z[..., col : col + e] + self.gates.local_bias.to(dtype))  # (b, n, e)
            coef = coef * local
            col += e
        if self.gating.uses_global:
            if self.global_source is GlobalSource.INPUT:  # mean_n(X) @ w == mean_n(X @ w)
                glob = torch.sigmoid(z[..., col : col + e].mean(1) + self.gates.global_bias.to(dtype))  # (b, e)
            else:
                glob = self._global_from_expert_output(h, dtype)
            coef = coef * glob[:, None, :]
        if self.routing is not None:  # InstructMoLE: per sample (the same for every token) or per token
            r = self.routing.to(dtype)
            coef = coef * (r[:, None, :] if r.ndim == 2 else r)
            glob = self.routing if glob is None and r.ndim == 2 else glob
        if coef.ndim == 1:
            coef = coef.view(1, 1, e)
        if self.recorder is not None:
            self.recorder.record(self, local, glob, x)
        if self.track_orthogonality:
            self._track(self._output_inner(h))
        hc = self._expand_rows(coef, h)  # (b, n, r)
        if not self.is_conv and out.is_contiguous():
            o = self.out_features
            y = torch.addmm(out.reshape(-1, o), hc.reshape(-1, rows), self.lora_B.to(dtype).t())  # F(X) + sum Y_i
            return y.view(out.shape)
        return out + restore(F.linear(hc, self.lora_B.to(dtype)))

    # ------------------------------------------------------------------ reference path
    def forward_naive(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's formula, one expert at a time: F(X) + sum_i g_i * E_i(X * s_i)."""
        out = self.base(x)
        tokens, restore = self._to_tokens(x)  # (b, n, d)
        dtype = tokens.dtype
        gates = self.gates
        total = torch.zeros(*tokens.shape[:2], self.out_features, dtype=dtype, device=tokens.device)
        locals_, globals_, ungated = [], [], []
        for i, name in enumerate(self.expert_names):
            pair = self.expert(name)
            s_i = g_i = None
            if self.gating.uses_local:
                s_i = torch.sigmoid(tokens @ gates.local_weight[i].to(dtype) + gates.local_bias[i].to(dtype))  # (b, n)
            if self.gating.uses_global and self.global_source is GlobalSource.INPUT:
                g_i = torch.sigmoid(tokens.mean(1) @ gates.global_weight[i].to(dtype) + gates.global_bias[i].to(dtype))
            if pair is None:
                if self.gating.uses_global and g_i is None:  # no expert output to pool: the logit is the bias alone
                    g_i = torch.sigmoid(gates.global_bias[i].to(dtype)).expand(tokens.shape[0])
                locals_.append(s_i)
                globals_.append(g_i)
                ungated.append(torch.zeros_like(total))
                continue
            if self.track_orthogonality:
                ungated.append(_lora(pair, tokens))
            y_i = _lora(pair, tokens * s_i[..., None] if s_i is not None else tokens)  # (b, n, o)
            if self.gating.uses_global and g_i is None:  # official variant: pool the expert's own scaled output
                pooled = _lora(pair, tokens).mean(1)  # (b, o)
                g_i = torch.sigmoid(pooled @ gates.global_weight[i].to(dtype) + gates.global_bias[i].to(dtype))
            if g_i is not None:
                y_i = y_i * g_i[:, None, None]
            if self.routing is not None:
                r = self.routing[..., i].to(dtype)
                y_i = y_i * (r[:, None, None] if r.ndim == 1 else r[..., None])
            y_i = y_i * self.expert_weight[i].to(dtype)
            total = total + y_i
            locals_.append(s_i)
            globals_.append(g_i)
        if self.recorder is not None:
            local = torch.stack(locals_, -1) if self.gating.uses_local else None
            glob = torch.stack(globals_, -1) if self.gating.uses_global else None
            self.recorder.record(self, local, glob, x)
        if self.track_orthogonality:
            flat = torch.stack(ungated, 1).flatten(2).float()  # (b, e, n*o)
            self._track(flat @ flat.transpose(1, 2))
        return out + restore(total)


def _lora(pair: LoraPair, x: torch.Tensor) -> torch.Tensor:
    """E(x) = B (A x) * alpha / r for x (..., d) -> (..., o)."""
    return (x @ pair.down.to(x.dtype).t()) @ pair.up.to(x.dtype).t() * pair.scale
