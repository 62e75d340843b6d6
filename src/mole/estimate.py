"""How much accelerator memory one MoLE training stage needs, from the model's real shapes.

    est = estimate_memory("sdxl", stage=3, batch_size=1, precision="bf16")
    est.total_gb, est.rows()                          # weights, gradients, optimizer state, activations, ...
    max_batch_size("sd15", stage=2, budget_gb=24)     # largest batch that fits

Nothing is allocated: the denoiser is built on the meta device (shapes only), the stage's experts / gates are
injected as in training, and one forward pass counts the bytes autograd saves for the backward (distinct storages,
parameters excluded), with attention saving what a fused (flash / memory-efficient) kernel saves: q, k, v, the output
and the log-sum-exp. With gradient checkpointing (diffusers checkpoints every resnet and transformer block) only
the blocks' inputs stay, plus one block's activations while it is recomputed.

    weights         every component the training loop moves to the device (denoiser, VAE, text encoders) in the
                    weight dtype; trainable tensors in fp32 (stage 1: the whole denoiser, plus the autocast copies
                    of its weights under mixed precision); frozen experts in the weight dtype
    gradients       fp32, one per trainable value
    optimizer       AdamW two fp32 states per trainable value, Lion one
    activations     saved for the backward at this batch size and resolution
    workspace       the gradient of the largest saved activation and its input (live at once in the backward)
    recording       host (CPU) memory for one recorded step with local maps (stage 3 logs them; inspect records
                    every step), not accelerator memory
Not included: the CUDA context and allocator fragmentation (typically 0.5-1.5 GB), and the VAE encoder's transient
activations when latents are not cached.

Per device on N devices (`gpus`, `strategy`; `with_strategy` applies them to an estimate), as the training loop
spreads the weights (docs/distributed.md): activations and workspace are per device's batch under every strategy.
    ddp     everything replicated: the same on any N
    zero2   gradients and optimizer states / N (DeepSpeed ZeRO-2); under mixed precision also the trained fp32
            weights (DeepSpeed's fp32 master copies live in the optimizer partition); the rest replicated
    fsdp2   the trained modules (the denoiser, with its frozen base and experts; stage 1's trained text encoder)
    zero3   sharded / N: their weights, autocast copies, gradients and optimizer states; plus the all-gather
            buffers: two whole blocks (the one computing, the one prefetched). The frozen VAE and text encoders are
            kept whole on every device under both (as diffusers' examples keep them out of ZeRO-3)
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

GB = 1024**3
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPTIMIZER_STATES = {"adamw": 2, "lion": 1}
NATIVE_RESOLUTION = {"sd15": 512, "sd21": 768, "sdxl": 1024, "pixart": 512}
CHECKPOINT_UNITS = ("ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock")  # what diffusers checkpoints
STRATEGIES = ("ddp", "zero2", "fsdp2", "zero3")  # simplest first
# the block lists the trained modules are sharded by (one FSDP unit per block; mole.training.distributed)
SHARD_BLOCKS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks", "layers", "block")
GATHER_BUFFER = "all-gather buffers (2 blocks)"


class EstimateError(ValueError):
    """A bad estimate request; the message names the field and the fix."""


@dataclass
class MemoryEstimate:
    """Bytes per part for one training step; `total` is the accelerator peak (recording is host memory)."""

    kind: str
    stage: int
    batch_size: int
    resolution: int
    precision: str
    optimizer: str
    gradient_checkpointing: bool
    rank: int
    num_experts: int
    weights: dict[str, int] = field(default_factory=dict)
    trainable_params: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    workspace: int = 0
    recording: int = 0
    wrapped_layers: int = 0
    activations_by_checkpointing: dict[bool, int] = field(default_factory=dict)  # both, whichever is chosen
    gpus: int = 1
    strategy: str = "ddp"
    sharded_weights: tuple[str, ...] = ()  # the weights rows of the trained modules (sharded by fsdp2 / zero3)
    trained_weights: tuple[str, ...] = ()  # the rows of trained fp32 weights (zero2 under mixed precision: / N)
    largest_block: int = 0  # bytes of the largest shard unit of the denoiser, whole

    @property
    def total(self) -> int:
        return sum(self.weights.values()) + self.gradients + self.optimizer_state + self.activations + self.workspace

    @property
    def total_gb(self) -> float:
        return self.total / GB

    def rows(self) -> list[tuple[str, float]]:
        """(part, GiB) rows for printing; the last is the total."""
        rows = [(f"weights: {k}", v / GB) for k, v in self.weights.items()]
        rows += [("gradients", self.gradients / GB), (f"optimizer ({self.optimizer})", self.optimizer_state / GB),
                 ("activations" + (" (checkpointed)" if self.gradient_checkpointing else ""), self.activations / GB),
                 ("workspace", self.workspace / GB), ("total (accelerator)", self.total_gb),
                 ("gate recording per step (host)", self.recording / GB)]  # fmt: skip
        return rows


def _flash_like_sdpa():
    """F.scaled_dot_product_attention with a fused kernel's saved tensors (q, k, v, out, logsumexp)."""
    original = F.scaled_dot_product_attention

    class _Flash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            # fused kernels write (b, n, h, d) and return the (b, h, n, d) view, so the caller's
            # transpose(1, 2).reshape(b, n, h * d) is a view of the same memory, not a copy
            out = original(q, k, v).transpose(1, 2).contiguous().transpose(1, 2)
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):  # pragma: no cover - the estimate never runs a backward
            raise NotImplementedError

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or is_causal or scale is not None or kw:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        return _Flash.apply(q, k, v)

    return original, sdpa


@contextmanager
def _patched_sdpa():
    original, sdpa = _flash_like_sdpa()
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _storage_key(t: torch.Tensor) -> int:
    """Tensors sharing memory share this key: the storage's address, or on meta (no addresses) the view's base."""
    if t.device.type != "meta":
        return t.untyped_storage().data_ptr()
    while t._base is not None:
        t = t._base
    return id(t)


def count_saved(model: nn.Module, run, flash_attention: bool = True) -> dict:
    """Run `run()` (a forward of `model`) and count what autograd saves: total bytes, the bytes attributed to each
    checkpoint unit (outermost ResnetBlock2D / Transformer2DModel / BasicTransformerBlock), the units' input bytes,
    and the largest saved storage. Works on meta tensors (nothing is computed) and on real ones."""
    own = {_storage_key(p) for p in model.parameters()} | {_storage_key(b) for b in model.buffers()}
    saved: dict[int, tuple[int, int]] = {}  # storage -> (bytes, unit index or -1)
    unit_inputs: list[int] = []
    active: list[int] = []

    def pack(t):
        key = _storage_key(t)
        if key not in own and key not in saved:
            saved[key] = (_nbytes(t), active[0] if active else -1)
        return t

    def pre(module, args, kwargs):
        if not active:
            x = args[0] if args else kwargs.get("hidden_states")
            unit_inputs.append(_nbytes(x) if isinstance(x, torch.Tensor) else 0)
            active.append(len(unit_inputs) - 1)
        else:
            active.append(active[0])

    def post(module, args, output):
        active.pop()

    handles = []
    for m in model.modules():
        if type(m).__name__ in CHECKPOINT_UNITS:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if flash_attention:
                with _patched_sdpa():
                    run()
            else:
                run()
    finally:
        for h in handles:
            h.remove()
    per_unit = [0] * len(unit_inputs)
    outside = 0
    for nbytes, unit in saved.values():
        if unit < 0:
            outside += nbytes
        else:
            per_unit[unit] += nbytes
    return {"total": sum(b for b, _ in saved.values()), "outside": outside, "per_unit": per_unit,
            "unit_inputs": unit_inputs, "largest": max((b for b, _ in saved.values()), default=0)}  # fmt: skip


def denoiser_inputs(model: nn.Module, batch: int, latent_hw: tuple[int, int], device, dtype) -> dict:
    """Denoiser arguments of the right shapes (UNet: SD1.x / SD2.x / SDXL; PixArt transformer)."""
    cfg = model.config
    h, w = latent_hw
    if type(model).__name__ == "PixArtTransformer2DModel":
        cond = {"resolution": None, "aspect_ratio": None}
        if cfg.sample_size == 128:  # PixArt-1024 uses the resolution / aspect-ratio conditions
            cond = {"resolution": torch.zeros(batch, 2, device=device, dtype=dtype),
                    "aspect_ratio": torch.zeros(batch, 1, device=device, dtype=dtype)}  # fmt: skip
        return {"hidden_states": torch.zeros(batch, cfg.in_channels, h, w, device=device, dtype=dtype),
                "encoder_hidden_states": torch.zeros(batch, 120, cfg.caption_channels, device=device, dtype=dtype),
                "timestep": torch.zeros(batch, device=device, dtype=torch.long), "added_cond_kwargs": cond}  # fmt: skip
    inputs = {
        "sample": torch.zeros(batch, cfg.in_channels, h, w, device=device, dtype=dtype),
        "timestep": torch.zeros(batch, device=device, dtype=torch.long),
        "encoder_hidden_states": torch.zeros(batch, 77, cfg.cross_attention_dim, device=device, dtype=dtype),
    }
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, text_dim, device=device, dtype=dtype),
                                       "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype)}  # fmt: skip
    return inputs


def wrap_meta_experts(model: nn.Module, names: list[str], rank: int, gating: str, device="meta") -> int:
    """Wrap every target layer in a MoLELayer with experts `names` of rank `rank` whose factors are empty tensors on
    `device` (meta: shapes only), as inject_mole would (without its fingerprints, which need values).
    Returns the number of wrapped layers."""
    from .config import MoLEConfig
    from .inject import _parent
    from .layers import LoraPair, mole_layer_for
    from .targets import TARGETS, detect_backbone, target_modules

    cfg = MoLEConfig(gating=gating)
    paths = target_modules(model, TARGETS[detect_backbone(model)])
    for path in paths:
        base = model.get_submodule(path)
        conv = isinstance(base, nn.Conv2d)
        d_in, d_out = (base.in_channels, base.out_channels) if conv else (base.in_features, base.out_features)
        kw = {"device": device, "dtype": base.weight.dtype}
        pairs = {n: LoraPair(torch.empty(rank, d_in, **kw), torch.empty(d_out, rank, **kw), float(rank), conv=conv)
                 for n in names}  # fmt: skip
        parent, attr = _parent(model, path)
        setattr(parent, attr, mole_layer_for(base, names, pairs, cfg, path))
    return len(paths)


def prepare_stage(denoiser: nn.Module, stage: int, rank: int, num_experts: int, gating: str = "both",
                  factor_device="meta") -> list[nn.Parameter]:  # fmt: skip
    """Make `denoiser` what stage `stage` trains (in place) and return its trainable parameters."""
    from .inject import expert_parameters, gate_parameters

    denoiser.requires_grad_(False)
    if stage == 1:
        denoiser.requires_grad_(True)
        return list(denoiser.parameters())
    if stage == 2:
        wrap_meta_experts(denoiser, ["expert"], rank, "none", factor_device)
        params = expert_parameters(denoiser)
    else:
        wrap_meta_experts(denoiser, [f"expert{i}" for i in range(num_experts)], rank, gating, factor_device)
        params = gate_parameters(denoiser)
    for p in params:
        p.requires_grad_(True)
    return params


def _component_params(kind_or_folder: str, components: list[str]) -> dict[str, int]:
    from .full import _build_model

    counts = {}
    for comp in components:
        model = _build_model(kind_or_folder, comp, torch.float32, "meta")
        counts[comp] = sum(p.numel() for p in model.parameters())
    return counts


def _ceil_div(value: int, n: int) -> int:
    return -(-value // n)


def with_strategy(est: MemoryEstimate, gpus: int = 1, strategy: str = "ddp") -> MemoryEstimate:
    """`est` (one device, nothing sharded) per device on `gpus` devices under `strategy` (module docstring)."""
    import dataclasses

    _validate_strategy(gpus, strategy)
    if est.gpus != 1 or est.strategy != "ddp":
        raise EstimateError("with_strategy takes a one-device estimate (gpus=1, strategy='ddp')")
    out = dataclasses.replace(est, weights=dict(est.weights), gpus=gpus, strategy=strategy)
    if strategy == "ddp":
        return out
    out.gradients = _ceil_div(est.gradients, gpus)
    out.optimizer_state = _ceil_div(est.optimizer_state, gpus)
    if strategy == "zero2" and est.precision != "fp32":
        for name in est.trained_weights:
            out.weights[name] = _ceil_div(est.weights[name], gpus)
    if strategy in ("fsdp2", "zero3"):
        for name in est.sharded_weights:
            out.weights[name] = _ceil_div(est.weights[name], gpus)
        if gpus > 1:
            out.weights[GATHER_BUFFER] = 2 * est.largest_block
    return out


def largest_unit(module: nn.Module, nbytes) -> int:
    """Bytes (nbytes(param)) of the largest shard unit of `module` as the training loop shards it: every element of
    a ModuleList named in SHARD_BLOCKS is a unit, the module itself the last; a parameter counts in the innermost
    unit holding it."""
    units = [""] + [f"{name}.{i}" for name, child in module.named_modules()
                    if isinstance(child, nn.ModuleList) and name.rsplit(".", 1)[-1] in SHARD_BLOCKS
                    for i in range(len(child))]  # fmt: skip
    sizes = dict.fromkeys(units, 0)
    for name, p in module.named_parameters():
        owner = max((u for u in units if not u or name.startswith(u + ".")), key=len)
        sizes[owner] += nbytes(p)
    return max(sizes.values())


def _validate_strategy(gpus: int, strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise EstimateError(f"strategy={strategy!r} is not valid; use one of {', '.join(map(str, STRATEGIES))}")
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise EstimateError(f"gpus={gpus!r} is not valid; use a whole number of devices, at least 1")


def devices_needed(est: MemoryEstimate, budget_gb: float, strategy: str, reserve_gb: float = 1.0,
                   most: int = 64) -> int | None:  # fmt: skip
    """The fewest devices (1, 2, 4, ... up to `most`) on which `est` fits `budget_gb` GiB per device less
    `reserve_gb` (CUDA context, allocator slack) under `strategy`; None when no count does."""
    n = 1
    while n <= most:
        if with_strategy(est, n, strategy).total <= (budget_gb - reserve_gb) * GB:
            return n
        n *= 2
    return None


def _validate(kind: str, stage: int, batch_size: int, resolution: int, precision: str, optimizer: str) -> None:
    from .full import KINDS

    if kind not in KINDS:
        raise EstimateError(f"kind={kind!r} has no shipped config; use one of {', '.join(map(str, KINDS))} "
                            "(or --base a folder)")
    if stage not in (1, 2, 3):
        raise EstimateError(f"stage={stage!r} is not valid; use 1 (fine-tune), 2 (expert) or 3 (mixture)")
    if batch_size < 1:
        raise EstimateError(f"batch_size={batch_size} is not valid; use at least 1")
    if resolution < 64 or resolution % 8:
        raise EstimateError(f"resolution={resolution} is not valid; use a multiple of 8, at least 64")
    if precision not in PRECISIONS:
        raise EstimateError(f"precision={precision!r} is not valid; use one of {', '.join(map(str, PRECISIONS))}")
    if optimizer not in OPTIMIZER_STATES:
        raise EstimateError(f"optimizer={optimizer!r} is not valid; use one of {', '.join(map(str, OPTIMIZER_STATES))}")


def estimate_memory(
    kind: str,
    stage: int,
    batch_size: int = 1,
    resolution: int | None = None,
    precision: str = "bf16",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    rank: int = 256,
    num_experts: int = 2,
    train_text_encoder: bool | None = None,
    gating: str = "both",
    gpus: int = 1,
    strategy: str = "ddp",
) -> MemoryEstimate:
    """Accelerator memory of one training step of `stage` on the full-size `kind` (sd15, sd21, sdxl, pixart), per
    device on `gpus` devices under `strategy` (ddp, zero2, fsdp2, zero3; see the module docstring).

    precision: fp32, or fp16 / bf16 mixed precision (frozen weights in that dtype, trainable ones in fp32).
    train_text_encoder: stage 1 on SD1.5 / SD2.1 (default: as the training config, true there)."""
    from .full import DENOISER, _pipeline_components

    kind = getattr(kind, "value", kind)
    resolution = resolution or NATIVE_RESOLUTION.get(kind, 512)
    optimizer = optimizer.lower()
    _validate(kind, stage, batch_size, resolution, precision, optimizer)
    _validate_strategy(gpus, strategy)
    wdtype = PRECISIONS[precision]
    wbytes = torch.finfo(wdtype).bits // 8
    est = MemoryEstimate(kind, stage, batch_size, resolution, precision, optimizer, gradient_checkpointing,
                         rank if stage > 1 else 0, num_experts if stage == 3 else (1 if stage == 2 else 0))  # fmt: skip

    from .full import _build_model

    denoiser = _build_model(kind, DENOISER[kind], wdtype, "meta")
    params = prepare_stage(denoiser, stage, rank, num_experts, gating)
    trainable = sum(p.numel() for p in params)
    from .inject import mole_layers

    layers = mole_layers(denoiser) if stage > 1 else {}
    est.wrapped_layers = len(layers)

    components = [c for c in _pipeline_components(kind) if c.startswith(("vae", "text_encoder"))]
    counts = _component_params(kind, components)
    text_trained = stage == 1 and kind in ("sd15", "sd21") and (train_text_encoder is None or train_text_encoder)
    for comp, n in counts.items():
        trained = text_trained and comp == "text_encoder"
        est.weights[comp] = n * (4 if trained else wbytes)
        trainable += n if trained else 0
    base_params = sum(p.numel() for n, p in denoiser.named_parameters() if ".lora_" not in n and ".gates." not in n)
    if stage == 1:
        est.weights[DENOISER[kind]] = base_params * 4
        if precision != "fp32":
            est.weights["autocast weight copies"] = (base_params + (counts.get("text_encoder", 0) if text_trained
                                                                     else 0)) * wbytes  # fmt: skip
    else:
        est.weights[DENOISER[kind]] = base_params * wbytes
        factors = sum(p.numel() for n, p in denoiser.named_parameters() if ".lora_" in n)
        gates = sum(p.numel() for n, p in denoiser.named_parameters() if ".gates." in n)
        if stage == 2:
            est.weights["expert (trained, fp32)"] = factors * 4
        else:
            est.weights[f"{num_experts} experts (frozen)"] = factors * wbytes
            est.weights["gates (trained, fp32)"] = gates * 4
    est.trained_weights = tuple(k for k in est.weights if "trained" in k or (stage == 1 and k == DENOISER[kind])
                                or (k == "text_encoder" and text_trained))  # fmt: skip
    est.sharded_weights = tuple(k for k in est.weights if k not in counts or (k == "text_encoder" and text_trained))
    est.largest_block = largest_unit(denoiser, lambda p: p.numel() * (4 if stage == 1 or p.requires_grad else wbytes))
    est.trainable_params = trainable
    est.gradients = trainable * 4
    est.optimizer_state = trainable * 4 * OPTIMIZER_STATES[optimizer]

    latent = (resolution // 8, resolution // 8)
    inputs = denoiser_inputs(denoiser, batch_size, latent, "meta", wdtype)
    counted = count_saved(denoiser, lambda: denoiser(**inputs))
    est.activations_by_checkpointing = {False: counted["total"], True: counted["total"]}
    if counted["per_unit"]:
        est.activations_by_checkpointing[True] = (
            counted["outside"] + sum(counted["unit_inputs"]) + max(counted["per_unit"])
        )
    est.activations = est.activations_by_checkpointing[gradient_checkpointing]
    est.workspace = 2 * counted["largest"]
    if stage == 3:
        est.recording = _recording_bytes(denoiser, inputs, num_experts)
    return with_strategy(est, gpus, strategy)


def _recording_bytes(denoiser: nn.Module, inputs: dict, num_experts: int) -> int:
    """Host bytes of one recorded step with local maps: fp32 (b, n, e) local and (b, e) global gates per layer."""
    from .inject import mole_layers

    total = [0]

    def hook(module, args, output):
        x = args[0]
        tokens = x.shape[2] * x.shape[3] if module.is_conv else (x.shape[-2] if x.ndim > 2 else 1)
        total[0] += 4 * x.shape[0] * num_experts * (tokens + 1)

    handles = [layer.register_forward_hook(hook) for layer in mole_layers(denoiser).values()]
    try:
        with torch.no_grad(), _patched_sdpa():
            denoiser(**inputs)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def max_batch_size(kind: str, stage: int, budget_gb: float, limit: int = 64, **kw) -> int:
    """Largest batch size (up to `limit`) whose estimate fits `budget_gb` GiB; 0 if batch 1 does not fit.
    Activations grow linearly with the batch, so two estimates (batch 1 and 2) give every batch size."""
    one = estimate_memory(kind, stage, batch_size=1, **kw)
    two = estimate_memory(kind, stage, batch_size=2, **kw)
    per_sample = two.total - one.total
    fixed = one.total - per_sample
    budget = budget_gb * GB
    if one.total > budget:
        return 0
    return int(min(limit, (budget - fixed) // max(per_sample, 1)))


def estimate_from_config(path: str | Path, **overrides) -> MemoryEstimate:
    """The estimate for a training config file (TOML); `overrides` replace estimate_memory's arguments."""
    from .training.config import load_config

    return estimate_for_train_config(load_config(path), **overrides)


def estimate_for_preset(base: str, preset: str, **overrides) -> MemoryEstimate:
    """The estimate for a training preset (stage1, stage2-face, stage2-hand, stage3) on `base`."""
    from .formats.ldm import checkpoint_shapes, detect_kind, is_single_file
    from .training.config import PRESETS, TrainConfig, merge

    if preset not in PRESETS:
        raise EstimateError(f"preset={preset!r} is unknown; use one of {', '.join(sorted(PRESETS))}")
    kind = _kind_of(str(base), is_single_file, checkpoint_shapes, detect_kind)
    data = merge(PRESETS[preset], {"model": base, "data": {"resolution": NATIVE_RESOLUTION[kind]}})
    return estimate_for_train_config(TrainConfig.from_dict(data), **overrides)


def estimate_for_train_config(cfg, **overrides) -> MemoryEstimate:
    """The estimate for a TrainConfig: its stage, model kind, batch size, resolution, mixed precision, optimizer,
    gradient checkpointing, expert rank (stage 2) or experts (stage 3: the files' largest rank when readable)."""
    from .formats.ldm import checkpoint_shapes, detect_kind, is_single_file

    kind = _kind_of(str(cfg.model), is_single_file, checkpoint_shapes, detect_kind)
    precision = {"no": "fp32"}.get(cfg.mixed_precision.value, cfg.mixed_precision.value)
    stage = int(overrides.pop("stage", None) or cfg.stage)
    if stage == 4:
        raise EstimateError("stage=4 (InstructMoLE) has no estimate yet; use stage 1, 2 or 3")
    rank, experts = cfg.expert.rank, max(2, len(cfg.mixture.experts))
    if stage == 3:
        rank = _max_rank(cfg.mixture.experts.values()) or rank
    kw = dict(batch_size=cfg.batch_size, resolution=cfg.data.resolution, precision=precision,
              optimizer=cfg.optim.name.value, gradient_checkpointing=cfg.gradient_checkpointing, rank=rank,
              num_experts=experts, train_text_encoder=cfg.train_text_encoder,
              gating=cfg.mixture.gating.value)  # fmt: skip
    strategy = getattr(getattr(cfg, "distributed", None), "value", None)  # the config's strategy, when it has one
    if strategy in STRATEGIES:
        kw["strategy"] = strategy
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return estimate_memory(kind, stage, **kw)


def _kind_of(model: str, is_single_file, checkpoint_shapes, detect_kind) -> str:
    from .full import KINDS, PUBLISHED

    if model in KINDS:
        return model
    for kind, hub_id in PUBLISHED.items():
        if model == hub_id:
            return kind
    if is_single_file(model):
        return detect_kind(checkpoint_shapes(model), model)
    from .models import check_base_name

    check_base_name(model, "model")  # a missing path or non-pipeline folder: worded as in every other command
    raise EstimateError(
        f"model={model!r}: the estimate needs one of {', '.join(map(str, KINDS))}, their hub ids "
        f"{', '.join(map(str, PUBLISHED.values()))} or a "
        "single-file checkpoint; pass --base KIND"
    )


def _max_rank(files) -> int:
    """The largest LoRA rank in the expert files that exist (0 when none can be read)."""
    from safetensors import safe_open

    best = 0
    for f in files:
        path = Path(f)
        if not path.is_file():
            continue
        with safe_open(str(path), "pt") as sf:
            for key in sf.keys():
                if "down" in key or "lora_A" in key:
                    best = max(best, sf.get_slice(key).get_shape()[0])
    return best
