"""The one training loop, shared by the three MoLE stages.

    result = train(load_config("configs/stage3.toml", overrides=["max_steps=100"]))

Per optimizer step (grad_accum micro-steps each):
    pixels (b, 3, R, R) -> VAE -> latents x0 (b, c, R/f, R/f)
    noise e ~ N(0, I), t ~ U{0..T-1}                    (per sample: a generator seeded by (seed, epoch, index))
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e
    target = e (epsilon) or sqrt(a_t) e - sqrt(1 - a_t) x0 (v-prediction)
    loss = mean_b( min(SNR_t, gamma) / SNR_t [or / (SNR_t + 1)] * |denoiser(x_t, t, text) - target|^2 )
Everything random is a function of the seed and the sample's place in the global sample stream (mole.training.draws),
never of the process rank or count: 1 process x 4 images and 2 processes x 2 images train the same model, and
resuming from a checkpoint replays exactly the batches, noise and timesteps the uninterrupted run would have used.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import CaptionedImages, StepBatchSampler, collate
from ..data.dataset import DataError
from ..data.shards import is_shard_spec, open_training_data
from ..models import DiffusionModel, TextConditioning
from ..outputs import check_output_dir
from ..recording import record_gates
from .checkpoint import (
    check_layout,
    checkpoint_state,
    dcp_writer,
    list_checkpoints,
    load_checkpoint,
    load_sharded_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_sharded_checkpoint,
)
from .config import Distributed, MixedPrecision, Stage, TrainConfig, TrainConfigError
from .distributed import (
    ZERO,
    accelerate_env,
    accelerator_options,
    check_launch,
    check_strategy,
    clip_grad_norm,
    device_mesh,
    full_tensor,
    gather_whole,
    load_whole,
    resolve_strategy,
    shard_modules,
    zero3_gathered,
)
from .draws import NOISE, PROBE, VAE, sample_generators, sample_noise
from .interrupt import StopRequest, TrainingInterrupted
from .loss import diffusion_loss
from .optim import make_optimizer, make_schedule
from .stages import setup_stage

logger = logging.getLogger(__name__)

# what a run writes into output_dir (tensorboard logs go to "mole/"); a fresh run refuses a folder holding any
RUN_ENTRIES = ("config.toml", "metrics.jsonl", "checkpoints", "final", "mole")
# consecutive micro-batches without one readable image after which training stops instead of spinning
MAX_EMPTY_BATCHES = 50


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including those before a resume)
    start_step: int
    losses: list[float]  # one per optimizer step of this run (mean over its micro-steps)
    skipped_images: int
    final: list[Path]
    checkpoints: list[Path]
    probe_loss_first: float  # loss on the run's first batch with fixed noise and timesteps, before training
    probe_loss_last: float  # the same batch, noise and timesteps after training
    gate_log: list[dict] = field(default_factory=list)  # stage 3: per-expert gate statistics at log steps
    trainable_checksum: float = 0.0  # sum of |trainable weights| on this process (equal on every process)
    batch: dict = field(default_factory=dict)  # per_device, processes, grad_accum, total (images per step)


def load_dtype(cfg: TrainConfig, weight_dtype: torch.dtype) -> torch.dtype | dict[str, torch.dtype]:
    """The dtype each pipeline component is loaded in: frozen components straight in the weight dtype, so no fp32
    copy of a large pipeline passes through host memory (PixArt's T5-XXL is 19 GB in fp32); what stage 1 trains
    (the denoiser, and the text encoder when it trains) in fp32 master weights."""
    if cfg.stage is not Stage.FINETUNE:
        return weight_dtype
    if weight_dtype == torch.float32:
        return torch.float32
    trained = {"unet": torch.float32, "transformer": torch.float32}
    if cfg.train_text_encoder:
        trained["text_encoder"] = torch.float32
    return {"default": weight_dtype, **trained}


# settings a resumed run may change without changing what it trains; every other change needs accept_changes
SAFE_ON_RESUME = ("max_steps", "resume", "log_every", "checkpoint_every", "keep_checkpoints", "tensorboard",
                  "output_dir")  # fmt: skip


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items() if x is not None and x != {}}
    return None if v == {} else v


def resume_changes(cfg: TrainConfig, checkpoint: Path) -> dict[str, tuple]:
    """Settings that differ between cfg and the config.toml saved with the checkpoint: {key: (old, new)}."""
    import tomllib

    try:
        old = _flat(tomllib.loads((Path(checkpoint) / "config.toml").read_text()))
    except (OSError, ValueError):
        return {}
    new = _flat(tomllib.loads(cfg.to_toml()))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if _norm(old.get(k)) != _norm(new.get(k))}  # fmt: skip


def check_resume_settings(cfg: TrainConfig, checkpoint: Path, accept_changes: bool = False) -> dict[str, tuple]:
    """Log the safe changes (e.g. more steps); raise naming every other changed key unless accept_changes."""
    changes = resume_changes(cfg, checkpoint)
    unsafe = {k: v for k, v in changes.items() if k.split(".")[0] not in SAFE_ON_RESUME}
    for k, (a, b) in changes.items():
        if k not in unsafe:
            logger.warning("resume: %s changed from %r to %r", k, a, b)
    if unsafe and not accept_changes:
        named = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in unsafe.items())
        raise TrainConfigError(
            f"resuming {checkpoint} with changed settings: {named}; start a new run in another output_dir "
            f"(--set output_dir=...), or continue with the new settings with --accept-changes"
        )
    for k, (a, b) in unsafe.items():
        logger.warning("resume: %s changed from %r to %r (accepted)", k, a, b)
    return changes


def check_run_folder(cfg: TrainConfig, overwrite: bool = False,
                     accept_changes: bool = False) -> tuple[Path | None, dict]:  # fmt: skip
    """Before anything heavy: the checkpoint to resume from (and its state), or, for a fresh start, a check that
    output_dir holds no earlier run (unless overwrite). Raises with the field, the value and the fix."""
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    resume_from = resolve_resume(cfg.resume, ckpt_dir)
    state = checkpoint_state(resume_from) if resume_from is not None else {}
    if resume_from is not None and int(state.get("step", 0)) > cfg.max_steps:
        raise TrainConfigError(
            f"max_steps={cfg.max_steps} is below the step of the checkpoint to resume ({state['step']}, {resume_from});"
            f" set max_steps to at least {state['step']}, or start afresh in another output_dir"
        )
    if resume_from is not None:
        check_resume_settings(cfg, resume_from, accept_changes)
    _check_inputs(cfg)
    own = resume_from is not None and resume_from.parent.resolve() == ckpt_dir.resolve()
    if not own and not overwrite:
        check_output_dir(out, RUN_ENTRIES, False, "mole train",
                         resume_hint="continue that run with --set resume=latest")  # fmt: skip
    return resume_from, state


def train(cfg: TrainConfig, overwrite: bool = False, accept_changes: bool = False) -> TrainResult:
    """Run one stage as configured; return what it did (losses, files).

    A fresh run (no resume) refuses an output_dir that holds an earlier run; overwrite=True removes that run's
    files (config.toml, metrics.jsonl, checkpoints/, final/, tensorboard logs) first. SIGINT / SIGTERM during the
    loop finish the current step, write a checkpoint and raise TrainingInterrupted."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from tqdm.auto import tqdm

    cfg.validate()
    strategy = resolve_strategy(cfg)
    check_strategy(cfg, strategy)
    logger.info("strategy: %s", strategy.value)
    out = Path(cfg.output_dir)
    resume_from, resume_state = check_run_folder(cfg, overwrite, accept_changes)
    fresh = resume_from is None
    run_id = resume_state.get("run_id") if not fresh else uuid.uuid4().hex
    trackers = _trackers(cfg)
    # accelerate keeps one process-wide state; a second run in this process (Python API, tests) may ask for other
    # mixed-precision settings. The process group (PartialState) is left alone.
    if hasattr(AcceleratorState, "_reset_state"):  # private in accelerate 1.x; without it, one setting per process
        AcceleratorState._reset_state()
    with accelerate_env(strategy):
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision.value,
            log_with=trackers or None,
            project_dir=str(out),
            **accelerator_options(cfg, strategy),
        )
    check_launch(accelerator.num_processes)
    # FSDP2 on one process has nothing to shard: it runs as plain data parallel
    fsdp = strategy is Distributed.FSDP2 and accelerator.num_processes > 1
    zero = strategy in ZERO
    sharded = fsdp or zero
    layout = "fsdp2" if fsdp else strategy.value if zero else "whole"
    if resume_from is not None:  # in seconds, before the model loads
        check_layout(resume_from, resume_state, layout, accelerator.num_processes)
    plan = cfg.batch_plan(accelerator.num_processes)  # raises rather than round a total it cannot reach
    accum = plan.grad_accum
    accelerator.gradient_accumulation_steps = accum
    logger.info("batch: %s", plan.describe())
    if fresh and overwrite and accelerator.is_main_process:
        check_output_dir(out, RUN_ENTRIES, True, "mole train")
    accelerator.wait_for_everyone()
    weight_dtype = {MixedPrecision.NO: torch.float32, MixedPrecision.FP16: torch.float16,
                    MixedPrecision.BF16: torch.bfloat16}[cfg.mixed_precision]  # fmt: skip

    # ---- model and stage
    # an image folder or webdataset shards; before the model: a wrong folder fails in seconds
    samples = open_training_data(cfg.data.path, cfg.data.manifest)
    with load_whole(accelerator):  # ZeRO-3: nothing is partitioned while loading (frozen parts stay whole)
        model = DiffusionModel.from_pretrained(cfg.model, dtype=load_dtype(cfg, weight_dtype))
    stage = setup_stage(cfg, model, weight_dtype)
    model.to(accelerator.device)
    for module in (stage.side_modules or {}).values():
        module.to(accelerator.device)
    if cfg.gradient_checkpointing:
        model.denoiser.enable_gradient_checkpointing()
        if "text_encoder" in stage.modules:
            stage.modules["text_encoder"].gradient_checkpointing_enable()
    side = stage.side_modules or {}
    params = stage.params
    groups = stage.param_groups
    if fsdp:  # torch's fully_shard on the trained modules; the optimizer is built on the sharded parameters
        params, groups = shard_modules(stage.modules, stage.params, stage.param_groups,
                                       device_mesh(accelerator.device), others=side)  # fmt: skip
    optimizer = make_optimizer(groups or params, cfg.optim)
    schedule = make_schedule(optimizer, cfg.optim, cfg.max_steps)
    if fsdp:
        optimizer = accelerator.prepare(optimizer)  # accelerate still skips the step between accumulation steps
        wrapped = dict(stage.modules)
    elif zero and len(stage.modules) > 1:  # DeepSpeed takes one model: stage 1's UNet and text encoder as one
        _, optimizer = accelerator.prepare(nn.ModuleDict(stage.modules), optimizer)
        wrapped = dict(stage.modules)  # called directly; the engine reduces and partitions their gradients
    else:
        prepared = accelerator.prepare(*stage.modules.values(), optimizer)
        wrapped = dict(zip(stage.modules, prepared[:-1]))
        optimizer = prepared[-1]
    denoiser = wrapped["denoiser"]
    text_encoder = wrapped.get("text_encoder")

    side_params = [p for m in side.values() for p in m.parameters() if p.requires_grad]
    ckpt_modules = {**stage.modules, **side}

    # ---- resume
    ckpt_dir = out / "checkpoints"
    start_step = 0
    if resume_from is not None:
        if zero:
            accelerator.load_state(str(resume_from / "accelerate"))
            schedule.load_state_dict(torch.load(resume_from / "schedule.pt", map_location="cpu", weights_only=True))
            state = checkpoint_state(resume_from)
        elif fsdp:
            state = load_sharded_checkpoint(resume_from, ckpt_modules, optimizer, schedule,
                                            accelerator.process_index, accelerator.num_processes)  # fmt: skip
        else:
            state = load_checkpoint(resume_from, ckpt_modules, optimizer, schedule)
        start_step = int(state["step"])
        logger.info("resumed from %s at step %d", resume_from, start_step)

    # ---- data
    dataset = CaptionedImages(samples, cfg.data.resolution, cfg.data.center_crop, cfg.data.random_flip,
                              cfg.data.caption_dropout, cfg.seed)  # fmt: skip
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, accelerator.num_processes, accelerator.process_index,
                               cfg.seed, start=start_step * accum,
                               order=getattr(samples, "epoch_order", None))  # shards: an order local to shards
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.data.num_workers)  # fmt: skip
    batches = iter(loader)
    latent_cache: dict[int, torch.Tensor] = {}
    text_cache: dict[str, TextConditioning] = {}

    def latents_for(batch) -> torch.Tensor:
        if not cfg.data.cache_latents:
            gens = sample_generators(cfg.seed, batch["keys"], VAE)  # one posterior sample per image, keyed by it
            return model.encode_images(batch["pixels"].to(accelerator.device), generator=gens)
        missing = [i for i in batch["indices"] if i not in latent_cache]
        if missing:
            pos = [batch["indices"].index(i) for i in missing]
            # the posterior mean: a cached latent must not freeze one random sample of the VAE posterior
            for i, lat in zip(missing, model.encode_images(batch["pixels"][pos], mode=True)):
                latent_cache[i] = lat
        return torch.stack([latent_cache[i] for i in batch["indices"]])

    def text_for(captions: list[str]) -> TextConditioning:
        if not cfg.data.cache_text:
            return model.encode_text(captions, text_encoder=text_encoder, clip_skip=cfg.clip_skip)
        for c in captions:
            if c not in text_cache:
                with torch.no_grad():
                    text_cache[c] = model.encode_text([c], clip_skip=cfg.clip_skip)
        kw = {}
        for key in text_cache[captions[0]].kwargs:
            kw[key] = torch.cat([text_cache[c].kwargs[key] for c in captions])
        return TextConditioning(kw)

    sched = model.noise_scheduler
    alphas = sched.alphas_cumprod

    def loss_on(batch, timesteps: torch.Tensor | None = None, stream: int = NOISE):
        latents = latents_for(batch).to(weight_dtype)
        noise, t = sample_noise(cfg.seed, batch["keys"], latents.shape[1:], sched.config.num_train_timesteps,
                                cfg.noise_offset, stream)  # fmt: skip
        noise, t = noise.to(latents.device, latents.dtype), t.to(latents.device)
        if timesteps is not None:
            t = timesteps.to(latents.device)
        if model.prediction_type == "flow":  # rectified flow (Flux): sigma = t / T, target n - x
            sigma = (t.float() / sched.config.num_train_timesteps).view(-1, 1, 1, 1).to(latents.dtype)
            noisy, target = (1 - sigma) * latents + sigma * noise, noise - latents
        else:
            noisy = sched.add_noise(latents, noise, t)
            target = noise if model.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        cond = text_for(batch["captions"]).to(accelerator.device, weight_dtype)
        if stage.prepare_batch is not None:
            stage.prepare_batch(batch)  # batch["step"]: the optimizer step this micro-batch belongs to
        with accelerator.autocast():
            pred = model.predict(noisy, t, cond, denoiser=denoiser)
        snr_gamma = None if model.prediction_type == "flow" else cfg.min_snr_gamma
        return diffusion_loss(pred, target, t, alphas, model.prediction_type, snr_gamma)

    # ---- probe: the first batch, fixed noise and spread timesteps, before and after
    probe_batch = collate([dataset[k] for k in sampler.batch(start_step * accum)])

    def probe() -> float:
        if probe_batch["pixels"] is None:
            return float("nan")
        n = probe_batch["pixels"].shape[0]
        t = torch.linspace(100, sched.config.num_train_timesteps - 100, n).long()
        with torch.no_grad():
            return float(loss_on(probe_batch, t, PROBE))

    probe_first = probe()

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(cfg.to_toml())
        _trim_metrics(out / "metrics.jsonl", start_step)
    if trackers:
        accelerator.init_trackers("mole", config=_flat(cfg.to_dict()))
    metrics_file = out / "metrics.jsonl"

    # ---- loop
    losses, gate_log, skipped, checkpoints = [], [], 0, []
    unreadable: set[int] = set()  # distinct unreadable images met so far
    empty_run = 0  # consecutive micro-batches without a readable image
    micro_step = start_step * accum
    step = start_step
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not accelerator.is_local_main_process, desc="train")
    denoiser.train()
    acc_loss, acc_n, t0 = 0.0, 0, time.perf_counter()

    def save_now() -> Path | None:
        accelerator.wait_for_everyone()
        extra = {"micro_step": micro_step, "skipped_images": skipped, "processes": accelerator.num_processes}
        if sharded:  # every process writes its shards
            if zero:  # DeepSpeed's engine writes its partitions (and accelerate the RNG states)
                write = lambda tmp: accelerator.save_state(str(tmp / "accelerate"))  # noqa: E731
            else:
                write = dcp_writer(ckpt_modules, optimizer, accelerator.process_index)
            path = save_sharded_checkpoint(ckpt_dir, step, write, schedule, cfg.to_toml(), extra,
                                           cfg.keep_checkpoints, run_id, accelerator.process_index,
                                           accelerator.num_processes, accelerator.wait_for_everyone,
                                           layout)  # fmt: skip
            checkpoints.append(path)
            return path
        if not accelerator.is_main_process:
            return None
        path = save_checkpoint(ckpt_dir, step, ckpt_modules, optimizer, schedule, cfg.to_toml(), extra,
                               cfg.keep_checkpoints, run_id=run_id)  # fmt: skip
        checkpoints.append(path)
        return path

    stop = StopRequest().__enter__()
    try:
        while step < cfg.max_steps:
            batch = next(batches)
            skipped += batch["skipped"]
            met_before = unreadable.issuperset(batch["bad_indices"])  # each unreadable image is warned once
            for index, reason in batch.get("bad_reasons", {}).items():  # here, not in the (per-worker) dataset
                if index not in unreadable:
                    logger.warning("skipping unreadable image %s; it is skipped in every epoch", reason)
            unreadable.update(batch["bad_indices"])
            micro_step += 1
            if batch["pixels"] is None:  # every image of this micro-batch was unreadable
                empty_run += 1
                _check_readable(cfg, len(dataset), unreadable, empty_run)
                (logger.debug if met_before else logger.warning)(
                    "micro-step %d: all %d images unreadable, batch skipped", micro_step, batch["skipped"])
                continue
            empty_run = 0
            batch["step"] = step  # the same for every micro-batch and process of one optimizer step
            completes_step = micro_step % accum == 0
            log_gates = stage.records_gates and completes_step and (step + 1) % cfg.log_every == 0
            with accelerator.accumulate(*wrapped.values()):
                if log_gates:
                    with record_gates(stage.modules["denoiser"], keep_local=True) as rec:
                        loss = loss_on(batch)
                    gate_stats = _gate_sums(rec)
                else:
                    loss, gate_stats = loss_on(batch), None
                aux_logs = {}
                if stage.aux_loss is not None:
                    aux, aux_logs = stage.aux_loss(step)
                    loss = loss + aux
                accelerator.backward(loss)
                if accelerator.sync_gradients and accelerator.num_processes > 1:
                    for p in side_params:  # used through hooks: DDP did not see them
                        if p.grad is not None:
                            p.grad = accelerator.reduce(p.grad, reduction="mean")
                if accelerator.sync_gradients and cfg.optim.max_grad_norm:
                    if fsdp:  # the sharded parameters fully_shard put in place, not the list taken before
                        clip_grad_norm(params, cfg.optim.max_grad_norm)
                    elif not zero:  # DeepSpeed clips inside its step (gradient_clipping in its config)
                        accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            acc_loss += float(loss.detach())
            acc_n += 1
            if not accelerator.sync_gradients:
                continue
            schedule.step()
            step += 1
            mean_loss = acc_loss / acc_n
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"loss became {mean_loss} at step {step}; lower optim.lr or use bf16 over fp16"
                )
            losses.append(mean_loss)
            acc_loss, acc_n = 0.0, 0
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                # what is logged is over all processes' samples: the mean loss (and aux terms) over processes,
                # the gate statistics of every process's samples; not process 0's own
                logged_loss, aux_logs = _mean_over_processes(accelerator, mean_loss, aux_logs)
                if gate_stats:
                    gate_stats = _gate_stats(gate_stats, accelerator)
                record = {"step": step, "loss": logged_loss, "lr": schedule.get_last_lr()[0], "skipped_images": skipped,
                          "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
                record.update(aux_logs)
                if gate_stats:
                    record.update(gate_stats)
                    gate_log.append({"step": step, **gate_stats})
                if accelerator.is_main_process:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                if trackers:
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                save_now()
            elif _stop_requested(stop, accelerator):
                save_now()
            if step < cfg.max_steps and _stop_requested(stop, accelerator):
                saved = checkpoints[-1] if checkpoints else None
                raise TrainingInterrupted(step, saved, out, stop.signal_name or "SIGINT")
    finally:
        stop.__exit__()
        bar.close()
    denoiser.eval()
    probe_last = probe()

    final: list[Path] = []
    accelerator.wait_for_everyone()
    with zero3_gathered(stage.modules, strategy):  # ZeRO-3: the partitioned weights whole on every process
        checksum = float(sum(full_tensor(p.detach()).double().abs().sum() for p in params))
        if fsdp:  # every process sends its shards; rank 0 holds the whole models (and their own classes) after
            gather_whole(stage.modules, accelerator.is_main_process)
        if accelerator.is_main_process:
            final_dir = out / "final"
            final_dir.mkdir(parents=True, exist_ok=True)
            final = stage.save_final(final_dir)
            (final_dir / "config.toml").write_text(cfg.to_toml())
    if trackers:
        accelerator.end_training()
    return TrainResult(
        steps=step, start_step=start_step, losses=losses, skipped_images=skipped, final=final,
        checkpoints=list_checkpoints(ckpt_dir), probe_loss_first=probe_first, probe_loss_last=probe_last,
        gate_log=gate_log, trainable_checksum=checksum,
        batch=asdict(plan),
    )  # fmt: skip


def _check_inputs(cfg: TrainConfig) -> None:
    """Files the config names, checked in milliseconds before minutes of model loading."""
    if not Path(cfg.data.path).is_dir() and not is_shard_spec(cfg.data.path):
        raise DataError(f"data.path={cfg.data.path!r} is not a folder; set it to the training image folder (or to "
                        "webdataset shards: a folder, a .tar, a pattern such as shard-{000000..000009}.tar)")
    from ..models import check_base_name

    check_base_name(cfg.model, "model")  # the rule every command shares: mole-tiny, a file, a folder, a hub id
    for name, path in cfg.mixture.experts.items() if cfg.stage == 3 else ():
        if not Path(path).exists():
            raise TrainConfigError(f"mixture.experts.{name}={path!r} does not exist; give the expert's LoRA file")


def _check_readable(cfg: TrainConfig, n: int, unreadable: set[int], empty_run: int) -> None:
    """Stop instead of spinning when no image (or no batch for a long run of micro-steps) can be read."""
    if len(unreadable) >= n or empty_run >= MAX_EMPTY_BATCHES:
        raise DataError(
            f"data.path={cfg.data.path!r}: {len(unreadable)} of {n} images are unreadable"
            + (" (all of them)" if len(unreadable) >= n else f" and {empty_run} batches in a row had none readable")
            + "; replace or remove the broken files (the warnings above name them)"
        )


def _stop_requested(stop: StopRequest, accelerator) -> bool:
    """The stop flag, agreed by every process (any process that got the signal stops them all)."""
    if accelerator.num_processes == 1:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _trim_metrics(path: Path, start_step: int) -> None:
    """On resume: drop metric lines of steps after the checkpoint (the interrupted run wrote them; they are redone),
    and a half-written last line."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= start_step:
            keep.append(line)
    path.write_text("".join(x + "\n" for x in keep))


def _mean_over_processes(accelerator, loss: float, logs: dict[str, float]) -> tuple[float, dict[str, float]]:
    """The loss and the logged aux values averaged over all processes (every process calls this at a log step)."""
    if accelerator.num_processes == 1:
        return loss, logs
    keys = sorted(logs)
    vals = torch.tensor([loss, *(float(logs[k]) for k in keys)], dtype=torch.float64, device=accelerator.device)
    vals = accelerator.reduce(vals, reduction="mean").cpu().tolist()
    return vals[0], dict(zip(keys, vals[1:]))


def _gate_sums(rec) -> dict:
    """This process's sums for the gate statistics: per expert, the global gate (mean over layers) summed over
    samples; the local scores' sum and sum of squares over layers and tokens; and the counts."""
    sums: dict = {"names": list(rec.expert_names)}
    try:
        glob = rec.mean_global()[0].double()  # (b, e)
        sums["global"] = (glob.sum(0), glob.shape[0])
    except ValueError:  # gating="local" records no global gates
        pass
    locs = [r.local_gate for r in rec.steps[0].values() if r.local_gate is not None] if rec.steps else []
    if locs:
        vals = torch.cat([loc.reshape(-1, loc.shape[-1]).double() for loc in locs])  # (tokens, e)
        sums["local"] = (vals.sum(0), vals.pow(2).sum(0), vals.shape[0])
    return sums


def _gate_stats(sums: dict, accelerator=None) -> dict[str, float]:
    """Per expert: mean global gate over layers and samples; mean and spread (unbiased std) of the local scores
    over layers and tokens; over the samples of every process when the sums are reduced (accelerator given)."""
    names, e = sums["names"], len(sums["names"])
    parts = []
    if "global" in sums:
        parts += [sums["global"][0].cpu(), torch.tensor([float(sums["global"][1])], dtype=torch.float64)]
    if "local" in sums:
        s, sq, n = sums["local"]
        parts += [s.cpu(), sq.cpu(), torch.tensor([float(n)], dtype=torch.float64)]
    if not parts:
        return {}
    flat = torch.cat(parts)
    if accelerator is not None and accelerator.num_processes > 1:
        flat = accelerator.reduce(flat.to(accelerator.device), reduction="sum").cpu()
    stats: dict[str, float] = {}
    pos = 0
    if "global" in sums:
        g, n = flat[:e], flat[e]
        pos = e + 1
        for i, name in enumerate(names):
            stats[f"gate/global/{name}"] = float(g[i] / n)
    if "local" in sums:
        s, sq, n = flat[pos : pos + e], flat[pos + e : pos + 2 * e], flat[pos + 2 * e]
        mean = s / n
        var = ((sq - s * mean) / (n - 1).clamp_min(1)).clamp_min(0)
        for i, name in enumerate(names):
            stats[f"gate/local_mean/{name}"] = float(mean[i])
            stats[f"gate/local_std/{name}"] = float(var[i].sqrt())
    return stats


def _trackers(cfg: TrainConfig) -> list[str]:
    if not cfg.tensorboard:
        return []
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            logger.info("tensorboard is not installed: metrics go to metrics.jsonl only")
            return []
    return ["tensorboard"]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        elif v is not None:
            out[f"{prefix}{k}"] = str(v)
    return out
