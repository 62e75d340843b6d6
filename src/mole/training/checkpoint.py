"""Atomic training checkpoints: trainable weights, optimizer, LR schedule, step, resolved config.

    output_dir/checkpoints/checkpoint-0000500/{trainable.safetensors, optimizer.pt, schedule.pt, state.json,
                                               config.toml}
A checkpoint is written to a temporary folder and renamed into place, so a crash never leaves a half checkpoint
that resume would pick up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"


class CheckpointError(ValueError):
    """A checkpoint cannot be used to resume; the message names the folder and what is wrong."""


def trainable_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """'<module key>/<param name>' -> tensor for every parameter that requires grad."""
    return {
        f"{key}/{name}": p.detach().cpu().contiguous()
        for key, module in modules.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def save_checkpoint(
    folder: Path,
    step: int,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    schedule,
    config_toml: str,
    extra: dict | None = None,
    keep: int = 2,
    run_id: str | None = None,
) -> Path:
    """Write checkpoint `step` atomically; then delete this run's (`run_id`'s) older checkpoints beyond `keep`.
    Checkpoints of other runs in the folder are never deleted."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:07d}"
    tmp = folder / f".tmp-{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(modules), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(schedule.state_dict(), tmp / "schedule.pt")
    (tmp / "config.toml").write_text(config_toml)
    (tmp / "state.json").write_text(json.dumps({"step": step, "run_id": run_id, **(extra or {})}))
    _publish(tmp, final, folder, run_id, keep)
    logger.info("checkpoint written: %s", final)
    return final


def _publish(tmp: Path, final: Path, folder: Path, run_id: str, keep: int) -> None:
    """Move a fully written checkpoint folder into place (atomic rename) and drop this run's oldest beyond `keep`."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    own = [c for c in list_checkpoints(folder) if checkpoint_state(c).get("run_id") == run_id]
    for old in own[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def checkpoint_state(path: Path) -> dict:
    """state.json of a checkpoint folder ({} when unreadable)."""
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError):
        return {}


NO_RESUME = ("", "none", "false", "no", "off")


def resolve_resume(resume: str | bool | None, folder: Path) -> Path | None:
    if resume is None or resume is False or str(resume).strip().lower() in NO_RESUME:
        return None
    if resume == "latest":
        found = list_checkpoints(folder)
        if not found:
            logger.info("resume=latest: no checkpoint in %s yet, starting from step 0", folder)
            return None
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"resume={resume!r} is not a checkpoint folder (no state.json); use 'latest' or a path")
    return path


def load_checkpoint(path: Path, modules: dict[str, nn.Module], optimizer, schedule) -> dict:
    """Restore weights, optimizer and schedule in place; return state.json."""
    tensors = load_file(str(path / "trainable.safetensors"))
    expected = {
        f"{key}/{name}": p
        for key, module in modules.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this run: missing {missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} "
            f"({len(unexpected)}); was it written by another stage or config?"
        )
    with torch.no_grad():
        for key, p in expected.items():
            if tensors[key].shape != p.shape:
                raise CheckpointError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[key])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    schedule.load_state_dict(torch.load(path / "schedule.pt", map_location="cpu", weights_only=True))
    return json.loads((path / "state.json").read_text())


# ---------------------------------------------------------------------------------------------------- sharded
# checkpoint-0000500/{sharded/ (torch.distributed.checkpoint: every process writes its shards), schedule.pt,
#                     rng-<rank>.pt, config.toml, state.json (sharded: true, processes: N)}
SHARDED = "sharded"


def _sharded_state(modules: dict[str, nn.Module], optimizer) -> tuple[nn.Module, dict, object]:
    """The trained weights and the optimizer state as DCP state dicts (DTensors stay sharded; frozen weights are
    left out: the base model is reloaded from its own files)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    container = nn.ModuleDict(modules)
    opts = StateDictOptions(ignore_frozen_params=True)
    optim = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer holds the torch one
    state = {"model": get_model_state_dict(container, options=opts),
             "optim": get_optimizer_state_dict(container, optim, options=opts)}  # fmt: skip
    return container, state, opts


def save_sharded_checkpoint(folder: Path, step: int, write_parts, schedule, config_toml: str, extra: dict, keep: int,
                            run_id: str | None, rank: int, num_processes: int, barrier,
                            layout: str = "fsdp2") -> Path:  # fmt: skip
    """Every process calls this: `write_parts(tmp)` writes each process's part (its shards, its RNG state) into a
    temporary folder; rank 0 adds the schedule, config and state.json and renames the folder into place, so a crash
    leaves no half checkpoint that resume would pick up. `barrier()` waits for every process."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:07d}"
    tmp = folder / f".tmp-{PREFIX}{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    write_parts(tmp)
    barrier()
    if rank == 0:
        torch.save(schedule.state_dict(), tmp / "schedule.pt")
        (tmp / "config.toml").write_text(config_toml)
        info = {"step": step, "run_id": run_id, **extra, "sharded": True, "layout": layout,
                "processes": num_processes}  # fmt: skip
        (tmp / "state.json").write_text(json.dumps(info))
        _publish(tmp, final, folder, run_id, keep)
        logger.info("sharded checkpoint written: %s", final)
    barrier()
    return final


def dcp_writer(modules: dict[str, nn.Module], optimizer, rank: int):
    """write_parts for FSDP2: the trained weights and optimizer state through torch.distributed.checkpoint (every
    process writes its shards) and this process's RNG state."""

    def write(tmp: Path) -> None:
        import torch.distributed.checkpoint as dcp

        _, state, _ = _sharded_state(modules, optimizer)
        dcp.save(state, checkpoint_id=str(tmp / SHARDED))
        torch.save(torch.get_rng_state(), tmp / f"rng-{rank}.pt")

    return write


def check_layout(path: Path, state: dict, layout: str, num_processes: int) -> None:
    """Before any model loads: a checkpoint resumes under the layout that wrote it. layout: "whole" (DDP, or
    FSDP2 on one process: every process holds all trained weights; resumes on any process count), "fsdp2",
    "zero2" or "zero3" (sharded: each process holds its part, so the same strategy and the same process count)."""
    theirs = state.get("layout") or ("fsdp2" if state.get("sharded") else "whole")
    procs = state.get("processes", "?")
    if theirs != "whole" and procs != num_processes:
        raise CheckpointError(
            f"{path} is a {theirs} checkpoint written by {procs} processes, this run has {num_processes}; resume it "
            f"on {procs} processes (torchrun --nproc_per_node {procs}), or start afresh"
        )
    if theirs != layout:
        raise CheckpointError(
            f"{path} was written as a {theirs} checkpoint on {procs} process(es), but this run is {layout} on "
            f"{num_processes}; resume with the strategy (distributed=...) and process count that wrote it"
        )


def load_sharded_checkpoint(path: Path, modules: dict[str, nn.Module], optimizer, schedule, rank: int,
                            num_processes: int) -> dict:  # fmt: skip
    """Restore a sharded checkpoint in place (every process calls this); return state.json. A checkpoint written
    by another number of processes is refused, naming both counts: its data position is per process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    info = checkpoint_state(path)
    if int(info.get("processes", num_processes)) != num_processes:
        raise CheckpointError(
            f"{path} was written by {info['processes']} processes, this run has {num_processes}; resume it on "
            f"{info['processes']} processes (torchrun --nproc_per_node {info['processes']}), or start afresh"
        )
    if not (path / SHARDED).is_dir():
        raise CheckpointError(f"{path} has no {SHARDED}/ folder: it is not a sharded checkpoint")
    container, state, opts = _sharded_state(modules, optimizer)
    dcp.load(state, checkpoint_id=str(path / SHARDED))
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # only the trained weights are in the checkpoint: the frozen ones stay as loaded (strict would ask for them)
    set_model_state_dict(container, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
    set_optimizer_state_dict(container, getattr(optimizer, "optimizer", optimizer), state["optim"], options=opts)
    schedule.load_state_dict(torch.load(path / "schedule.pt", map_location="cpu", weights_only=True))
    rng = path / f"rng-{rank}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return info
