"""A user's work is never lost: used output folders, checkpoint rotation, unreadable data, signals, killed runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mole.data.dataset import DataError
from mole.outputs import OutputExistsError, check_output_dir, check_output_file, fresh_dir
from mole.training import TrainConfigError, load_config, train
from mole.training.checkpoint import list_checkpoints, save_checkpoint

FAST = ["data.resolution=32", "batch_size=2", "tensorboard=false", "data.caption_dropout=0.0", "expert.rank=2"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def cfg(base, data, out, *extra):
    return load_config(preset="stage2-face", overrides=[
        f"model='{base}'", f"data.path='{data}'", f"output_dir='{out}'", *FAST, *extra])  # fmt: skip


def metric_steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_second_run_into_a_used_output_dir_is_refused_until_overwrite(tmp_path, tiny_sd15_dir, faces_dir):
    out = tmp_path / "run"
    first = train(cfg(tiny_sd15_dir, faces_dir, out, "max_steps=3", "checkpoint_every=1", "log_every=1"))
    final_bytes = first.final[0].read_bytes()
    with pytest.raises(OutputExistsError, match=r"already holds results \(config.toml.*--overwrite.*resume=latest"):
        train(cfg(tiny_sd15_dir, faces_dir, out, "max_steps=2", "optim.lr=1e-3"))
    assert first.final[0].read_bytes() == final_bytes and len(list_checkpoints(out / "checkpoints")) == 2
    second = train(cfg(tiny_sd15_dir, faces_dir, out, "max_steps=2", "checkpoint_every=1", "log_every=1",
                       "optim.lr=1e-3"), overwrite=True)  # fmt: skip
    assert metric_steps(out) == [1, 2]  # the earlier run's lines are gone, not mixed in
    assert [p.name for p in second.checkpoints] == ["checkpoint-0000001", "checkpoint-0000002"]
    assert first.final[0].read_bytes() != final_bytes
    # resuming is the other way to reuse the folder; max_steps below the checkpoint's step is an error
    with pytest.raises(TrainConfigError, match=r"max_steps=1 is below the step of the checkpoint to resume \(2"):
        train(cfg(tiny_sd15_dir, faces_dir, out, "max_steps=1", "resume='latest'"))


def test_rotation_deletes_only_this_runs_checkpoints(tmp_path):
    module = nn.Linear(2, 2)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(folder, step, {"m": module}, opt, sched, "", keep=2, run_id="old")
    for step in (1, 2, 3):  # a second run in the same folder: its rotation never touches the first run's 4 and 5
        save_checkpoint(folder, step, {"m": module}, opt, sched, "", keep=2, run_id="new")
    runs = {p.name: json.loads((p / "state.json").read_text())["run_id"] for p in list_checkpoints(folder)}
    assert runs == {"checkpoint-0000002": "new", "checkpoint-0000003": "new", "checkpoint-0000004": "old",
                    "checkpoint-0000005": "old"}  # fmt: skip


def test_all_unreadable_images_stop_with_an_error_naming_folder_and_count(tmp_path, tiny_sd15_dir):
    data = tmp_path / "broken"
    data.mkdir()
    for i in range(3):
        (data / f"b{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
        (data / f"b{i}.txt").write_text("a face")
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=rf"data.path='{data}': 3 of 3 images are unreadable \(all of them\)"):
        train(cfg(tiny_sd15_dir, data, tmp_path / "out", "max_steps=5"))
    assert time.perf_counter() - t0 < 120


def test_missing_data_folder_fails_before_the_model_loads(tmp_path):
    with pytest.raises(DataError, match="data.path=.*is not a folder"):
        train(cfg(tmp_path / "no-model-needed", tmp_path / "nope", tmp_path / "out", "max_steps=1"))


def _cli_train(out, base, data, *extra):
    return [sys.executable, "-m", "mole.cli", "train", "--preset", "stage2-face", "--set", f"model={base}",
            "--set", f"data.path={data}", "--set", f"output_dir={out}", "--set", "data.resolution=32",
            "--set", "batch_size=2", "--set", "tensorboard=false", "--set", "expert.rank=2",
            "--set", "data.caption_dropout=0.0", "--set", "checkpoint_every=1", *extra]  # fmt: skip


def _wait_for(path_glob: Path, pattern: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while not list(path_glob.glob(pattern)):
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()[1][-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for a checkpoint")
        time.sleep(0.1)


def test_sigterm_becomes_a_stop_request_and_a_second_signal_aborts():
    from mole.training.interrupt import StopRequest, TrainingInterrupted

    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested and stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) == before
    assert TrainingInterrupted(3, None, Path("o"), "SIGTERM").exit_code == 143


def test_ctrl_c_writes_a_checkpoint_and_prints_the_resume_command(tmp_path, tiny_sd15_dir, faces_dir):
    sig = signal.SIGINT
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli_train(out, tiny_sd15_dir, faces_dir, "--set", "max_steps=100000"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for(out / "checkpoints", "checkpoint-*", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("resume with: ")]
    assert line.endswith("--set resume=latest") and "mole train" in line
    last = list_checkpoints(out / "checkpoints")[-1]
    step = json.loads((last / "state.json").read_text())["step"]
    assert f"at step {step};" in err and load_file(str(last / "trainable.safetensors"))
    # the printed command continues the run
    from mole.cli import main

    args = line[len("resume with: mole "):].split()
    args = [a.replace("max_steps=100000", f"max_steps={step + 1}") for a in args]
    assert main(args) == 0
    assert json.loads((list_checkpoints(out / "checkpoints")[-1] / "state.json").read_text())["step"] == step + 1


def test_kill_9_leaves_only_whole_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_sd15_dir,
                                                                                        faces_dir):  # fmt: skip
    steps = 6
    full = train(cfg(tiny_sd15_dir, faces_dir, tmp_path / "full", f"max_steps={steps}", "checkpoint_every=1"))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli_train(out, tiny_sd15_dir, faces_dir, "--set", f"max_steps={steps}"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for(out / "checkpoints", "checkpoint-0000002", proc)
    proc.kill()  # SIGKILL: no handler runs; it may land in the middle of writing checkpoint 3
    proc.communicate(timeout=60)
    for ckpt in list_checkpoints(out / "checkpoints"):  # whatever is listed is whole
        assert load_file(str(ckpt / "trainable.safetensors"))
        torch.load(ckpt / "optimizer.pt", weights_only=True)
    resumed = train(cfg(tiny_sd15_dir, faces_dir, out, f"max_steps={steps}", "checkpoint_every=1",
                        "resume='latest'"))  # fmt: skip
    assert 2 <= resumed.start_step < steps and resumed.steps == steps
    a, b = load_file(str(full.final[0])), load_file(str(resumed.final[0]))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert metric_steps(out) == sorted(set(metric_steps(out)))  # no step logged twice


def test_output_helpers(tmp_path):
    out = tmp_path / "g"
    check_output_dir(out, ["index.json"], False, "x")  # missing: fine
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    check_output_dir(out, ["index.json", "mole"], False, "x")  # other files are not results
    (out / "index.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=r"x: output folder .* \(index.json\); pass --overwrite"):
        check_output_dir(out, ["index.json"], False, "x")
    check_output_dir(out, ["index.json"], True, "x")
    assert not (out / "index.json").exists() and (out / "notes.txt").read_text() == "mine"
    (out / "index.json").write_text("{}")
    assert fresh_dir(out, ["index.json"]) == tmp_path / "g-2"
    (tmp_path / "g-2").mkdir()
    (tmp_path / "g-2" / "index.json").write_text("{}")
    assert fresh_dir(out, ["index.json"]) == tmp_path / "g-3"
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        check_output_file(out / "index.json", False, "y")
