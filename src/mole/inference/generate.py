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

    OUTPUTS = ("images.jsonl", "index.json", "run.json", "compare.png", "mole", "fixed", "none")

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


def write_png(image: Image.Image, path: Path, meta: dict) -> None:
    """Write `image` to `path` atomically with its settings: A1111's `parameters` text (read by most image tools)
    and the whole record as JSON under `mole`."""
    info = PngInfo()
    info.add_text("parameters", f"{meta['prompt']}\nNegative prompt: {meta.get('negative_prompt') or ''}\n"
                  f"Steps: {meta['steps']}, Sampler: {meta['scheduler']}, CFG scale: {meta['guidance_scale']}, "
                  f"Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}, Model: {meta['base']}")  # fmt: skip
    info.add_text("mole", json.dumps(meta))
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp, pnginfo=info)
    tmp.replace(path)  # a kill never leaves a half-written image


def _settings(opts: GenerateOptions) -> dict:
    """What decides a run's images (not where they go, nor --overwrite): a rerun with equal settings continues."""
    skip = ("out_dir", "overwrite")
    return json.loads(json.dumps({k: v for k, v in asdict(opts).items() if k not in skip}, default=str))


def same_run(out_dir: str | Path, opts: GenerateOptions, unfinished: bool = False) -> bool:
    """Whether out_dir holds a run with these settings (run.json), which generate continues; unfinished: and it
    has not finished (no index.json)."""
    out = Path(out_dir)
    if unfinished and (out / "index.json").exists():
        return False
    try:
        return json.loads((out / "run.json").read_text()) == _settings(opts)
    except (OSError, ValueError):
        return False


def _done_rows(out: Path) -> dict[str, dict]:
    """path -> record, from an earlier (interrupted) run's images.jsonl; a line cut short by a kill is skipped,
    and so is a row whose image is gone."""
    rows = {}
    index = out / "images.jsonl"
    for line in index.read_text().splitlines() if index.is_file() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and Path(rec.get("path", "")).is_file():
            rows[rec["path"]] = rec
    return rows


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
    """Generate every (prompt, seed) in every mode; return an index of what was written. images.jsonl grows as
    each image is written, so an interrupted run continues where it stopped: an out_dir holding a run with the
    same settings (run.json) is continued (its images are kept, only the missing ones are drawn). An out_dir
    holding another run's images is refused unless opts.overwrite (which removes them first)."""
    out = Path(opts.out_dir)
    settings = _settings(opts)
    same = not opts.overwrite and same_run(out, opts)
    if not same:
        check_output_dir(opts.out_dir, GenerateOptions.OUTPUTS, opts.overwrite, "mole generate")
    done = _done_rows(out) if same else {}
    jobs = [(pi, p, s) for pi, p in enumerate(opts.prompts) for s in opts.seeds]
    paths = {(mode.value, pi, s): str(out / mode.value / f"{pi:04d}_seed{s}.png") for mode in opts.modes
             for pi, _, s in jobs}  # fmt: skip
    todo = sum(p not in done for p in paths.values())
    if done:
        logger.warning("%s: continuing an earlier run with the same settings: %d of %d images are there, %d to draw",
                       out, len(paths) - todo, len(paths), todo)  # fmt: skip
    model, device = open_sampler(opts.base, opts.scheduler, opts.dtype, opts.device,
                                 progress=logger.isEnabledFor(logging.DEBUG))  # fmt: skip
    pipe, dtype = model.pipe, model.denoiser.dtype
    if opts.scheduler_config:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **opts.scheduler_config)
    native = default_size(model)
    height, width = opts.height or native[0], opts.width or native[1]
    lengths = check_prompt_lengths(model, opts.prompts)
    loaded = None  # the mode whose MoLE weights are in the pipeline
    first = next((m for m in opts.modes if any(paths[(m.value, pi, s)] not in done for pi, _, s in jobs)), None)
    if opts.mole and first is not None:  # a MoLE file that does not fit the base stops here, before any folder
        load_mole_weights(pipe, opts.mole, first, opts.expert_weights, opts.strict_base, opts.expert_files)
        loaded = first
    out.mkdir(parents=True, exist_ok=True)  # only once the model loaded: a failed start leaves no folder
    (out / "run.json").write_text(json.dumps(settings, indent=1))

    from tqdm.auto import tqdm

    index: dict = {"options": {**asdict(opts), "modes": [m.value for m in opts.modes]}, "prompts": lengths,
                   "images": []}  # fmt: skip
    by_mode: dict[str, list[Image.Image]] = {}
    quiet = not logger.isEnabledFor(logging.WARNING)
    bar = tqdm(total=todo, desc="generate", unit="image", disable=True if quiet else None)  # one bar: images
    scheduler = type(pipe.scheduler).__name__ if is_flux(model) else opts.scheduler  # Flux keeps its own
    with (out / "images.jsonl").open("w") as log:
        for rec in done.values():  # what the earlier run finished stays in the index
            log.write(json.dumps(rec) + "\n")
        log.flush()
        for mode in opts.modes:
            missing = [j for j in jobs if paths[(mode.value, j[0], j[2])] not in done]
            if opts.mole and missing and mode is not loaded:
                load_mole_weights(pipe, opts.mole, mode, opts.expert_weights, opts.strict_base, opts.expert_files)
                loaded = mode
            capture = RoutingCapture(pipe)
            conditions = attach_conditions(model, opts.images, opts.condition_types) if missing else None
            folder = out / mode.value
            folder.mkdir(parents=True, exist_ok=True)
            negative = (opts.negative_prompt or "") + opts.negative_suffix
            for start in range(0, len(missing), opts.batch_size):
                chunk = missing[start : start + opts.batch_size]
                generators = [torch.Generator(device=device).manual_seed(s) for _, _, s in chunk]
                kwargs = dict(
                    prompt=[p + opts.prompt_suffix for _, p, _ in chunk], num_inference_steps=opts.steps,
                    guidance_scale=opts.guidance_scale,
                    height=height, width=width, generator=generators, **pipeline_kwargs(model, height, width),
                )  # fmt: skip
                if negative:
                    kwargs["negative_prompt"] = [negative] * len(chunk)
                capture.reset()
                result = pipe(**kwargs).images
                routing = capture.per_sample(len(chunk))
                for (pi, prompt, seed), image, route in zip(chunk, result, routing):
                    meta = {"prompt": prompt + opts.prompt_suffix, "negative_prompt": negative or None, "seed": seed,
                            "steps": opts.steps, "guidance_scale": opts.guidance_scale, "scheduler": scheduler,
                            "height": height, "width": width, "base": opts.base, "mole": opts.mole,
                            "mode": mode.value, "expert_weights": opts.expert_weights,
                            "dtype": str(dtype).replace("torch.", ""),
                            "truncated": lengths[pi]["truncated"], "images": list(opts.images) or None}  # fmt: skip
                    if route is not None:
                        meta["routing"] = route
                    path = Path(paths[(mode.value, pi, seed)])
                    write_png(image, path, meta)
                    done[str(path)] = {"path": str(path), **meta}
                    log.write(json.dumps(done[str(path)]) + "\n")  # a row only once its image is complete
                    log.flush()
                    bar.update(1)
            images = [Image.open(paths[(mode.value, pi, s)]).convert("RGB") for pi, _, s in jobs]
            grid(images, cols=min(len(opts.seeds), 8) if len(opts.seeds) > 1 else min(len(images), 8),
                 labels=[f"{p[:24]} s{s}" for _, p, s in jobs]).save(folder / "grid.png")  # fmt: skip
            by_mode[mode.value] = images
            capture.remove()
            if conditions is not None:
                conditions.remove()
    bar.close()
    index["images"] = [done[paths[(mode.value, pi, s)]] for mode in opts.modes for pi, _, s in jobs]
    index["drawn"] = todo
    if len(opts.modes) > 1:  # side by side: one row per (prompt, seed), one column per mode
        cells, labels = [], []
        for k in range(len(jobs)):
            for mode in opts.modes:
                cells.append(by_mode[mode.value][k])
                labels.append(mode.value)
        grid(cells, cols=len(opts.modes), labels=labels).save(out / "compare.png")
    tmp = out / "images.jsonl.tmp"  # in job order now that every image is there
    tmp.write_text("".join(json.dumps(rec) + "\n" for rec in index["images"]))
    tmp.replace(out / "images.jsonl")
    (out / "index.json").write_text(json.dumps(index, indent=2, default=str))
    return index

