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
    assert "\n" not in msg and 'distributed = "fsdp"' in msg
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
def launch(tmp_path, model, data, parts: str, port: int) -> dict:
    """tests/scripts/mp_strategies.py under torchrun on 2 CPU processes (gloo); its report.json."""
    import json
    import os
    import subprocess
    import sys

    script = Path(__file__).parent / "scripts" / "mp_strategies.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), str(tmp_path), str(model), str(data), parts]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "report.json").read_text())


def test_fsdp2_trains_saves_and_resumes_as_ddp(tmp_path, tiny_sd15_dir, faces_dir):
    """One launch (2 CPU processes): stages 1-3 under DDP and FSDP2, a clipped and an unclipped FSDP2 run, and a
    sharded stop after 2 steps resumed to 4."""
    import json

    r = launch(tmp_path, tiny_sd15_dir, faces_dir, "s2,s1,s3", 29613)
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
    # resumed on 1 process (this one): stopped before the model loads, in one line naming both counts
    from mole.training import train
    from mole.training.checkpoint import CheckpointError

    cfg = load_config(tmp_path / "s2_res" / "config.toml", overrides=["max_steps=6", "resume=latest"])
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    assert "\n" not in str(err.value) and "written by 2 processes, this run has 1" in str(err.value)
    # stage 1: UNet and text encoder sharded separately; the whole pipeline written, every weight as DDP's but
    # elements whose true gradient is (nearly) 0, above all the two CLIP key biases (softmax ignores a shift along the
    # keys): Adam (eps 1e-8) turns their rounding noise, different in each reduction order, into +-lr steps (2 steps
    # x 2 x 1e-4). Which other near-zero elements cross 1e-6 depends on the CPU's kernels: at most two more tensors.
    s1 = r["s1_fsdp"]
    te = "text_encoder/model.safetensors:encoder.layers"
    above = set(s1["above_1e-6"])
    assert {f"{te}.0.self_attn.k_proj.bias", f"{te}.1.self_attn.k_proj.bias"} <= above and len(above) <= 4, above
    assert max(s1["above_1e-6"].values()) <= 4e-4 + 1e-7
    assert any(f.startswith("unet/") for f in s1["files"]) and any(f.startswith("text_encoder/") for f in s1["files"])
    assert s1["unet_class"] == s1["loaded"] == "UNet2DConditionModel"
    # stage 3: the MoLE file names the plain UNet (not FSDPUNet2DConditionModel), loads, equals DDP's within 1e-6
    s3 = r["s3_fsdp"]
    assert s3["class"] == "UNet2DConditionModel" and s3["loaded_layers"] == 48 and s3["max_diff"] <= 1e-6
    # and `mole generate` takes both: the FSDP2 stage-1 pipeline as --base, the FSDP2 MoLE file as --mole
    assert r["generate_rc"] == 0 and "0000_seed0.png" in r["generated"]


def test_a_checkpoint_resumes_only_under_the_layout_and_process_count_that_wrote_it(tmp_path):
    from mole.training.checkpoint import CheckpointError, check_layout

    sharded = {"step": 2, "sharded": True, "layout": "fsdp2", "processes": 2}
    check_layout(tmp_path, sharded, "fsdp2", 2)
    with pytest.raises(CheckpointError) as err:  # another process count: one line naming both counts
        check_layout(tmp_path, sharded, "whole", 1)
    msg = str(err.value)
    assert "\n" not in msg and "written by 2 processes, this run has 1" in msg and "--nproc_per_node 2" in msg
    with pytest.raises(CheckpointError, match="by 2 processes, this run has 4"):
        check_layout(tmp_path, sharded, "fsdp2", 4)
    with pytest.raises(CheckpointError, match="fsdp2 checkpoint on 2 process.*zero2 on 2"):
        check_layout(tmp_path, sharded, "zero2", 2)
    whole = {"step": 2, "processes": 2}  # DDP: every process holds everything, any count resumes it
    check_layout(tmp_path, whole, "whole", 1)
    check_layout(tmp_path, {"step": 2}, "whole", 3)  # written before processes were recorded
    with pytest.raises(CheckpointError, match="whole checkpoint.*fsdp2 on 2"):
        check_layout(tmp_path, whole, "fsdp2", 2)


def test_fsdp2_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(tmp_path, tiny_sd15_dir, faces_dir):
    """kill -9 of every process of a 2-process FSDP2 run once a checkpoint is written, resume=latest, compare with
    the run that was never stopped (16 steps, checkpoint every 2)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = Path(__file__).parent / "scripts" / "mp_strategies.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29615",
           str(script), str(tmp_path), str(tiny_sd15_dir), str(faces_dir), "k1"]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "k_res" / "checkpoints"
    try:
        deadline = time.monotonic() + 300
        while not (ckpts / "checkpoint-0000004" / "state.json").is_file() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
    finally:  # kill -9 both training processes (torchrun starts them in their own sessions) and the launcher
        import psutil

        workers = psutil.Process(proc.pid).children(recursive=True)
        for w in workers:
            w.kill()
        proc.kill()
        proc.wait()
        psutil.wait_procs(workers, timeout=30)
    assert proc.returncode == -signal.SIGKILL and len(workers) >= 2
    assert not (tmp_path / "k_res" / "final").exists()  # it did not finish
    r = launch(tmp_path, tiny_sd15_dir, faces_dir, "k2", 29616)
    assert 4 <= r["k_res"]["start_step"] < 16
    assert r["k_res"]["max_diff"] <= 1e-6  # the resumed run ends with the uninterrupted run's expert
    assert r["k_res"]["losses"] == r["k_full"]["losses"][r["k_res"]["start_step"]:]


def test_deepspeed_zero2_and_zero3_train_and_resume_as_ddp(tmp_path, tiny_sd15_dir, faces_dir):
    """DeepSpeed through accelerate on 2 CPU processes (gloo, DeepSpeed's CPU accelerator): stage 2 with clipping
    that bites under ZeRO-2 and ZeRO-3 ends where DDP ends; a ZeRO-2 stop after 2 steps resumes to the same expert.
    Runs where deepspeed is installed (pip install --no-deps deepspeed hjson py-cpuinfo msgpack einops ninja)."""
    import json

    pytest.importorskip("deepspeed")
    r = launch(tmp_path, tiny_sd15_dir, faces_dir, "z", 29614)
    assert r["s2_zero2"]["max_diff"] <= 1e-6 and r["s2_zero3"]["max_diff"] <= 1e-6
    assert len(r["s2_zero3"]["files"]) == 2 * 48  # the whole expert, gathered out of ZeRO-3's partitions
    assert r["s2_zres"]["start_step"] == 2 and r["s2_zres"]["max_diff"] <= 1e-6
    # the resumed steps see the same images and noise: losses equal to float32 rounding (ZeRO's reduction order
    # after a reload may differ in the last bit; a wrong data position or RNG state moves them by > 1e-3)
    assert r["s2_zres"]["losses"] == pytest.approx(r["s2_zero2"]["losses"][2:], rel=1e-6, abs=0)
    state = json.loads((tmp_path / "s2_zres" / "checkpoints" / "checkpoint-0000004" / "state.json").read_text())
    assert state["layout"] == "zero2" and state["processes"] == 2


def test_deepspeed_config_is_built_from_the_training_config():
    """What the engine is given (checked without DeepSpeed): micro-batch, accumulation from total_batch_size,
    clipping, ZeRO stage, 16-bit gather for saves under ZeRO-3; precision left to accelerate."""
    from mole.training.distributed import deepspeed_config

    cfg = load_config(overrides=[*BASE, "batch_size=2", "total_batch_size=16", "optim.max_grad_norm=0.5"])
    ds = deepspeed_config(cfg, Distributed.ZERO3, cfg.batch_plan(2).grad_accum)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"] == ds["fp16"] == {"enabled": "auto"}
    ds2 = deepspeed_config(load_config(overrides=[*BASE, "optim.max_grad_norm='none'"]), Distributed.ZERO2, 1)
    assert ds2["zero_optimization"] == {"stage": 2} and ds2["gradient_clipping"] == 0.0


def test_zero3_with_a_trained_clip_text_encoder_is_refused_in_one_line():
    from mole.training.distributed import check_strategy

    s1 = load_config(overrides=[*BASE, "stage=1", "train_text_encoder=true"])
    with pytest.raises(TrainConfigError) as err:
        check_strategy(s1, Distributed.ZERO3)
    assert "\n" not in str(err.value) and "zero2" in str(err.value) and "train_text_encoder=false" in str(err.value)
    check_strategy(s1, Distributed.ZERO2)  # ZeRO-2 trains it (equal to DDP: tests/scripts/mp_strategies.py z1)
    check_strategy(load_config(overrides=[*BASE, "stage=1", "train_text_encoder=false"]), Distributed.ZERO3)
