"""Training strategies beyond plain data parallel: which one runs, and the pieces each needs.

    strategy = resolve_strategy(cfg)               # cfg.distributed, or the accelerate config the run was launched with
    ddp    -> accelerator.prepare(models, optimizer)  (accelerate)
    fsdp2  -> shard_modules(modules)               (torch.distributed.fsdp.fully_shard: runs on CPU / gloo too)
    zero2 / zero3 -> deepspeed_plugin(...)         (DeepSpeed through accelerate)
"""

from __future__ import annotations

import logging
import os

from .config import Distributed, TrainConfig, TrainConfigError

logger = logging.getLogger(__name__)


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launched_strategy() -> Distributed | None:
    """The strategy an accelerate config file asked for (`accelerate launch --config_file ...` passes it on in the
    environment), or None for a plain multi-process / one-process launch."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2").strip()
        if stage not in ("2", "3"):
            raise TrainConfigError(
                f"the accelerate config asks for DeepSpeed zero_stage={stage}; mole trains with zero_stage 2 or 3 "
                "(configs/accelerate/zero2.yaml, zero3.yaml)"
            )
        return Distributed.ZERO2 if stage == "2" else Distributed.ZERO3
    if _flag("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1").strip()
        if version != "2":
            raise TrainConfigError(
                f"the accelerate config asks for FSDP version {version}; mole trains with FSDP2: set "
                "fsdp_version: 2 (configs/accelerate/fsdp2.yaml)"
            )
        return Distributed.FSDP2
    return None


def resolve_strategy(cfg: TrainConfig) -> Distributed:
    """cfg.distributed, unless an accelerate config file chose a sharded strategy; a config and a launch that ask
    for two different sharded strategies is an error naming both."""
    launched = launched_strategy()
    if launched is None or launched is cfg.distributed:
        return cfg.distributed
    if cfg.distributed is not Distributed.DDP:
        raise TrainConfigError(
            f"distributed={cfg.distributed.value!r} but the accelerate config file asks for {launched.value!r}; "
            "set distributed to the same strategy or launch with the matching configs/accelerate/*.yaml"
        )
    return launched


def check_launch(num_processes: int) -> None:
    """Launches that do not start the processes they were asked for.

    - `accelerate launch --cpu --num_processes N` (N > 1) starts one process: accelerate starts several CPU
      processes only through mpirun (--mpirun_hostfile). Its simple launcher leaves this signature in the
      environment: MASTER_ADDR and KMP_BLOCKTIME=1 set, ACCELERATE_USE_CPU true, no WORLD_SIZE. A warning.
    - `accelerate launch --multi_gpu` (or a MULTI_GPU config file with use_cpu: true) on a machine without GPUs
      starts N processes that each train alone (WORLD_SIZE=N, but accelerate sees no GPU and no
      ACCELERATE_USE_CPU): N runs writing one output_dir. An error."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world > 1 and num_processes == 1:
        raise TrainConfigError(
            f"WORLD_SIZE={world} processes were launched but accelerate joined them into 1 (no GPU, and "
            "ACCELERATE_USE_CPU is not set); on CPUs launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            f"--num_processes {world} ...` or `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {world} ...`"
        )
    if (num_processes == 1 and _flag("ACCELERATE_USE_CPU") and "MASTER_ADDR" in env and env.get("KMP_BLOCKTIME") == "1"
            and "WORLD_SIZE" not in env and "PMI_SIZE" not in env and "OMPI_COMM_WORLD_SIZE" not in env):  # fmt: skip
        logger.warning(
            "running on 1 process: `accelerate launch --cpu --num_processes N` starts one process (accelerate runs "
            "several CPU processes only through mpirun); launch N CPU processes with "
            "`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m mole.cli train ...`"
        )
