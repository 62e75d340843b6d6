"""`mole generate`: images from prompts with MoLE, the base model, or fixed-weight expert mixing.

Each image is a PNG carrying its prompt, seed and settings in its metadata; a contact sheet and a jsonl index sit
beside them. For a side-by-side comparison, `modes` lists several MixModes: every (prompt, seed) is generated in
each, and compare.png shows them in columns.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..outputs import check_output_dir
from ..targets import Backbone
from .pipeline import (
    MixMode,
    SamplingOptions,
    condition_latents,
    default_size,
    load_mole_weights,
    open_sampler,
    pipeline_kwargs,
)
from .plot import grid

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class GenerateOptions(SamplingOptions):
    base: str
    prompts: list[str]
    mole: str | None = None  # MoLE .safetensors; required unless modes == [none]
    out_dir: str = "runs/generate"
    seeds: list[int] = field(default_factory=lambda: [0])
    negative_prompt: str | None = None
    batch_size: int = 4
    modes: list[MixMode] = field(default_factory=lambda: [MixMode.MOLE])
    expert_weights: dict[str, float] | None = None
    expert_files: dict[str, str] | None = None  # {name: LoRA file}: the experts of the paper's gate files, by name
    prompt_suffix: str = ""  # appended to every prompt (the official scripts: " best quality, 8K")
    negative_suffix: str = ""  # appended to every negative prompt (empty by default)
    scheduler_config: dict | None = None  # overrides of the scheduler's config (e.g. kohya's DDIM)
    strict_base: bool = True
    overwrite: bool = False  # False: refuse an out_dir holding an earlier run's images and index
    images: list[str] = field(default_factory=list)  # condition images (Flux / Flux-Kontext), any sizes, in order
    condition_types: list[str] | None = None  # PixArt: one type per image (default: the file's only type)

    OUTPUTS = ("images.jsonl", "index.json", "compare.png", "mole", "fixed", "none")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.modes = [MixMode(m) for m in self.modes]
        if not self.prompts:
            raise ValueError("prompts is empty: pass at least one prompt (or a prompt file)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: use at least 1")
        if any(m is not MixMode.NONE for m in self.modes) and not self.mole:
            raise ValueError("mole is not set: pass the MoLE .safetensors file, or use --no-mole for the base model")


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line (blank lines and lines starting with # skipped), or a .json/.jsonl of {"prompt": ...}."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"prompt file {path} is a folder; give a text, .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompt file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if path.suffix in (".jsonl", ".json"):
        try:
            lines = [x for x in text.splitlines() if x.strip()]
            data = [json.loads(x) for x in lines] if path.suffix == ".jsonl" else json.loads(text)
        except ValueError as exc:
            raise ValueError(f"prompt file {path} is not valid {path.suffix[1:].upper()} ({exc})") from None
        if not isinstance(data, list):
            raise ValueError(f"prompt file {path}: expected a list of prompts or of {{\"prompt\": ...}} records")
        out = []
        for n, d in enumerate(data, 1):
            if isinstance(d, dict):
                if not isinstance(d.get("prompt"), str):
                    raise ValueError(f"prompt file {path}: record {n} has no 'prompt' text (keys: {sorted(d)}); "
                                     "give each record a \"prompt\" key")  # fmt: skip
                out.append(d["prompt"])
            elif isinstance(d, str):
                out.append(d)
            else:
                raise ValueError(f"prompt file {path}: record {n} is {d!r}, not a prompt or a {{'prompt': ...}} record")
        return out
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def check_prompt_lengths(model, prompts: list[str]) -> list[dict]:
    """For each prompt: its token count, the limit, and the text the text encoder will not see (if any)."""
    pipe = model.pipe
    tok = pipe.tokenizer
    limit = 120 if model.backbone is Backbone.PIXART else tok.model_max_length
    reports = []
    for p in prompts:
        ids = tok(p, truncation=False, add_special_tokens=True).input_ids
        report = {"prompt": p, "tokens": len(ids), "limit": limit, "truncated": None}
        if len(ids) > limit:
            kept = limit - 1  # the end-of-text token takes the last place
            report["truncated"] = tok.decode(ids[kept:-1], skip_special_tokens=True)
            logger.warning(
                "prompt has %d tokens, the text encoder takes %d; this part is cut off: %r",
                len(ids), limit, report["truncated"],
            )  # fmt: skip
        reports.append(report)
    return reports


def _png(image: Image.Image, path: Path, meta: dict) -> None:
    info = PngInfo()
    info.add_text("parameters", f"{meta['prompt']}\nNegative prompt: {meta.get('negative_prompt') or ''}\n"
                  f"Steps: {meta['steps']}, Sampler: {meta['scheduler']}, CFG scale: {meta['guidance_scale']}, "
                  f"Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}, Model: {meta['base']}")  # fmt: skip
    info.add_text("mole", json.dumps(meta))
    image.save(path, pnginfo=info)


class RoutingCapture:
    """The expert weights an InstructMoLE router gave on the first denoiser call of each pipeline call (the
    instruction routing does not depend on the step): per sample, per instruction-routed layer, the chosen experts
    and their weights. Nothing is captured for a model without an InstructMoLE router."""

    def __init__(self, pipe) -> None:
        im = getattr(pipe, "mole_instruct", None)
        self.router = im.router if im is not None else None
        self.weights: torch.Tensor | None = None  # (layers, b, E) of the first call since reset()
        self._handle = None
        if self.router is not None:
            from ..inject import mole_state

            denoiser = im.transformer[0]
            self.experts = mole_state(denoiser).expert_names
            self._handle = denoiser.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if self.weights is None and self.router.last_weights is not None:
            self.weights = self.router.last_weights.detach().float().cpu().clone()

    def reset(self) -> None:
        self.weights = None

    def per_sample(self, n: int) -> list[dict | None]:
        """The last n samples of the captured batch (the conditional ones under guidance): {layer: {experts,
        weights}} with the experts of nonzero weight, largest first."""
        if self.router is None or self.weights is None:
            return [None] * n
        w = self.weights[:, -n:]  # (layers, n, E)
        out = []
        for i in range(n):
            rec = {}
            for j, path in enumerate(self.router.layer_paths):
                order = [e for e in torch.argsort(w[j, i], descending=True).tolist() if w[j, i, e] > 0]
                rec[path] = {"experts": [self.experts[e] for e in order],
                             "weights": [round(float(w[j, i, e]), 6) for e in order]}  # fmt: skip
            out.append(rec)
        return out

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class _TypedConditions:
    """PixArt: the loaded InstructMoLE's condition tokens, set to the condition images with their types."""

    def __init__(self, tokens, latents: list[torch.Tensor], types: list[str]) -> None:
        self.tokens = tokens
        tokens.set(latents, [[t] for t in types])

    def remove(self) -> None:
        self.tokens.set(None)


def attach_conditions(model, images: list[str], types: list[str] | None = None):
    """Condition images for the next pipeline calls (None without images): on Flux / Flux-Kontext as Kontext
    tokens; on PixArt as the loaded InstructMoLE file's typed condition tokens (`types`: one per image; default the
    file's only type). The returned object's remove() ends it."""
    if not images:
        return None
    im = getattr(model.pipe, "mole_instruct", None)
    if is_flux(model):
        from ..instruct import KontextConditions

        kontext = KontextConditions(model.denoiser)
        kontext.set([x.to(model.denoiser.dtype) for x in condition_latents(model, images)])
        return kontext
    if im is None or im.conditions is None:
        raise ValueError(f"images={images[:2]}: condition images need a Flux / Flux-Kontext base, or on "
                         f"{model.backbone.value} an InstructMoLE file trained with condition_types; drop --image")
    known = im.conditions.types
    if not types:
        if len(known) != 1:
            raise ValueError(f"condition images on {model.backbone.value} need a type each: pass --condition-type "
                             f"once per --image, one of {known}")  # fmt: skip
        types = known * len(images)
    if len(types) != len(images):
        raise ValueError(f"{len(images)} condition image(s) but {len(types)} condition type(s); give one "
                         "--condition-type per --image")  # fmt: skip
    latents = [x.to(model.denoiser.dtype) for x in condition_latents(model, images)]
    return _TypedConditions(im.conditions, latents, list(types))


def is_flux(model) -> bool:
    return model.backbone is Backbone.FLUX


def generate(opts: GenerateOptions) -> dict:
    """Generate every (prompt, seed) in every mode; return an index of what was written. An out_dir holding an
    earlier run's images is refused unless opts.overwrite (which removes them first)."""
    check_output_dir(opts.out_dir, GenerateOptions.OUTPUTS, opts.overwrite, "mole generate")
    model, device = open_sampler(opts.base, opts.scheduler, opts.dtype, opts.device,
                                 progress=logger.isEnabledFor(logging.INFO))  # fmt: skip
    pipe = model.pipe
    if opts.scheduler_config:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **opts.scheduler_config)
    native = default_size(model)
    height, width = opts.height or native[0], opts.width or native[1]
    lengths = check_prompt_lengths(model, opts.prompts)

    out = Path(opts.out_dir)
    jobs = [(pi, p, s) for pi, p in enumerate(opts.prompts) for s in opts.seeds]
    index: dict = {"options": {**asdict(opts), "modes": [m.value for m in opts.modes]}, "prompts": lengths,
                   "images": []}  # fmt: skip
    by_mode = _generate_modes(opts, model, device, jobs, height, width, lengths, index, out)
    if len(opts.modes) > 1:  # side by side: one row per (prompt, seed), one column per mode
        cells, labels = [], []
        for k in range(len(jobs)):
            for mode in opts.modes:
                cells.append(by_mode[mode.value][k])
                labels.append(mode.value)
        grid(cells, cols=len(opts.modes), labels=labels).save(out / "compare.png")
    with (out / "images.jsonl").open("w") as fh:
        for rec in index["images"]:
            fh.write(json.dumps(rec) + "\n")
    (out / "index.json").write_text(json.dumps(index, indent=2, default=str))
    return index


def _generate_modes(opts, model, device, jobs, height, width, lengths, index, out) -> dict[str, list[Image.Image]]:
    pipe, dtype = model.pipe, model.denoiser.dtype
    by_mode: dict[str, list[Image.Image]] = {}
    scheduler = type(pipe.scheduler).__name__ if is_flux(model) else opts.scheduler  # Flux keeps its own
    for mode in opts.modes:
        if opts.mole:
            load_mole_weights(pipe, opts.mole, mode, opts.expert_weights, opts.strict_base, opts.expert_files)
        capture = RoutingCapture(pipe)
        conditions = attach_conditions(model, opts.images, opts.condition_types)
        folder = out / mode.value
        folder.mkdir(parents=True, exist_ok=True)
        images: list[Image.Image] = []
        for start in range(0, len(jobs), opts.batch_size):
            chunk = jobs[start : start + opts.batch_size]
            generators = [torch.Generator(device=device).manual_seed(s) for _, _, s in chunk]
            kwargs = dict(
                prompt=[p + opts.prompt_suffix for _, p, _ in chunk], num_inference_steps=opts.steps,
                guidance_scale=opts.guidance_scale,
                height=height, width=width, generator=generators, **pipeline_kwargs(model, height, width),
            )  # fmt: skip
            negative = (opts.negative_prompt or "") + opts.negative_suffix
            if negative:
                kwargs["negative_prompt"] = [negative] * len(chunk)
            capture.reset()
            result = pipe(**kwargs).images
            routing = capture.per_sample(len(chunk))
            for (pi, prompt, seed), image, route in zip(chunk, result, routing):
                meta = {"prompt": prompt + opts.prompt_suffix, "negative_prompt": negative or None, "seed": seed,
                        "steps": opts.steps, "guidance_scale": opts.guidance_scale, "scheduler": scheduler,
                        "height": height, "width": width, "base": opts.base, "mole": opts.mole, "mode": mode.value,
                        "expert_weights": opts.expert_weights, "dtype": str(dtype).replace("torch.", ""),
                        "truncated": lengths[pi]["truncated"], "images": list(opts.images) or None}  # fmt: skip
                if route is not None:
                    meta["routing"] = route
                path = folder / f"{pi:04d}_seed{seed}.png"
                _png(image, path, meta)
                images.append(image)
                index["images"].append({"path": str(path), **meta})
        grid(images, cols=min(len(opts.seeds), 8) if len(opts.seeds) > 1 else min(len(images), 8),
             labels=[f"{p[:24]} s{s}" for _, p, s in jobs]).save(folder / "grid.png")  # fmt: skip
        by_mode[mode.value] = images
        capture.remove()
        if conditions is not None:
            conditions.remove()
    return by_mode
