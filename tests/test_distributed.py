"""Training strategies (docs/distributed.md): the setting, the accelerate config files, launches that go wrong."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mole.training import Distributed, TrainConfigError, load_config
from mole.training.distributed import check_launch, resolve_strategy

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model='m'", "data.path='d'", "mixture.experts={a='a.safetensors'}"]


def test_distributed_setting_is_validated_in_one_line():
    assert load_config(overrides=[*BASE, "distributed=fsdp2"]).distributed is Distributed.FSDP2
    assert load_config(overrides=BASE).distributed is Distributed.DDP
    with pytest.raises(TrainConfigError) as err:
        load_config(overrides=[*BASE, "distributed=fsdp"])
    msg = str(err.value)
    assert "\n" not in msg and "distributed='fsdp'" in msg
    assert all(c in msg for c in ("ddp", "fsdp2", "zero2", "zero3"))
    # the setting survives the TOML written beside every checkpoint
    cfg = load_config(overrides=[*BASE, "distributed=zero3"])
    import tomllib

    assert tomllib.loads(cfg.to_toml())["distributed"] == "zero3"


@pytest.mark.parametrize("name, strategy", [("ddp", None), ("fsdp2", "fsdp2"), ("zero2", "zero2"),
                                            ("zero3", "zero3")])  # fmt: skip
def test_shipped_accelerate_configs_launch_their_strategy(monkeypatch, name, strategy):
    """Each configs/accelerate file loads in accelerate, and the environment its launcher sets picks the strategy."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    acc = load_config_from_file(str(path))
    kinds = {"ddp": DistributedType.MULTI_GPU, "fsdp2": DistributedType.FSDP, "zero2": DistributedType.DEEPSPEED,
             "zero3": DistributedType.DEEPSPEED}  # fmt: skip
    assert acc.distributed_type == kinds[name]
    for var in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(var, raising=False)
    # what accelerate's launchers put in the environment for this file (utils/launch.py)
    if acc.distributed_type == DistributedType.FSDP:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.setenv("FSDP_VERSION", str(acc.fsdp_config["fsdp_version"]))
    if acc.distributed_type == DistributedType.DEEPSPEED:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(acc.deepspeed_config["zero_stage"]))
    cfg = load_config(overrides=BASE)
    assert resolve_strategy(cfg).value == (strategy or "ddp")


def test_config_and_launch_that_disagree_stop_naming_both(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(TrainConfigError, match="'fsdp2'.*'zero3'"):
        resolve_strategy(load_config(overrides=[*BASE, "distributed=fsdp2"]))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    with pytest.raises(TrainConfigError, match="zero_stage=1"):
        resolve_strategy(load_config(overrides=BASE))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(TrainConfigError, match="fsdp_version: 2"):
        resolve_strategy(load_config(overrides=BASE))


def test_launches_that_start_fewer_processes_are_named(monkeypatch, caplog):
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    # accelerate launch --cpu --num_processes 2: one process, and this environment (accelerate/utils/launch.py)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("KMP_BLOCKTIME", "1")
    with caplog.at_level(logging.WARNING):
        check_launch(1)
    assert "torchrun --nproc_per_node" in caplog.text and "mpirun" in caplog.text
    caplog.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun on CPUs without ACCELERATE_USE_CPU: two lone runs
    with pytest.raises(TrainConfigError, match="WORLD_SIZE=2.*ACCELERATE_USE_CPU=1"):
        check_launch(1)
    check_launch(2)  # a real two-process run: nothing to say
    assert caplog.text == ""


# --------------------------------------------------------------------------------------------- 2 processes (gloo)
def test_fsdp2_trains_saves_and_resumes_as_ddp(tmp_path, tiny_sd15_dir, faces_dir):
    """One torchrun launch of tests/scripts/mp_strategies.py (2 CPU processes): stages 1-3 under DDP and FSDP2,
    a clipped and an unclipped FSDP2 run, and a sharded stop after 2 steps resumed to 4."""
    import json
    import os
    import subprocess
    import sys

    script = Path(__file__).parent / "scripts" / "mp_strategies.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613",
           str(script), str(tmp_path), str(tiny_sd15_dir), str(faces_dir)]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["world"] == "2"
    # stage 2, clipping at 1e-4 (it bites: without it the expert ends 3e-3 away): FSDP2 = DDP within 1e-6
    assert r["s2_fsdp"]["max_diff"] <= 1e-6
    assert r["s2_fsdp_noclip"]["max_diff"] > 1e-4
    assert len(r["s2_fsdp"]["files"]) == 2 * 48  # face.safetensors: down and up at each of the 48 layers
    # sharded checkpoint 2, resume=latest to 4: the uninterrupted run's expert, and its losses from step 3 on
    assert r["s2_res"]["start_step"] == 2 and r["s2_res"]["max_diff"] <= 1e-6
    assert r["s2_res"]["losses"] == r["s2_fsdp"]["losses"][2:]
    assert r["s2_res"]["checkpoints"] == ["checkpoint-0000002", "checkpoint-0000004"]
    ckpt = tmp_path / "s2_res" / "checkpoints" / "checkpoint-0000004"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["sharded"] is True and state["processes"] == 2 and state["step"] == 4
    assert (ckpt / "sharded" / ".metadata").is_file()
    assert {p.name for p in ckpt.glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
    # stage 1: UNet and text encoder sharded separately; the whole pipeline written, every weight as DDP's but the
    # two CLIP key biases, whose true gradient is 0 (softmax ignores a shift along the keys): Adam (eps 1e-8) turns
    # their rounding noise, different in each reduction order, into +-lr steps (2 steps x 2 x 1e-4)
    s1 = r["s1_fsdp"]
    te = "text_encoder/model.safetensors:encoder.layers"
    assert sorted(s1["above_1e-6"]) == [f"{te}.0.self_attn.k_proj.bias", f"{te}.1.self_attn.k_proj.bias"]
    assert max(s1["above_1e-6"].values()) <= 4e-4 + 1e-7
    assert any(f.startswith("unet/") for f in s1["files"]) and any(f.startswith("text_encoder/") for f in s1["files"])
    assert s1["unet_class"] == s1["loaded"] == "UNet2DConditionModel"
    # stage 3: the MoLE file names the plain UNet (not FSDPUNet2DConditionModel), loads, equals DDP's within 1e-6
    s3 = r["s3_fsdp"]
    assert s3["class"] == "UNet2DConditionModel" and s3["loaded_layers"] == 48 and s3["max_diff"] <= 1e-6
