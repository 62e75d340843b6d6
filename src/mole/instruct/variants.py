"""InstructConfig: the `official` variant (the published code's settings, the default) and the `package` variant
(this package's earlier choices); every field left unset takes its variant's value, any field can be overridden.

official (yanq095/InstructMoLE train_config.json, src/lora_moe.py, train_kontext.py):
    8 experts, top-4, rank 32, alpha 32, A ~ U(+-1/sqrt(rank)), B = 0, on ff.net.2 + single blocks' proj_out;
    Perceiver resampler over the T5 states (+ CLIP pooled), per-layer TopKGate with train noise, no renormalisation;
    LB = 0.1 * E * sum f_i P_i (hard counts); ortho weight 0.01 over the whole batch; summed over layers;
    cosine decay 1 -> 1e-5; a shared rank-256 LoRA trained jointly; gate lr 5e-5; conditions dropped on 5 % of steps.
package: masked-mean pooling, renormalised top-2 of 4 experts, per-sample orthogonality 0.1, mass-based balance 0.01,
    averaged over layers, no decay, experts on every DiT block layer, no shared LoRA.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields

from torch import nn

from ..targets import TARGETS, Backbone, detect_backbone
from .router import Pooling, Routing


class Decay(str, enum.Enum):
    NONE = "none"
    LINEAR = "linear"
    COSINE = "cosine"


class Variant(str, enum.Enum):
    OFFICIAL = "official"
    PACKAGE = "package"


VARIANTS: dict[Variant, dict] = {
    Variant.OFFICIAL: dict(
        num_experts=8, top_k=4, rank=32, alpha=32.0, expert_init="rank", pooling="perceiver",
        routing="softmax_topk", renormalize=False, router_noise=True, balance="counts", lb_weight=0.1,
        token_lb_weight=0.01, ortho_weight=0.01, ortho_scope="batch", layer_reduce="sum", decay="cosine",
        decay_min=1e-5, shared_rank=256, shared_alpha=256.0, gate_lr=5e-5, num_queries=1, condition_dropout=0.05,
    ),
    Variant.PACKAGE: dict(
        num_experts=4, top_k=2, rank=16, alpha=None, expert_init="fan_in", pooling="mean", routing="softmax_topk",
        renormalize=True, router_noise=False, balance="mass", lb_weight=0.01, token_lb_weight=0.01,
        ortho_weight=0.1, ortho_scope="sample", layer_reduce="mean", decay="none", decay_min=0.0, shared_rank=0,
        shared_alpha=None, gate_lr=None, num_queries=8, condition_dropout=0.0,
    ),
}  # fmt: skip

_UNSET = object()


@dataclass
class InstructConfig:
    variant: Variant = Variant.OFFICIAL
    num_experts: int = None  # type: ignore[assignment]
    top_k: int = None  # type: ignore[assignment]
    rank: int = None  # type: ignore[assignment]
    alpha: float | None = _UNSET  # type: ignore[assignment]
    expert_init: str = None  # type: ignore[assignment]  # "rank": U(+-1/sqrt(rank)); "fan_in": U(+-1/sqrt(d_in))
    pooling: Pooling = None  # type: ignore[assignment]
    routing: Routing = None  # type: ignore[assignment]
    renormalize: bool = None  # type: ignore[assignment]  # top-k weights rescaled to sum to 1
    router_noise: bool = None  # type: ignore[assignment]  # randn / E on the logits in training
    balance: str = None  # type: ignore[assignment]  # "counts": f from hard top-k counts; "mass": routed weight
    lb_weight: float = None  # type: ignore[assignment]  # the gates' aux_loss_alpha
    token_lb_weight: float = None  # type: ignore[assignment]  # aux_loss_alpha of token-routed layers
    ortho_weight: float = None  # type: ignore[assignment]
    ortho_scope: str = None  # type: ignore[assignment]  # "batch": over [E, B*S*D]; "sample": per sample, averaged
    layer_reduce: str = None  # type: ignore[assignment]  # "sum" or "mean" of the per-layer aux losses
    decay: Decay = None  # type: ignore[assignment]
    decay_min: float = None  # type: ignore[assignment]
    decay_steps: int = 0  # 0: the training run's max_steps
    shared_rank: int = None  # type: ignore[assignment]  # 0: no shared LoRA
    shared_alpha: float | None = _UNSET  # type: ignore[assignment]
    gate_lr: float | None = _UNSET  # type: ignore[assignment]  # None: the optimizer's lr
    resampler_dim: int = 768
    resampler_depth: int = 2
    resampler_heads: int = 12
    resampler_dropout: float = 0.1
    num_queries: int = None  # type: ignore[assignment]  # resampler queries
    token_routing: bool = False  # the package's comparison: MoLE's per-token local sigmoid gates, no router
    token_route_overrides: list[str] = field(default_factory=list)  # layer-path regexes routed per token (official)
    condition_types: list[str] = field(default_factory=list)
    condition_dropout: float = None  # type: ignore[assignment]  # share of training steps without conditions
    targets: list[str] | None = None  # expert layers (regexes); None: the variant's table for the backbone
    shared_targets: list[str] | None = None  # shared-LoRA layers (regexes); None: the official table

    def __post_init__(self) -> None:
        try:
            self.variant = Variant(self.variant)
        except ValueError:
            raise ValueError(f"instruct.variant={self.variant!r}: use 'official' or 'package'") from None
        for key, value in VARIANTS[self.variant].items():
            if getattr(self, key) is None or getattr(self, key) is _UNSET:
                setattr(self, key, value)
        self.pooling, self.routing, self.decay = Pooling(self.pooling), Routing(self.routing), Decay(self.decay)
        if self.num_experts < 1 or self.rank < 1:
            raise ValueError(f"num_experts={self.num_experts}, rank={self.rank}: use at least 1 each")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k}: use 1..num_experts ({self.num_experts})")
        if self.ortho_weight < 0 or self.lb_weight < 0 or self.token_lb_weight < 0:
            raise ValueError(f"ortho_weight={self.ortho_weight}, lb_weight={self.lb_weight}: use 0 or more")
        choices = {"expert_init": ("rank", "fan_in"), "balance": ("counts", "mass"), "ortho_scope": ("batch", "sample"),
                   "layer_reduce": ("sum", "mean")}  # fmt: skip
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"instruct.{key}={getattr(self, key)!r}: use one of {', '.join(map(str, allowed))}")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"instruct.condition_dropout={self.condition_dropout}: use 0 <= p < 1 (official 0.05)")
        if self.shared_rank < 0:
            raise ValueError(f"instruct.shared_rank={self.shared_rank}: use 0 (none) or a positive rank")
        if self.resampler_dim % self.resampler_heads:
            raise ValueError(f"instruct.resampler_dim={self.resampler_dim} is not a multiple of resampler_heads="
                             f"{self.resampler_heads}")  # fmt: skip
        if self.decay is not Decay.NONE and self.decay_steps < 0:
            raise ValueError(f"instruct.decay_steps={self.decay_steps}: use 0 (max_steps) or more")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(variant=self.variant.value, pooling=self.pooling.value, routing=self.routing.value,
                 decay=self.decay.value)  # fmt: skip
        return {k: v for k, v in d.items() if k in {f.name for f in fields(self)}}


# Expert and shared-LoRA layers per backbone (regexes on module paths).
_OFFICIAL_EXPERTS = {
    Backbone.FLUX: TARGETS[Backbone.FLUX],
    Backbone.PIXART: (r"^transformer_blocks\.\d+\.ff\.net\.2$",),
}
_OFFICIAL_SHARED = {
    # train_config.json lora_config: x_embedder, attn.to_q/k/v/to_out.0, norm1.linear, norm.linear, ff.net.0.proj,
    # single_transformer_blocks.*.proj_mlp (peft suffix matching, written out as anchored regexes)
    Backbone.FLUX: (
        r"^x_embedder$",
        r"^(?:single_)?transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v|to_out\.0)$",
        r"^transformer_blocks\.\d+\.norm1\.linear$",
        r"^single_transformer_blocks\.\d+\.norm\.linear$",
        r"^transformer_blocks\.\d+\.ff\.net\.0\.proj$",
        r"^single_transformer_blocks\.\d+\.proj_mlp$",
    ),
    Backbone.PIXART: (r"^transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj)$",),
}


def expert_targets(transformer: nn.Module, cfg: InstructConfig) -> tuple[str, ...]:
    if cfg.targets is not None:
        return tuple(cfg.targets)
    backbone = detect_backbone(transformer)
    if cfg.variant is Variant.OFFICIAL and backbone in _OFFICIAL_EXPERTS:
        return _OFFICIAL_EXPERTS[backbone]
    return TARGETS[backbone]


def shared_targets(transformer: nn.Module, cfg: InstructConfig) -> tuple[str, ...]:
    if cfg.shared_targets is not None:
        return tuple(cfg.shared_targets)
    backbone = detect_backbone(transformer)
    if backbone not in _OFFICIAL_SHARED:
        raise ValueError(f"instruct.shared_rank={cfg.shared_rank} on {type(transformer).__name__}: no default shared "
                         "LoRA layers for it; set instruct.shared_targets or instruct.shared_rank=0")  # fmt: skip
    return _OFFICIAL_SHARED[backbone]
