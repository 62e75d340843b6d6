"""Training strategies beyond plain data parallel: which one runs, and the pieces each needs.

    strategy = resolve_strategy(cfg)               # cfg.distributed, or the accelerate config the run was launched with
    ddp    -> accelerator.prepare(models, optimizer)  (accelerate)
    fsdp2  -> shard_modules(modules)               (torch.distributed.fsdp.fully_shard: runs on CPU / gloo too)
    zero2 / zero3 -> accelerator_options(cfg, strategy)  (a DeepSpeedPlugin: DeepSpeed through accelerate)
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

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


def check_strategy(cfg: TrainConfig, strategy: Distributed) -> None:
    """Combinations that cannot train, refused before anything loads."""
    from .config import Stage

    if strategy is Distributed.ZERO3 and cfg.stage is Stage.FINETUNE and cfg.train_text_encoder:
        raise TrainConfigError(
            "distributed='zero3' with train_text_encoder=true cannot train: ZeRO-3 partitions the CLIP text encoder "
            "and CLIP's embeddings read the partitioned position table's size outside its forward "
            "(max_position_embeddings: 0); use distributed='zero2' or 'fsdp2', or train_text_encoder=false"
        )


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


# ---------------------------------------------------------------------------------------------------- FSDP2
# ModuleLists whose entries become their own FSDP unit (UNet blocks, DiT blocks, CLIP / T5 layers): only one block's
# full weights exist at a time in forward and backward, which is what sharding saves
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks", "layers", "block")


def device_mesh(device):
    """The 1-D mesh over every process (gloo on CPUs, nccl on GPUs), on the process group accelerate started."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("shard",))


def shard_modules(
    modules: dict[str, nn.Module],
    params: list[nn.Parameter],
    param_groups: list[dict] | None,
    mesh,
    others: dict[str, nn.Module] | None = None,
) -> tuple[list[nn.Parameter], list[dict] | None]:
    """fully_shard each trained module (its blocks first, then the module itself: one FSDP unit per block) and
    return `params` and `param_groups` rewritten to the sharded parameters (fully_shard replaces every parameter
    by a DTensor; the list taken before no longer receives gradients). Modules in `others` stay whole."""
    from torch.distributed.fsdp import fully_shard

    where = {}
    for key, module in {**modules, **(others or {})}.items():
        for name, p in module.named_parameters():
            where.setdefault(id(p), (key, name))
    lost = [p for p in params if id(p) not in where]
    if lost:  # pragma: no cover - a stage that trains a parameter outside its modules
        raise ValueError(f"{len(lost)} trained parameter(s) are in none of the modules {sorted(modules)}")
    names = [where[id(p)] for p in params]
    groups = [[where[id(p)] for p in g["params"]] for g in param_groups] if param_groups else None
    for module in modules.values():
        for name, child in reversed(list(module.named_modules())):  # inner blocks before the blocks holding them
            if isinstance(child, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS:
                for block in child:
                    if any(True for _ in block.parameters()):
                        fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
    every = {**modules, **(others or {})}

    def find(key_name):
        key, name = key_name
        return every[key].get_parameter(name)

    new_params = [find(n) for n in names]
    new_groups = None
    if param_groups:
        new_groups = [{**g, "params": [find(n) for n in names_g]} for g, names_g in zip(param_groups, groups)]
    return new_params, new_groups


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over a mix of sharded (DTensor) and whole gradients: the norm of all of them
    together, each shard counted once (the DTensor norm is reduced over the mesh), every gradient scaled by
    min(1, max_norm / (norm + 1e-6)) as torch does. Returns the norm before clipping."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    parts = []
    if sharded:
        parts.append(torch.nn.utils.get_total_norm(sharded).full_tensor())
    if whole:
        parts.append(torch.nn.utils.get_total_norm(whole))
    if not parts:
        return torch.tensor(0.0)
    total = parts[0] if len(parts) == 1 else torch.stack([x.to(parts[0]) for x in parts]).norm()
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every process calls it), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


def unwrapped_class(module: nn.Module) -> type:
    """The model's own class under FSDP2's generated FSDP<Class> (fully_shard swaps module.__class__)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def gather_whole(modules: dict[str, nn.Module], is_main: bool) -> None:
    """Make the sharded modules whole on the main process, for the final files: every process takes part in
    get_model_state_dict(full_state_dict=True, cpu_offload=True) (rank 0 receives the full tensors in host memory);
    rank 0 then puts them back as plain parameters and gives each module its own class again, so the writers
    (save_pretrained, save_expert, save_mole) see the unwrapped model. The other processes keep their shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    for module in modules.values():
        if not is_sharded(module):
            continue
        full = get_model_state_dict(module, options=opts)
        if not is_main:
            continue
        device = next(iter(full.values())).device if full else torch.device("cpu")
        for name, p in list(module.named_parameters()):
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            setattr(owner, leaf, nn.Parameter(full[name].to(device), requires_grad=p.requires_grad))
        for sub in module.modules():
            if is_sharded(sub):
                sub.__class__ = unwrapped_class(sub)


# ---------------------------------------------------------------------------------------------------- DeepSpeed
ZERO = (Distributed.ZERO2, Distributed.ZERO3)


def deepspeed_config(cfg: TrainConfig, strategy: Distributed, grad_accum: int) -> dict:
    """The DeepSpeed config mole trains with, made from the training config: the micro-batch (DeepSpeed's
    prepare() needs it, or a dataloader, which mole does not hand to accelerate), the accumulation computed from
    total_batch_size, clipping (DeepSpeed clips inside its step), the ZeRO stage; precision is filled in by
    accelerate from mixed_precision. Under ZeRO-3 the whole 16-bit weights are gathered for a save."""
    zero: dict = {"stage": 2 if strategy is Distributed.ZERO2 else 3}
    if strategy is Distributed.ZERO3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(cfg.optim.max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def accelerator_options(cfg: TrainConfig, strategy: Distributed) -> dict:
    """Extra Accelerator(...) arguments for the strategy: for ZeRO a DeepSpeedPlugin with deepspeed_config() (the
    process count from WORLD_SIZE, as every launcher sets it) and zero3_init_flag off, so that nothing loaded
    (VAE, frozen text encoders) is partitioned by zero.Init: only the prepared trained model is; without GPUs the
    gloo backend (accelerate knows no CPU backend for DeepSpeed)."""
    if strategy not in ZERO:
        return {}
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    ds = deepspeed_config(cfg, strategy, cfg.batch_plan(world).grad_accum)
    opts: dict = {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=False)}
    if not torch.cuda.is_available():
        opts["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    return opts


class accelerate_env:
    """The environment accelerate reads while an Accelerator is made, put back afterwards: ACCELERATE_USE_FSDP
    hidden (mole shards with torch itself), and for ZeRO without GPUs ACCELERATE_USE_CPU hidden (with it accelerate
    ignores DeepSpeed) and DeepSpeed's CPU accelerator chosen; ACCELERATE_USE_DEEPSPEED, which accelerate sets for
    a plugin, is restored so that a later run in the same process is not taken for a DeepSpeed launch."""

    KEYS = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED", "DS_ACCELERATOR")

    def __init__(self, strategy: Distributed):
        self.strategy = strategy

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.KEYS}
        os.environ.pop("ACCELERATE_USE_FSDP", None)
        if self.strategy in ZERO and not torch.cuda.is_available():
            os.environ.pop("ACCELERATE_USE_CPU", None)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if k == "DS_ACCELERATOR":
                continue  # DeepSpeed reads it once per process
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return False


def zero3_gathered(modules: dict[str, nn.Module], strategy: Distributed):
    """A context in which ZeRO-3's partitioned weights of `modules` are whole on every process (a collective:
    every process enters it); any other strategy: nothing to do."""
    import contextlib

    if strategy is not Distributed.ZERO3:
        return contextlib.nullcontext()
    import deepspeed

    params = [p for m in modules.values() for p in m.parameters()]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class load_whole:
    """Load models whole under ZeRO-3, as diffusers' training examples keep the VAE and frozen text encoders out of
    the partitioning: accelerate registers its DeepSpeed config with transformers for any ZeRO-3 plugin (also
    with zero3_init_flag off), and transformers' from_pretrained then partitions every model it loads under
    zero.Init, the frozen CLIP text encoder included, which nothing prepares afterwards ("max_position_embeddings:
    0"). Inside this context that registration is lifted; the trained model is partitioned by DeepSpeed when it is
    prepared."""

    def __init__(self, accelerator):
        self.plugin = getattr(accelerator.state, "deepspeed_plugin", None)

    def __enter__(self):
        if self.plugin is not None:
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self.plugin.dschf = None
        return self

    def __exit__(self, *exc):
        if self.plugin is not None:
            self.plugin.set_deepspeed_weakref()
        return False
