"""InstructMoLE on a DiT: experts trained jointly from scratch, routed by the instruction, kept distinct by an
output-space orthogonality loss and balanced by a load-balancing loss.

    im = InstructMoLE(pipe.transformer, InstructConfig(), text_dim=4096, pooled_dim=768)   # official variant
    loss = diffusion_loss + im.aux_loss(step)[0]          # after each denoiser forward
    im.save("instruct.safetensors", base_model=...)        # experts + router (+ shared LoRA, conditions) + manifest
    im = InstructMoLE.load(fresh_transformer, "instruct.safetensors")

Auxiliary loss (official): every MoLE layer l adds w(t) * (LB_l + ortho_weight * ortho_l), summed over layers;
LB_l = lb_weight * E * sum_i f_i P_i from the layer's gate, ortho_l over the experts' ungated outputs flattened over
the whole batch, w(t) the cosine decay 1 -> 1e-5 over training. See gate.py for the formulas and variants.py for
the official and package settings.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from torch import nn

from ..config import GateInit, MoLEConfig
from ..experts import ExpertWeights, KeyNaming
from ..formats import MoLEFileError
from ..formats.mole_file import read_mole_file
from ..inject import expert_parameters, gate_parameters, inject_mole, mole_layers
from ..io import load_mole, save_mole
from ..layers.lora import LoraPair
from ..targets import target_modules
from .conditions import ConditionTokens
from .gate import cosine_penalty, decay_weight
from .router import InstructRouter
from .shared import SharedLoRA
from .variants import Decay, InstructConfig, expert_targets, shared_targets

__all__ = ["Decay", "InstructConfig", "InstructMoLE", "fresh_experts"]


def fresh_experts(transformer: nn.Module, cfg: InstructConfig, paths: list[str], seed: int = 0) -> list[ExpertWeights]:
    """cfg.num_experts new experts on `paths`: B = 0, A ~ U(+-1/sqrt(rank)) (official) or U(+-1/sqrt(d_in))."""
    g = torch.Generator().manual_seed(seed)
    alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
    experts = []
    for i in range(cfg.num_experts):
        layers = {}
        for path in paths:
            m = transformer.get_submodule(path)
            conv = isinstance(m, nn.Conv2d)
            d_in, d_out = (m.in_channels, m.out_channels) if conv else (m.in_features, m.out_features)
            bound = 1.0 / (cfg.rank if cfg.expert_init == "rank" else d_in) ** 0.5
            down = (torch.rand(cfg.rank, d_in, generator=g) * 2 - 1) * bound
            layers[path] = LoraPair(down, torch.zeros(d_out, cfg.rank), alpha, conv=conv)
        experts.append(ExpertWeights(f"expert{i}", layers, KeyNaming.DOTTED, source="new"))
    return experts


class InstructMoLE(nn.Module):
    """Owns the router, the shared LoRA and condition embeddings; the experts live in the transformer's MoLE layers."""

    def __init__(self, transformer: nn.Module, cfg: InstructConfig, text_dim: int, seed: int = 0,
                 experts_from_file: bool = False, pooled_dim: int | None = None,
                 total_steps: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.cfg, self.text_dim = cfg, text_dim
        self.pooled_dim = pooled_dim if pooled_dim is not None else _pooled_dim(transformer)
        self.total_steps = total_steps  # the decay's length when cfg.decay_steps is 0 (training's max_steps)
        self.transformer = [transformer]  # not a submodule: the base model is not ours to save
        patterns = expert_targets(transformer, cfg)
        if not experts_from_file:
            paths = target_modules(transformer, patterns)
            if not paths:
                raise ValueError(f"instruct.targets={list(patterns)} select no layer of {type(transformer).__name__}")
            experts = fresh_experts(transformer, cfg, paths, seed)
            gating = "local" if cfg.token_routing else "none"
            inject_mole(transformer, experts, MoLEConfig(gating=gating, gate_init=GateInit.ZERO,
                                                         targets=list(patterns)), seed=seed)  # fmt: skip
        layers = mole_layers(transformer)
        self.layer_paths = list(layers)
        self.router = None
        if not cfg.token_routing:
            overrides = [re.compile(p) for p in cfg.token_route_overrides]
            token_layers = {p: layers[p].in_features for p in self.layer_paths if any(r.search(p) for r in overrides)}
            resampler = dict(dim=cfg.resampler_dim, depth=cfg.resampler_depth, heads=cfg.resampler_heads,
                             dim_head=cfg.resampler_dim // cfg.resampler_heads, num_queries=cfg.num_queries,
                             dropout=cfg.resampler_dropout)  # fmt: skip
            with _seeded(seed + 2000):  # resampler, gates: torch's default inits, drawn from the run seed
                self.router = InstructRouter(
                    text_dim, self.layer_paths, cfg.num_experts, cfg.pooling, cfg.routing, cfg.top_k,
                    cfg.num_queries, pooled_dim=self.pooled_dim, renormalize=cfg.renormalize, noise=cfg.router_noise,
                    aux_loss_alpha=cfg.lb_weight, balance=cfg.balance, resampler=resampler,
                    token_layers=token_layers, token_aux_loss_alpha=cfg.token_lb_weight,
                )
            self.router.attach(transformer)
        self.shared = None
        if cfg.shared_rank:
            shared = target_modules(transformer, shared_targets(transformer, cfg))
            self.shared = SharedLoRA(transformer, shared, cfg.shared_rank, cfg.shared_alpha, seed=seed + 1000)
        with _seeded(seed + 3000):
            self.conditions = ConditionTokens(transformer, cfg.condition_types) if _needs_type_embedding(
                transformer, cfg) else None  # fmt: skip
        for layer in layers.values():
            layer.track_orthogonality = True

    # ------------------------------------------------------------------ training
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups(1.0) for p in group["params"]]

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: experts, shared LoRA, resampler, condition embeddings at `lr`; the gates at
        cfg.gate_lr (official 5e-5) when set."""
        t = self.transformer[0]
        gates = list(self.router.gates.parameters()) + list(self.router.token_gates.parameters()) if self.router else []
        ids = {id(p) for p in gates}
        rest = expert_parameters(t) + gate_parameters(t) + [p for p in self.parameters() if id(p) not in ids]
        for p in rest + gates:
            p.requires_grad_(True)
        groups = [{"params": rest, "lr": lr}]
        if gates:
            groups.append({"params": gates, "lr": self.cfg.gate_lr if self.cfg.gate_lr is not None else lr})
        return groups

    def aux_weight(self, step: int) -> float:
        total = self.cfg.decay_steps or self.total_steps or 0
        return decay_weight(step, total, self.cfg.decay.value, self.cfg.decay_min)

    def layer_losses(self) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per MoLE layer (balance loss or None, orthogonality or None) of the last denoiser call."""
        aux = self.router.last_aux if self.router is not None else {}
        out = {}
        for path, layer in mole_layers(self.transformer[0]).items():
            ortho = None
            if layer.last_inner is not None:
                inner = layer.last_inner.float()
                batch = self.cfg.ortho_scope == "batch"
                ortho = cosine_penalty(inner.sum(0)) if batch else cosine_penalty(inner).mean()
            out[path] = (aux.get(path), ortho)
        return out

    def aux_loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """w(step) * reduce_l(LB_l + ortho_weight * ortho_l) over the layers of the last denoiser call."""
        per_layer = self.layer_losses()
        terms, lbs, orthos = [], [], []
        for lb, ortho in per_layer.values():
            term = None
            if lb is not None:
                lbs.append(lb)
                term = lb
            if ortho is not None:
                orthos.append(ortho)
                term = self.cfg.ortho_weight * ortho if term is None else term + self.cfg.ortho_weight * ortho
            if term is not None:
                terms.append(term)
        w = self.aux_weight(step)
        if not terms:
            return torch.zeros(()), {"instruct/aux_weight": w}
        stacked = torch.stack(terms)
        total = w * (stacked.sum() if self.cfg.layer_reduce == "sum" else stacked.mean())
        logs = {"instruct/aux_weight": w, "instruct/aux": float(total.detach())}
        if orthos:
            logs["instruct/ortho"] = float(torch.stack(orthos).detach().mean())
        if lbs:
            logs["instruct/load_balance"] = float(torch.stack(lbs).detach().mean())
        if self.router is not None and self.router.last_weights is not None:
            usage = self.router.last_weights.detach().float().mean((0, 1))
            logs.update({f"instruct/usage/expert{i}": float(u) for i, u in enumerate(usage)})
        return total, logs

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, base_model: str | None = None) -> Path:
        extra = {f"instruct.{k}": v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        manifest = {"instruct": self.cfg.to_dict(), "text_dim": self.text_dim, "pooled_dim": self.pooled_dim}
        return save_mole(self.transformer[0], path, base_model=base_model, extra_tensors=extra,
                         extra_manifest=manifest)  # fmt: skip

    @classmethod
    def load(cls, transformer: nn.Module, path: str | Path, strict_base: bool = True) -> InstructMoLE:
        """The experts, router and shared LoRA of `path` on `transformer`, in eval mode."""
        manifest, tensors = read_mole_file(path)
        info = manifest.get("extra", {})
        if "instruct" not in info:
            raise MoLEFileError(f"{path} is a MoLE file without InstructMoLE parts (no router); use load_mole")
        load_mole(transformer, path, strict_base=strict_base)
        cfg = InstructConfig(**info["instruct"])
        im = cls(transformer, cfg, info["text_dim"], experts_from_file=True, pooled_dim=info.get("pooled_dim"))
        state = {k[len("instruct.") :]: v for k, v in tensors.items() if k.startswith("instruct.")}
        missing, unexpected = im.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise MoLEFileError(
                f"{path}: router tensors do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        return im.eval()

    def remove(self) -> None:
        """Detach the router, shared LoRA and condition hooks (the MoLE layers stay: remove_mole removes them)."""
        if self.router is not None:
            self.router.detach()
        if self.shared is not None:
            self.shared.remove()
        if self.conditions is not None:
            self.conditions.remove()

    def routing_by_condition(self, weights: torch.Tensor, types: list[str]) -> dict[str, torch.Tensor]:
        """Mean routing weight per expert for each condition type; weights (layers, b, E) from the router."""
        per_sample = weights.detach().float().mean(0)  # (b, E)
        if per_sample.shape[0] != len(types):  # CFG doubled the batch: keep the conditional half
            per_sample = per_sample[-len(types) :]
        return {t: per_sample[[i for i, x in enumerate(types) if x == t]].mean(0) for t in dict.fromkeys(types)}


@contextlib.contextmanager
def _seeded(seed: int):
    """Build modules whose inits (nn.Linear defaults, randn queries, normal_ embeddings) draw from the CPU generator
    seeded with `seed`; the global RNG state is restored afterwards (so the init depends on the seed alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _pooled_dim(transformer: nn.Module) -> int | None:
    """The CLIP pooled vector's width the denoiser takes (Flux's pooled_projection_dim), else None."""
    cfg = getattr(transformer, "config", None)
    return getattr(cfg, "pooled_projection_dim", None) if cfg is not None else None


def _needs_type_embedding(transformer: nn.Module, cfg: InstructConfig) -> bool:
    """PixArt-style DiTs get condition tokens with type embeddings; Flux takes conditions the Kontext way."""
    return bool(cfg.condition_types) and hasattr(transformer, "pos_embed") and hasattr(transformer, "norm_out") \
        and type(transformer).__name__ != "FluxTransformer2DModel"  # fmt: skip
