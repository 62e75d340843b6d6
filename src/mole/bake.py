"""`mole bake`: a MoLE file's experts at fixed weights as ONE plain kohya LoRA that any tool loads.

Per layer the baked update is exactly sum_i w_i * dW_i, where dW_i = B_i A_i * alpha_i / r_i: the experts' ranks are
concatenated (down = [A_1; A_2; ...], up = [w_1 s_1 B_1, w_2 s_2 B_2, ...] with s_i = alpha_i / r_i folded into the
up factors) and the file's alpha is the total rank, so kohya's scale alpha / rank is 1. With `rank` below the total
rank the update is compressed by a truncated SVD and the relative Frobenius error it introduces is reported.

    layers, report = bake_layers(experts, {"face": 0.8, "hand": 0.3})
    write_kohya_lora(layers, "baked.safetensors", model=unet)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .experts import ExpertWeights
from .formats import MoLEFileError
from .formats.kohya import kohya_flat_name, uses_sgm_names
from .formats.mole_file import embedded_experts, read_mole_file
from .layers.lora import LoraPair
from .targets import Backbone, submodule

logger = logging.getLogger(__name__)


@dataclass
class BakeReport:
    """What a bake did: the weights, the ranks, and (with --rank) the relative Frobenius error of the compression:
    ||dW - dW_R||_F / ||dW||_F over all layers together, and the worst single layer."""

    weights: dict[str, float]
    layers: int
    total_rank: int
    rank: int
    relative_error: float = 0.0
    max_layer_error: float = 0.0
    per_layer_error: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"weights": self.weights, "layers": self.layers, "total_rank": self.total_rank, "rank": self.rank,
                "relative_error": self.relative_error, "max_layer_error": self.max_layer_error}  # fmt: skip


def bake_layers(
    experts: Mapping[str, ExpertWeights], weights: Mapping[str, float], rank: int | None = None
) -> tuple[dict[str, LoraPair], BakeReport]:
    """One LoRA pair per layer whose delta W is sum_i weights[i] * dW_i (exact; with `rank`, its best rank-R
    approximation when R is below the concatenated rank). Experts not in `weights` are left out (weight 0)."""
    unknown = sorted(set(weights) - set(experts))
    if unknown:
        raise ValueError(f"weights name experts {unknown} that the file does not hold; its experts are "
                         f"{sorted(experts)} (e.g. --weights {next(iter(experts), 'face')}=0.8)")  # fmt: skip
    for name, w in weights.items():
        if not math.isfinite(w):
            raise ValueError(f"weight of expert {name!r} is {w}; use a finite number such as 0.8")
    if not weights:
        raise ValueError("no expert weights: give at least one, e.g. --weights face=0.8")
    if rank is not None and rank < 1:
        raise ValueError(f"rank={rank}: use a positive rank (e.g. 8), or leave it out for the exact bake")
    names = list(weights)
    paths = sorted({p for n in names for p in experts[n].layers}, key=_layer_order(experts, names))
    out: dict[str, LoraPair] = {}
    err2 = norm2 = 0.0
    per_layer: dict[str, float] = {}
    total = 0
    for path in paths:
        pairs = [(experts[n].layers[path], float(weights[n])) for n in names if path in experts[n].layers]
        kernels = {p.kernel_size for p, _ in pairs}
        if len(kernels) > 1:
            raise ValueError(f"layer {path!r}: the experts' down factors have kernels {sorted(kernels)}; a baked "
                             "LoRA needs one kernel per layer (bake these experts separately)")  # fmt: skip
        down = torch.cat([p.down.float() for p, _ in pairs], 0)
        up = torch.cat([p.up.float() * (w * p.scale) for p, w in pairs], 1)
        conv = any(p.conv for p, _ in pairs)
        r_total = down.shape[0]
        total = max(total, r_total)
        if rank is not None and rank < r_total:
            dense = up @ down.reshape(r_total, -1)
            u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
            up_r = (u[:, :rank] * s[:rank]).float()
            down_r = vh[:rank].float()
            approx = up_r.double() @ down_r.double()
            e2 = float((dense.double() - approx).pow(2).sum())
            n2 = float(dense.double().pow(2).sum())
            err2, norm2 = err2 + e2, norm2 + n2
            per_layer[path] = math.sqrt(e2 / n2) if n2 > 0 else 0.0
            down, up = down_r.reshape(rank, *down.shape[1:]), up_r
        else:
            norm2 += float((up.double() @ down.reshape(r_total, -1).double()).pow(2).sum())
            per_layer[path] = 0.0
        out[path] = LoraPair(down.contiguous(), up.contiguous(), float(down.shape[0]), conv=conv)
    report = BakeReport(
        weights={n: float(w) for n, w in weights.items()}, layers=len(out), total_rank=total,
        rank=min(rank, total) if rank is not None else total,
        relative_error=math.sqrt(err2 / norm2) if norm2 > 0 else 0.0,
        max_layer_error=max(per_layer.values(), default=0.0), per_layer_error=per_layer,
    )  # fmt: skip
    logger.info("baked %d layers, rank %d (relative error %.3g)", report.layers, report.rank, report.relative_error)
    return out, report


def _layer_order(experts: Mapping[str, ExpertWeights], names: list[str]):
    order: dict[str, int] = {}
    for n in names:
        for p in experts[n].layers:
            order.setdefault(p, len(order))
    return lambda p: order[p]


def kohya_lora_state_dict(layers: Mapping[str, LoraPair], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """kohya tensors (lora_unet_<flat>.lora_down.weight / lora_up.weight / alpha) for layers keyed by module path;
    the flat names are the ones `mole convert` writes (SGM names for SDXL, which needs `model`), 1x1 convs 4-D."""
    sd: dict[str, torch.Tensor] = {}
    for path, pair in layers.items():
        flat = "lora_unet_" + (kohya_flat_name(path, model) if model is not None else path.replace(".", "_"))
        conv = pair.conv or (model is not None and isinstance(submodule(model, path), nn.Conv2d))
        down, up = LoraPair(pair.down, pair.up, pair.alpha, conv=conv).factors_for_file()
        sd[f"{flat}.lora_down.weight"], sd[f"{flat}.lora_up.weight"] = down, up
        sd[f"{flat}.alpha"] = torch.tensor(pair.alpha, dtype=torch.float32)
    return sd


def bake_mole_file(
    path: str | Path,
    out: str | Path,
    weights: Mapping[str, float],
    model: nn.Module | None = None,
    rank: int | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> BakeReport:
    """Bake the experts a MoLE file embeds (`mole-tiny` names the shipped one) at `weights` into one kohya LoRA file
    at `out`. `model` (the base denoiser) names SDXL layers the SGM way and shapes 1x1 conv factors."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"out={str(out)!r} must end in .safetensors")
    if out.exists() and not overwrite:
        raise MoLEFileError(f"{out} exists; pass --overwrite to replace it")
    manifest, tensors = read_mole_file(path)
    if model is None and Backbone(manifest["base_model"]["backbone"]) is Backbone.SDXL:
        raise MoLEFileError(f"{path}: naming SDXL layers the kohya way needs the base model; pass model= (--base)")
    experts = embedded_experts(manifest, tensors, str(path), model)
    if not experts:
        raise MoLEFileError(f"{path} embeds no experts; bake needs the experts in the file")
    layers, report = bake_layers(experts, weights, rank=rank)
    sd = {k: v.to(dtype) if not k.endswith(".alpha") else v for k, v in kohya_lora_state_dict(layers, model).items()}
    metadata = {"format": "pt", "mole_bake": ",".join(f"{n}={w:g}" for n, w in report.weights.items()),
                "ss_network_module": "networks.lora", "ss_network_dim": str(report.rank),
                "ss_network_alpha": str(report.rank)}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out), metadata=metadata)
    if model is not None and uses_sgm_names(model):
        logger.info("named the layers in kohya's SGM layout (SDXL)")
    return report


def gate_means(pipe, prompts: list[str], seed: int = 0, **call_kwargs) -> dict[str, float]:
    """Each expert's global gate averaged over layers, denoising steps and prompts, on the conditional half of
    classifier-free guidance (diffusers batches [unconditional, conditional]); the MoLE must be loaded in `pipe`.
    Prompt i starts from the noise of seed + i, whatever else runs."""
    from .inference.pipeline import denoiser_of
    from .recording import record_gates

    if not prompts:
        raise ValueError("no prompts to average the gates over; give a prompt file with one prompt a line")
    denoiser = denoiser_of(pipe)
    sums, count, names = None, 0, None
    for i, prompt in enumerate(prompts):
        with record_gates(denoiser, keep_local=False) as rec:
            pipe(prompt, generator=torch.Generator().manual_seed(seed + i), **call_kwargs)
        g = rec.mean_global()  # (steps, b, e)
        cfg = call_kwargs.get("guidance_scale", 7.5) > 1.0
        g = g[:, g.shape[1] // 2 :] if cfg and g.shape[1] % 2 == 0 else g
        sums = g.double().sum((0, 1)) if sums is None else sums + g.double().sum((0, 1))
        count += g.shape[0] * g.shape[1]
        names = rec.expert_names
    means = sums / count
    return {n: float(m) for n, m in zip(names, means)}
