"""InstructMoLE on a DiT: experts trained jointly from scratch, routed by the instruction, kept distinct by an
output-space orthogonality loss and balanced by a load-balancing loss.

    im = InstructMoLE(pipe.transformer, InstructConfig(num_experts=4, rank=16), text_dim=4096)
    loss = diffusion_loss + im.aux_loss(step)[0]          # after each denoiser forward
    im.save("instruct.safetensors", base_model=...)        # experts + router (+ condition embeddings) + manifest
    im = InstructMoLE.load(fresh_transformer, "instruct.safetensors")
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import GateInit, MoLEConfig
from ..inject import expert_parameters, gate_parameters, inject_mole, mole_layers, new_expert
from ..io import MoLEFileError, load_mole, read_mole_file, save_mole
from .conditions import ConditionTokens
from .router import InstructRouter, Pooling, Routing, load_balance_loss, orthogonality_loss, schedule_weight


class Decay(str, enum.Enum):
    NONE = "none"
    LINEAR = "linear"
    COSINE = "cosine"


@dataclass
class InstructConfig:
    num_experts: int = 4
    rank: int = 16
    alpha: float | None = None
    pooling: Pooling = Pooling.MEAN
    routing: Routing = Routing.SOFTMAX_TOPK
    top_k: int = 2
    num_queries: int = 8
    token_routing: bool = False  # comparison: MoLE's per-token local gates instead of instruction routing
    ortho_weight: float = 0.1
    lb_weight: float = 0.01
    decay: Decay = Decay.NONE
    decay_steps: int = 0
    condition_types: list[str] = field(default_factory=list)
    targets: list[str] | None = None

    def __post_init__(self) -> None:
        self.pooling, self.routing, self.decay = Pooling(self.pooling), Routing(self.routing), Decay(self.decay)
        if self.num_experts < 1 or self.rank < 1:
            raise ValueError(f"num_experts={self.num_experts}, rank={self.rank}: use at least 1 each")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k}: use 1..num_experts ({self.num_experts})")
        if self.ortho_weight < 0 or self.lb_weight < 0:
            raise ValueError(f"ortho_weight={self.ortho_weight}, lb_weight={self.lb_weight}: use 0 or more")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(pooling=self.pooling.value, routing=self.routing.value, decay=self.decay.value)
        return d


class InstructMoLE(nn.Module):
    """Owns the router and condition embeddings; the experts live in the transformer's MoLE layers."""

    def __init__(self, transformer: nn.Module, cfg: InstructConfig, text_dim: int, seed: int = 0,
                 experts_from_file: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.cfg, self.text_dim = cfg, text_dim
        self.transformer = [transformer]  # not a submodule: the base model is not ours to save
        if not experts_from_file:
            experts = [new_expert(transformer, f"expert{i}", cfg.rank, cfg.alpha, cfg.targets, seed=seed + i)
                       for i in range(cfg.num_experts)]  # fmt: skip
            gating = "local" if cfg.token_routing else "none"
            inject_mole(transformer, experts, MoLEConfig(gating=gating, gate_init=GateInit.ZERO,
                                                         targets=cfg.targets))  # fmt: skip
        self.layer_paths = list(mole_layers(transformer))
        self.router = None
        if not cfg.token_routing:
            self.router = InstructRouter(text_dim, self.layer_paths, cfg.num_experts, cfg.pooling, cfg.routing,
                                         cfg.top_k, cfg.num_queries)  # fmt: skip
            self.router.attach(transformer)
        self.conditions = ConditionTokens(transformer, cfg.condition_types) if cfg.condition_types else None
        for layer in mole_layers(transformer).values():
            layer.track_orthogonality = True

    # ------------------------------------------------------------------ training
    def trainable_parameters(self) -> list[nn.Parameter]:
        t = self.transformer[0]
        params = expert_parameters(t) + gate_parameters(t) + list(self.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    def aux_loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """weight_o(step) * orthogonality + weight_lb(step) * load balance, from the last denoiser call."""
        layers = mole_layers(self.transformer[0]).values()
        ortho = orthogonality_loss([layer.last_cosine for layer in layers if layer.last_cosine is not None])
        logs = {"instruct/ortho": float(ortho.detach())}
        w_o = schedule_weight(self.cfg.ortho_weight, step, self.cfg.decay.value, self.cfg.decay_steps)
        total = w_o * ortho
        if self.router is not None and self.router.last_probs is not None:
            lb = load_balance_loss(self.router.last_probs, self.router.last_weights)
            w_lb = schedule_weight(self.cfg.lb_weight, step, self.cfg.decay.value, self.cfg.decay_steps)
            total = total + w_lb * lb
            logs.update({"instruct/load_balance": float(lb.detach()), "instruct/lb_weight": w_lb})
            usage = self.router.last_weights.detach().mean((0, 1))
            logs.update({f"instruct/usage/expert{i}": float(u) for i, u in enumerate(usage)})
        logs["instruct/ortho_weight"] = w_o
        return total, logs

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, base_model: str | None = None) -> Path:
        extra = {f"instruct.{k}": v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        manifest = {"instruct": self.cfg.to_dict(), "text_dim": self.text_dim}
        return save_mole(self.transformer[0], path, base_model=base_model, extra_tensors=extra,
                         extra_manifest=manifest)  # fmt: skip

    @classmethod
    def load(cls, transformer: nn.Module, path: str | Path, strict_base: bool = True) -> InstructMoLE:
        manifest, tensors = read_mole_file(path)
        info = manifest.get("extra", {})
        if "instruct" not in info:
            raise MoLEFileError(f"{path} is a MoLE file without InstructMoLE parts (no router); use load_mole")
        load_mole(transformer, path, strict_base=strict_base)
        cfg = InstructConfig(**info["instruct"])
        im = cls(transformer, cfg, info["text_dim"], experts_from_file=True)
        state = {k[len("instruct.") :]: v for k, v in tensors.items() if k.startswith("instruct.")}
        missing, unexpected = im.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise MoLEFileError(
                f"{path}: router tensors do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        return im

    def routing_by_condition(self, weights: torch.Tensor, types: list[str]) -> dict[str, torch.Tensor]:
        """Mean routing weight per expert for each condition type; weights (layers, b, E) from the router."""
        per_sample = weights.detach().float().mean(0)  # (b, E)
        if per_sample.shape[0] != len(types):  # CFG doubled the batch: keep the conditional half
            per_sample = per_sample[-len(types) :]
        return {t: per_sample[[i for i, x in enumerate(types) if x == t]].mean(0) for t in dict.fromkeys(types)}
