"""What each stage trains and what it leaves behind.

Stage 1: the denoiser (+ the text encoder of SD1.5 / SD2.1)        -> a diffusers pipeline folder
Stage 2: one new LoRA expert on the denoiser's target layers         -> <name>.safetensors (diffusers LoRA format)
Stage 3: the gates of every layer, base and experts frozen           -> mole.safetensors (gates + experts + manifest)
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import MoLEConfig
from ..formats.lora import ExpertFormat, load_expert, save_expert
from ..inject import expert_parameters, extract_expert, gate_parameters, inject_mole, new_expert
from ..io import save_mole
from ..models import DiffusionModel
from ..targets import Backbone
from .config import Stage, TrainConfig, TrainConfigError
from .draws import ROUTER
from .draws import mix as draw_seed

logger = logging.getLogger(__name__)


@dataclass
class StageSetup:
    modules: dict[str, nn.Module]  # the modules holding trainable parameters: "denoiser", maybe "text_encoder"
    params: list[nn.Parameter]
    save_final: Callable[[Path], list[Path]]
    records_gates: bool
    aux_loss: Callable[[int], tuple[torch.Tensor, dict[str, float]]] | None = None  # added after each forward
    # trainable modules used through hooks, not through forward(): not wrapped by accelerate, grads reduced by hand
    side_modules: dict[str, nn.Module] | None = None
    prepare_batch: Callable[[dict], None] | None = None  # called with each batch before the denoiser runs
    param_groups: list[dict] | None = None  # optimizer groups with their own lr (InstructMoLE's gates); else params


def _cast(module: nn.Module, dtype: torch.dtype) -> None:
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


def setup_stage(cfg: TrainConfig, model: DiffusionModel, weight_dtype: torch.dtype) -> StageSetup:
    """Freeze everything, then make trainable what the stage trains; frozen weights go to `weight_dtype`."""
    pipe, denoiser = model.pipe, model.denoiser
    if cfg.clip_skip != 1 and model.backbone not in (Backbone.SD15, Backbone.SD21):
        raise TrainConfigError(
            f"clip_skip={cfg.clip_skip} applies to the CLIP text encoder of SD1.5 / SD2.1, not to "
            f"{model.backbone.value}; set clip_skip=1"
        )
    model.vae.requires_grad_(False)
    _cast(model.vae, weight_dtype)
    for enc in model.text_encoders:
        enc.requires_grad_(False)
    denoiser.requires_grad_(False)
    component = "unet" if model.is_unet else "transformer"

    if cfg.stage is Stage.FINETUNE:
        denoiser.requires_grad_(True)
        modules = {"denoiser": denoiser}
        if cfg.train_text_encoder:
            if model.backbone not in (Backbone.SD15, Backbone.SD21):
                raise TrainConfigError(
                    f"train_text_encoder=true is supported for SD1.5 / SD2.1, not {model.backbone.value}; "
                    "set train_text_encoder=false"
                )
            pipe.text_encoder.requires_grad_(True)
            modules["text_encoder"] = pipe.text_encoder
        else:
            for enc in model.text_encoders:
                _cast(enc, weight_dtype)
        params = [p for m in modules.values() for p in m.parameters()]

        def save_final(out: Path) -> list[Path]:
            pipe.save_pretrained(out)
            return [out]

        return StageSetup(modules, params, save_final, records_gates=False)

    for enc in model.text_encoders:
        _cast(enc, weight_dtype)
    _cast(denoiser, weight_dtype)
    if cfg.stage is Stage.EXPERT:
        ex = cfg.expert
        expert = new_expert(denoiser, ex.name, ex.rank, ex.alpha, seed=cfg.seed)
        inject_mole(denoiser, [expert], MoLEConfig(gating="none"))
        params = expert_parameters(denoiser)

        def save_final(out: Path) -> list[Path]:
            trained = extract_expert(denoiser, ex.name)
            for pair in trained.layers.values():
                pair.down, pair.up = pair.down.float(), pair.up.float()
            return [save_expert(trained, out / f"{ex.name}.safetensors", ExpertFormat.DIFFUSERS, component)]

    elif cfg.stage is Stage.INSTRUCT:
        from ..instruct import InstructMoLE

        if model.is_unet:
            raise TrainConfigError(
                f"stage=4 (InstructMoLE) runs on DiTs (PixArt, Flux), not on the {model.backbone.value} UNet; "
                "use stages 1-3"
            )
        dc = denoiser.config
        text_dim = getattr(dc, "joint_attention_dim", None) or dc.caption_channels or dc.cross_attention_dim
        im = InstructMoLE(denoiser, cfg.instruct, text_dim=text_dim, seed=cfg.seed, total_steps=cfg.max_steps)
        groups = im.param_groups(cfg.optim.lr)
        params = [p for g in groups for p in g["params"]]
        for p in params:
            p.data = p.data.float()

        kontext = None
        if cfg.instruct.condition_types and model.backbone is Backbone.FLUX:
            from ..instruct import KontextConditions

            kontext = KontextConditions(denoiser)

        def prepare(batch: dict) -> None:
            if im.router is not None:  # the router's logit noise per sample, like every other draw
                im.router.set_noise_seeds([draw_seed(cfg.seed, ROUTER, e, i) for e, i in batch["keys"]])
            if im.conditions is not None or kontext is not None:
                if batch.get("conditions") is None:
                    raise TrainConfigError(
                        f"instruct.condition_types={cfg.instruct.condition_types} but the data has no conditions: "
                        "use a jsonl manifest with condition and condition_type per record"
                    )
                step = batch.get("step")  # None for the loss probe, which always keeps its conditions
                dropped = step is not None and conditions_dropped(cfg.seed, step, cfg.instruct.condition_dropout)
                batch["conditions_dropped"] = dropped
                target = kontext if kontext is not None else im.conditions
                if dropped:
                    target.set(None)
                    return
                latents = [model.encode_images(c, mode=True).to(weight_dtype) for c in batch["conditions"]]
                if kontext is not None:
                    kontext.set(latents)
                else:
                    im.conditions.set(latents, batch["condition_types"])

        def save_final(out: Path) -> list[Path]:
            files = [im.save(out / "instruct.safetensors", base_model=cfg.model)]
            if cfg.instruct.condition_types:
                files += _routing_by_condition(cfg, model, im, out)
            return files

        return StageSetup({"denoiser": denoiser}, params, save_final, records_gates=False, aux_loss=im.aux_loss,
                          side_modules={"instruct": im}, prepare_batch=prepare, param_groups=groups)  # fmt: skip
    else:
        mix = cfg.mixture
        experts = [load_expert(path, name, component=component) for name, path in mix.experts.items()]
        mole_cfg = MoLEConfig(gating=mix.gating, global_source=mix.global_source, gate_init=mix.gate_init)
        inject_mole(denoiser, experts, mole_cfg, seed=cfg.seed)  # seeded gate init: the same on every process
        params = gate_parameters(denoiser)

        def save_final(out: Path) -> list[Path]:
            return [save_mole(denoiser, out / "mole.safetensors", base_model=cfg.model)]

    for p in params:  # trainable weights stay fp32 under mixed precision
        p.data = p.data.float()
        p.requires_grad_(True)
    return StageSetup({"denoiser": denoiser}, params, save_final, records_gates=cfg.stage is Stage.MIXTURE)


def conditions_dropped(seed: int, step: int, rate: float) -> bool:
    """Official InstructMoLE: an optimizer step trains without its conditions with probability `rate` (5 %). One
    draw per (seed, step): every micro-batch and every process of the step agree, so the run does not depend on how
    the step's images are split over processes or accumulation (int tuples hash the same in every process)."""
    return rate > 0 and random.Random(hash((seed, 7919, step))).random() < rate


@torch.no_grad()
def _routing_by_condition(cfg: TrainConfig, model: DiffusionModel, im, out: Path) -> list[Path]:
    """Route up to 32 training instructions per condition type; write routing.png (expert x type) and JSON."""
    import json

    from ..data import scan_samples
    from ..instruct import routing_heatmap

    samples = scan_samples(cfg.data.path, cfg.data.manifest)
    by_type: dict[str, list[str]] = {}
    for s in samples:
        if s.condition_type is not None and len(by_type.setdefault(s.condition_type, [])) < 32:
            by_type[s.condition_type].append(s.caption)
    means = {}
    for ctype, captions in by_type.items():
        text = model.encode_text(captions).kwargs
        im.router.eval()  # no noise, no dropout: the routing a user gets at generation
        pooled = text.get("pooled_projections")
        weights = im.router(text["encoder_hidden_states"].float(), text.get("encoder_attention_mask"),
                            None if pooled is None else pooled.float())  # fmt: skip
        means[ctype] = weights.mean((0, 1)).cpu()  # (E,) over layers and instructions
    names = [f"expert{i}" for i in range(cfg.instruct.num_experts)]
    routing_heatmap(means, names, out / "routing.png", title="mean routing weight by condition type")
    (out / "routing.json").write_text(json.dumps({t: v.tolist() for t, v in means.items()}))
    return [out / "routing.png", out / "routing.json"]
