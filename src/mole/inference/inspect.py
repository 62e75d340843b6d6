"""`mole inspect`: what the gates do while an image is generated (the paper's Fig. 7).

Outputs in out_dir:
    gates_global.png      per prompt kind (or per prompt when no kinds are given) and expert, the global gate
                          averaged over layers vs inference step, band = +-1 std over that kind's prompts (Fig. 7a/b:
                          the paper shows face and hand prompts apart; one average over all would hide it)
    local_maps_<k>.png    per expert (rows) and chosen steps (columns), the local score averaged over image-token
                          layers, overlaid on prompt k's final image (Fig. 7c)
    image_<k>.png         the final images
    gates.json            the raw numbers: global gates per prompt / step / expert, per layer means, local maps

For an InstructMoLE file (experts routed by the instruction) instead:
    routing_<k>.png       prompt k: the weight of each expert (columns) in each instruction-routed layer (rows),
                          0 for the experts not chosen
    routing.png           mean weight per expert (columns) for each prompt (rows), over the layers
    routing.json          the numbers: per prompt, per layer, the weight of every expert and the chosen ones
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..inject import mole_layers
from ..outputs import check_output_dir
from ..recording import record_gates
from ..targets import Backbone
from .generate import RoutingCapture, attach_conditions, check_prompt_lengths
from .pipeline import MixMode, SamplingOptions, default_size, load_mole_weights, open_sampler, pipeline_kwargs
from .plot import grid, line_chart, overlay

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class InspectOptions(SamplingOptions):
    base: str
    mole: str
    prompts: list[str]
    out_dir: str = "runs/inspect"
    seed: int = 0
    map_steps: int = 5  # how many evenly spaced steps the local maps show
    strict_base: bool = True
    expert_files: dict[str, str] | None = None  # {name: LoRA file}: the experts of the paper's gate files, by name
    negative_prompt: str | None = None
    kinds: list[str] | None = None  # one per prompt ("face", "hand", ...): gates are also reported per kind
    overwrite: bool = False  # False: refuse an out_dir holding an earlier inspect's files

    images: list[str] = field(default_factory=list)  # condition images (Flux / Flux-Kontext; PixArt: typed)
    condition_types: list[str] | None = None  # PixArt: one type per image

    OUTPUTS = ("gates.json", "gates_global.png", "images.png", "image_*.png", "local_maps_*.png", "routing.json",
               "routing.png", "routing_*.png")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompts:
            raise ValueError("prompts is empty: pass at least one prompt")
        if self.map_steps < 1:
            raise ValueError(f"map_steps={self.map_steps}: use at least 1")
        if self.kinds is not None and len(self.kinds) != len(self.prompts):
            raise ValueError(f"kinds: {len(self.kinds)} given for {len(self.prompts)} prompts; give one kind per "
                             "prompt (--prompt-kind, in the order of the prompts)")  # fmt: skip


def mean_local_map(step_records: dict, sample: int, hw: tuple[int, int], expert: int) -> np.ndarray | None:
    """Average one sample's local scores over every layer with a known grid, resized to the latent grid hw."""
    maps = []
    for rec in step_records.values():
        if rec.local_gate is None or rec.grid is None:
            continue
        h, w = rec.grid
        m = rec.local_gate[sample, :, expert].reshape(1, 1, h, w)
        maps.append(F.interpolate(m, size=hw, mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(maps).mean(0).numpy() if maps else None


def inspect(opts: InspectOptions) -> dict:
    check_output_dir(opts.out_dir, InspectOptions.OUTPUTS, opts.overwrite, "mole inspect")
    model, device = open_sampler(opts.base, opts.scheduler, opts.dtype, opts.device,
                                 progress=logger.isEnabledFor(logging.INFO))  # fmt: skip
    pipe = model.pipe
    load_mole_weights(pipe, opts.mole, MixMode.MOLE, strict_base=opts.strict_base, expert_files=opts.expert_files)
    if getattr(pipe, "mole_instruct", None) is not None:
        return _inspect_instruct(opts, model, device)
    denoiser = model.denoiser
    layer_paths = list(mole_layers(denoiser))
    f = model.vae_scale_factor
    native = default_size(model)
    height, width = opts.height or native[0], opts.width or native[1]
    latent_hw = (height // f, width // f)
    if model.backbone is Backbone.PIXART:
        p = denoiser.config.patch_size
        latent_hw = (latent_hw[0] // p, latent_hw[1] // p)  # image tokens are patches
    shown = sorted({round(k * (opts.steps - 1) / max(1, opts.map_steps - 1)) for k in range(opts.map_steps)})
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lengths = check_prompt_lengths(model, opts.prompts)

    per_prompt_global, per_layer, local_json, images = [], [], {}, []
    experts: list[str] = []
    for k, prompt in enumerate(opts.prompts):
        generator = torch.Generator(device=device).manual_seed(opts.seed)
        kwargs = dict(prompt=prompt, num_inference_steps=opts.steps, guidance_scale=opts.guidance_scale,
                      height=height, width=width, generator=generator)  # fmt: skip
        if opts.negative_prompt:
            kwargs["negative_prompt"] = opts.negative_prompt
        kwargs.update(pipeline_kwargs(model))
        with record_gates(denoiser, keep_local=True, latent_hw=latent_hw, local_steps=set(shown)) as rec:
            image = pipe(**kwargs).images[0]
        experts = rec.expert_names
        if rec.num_steps != opts.steps:
            logger.warning("recorded %d denoiser calls for %d steps (scheduler with extra calls)", rec.num_steps,
                           opts.steps)  # fmt: skip
        g = rec.global_gates()  # (steps, layers, b, e); the conditional sample is the last under CFG
        cond = g[:, :, -1, :]
        per_prompt_global.append(cond.mean(1))  # (steps, e)
        per_layer.append(cond)  # (steps, layers, e)
        image.save(out / f"image_{k}.png")
        images.append(image)
        cells, labels, local_json[str(k)] = [], [], {}
        scale = max(1.0, 160 / min(image.size))  # small images get enlarged so the maps stay readable
        shown_image = image.resize((round(image.width * scale), round(image.height * scale)), 3)
        heats = {}
        for e, name in enumerate(experts):
            for t in shown:
                heat = mean_local_map(rec.steps[t], -1, latent_hw, e)
                if heat is not None:
                    heats[(name, t)] = heat
                    local_json[str(k)].setdefault(str(t), {})[name] = np.round(heat, 4).tolist()
        if heats:  # one colour scale per figure, from its lowest to its highest score, printed in the labels
            lo = min(float(h.min()) for h in heats.values())
            hi = max(float(h.max()) for h in heats.values())
            for (name, t), heat in heats.items():
                cells.append(overlay(shown_image, heat, alpha=0.55, vmin=lo, vmax=hi))
                labels.append(f"{name} t{t} mean {heat.mean():.2f} [{lo:.2f},{hi:.2f}]")
        if cells:
            grid(cells, cols=len(shown), labels=labels).save(out / f"local_maps_{k}.png")

    stacked = torch.stack(per_prompt_global)  # (prompts, steps, e)
    mean, std = stacked.mean(0), stacked.std(0) if len(opts.prompts) > 1 else torch.zeros_like(stacked[0])
    # Fig. 7 per group: the prompt kinds when given, else each prompt on its own
    groups: dict[str, list[int]] = {}
    for k in range(len(opts.prompts)):
        groups.setdefault(opts.kinds[k] if opts.kinds else f"prompt {k}", []).append(k)
    series, bands, per_kind = {}, {}, {}
    for label, idx in groups.items():
        part = stacked[idx]
        g_mean = part.mean(0)
        g_std = part.std(0) if len(idx) > 1 else torch.zeros_like(g_mean)
        per_kind[label] = {n: {"first_step": g_mean[0, i].item(), "last_step": g_mean[-1, i].item(),
                               "mean": g_mean[:, i].mean().item(), "prompts": idx} for i, n in enumerate(experts)}
        for i, n in enumerate(experts):
            series[f"{n} gate | {label}"] = g_mean[:, i].tolist()
            bands[f"{n} gate | {label}"] = g_std[:, i].tolist()
    line_chart(
        series, out / "gates_global.png", bands=bands,
        title=f"global gate per {'prompt kind' if opts.kinds else 'prompt'} (mean over {len(layer_paths)} layers)",
        xlabel="inference step", ylabel="gate",
    )  # fmt: skip
    per_prompt = [{"prompt": p, "kind": opts.kinds[k] if opts.kinds else None,
                   **{n: {"first_step": stacked[k, 0, i].item(), "last_step": stacked[k, -1, i].item(),
                          "mean": stacked[k, :, i].mean().item()} for i, n in enumerate(experts)}}
                  for k, p in enumerate(opts.prompts)]  # fmt: skip
    layer_means = torch.stack(per_layer).mean(0)  # (steps, layers, e)
    data = {
        "experts": experts,
        "prompts": lengths,
        "steps": opts.steps,
        "layers": layer_paths,
        "global_per_prompt": {n: stacked[:, :, i].tolist() for i, n in enumerate(experts)},  # [prompt][step]
        "global_mean": {n: mean[:, i].tolist() for i, n in enumerate(experts)},  # over all prompts: see per_prompt
        "per_prompt": per_prompt,  # per prompt and expert: the global gate at the first / last step and its mean
        "per_kind": per_kind if opts.kinds else None,  # the same per prompt kind (mean over its prompts)
        "global_std_over_prompts": {n: std[:, i].tolist() for i, n in enumerate(experts)},
        "global_per_layer": {  # [step] per layer, mean over prompts
            path: {n: layer_means[:, j, i].tolist() for i, n in enumerate(experts)}
            for j, path in enumerate(layer_paths)
        },
        "local_map_steps": shown,
        "local_maps": local_json,  # prompt -> step -> expert -> latent-grid map
        "latent_grid": list(latent_hw),
    }
    (out / "gates.json").write_text(json.dumps(data))
    grid(images, cols=min(len(images), 8), labels=[p[:30] for p in opts.prompts]).save(out / "images.png")
    return data


def _short(path: str) -> str:
    return path.replace("single_transformer_blocks.", "s").replace("transformer_blocks.", "d")


def _inspect_instruct(opts: InspectOptions, model, device) -> dict:
    """InstructMoLE: the experts each prompt's instruction chooses, and their weights, per layer."""
    from ..instruct import routing_heatmap

    pipe = model.pipe
    native = default_size(model)
    height, width = opts.height or native[0], opts.width or native[1]
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lengths = check_prompt_lengths(model, opts.prompts)
    capture = RoutingCapture(pipe)
    kontext = attach_conditions(model, opts.images, opts.condition_types)
    layers = capture.router.layer_paths
    per_prompt, images, means = [], [], {}
    try:
        for k, prompt in enumerate(opts.prompts):
            kwargs = dict(prompt=prompt, num_inference_steps=opts.steps, guidance_scale=opts.guidance_scale,
                          height=height, width=width, generator=torch.Generator(device=device).manual_seed(opts.seed),
                          **pipeline_kwargs(model, height, width))  # fmt: skip
            if opts.negative_prompt:
                kwargs["negative_prompt"] = opts.negative_prompt
            capture.reset()
            image = pipe(**kwargs).images[0]
            if capture.weights is None:
                raise RuntimeError("the InstructMoLE router gave no weights while generating (was it detached?)")
            w = capture.weights[:, -1]  # (layers, E): the conditional sample
            chosen = capture.per_sample(1)[0]
            routing_heatmap({_short(p): w[j] for j, p in enumerate(layers)}, capture.experts, out / f"routing_{k}.png",
                            title=f"expert weights per layer: {prompt[:40]}")  # fmt: skip
            means[f"{k}: {prompt}"[:14]] = w.mean(0)
            per_prompt.append({"prompt": prompt, "weights": {p: w[j].tolist() for j, p in enumerate(layers)},
                               "chosen": chosen, "mean_over_layers": w.mean(0).tolist()})  # fmt: skip
            image.save(out / f"image_{k}.png")
            images.append(image)
    finally:
        capture.remove()
        if kontext is not None:
            kontext.remove()
    routing_heatmap(means, capture.experts, out / "routing.png", title="mean expert weight over layers, per prompt")
    data = {"kind": "instruct", "experts": capture.experts, "layers": layers, "prompts": lengths, "steps": opts.steps,
            "images": list(opts.images), "routing": per_prompt}  # fmt: skip
    (out / "routing.json").write_text(json.dumps(data, indent=2))
    grid(images, cols=min(len(images), 8), labels=[p[:30] for p in opts.prompts]).save(out / "images.png")
    return data
