"""Training configuration: nested dataclasses read from TOML, overridden from the command line, validated with
messages that name the field, the value and the fix, and written back as TOML beside every checkpoint."""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import tomllib

from ..config import GateInit, Gating, GlobalSource, MoLEConfigError
from ..instruct.model import InstructConfig
from .presets import PRESET_SOURCES, PRESETS


class TrainConfigError(MoLEConfigError):
    """A training option is invalid; the message names the field (dotted path), the value and the fix."""


class Stage(enum.IntEnum):
    FINETUNE = 1  # UNet (+ text encoder) on the human-centric set
    EXPERT = 2  # one LoRA expert on one close-up set
    MIXTURE = 3  # gates only, base and experts frozen
    INSTRUCT = 4  # InstructMoLE on a DiT: experts from scratch + instruction router, jointly


class OptimizerName(str, enum.Enum):
    ADAMW = "adamw"
    LION = "lion"


class LRSchedule(str, enum.Enum):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class Distributed(str, enum.Enum):
    """How the trained weights are spread over processes (docs/distributed.md)."""

    DDP = "ddp"  # a full copy on every process, gradients all-reduced (accelerate)
    FSDP2 = "fsdp2"  # trained modules sharded with torch.distributed.fsdp.fully_shard (torch directly)
    ZERO2 = "zero2"  # DeepSpeed ZeRO-2 through accelerate: optimizer state and gradients partitioned
    ZERO3 = "zero3"  # DeepSpeed ZeRO-3 through accelerate: the trained weights partitioned too


class MixedPrecision(str, enum.Enum):
    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"


@dataclass
class DataConfig:
    path: str = ""  # image folder, or webdataset shards (a folder of them, a .tar, shard-{000000..000009}.tar)
    manifest: str | None = None  # .jsonl / .json manifest (incl. kohya metadata json); None: .txt beside each image
    resolution: int = 512  # square training size in pixels
    center_crop: bool = True  # False: random crop
    random_flip: bool = False
    caption_dropout: float = 0.1  # probability of an empty caption (for classifier-free guidance)
    num_workers: int = 0
    cache_latents: bool = False  # encode each image once (needs center_crop and no random_flip)
    cache_text: bool = False  # encode each caption once (needs a frozen text encoder)


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.ADAMW
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    schedule: LRSchedule = LRSchedule.CONSTANT
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0


@dataclass
class ExpertTrainConfig:
    name: str = "face"
    rank: int = 256
    alpha: float | None = None  # None: alpha = rank (scale 1)


@dataclass
class MixtureTrainConfig:
    experts: dict[str, str] = field(default_factory=dict)  # name -> LoRA file or folder
    gating: Gating = Gating.BOTH
    global_source: GlobalSource = GlobalSource.INPUT
    gate_init: GateInit = GateInit.DEFAULT


@dataclass(frozen=True)
class BatchPlan:
    """One optimizer step = per_device images x processes x grad_accum micro-steps = total images."""

    per_device: int
    processes: int
    grad_accum: int
    total: int

    def describe(self) -> str:
        return (f"{self.total} images per optimizer step = {self.per_device} per device x {self.processes} "
                f"process(es) x {self.grad_accum} accumulation step(s)")  # fmt: skip


@dataclass
class TrainConfig:
    stage: Stage = Stage.MIXTURE
    model: str = ""  # hub id, local diffusers pipeline folder or single-file checkpoint (model.safetensors)
    output_dir: str = "runs/train"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    expert: ExpertTrainConfig = field(default_factory=ExpertTrainConfig)
    mixture: MixtureTrainConfig = field(default_factory=MixtureTrainConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    train_text_encoder: bool = True  # stage 1 only (SD1.5 / SD2.1)
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 1  # per process (the micro-batch one forward pass holds)
    # images per optimizer step over all processes (the paper: 64); None: batch_size x processes x grad_accum
    total_batch_size: int | None = None
    grad_accum: int | None = None  # None: 1, or total_batch_size / (batch_size x processes) when that is set
    clip_skip: int = 1  # kohya / A1111 numbering: 1 = the last CLIP layer, 2 = the penultimate (diffusers' 1)
    mixed_precision: MixedPrecision = MixedPrecision.NO
    gradient_checkpointing: bool = False
    distributed: Distributed = Distributed.DDP  # ddp | fsdp2 | zero2 | zero3 (or set by an accelerate config file)
    min_snr_gamma: float | None = 5.0  # None: plain MSE
    noise_offset: float = 0.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    tensorboard: bool = True  # when the tensorboard package is installed

    def validate(self) -> TrainConfig:
        def need(ok: bool, name: str, value: Any, fix: str) -> None:
            if not ok:
                raise TrainConfigError(f"{name}={value!r} is not valid: {fix}")

        if not self.model:
            raise TrainConfigError("model is not set (model=''): give the base model, e.g. --set model=mole-tiny, a "
                                   "hub id, a pipeline folder or a model.safetensors")  # fmt: skip
        if not self.data.path:
            raise TrainConfigError("data.path is not set: give the training image folder, e.g. --set data.path=DIR, "
                                   "or in the config file a [data] table with path = \"DIR\"")  # fmt: skip
        need(self.max_steps >= 1, "max_steps", self.max_steps, "use at least 1")
        need(self.batch_size >= 1, "batch_size", self.batch_size, "use at least 1")
        need(self.grad_accum is None or self.grad_accum >= 1, "grad_accum", self.grad_accum, "use at least 1")
        need(self.total_batch_size is None or self.total_batch_size >= 1, "total_batch_size", self.total_batch_size,
             "use at least 1 (the paper: 64)")  # fmt: skip
        need(self.clip_skip >= 1, "clip_skip", self.clip_skip,
             "use 1 (the last CLIP layer, the paper's setting) or more (kohya / A1111 numbering)")  # fmt: skip
        self.batch_plan(1)  # a micro-batch that cannot divide the total fails here, before any model loads
        need(self.data.resolution >= 8 and self.data.resolution % 8 == 0, "data.resolution", self.data.resolution,
             "use a multiple of 8")  # fmt: skip
        need(0.0 <= self.data.caption_dropout < 1.0, "data.caption_dropout", self.data.caption_dropout,
             "use a probability in [0, 1)")  # fmt: skip
        need(0 < self.optim.lr < 1 and math.isfinite(self.optim.lr), "optim.lr", self.optim.lr,
             "use a positive rate below 1 (the paper: 1e-5 to 2e-5; Lion 2e-6)")  # fmt: skip
        for i, b in enumerate(self.optim.betas):
            need(0.0 <= b < 1.0, f"optim.betas[{i}]", b, "use values in [0, 1), e.g. betas = [0.9, 0.999]")
        need(self.optim.weight_decay >= 0 and math.isfinite(self.optim.weight_decay), "optim.weight_decay",
             self.optim.weight_decay, "use 0 or a small positive value (e.g. 1e-2)")  # fmt: skip
        need(self.optim.eps > 0 and math.isfinite(self.optim.eps), "optim.eps", self.optim.eps,
             "use a small positive value (e.g. 1e-8)")  # fmt: skip
        need(self.optim.max_grad_norm is None or self.optim.max_grad_norm > 0, "optim.max_grad_norm",
             self.optim.max_grad_norm, "use a positive norm (e.g. 1.0) or leave it unset")  # fmt: skip
        need(self.noise_offset >= 0 and math.isfinite(self.noise_offset), "noise_offset", self.noise_offset,
             "use 0 or a small positive value (e.g. 0.05)")  # fmt: skip
        need(self.data.num_workers >= 0, "data.num_workers", self.data.num_workers, "use 0 or more")
        need(isinstance(self.seed, int) and 0 <= self.seed < 2**31, "seed", self.seed,
             "use an integer in [0, 2147483647]")  # fmt: skip
        alpha = self.expert.alpha
        need(alpha is None or (alpha > 0 and math.isfinite(alpha)), "expert.alpha", alpha,
             "use a positive alpha (the scale is alpha / rank) or leave it unset")  # fmt: skip
        need(self.optim.warmup_steps >= 0, "optim.warmup_steps", self.optim.warmup_steps, "use 0 or more")
        need(self.min_snr_gamma is None or self.min_snr_gamma > 0, "min_snr_gamma", self.min_snr_gamma,
             "use a positive gamma (paper: 5) or leave it unset for plain MSE")  # fmt: skip
        need(self.log_every >= 1, "log_every", self.log_every, "use at least 1")
        need(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "use at least 1")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "keep at least 1")
        if self.data.cache_latents:
            need(self.data.center_crop and not self.data.random_flip, "data.cache_latents", True,
                 "cached latents need data.center_crop=true and data.random_flip=false")  # fmt: skip
        if self.stage is Stage.EXPERT:
            need(self.expert.rank >= 1, "expert.rank", self.expert.rank, "use a rank of at least 1 (paper: 256)")
            from ..experts import EXPERT_NAME

            need(bool(EXPERT_NAME.match(self.expert.name)), "expert.name", self.expert.name,
                 "use a short identifier such as 'face' or 'hand'")  # fmt: skip
        if self.stage is Stage.MIXTURE:
            need(bool(self.mixture.experts), "mixture.experts", self.mixture.experts,
                 "name the experts to mix, e.g. mixture.experts = {face = 'face.safetensors'}")  # fmt: skip
            need(self.mixture.gating is not Gating.NONE, "mixture.gating", "none",
                 "stage 3 trains gates: use local, global or both")  # fmt: skip
        if self.data.cache_text:
            need(self.stage is not Stage.FINETUNE or not self.train_text_encoder, "data.cache_text", True,
                 "the text encoder trains, so its embeddings change; set train_text_encoder=false")  # fmt: skip
        return self

    def batch_plan(self, num_processes: int) -> BatchPlan:
        """How one optimizer step's batch is made on `num_processes` processes. With total_batch_size set, the
        accumulation is computed from it and never rounded: a total that batch_size x processes does not divide is
        an error naming the batch sizes that would."""
        per_step = self.batch_size * num_processes
        if self.total_batch_size is None:
            accum = self.grad_accum or 1
            return BatchPlan(self.batch_size, num_processes, accum, per_step * accum)
        total = self.total_batch_size
        if total % per_step:
            fits = [b for b in range(1, total + 1) if total % (b * num_processes) == 0]
            raise TrainConfigError(
                f"total_batch_size={total} is not a multiple of batch_size={self.batch_size} x {num_processes} "
                f"process(es) = {per_step}, so no whole number of accumulation steps reaches it; use batch_size in "
                f"{fits} on {num_processes} process(es), or change total_batch_size"
            )
        accum = total // per_step
        if self.grad_accum is not None and self.grad_accum != accum:
            raise TrainConfigError(
                f"grad_accum={self.grad_accum} contradicts total_batch_size={total} = batch_size={self.batch_size} "
                f"x {num_processes} process(es) x {accum}; leave grad_accum unset (it is computed) or change "
                "total_batch_size"
            )
        return BatchPlan(self.batch_size, num_processes, accum, total)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def to_toml(self) -> str:
        return _to_toml(_mark_unset(self, self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return build_dataclass(cls, data, "")


# ---------------------------------------------------------------------------------------------------- presets
def annotated_toml(cfg: TrainConfig, preset: str | None = None, num_processes: int = 1) -> str:
    """The resolved config as TOML, each option the preset set followed by its source as a comment, and the batch
    arithmetic (total = per device x processes x accumulation) for `num_processes` as a closing comment."""
    sources = PRESET_SOURCES.get(preset, {}) if preset else {}
    adapted = getattr(cfg, "adapted", {})  # load_config's adapt_to_model: values fitted to the model / device
    out, table = [], ""
    for line in _to_toml(_mark_unset(cfg, cfg.to_dict()), keep_none=set(sources)).splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            table = stripped[1:-1] + "."
        key = stripped.lstrip("# ").split(" = ", 1)[0] if " = " in stripped else None
        src = sources.get(table + key) if key else None
        if src and table + key in getattr(cfg, "set_keys", ()):
            src = "--set (not the preset)"  # the preset's source no longer describes the value
        note = adapted.get(table + key) if key else None
        if note:
            src = f"{note}; preset: {src}" if src and not src.startswith("--set") else note
        out.append(f"{line}  # {src}" if src else line)
    plan = cfg.batch_plan(num_processes)
    out.append("")
    out.append(f"# batch: {plan.describe()}")
    return "\n".join(out) + "\n"


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "experts" else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """'optim.lr=1e-4' -> {'optim': {'lr': 1e-4}}; values are TOML (strings may go unquoted)."""
    if "=" not in text:
        raise TrainConfigError(f"override {text!r} is not key=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(
    path: str | Path | None = None, preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """preset < TOML file < overrides, then validated."""
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise TrainConfigError(f"preset={preset!r} is unknown; use one of {', '.join(sorted(PRESETS))}")
        data = merge(data, PRESETS[preset])
    explicit: set[str] = set()  # what the config file and --set give: kept (a conflict is marked, not adapted)
    if path is not None:
        try:
            from_file = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            explicit |= set(_dotted(from_file))
            data = merge(data, from_file)
        except FileNotFoundError:
            raise TrainConfigError(f"config file {str(path)!r} does not exist") from None
        except IsADirectoryError:
            raise TrainConfigError(f"config file {str(path)!r} is a folder; give the .toml file") from None
        except UnicodeDecodeError as exc:
            raise TrainConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}); "
                                   "save it as UTF-8") from None  # fmt: skip
        except tomllib.TOMLDecodeError as exc:
            raise TrainConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    set_keys: set[str] = set()
    for text in overrides:
        update = parse_override(text)
        set_keys |= set(_dotted(update))
        data = merge(data, update)
    cfg = TrainConfig.from_dict(data)
    # not fields: what --print-config marks and train logs; the keys --print-config credits to --set
    cfg.adapted = adapt_to_model(cfg, explicit | set_keys, set_keys=set_keys)
    cfg.set_keys = set_keys
    return cfg.validate()


def _dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and k != "experts":
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def model_shape(model: str) -> dict[str, Any] | None:
    """The native image side and layer widths of a local pipeline folder (or mole-tiny), from its config files
    only (milliseconds, nothing loads); None for a hub id or single file (unknown without loading)."""
    import json

    from ..mole_tiny import is_mole_tiny, resolve_base

    try:
        folder = Path(resolve_base(model) if is_mole_tiny(model) else model).expanduser()
        if not (folder / "model_index.json").is_file():
            return None
        configs = [folder / d / "config.json" for d in ("unet", "transformer")]
        den = next((c for c in configs if c.is_file()), None)
        den_cfg = json.loads(den.read_text()) if den else {}
        vae = json.loads((folder / "vae" / "config.json").read_text())
        sample = den_cfg.get("sample_size")
        side = (sample if isinstance(sample, int) else min(sample)) * 2 ** (len(vae["block_out_channels"]) - 1)
        return {"side": int(side), "widths": list(den_cfg.get("block_out_channels") or [])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def adapt_to_model(cfg: TrainConfig, explicit: set[str] = frozenset(), cuda: bool | None = None,
                   set_keys: set[str] = frozenset()) -> dict[str, str]:  # fmt: skip
    """Fit preset and default values to the model and device, leaving what `explicit` names (the config file's
    and --set's keys) alone. Returns
    {dotted key: reason} for each value changed ("adapted: ...") or that conflicts and is kept ("conflicts: ...").
    - data.resolution: the model's native side (mole-tiny: 64 px, not the preset's 512);
    - mixed_precision bf16 / fp16 without a GPU: no (CPU autocast in half precision is slow and lossy), also when
      a config file asks for it (a GPU setting, as in configs/*.toml); only --set keeps it;
    - expert.rank above the model's narrowest block: marked (a rank above min(in, out) of a layer adds nothing);
    - without a GPU, a micro-batch too large for the resolution and more than 8 images per optimizer step: marked
      with a value and the gradient accumulation that keeps the images per step (_cpu_batch_notes)."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    notes: dict[str, str] = {}
    shape = model_shape(cfg.model)
    name = cfg.model if len(cfg.model) < 40 else "the model"
    if shape and cfg.data.resolution != shape["side"]:
        if "data.resolution" in explicit:
            notes["data.resolution"] = f"conflicts: {name} draws {shape['side']} px; kept as given"
        else:
            notes["data.resolution"] = f"adapted: {name} draws {shape['side']} px (was {cfg.data.resolution})"
            cfg.data.resolution = shape["side"]
    if not cuda and cfg.mixed_precision is not MixedPrecision.NO:
        was = cfg.mixed_precision.value
        if "mixed_precision" in set_keys:
            notes["mixed_precision"] = f"conflicts: no GPU here, {was} on a CPU is slow; kept as given"
        else:
            notes["mixed_precision"] = f"adapted: no GPU here, so full precision (was {was})"
            cfg.mixed_precision = MixedPrecision.NO
    if not cuda:
        notes.update(_cpu_batch_notes(cfg))
    if shape and shape["widths"] and cfg.stage == Stage.EXPERT and cfg.expert.rank > min(shape["widths"]):
        notes["expert.rank"] = (f"conflicts: rank {cfg.expert.rank} is above {name}'s narrowest block "
                                f"({min(shape['widths'])} channels; widths {shape['widths']}): a rank above a layer's "
                                "min(in, out) adds nothing there; --set expert.rank=N to choose")  # fmt: skip
    return notes


CPU_STEP_IMAGES = 8  # images per optimizer step above which a CPU run is marked (the paper's 64: a GPU setting)
CPU_MICRO_PIXELS = 8 * 64 * 64  # a micro-batch a CPU holds briskly: 8 images at 64 px, 2 at 128, 1 at 256 and up


def _cpu_batch_notes(cfg: TrainConfig) -> dict[str, str]:
    """Marks (kept, not changed: the batch is the user's training choice) for a batch meant for GPUs on a CPU: a
    micro-batch too large for its resolution, and more images per optimizer step than a CPU run needs; each names
    a value and how gradient accumulation keeps the images per step."""
    notes: dict[str, str] = {}
    try:
        plan = cfg.batch_plan(1)
    except (ValueError, TrainConfigError):
        return notes  # the batch arithmetic itself is refused elsewhere, with its own message
    res = max(1, cfg.data.resolution)
    micro = max(1, CPU_MICRO_PIXELS // (res * res))
    if cfg.batch_size > micro:
        accum = -(-cfg.batch_size // micro)
        keep = (f"total_batch_size={cfg.total_batch_size} is then reached by gradient accumulation"
                if cfg.total_batch_size else f"add --set grad_accum={accum * plan.grad_accum} to keep "
                f"{plan.total} images per step by gradient accumulation")  # fmt: skip
        notes["batch_size"] = (f"conflicts: no GPU here: a micro-batch of {cfg.batch_size} images at {res} px is "
                               f"slow and memory-hungry on a CPU; use --set batch_size={micro} ({keep})")  # fmt: skip
    if plan.total > CPU_STEP_IMAGES:
        key = "total_batch_size" if cfg.total_batch_size else "grad_accum" if (cfg.grad_accum or 1) > 1 else None
        if key:
            fix = (f"--set total_batch_size={CPU_STEP_IMAGES}" if key == "total_batch_size" else
                   f"--set grad_accum={max(1, CPU_STEP_IMAGES // plan.per_device)}")  # fmt: skip
            notes[key] = (f"conflicts: no GPU here: {plan.total} images per optimizer step ({plan.grad_accum} "
                          f"accumulation step(s) of {plan.per_device}) make each step about {plan.total}x one "
                          f"image's time on a CPU; for a CPU run use {fix} (gradient accumulation reaches a larger "
                          "total on a GPU)")  # fmt: skip
    return notes


# ---------------------------------------------------------------------------------------------------- helpers
def build_dataclass(cls: type, data: Any, prefix: str, cli: str = "--set") -> Any:
    """cls from a TOML table; every unknown key below it is reported at once (with the nearest valid key), then the
    values are checked, each error in CLI / TOML terms. cli: the flag that sets a key ("" where there is none)."""
    if not isinstance(data, dict):
        name = prefix.rstrip(".") or "config"
        hint = ""
        if isinstance(data, str) and any(f.name == "path" for f in fields(cls)):  # data = "data/faces"
            hint = f"; for the folder write {name}.path = {data!r} (--set {name}.path={data}, or [{name}] path = ...)"
        elif isinstance(data, list) and all(isinstance(d, dict) for d in data):  # [[data]] where [data] is meant
            hint = f"; write [{name}] (one pair of brackets), not [[{name}]] (a list of tables)"
        raise TrainConfigError(f"{name} must be a table of options ([{name}] in the TOML), got "
                               f"{shown(data, name)}{hint}")  # fmt: skip
    unknown = unknown_keys(cls, data, prefix)
    if unknown:
        raise TrainConfigError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
                               f"{'; --print-config lists every option' if cli else ''}")  # fmt: skip
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], prefix + f.name, cli)
    try:
        return cls(**kwargs)
    except MoLEConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        raise TrainConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def _table_type(tp: Any) -> tuple[str, Any] | None:
    """("one", cls) for a dataclass field (optional too), ("list" / "dict", cls) for a list / table of them."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _table_type(inner[0]) if len(inner) == 1 else None
    if is_dataclass(tp):
        return "one", tp
    if origin is list and args and is_dataclass(args[0]):
        return "list", args[0]
    if origin is dict and len(args) == 2 and is_dataclass(args[1]):
        return "dict", args[1]
    return None


def unknown_keys(cls: type, data: Any, prefix: str = "") -> list[str]:
    """Every key of `data` (nested tables and [[lists]] of tables included) that `cls` does not have, in dotted
    form, each with the nearest valid key: ["optim.lrr (did you mean optim.lr?)", "foo"]."""
    import difflib

    if not isinstance(data, dict) or not is_dataclass(cls):
        return []
    hints = typing.get_type_hints(cls)
    known = sorted(f.name for f in fields(cls))
    out = []
    for key in data:
        if key not in known:
            match = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            out.append(f"{prefix}{key} (did you mean {prefix}{match[0]}?)" if match else f"{prefix}{key}")
            continue
        table = _table_type(hints[key])
        if table is None:
            continue
        kind, sub = table
        value = data[key]
        if kind == "one":
            out += unknown_keys(sub, value, f"{prefix}{key}.")
        elif kind == "list" and isinstance(value, list):
            for i, item in enumerate(value):
                out += unknown_keys(sub, item, f"{prefix}{key}[{i}].")
        elif kind == "dict" and isinstance(value, dict):
            for k, item in value.items():
                out += unknown_keys(sub, item, f"{prefix}{key}.{k}.")
    return out


def shown(value: Any, name: str) -> str:
    """A value as TOML writes it, for messages: a table as its dotted keys, e.g. "a table (model.not = 1)"."""

    def toml(v: Any) -> str:
        try:
            return _toml_value(v)
        except TypeError:
            return str(v)

    if isinstance(value, dict):
        inner = ", ".join(f"{name}.{k} = {toml(v)}" for k, v in list(value.items())[:3])
        return f"a table ({inner}{', ...' if len(value) > 3 else ''})" if value else "an empty table"
    if isinstance(value, (list, tuple)):
        return f"a list ({toml(list(value))})"
    return toml(value)


_TEXT = {  # what a text option holds, by its name, for "must be ..." messages
    "model": ("a model name or path (mole-tiny, a hub id, a folder or a .safetensors file)", "PATH"),
    "base": ("a model name or path (mole-tiny, a hub id, a folder or a .safetensors file)", "PATH"),
    "mole": ("a MoLE file (or mole-tiny)", "FILE"),
    "resume": ('"latest", "none" or a checkpoint folder', "latest"),
    "output_dir": ("a folder path", "FOLDER"),
    "out_dir": ("a folder path", "FOLDER"),
    "path": ("a path", "PATH"),
}


def _must(name: str, what: str, value: Any, cli: str, example: str = "VALUE") -> TrainConfigError:
    """The one wording of a value of the wrong type: the option, what it holds, what was given, and the fix."""
    fix = ""
    if isinstance(value, dict):  # --set model.not=1 (or [model] in the TOML) where model is one value
        fix = (f"; set {name} itself" + (f" ({cli} {name}={example})" if cli else f" ({name} = ...)")
               + ", not a key below it")
    return TrainConfigError(f"{name} must be {what}, got {shown(value, name)}{fix}")


def _coerce(tp: Any, value: Any, name: str, cli: str = "--set") -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if type(None) in args and (value is None or (value == UNSET and inner[0] is not str)):
            return None
        return _coerce(inner[0], value, name, cli)
    if is_dataclass(tp):
        return build_dataclass(tp, value, name + ".", cli)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except (ValueError, TypeError):
            allowed = ", ".join(str(m.value) for m in tp)
            raise TrainConfigError(f"{name} = {shown(value, name)} is not valid; use one of {allowed}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _must(name, f"a list of {len(args)} numbers (e.g. [0.9, 0.99])", value, cli)
        return tuple(_coerce(a, v, f"{name}[{i}]", cli) for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, list):
            if isinstance(value, dict) and is_dataclass(args[0]):  # [models] where [[models]] is meant
                raise TrainConfigError(f"{name} must be a list of tables, got {shown(value, name)}: write "
                                       f"[[{name}]] (two pairs of brackets) for each entry, not [{name}]")  # fmt: skip
            raise _must(name, "a list", value, cli)
        return [_coerce(args[0], v, f"{name}[{i}]", cli) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TrainConfigError(f"{name} must be a table (e.g. {name} = {{face = \"face.safetensors\"}}), "
                                   f"got {shown(value, name)}")  # fmt: skip
        return {str(k): _coerce(args[1], v, f"{name}.{k}", cli) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _must(name, "true or false", value, cli, "true")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _must(name, "a number", value, cli, "1e-4")
        if not math.isfinite(value):
            raise TrainConfigError(f"{name} = {shown(value, name)} must be a finite number (nan / inf are not "
                                   "settings)")  # fmt: skip
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _must(name, "a whole number", value, cli, "1")
        return value
    if tp is str:
        if name == "resume" and value is False:  # resume = false: start fresh, as resume = "none"
            return None
        if not isinstance(value, (str, Path)):
            what, example = _TEXT.get(name.rsplit(".", 1)[-1].split("[")[0], ("text", "TEXT"))
            raise _must(name, what, value, cli, example)
        return str(value)
    return value


UNSET = "none"  # how TOML (which has no null) writes an option that is off although its default is not, e.g.
# min_snr_gamma = "none" (plain MSE) or optim.max_grad_norm = "none" (no clipping); also accepted from --set


def _mark_unset(obj: Any, data: dict[str, Any]) -> dict[str, Any]:
    """data (obj.to_dict()) with UNSET for each None whose field default is not None, so the TOML reads back equal."""
    out = dict(data)
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out[f.name] = _mark_unset(value, data[f.name])
        elif value is None and f.default is not None and f.default is not dataclasses.MISSING:
            out[f.name] = UNSET
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def _to_toml(data: dict[str, Any], keep_none: set[str] = frozenset()) -> str:
    """Write nested dicts as TOML; None values are left out (they mean "unset"), or written as a comment
    `# key = (unset)` for the dotted keys in `keep_none`."""
    lines, tables = [], []
    for k, v in data.items():
        if v is None:
            if k in keep_none:
                lines.append(f"# {_toml_key(k)} = (unset)")
            continue
        if isinstance(v, dict) and v and all(not isinstance(x, dict) or k2 == "experts" for k2, x in v.items()):
            tables.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        for k, v in table.items():
            if v is not None:
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
            elif f"{name}.{k}" in keep_none:
                lines.append(f"# {_toml_key(k)} = (unset)")
    return "\n".join(lines) + "\n"
