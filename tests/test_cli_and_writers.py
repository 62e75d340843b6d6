"""The `mole` CLI (demo, info) and writing experts in formats other tools read."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import out_of
from mole import ExpertFormat, MoLEConfig, inject_mole, load_expert, mole_layers, save_expert
from mole.cli import main
from mole.io import read_mole_file
from mole.mole_tiny import ASSETS
from mole.tiny import random_expert, tiny_pixart, tiny_unet, unet_inputs


@pytest.mark.skipif(not (ASSETS / "mole.safetensors").is_file(), reason="mole-tiny not built")
def test_demo_on_mole_tiny_reports_measured_numbers(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path), "--steps", "3", "--seeds", "1", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    checks = summary["checks"]
    assert checks["wrapped_layers"] == len(read_mole_file("mole-tiny", tensors=False)[0]["layers"])
    assert checks["max_abs_fused_vs_naive"] < 1e-4
    assert checks["max_abs_kohya_hand_vs_embedded_hand"] < 1e-6
    assert checks["remove_restores_base_exactly"] is True
    assert checks["max_abs_change_vs_base"] > 1e-4
    for kind in ("face", "hand", "scene"):
        gates = summary["global_gate"][kind]
        assert set(gates) == {"face", "hand"} and all(0 < g["mean"] < 1 for g in gates.values())
    assert (tmp_path / "inspect" / "gates_global.png").is_file() and (tmp_path / "compare.png").is_file()
    assert main(["info", "mole-tiny"]) == 0


def test_cli_errors_are_reported_not_raised(tmp_path, caplog):
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in caplog.text
    assert main(["demo", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "sample_steps=0" in caplog.text


def _errors(caplog):
    return [r for r in caplog.records if r.levelno >= 40]


@pytest.mark.parametrize("case", ["folder_config", "latin1_config", "bad_betas", "huge_lr", "alpha", "decay",
                                  "missing_config"])  # fmt: skip
def test_train_config_errors_are_one_line_with_exit_2(tmp_path, caplog, case):
    folder = tmp_path / "cfgdir"
    folder.mkdir()
    latin = tmp_path / "l.toml"
    latin.write_bytes('model = "caf\xe9"\n'.encode("latin-1"))
    base = ["train", "--preset", "stage2-face", "--set", "model=m", "--set", "data.path=d", "--print-config"]
    args, message = {
        "folder_config": (["--config", str(folder)], "is a folder; give the .toml file"),
        "latin1_config": (["--config", str(latin)], f"config file '{latin}' is not UTF-8"),
        "bad_betas": (["--set", "optim.betas=[1.5, 2]"], "optim.betas[0]=1.5 is not valid"),
        "huge_lr": (["--set", "optim.lr=1e8"], "optim.lr=100000000.0 is not valid"),
        "alpha": (["--set", "expert.alpha=-3"], "expert.alpha=-3.0 is not valid"),
        "decay": (["--set", "optim.weight_decay=-1"], "optim.weight_decay=-1.0 is not valid"),
        "missing_config": (["--config", str(tmp_path / "nope.toml")], "does not exist"),
    }[case]
    assert main([*base, *args]) == 2
    [err] = _errors(caplog)
    assert message in err.getMessage() and "\n" not in err.getMessage()


def test_debug_shows_the_traceback_and_internal_errors_say_so(tmp_path, caplog, monkeypatch):
    with pytest.raises(FileNotFoundError):
        main(["info", str(tmp_path / "missing.safetensors"), "--debug"])
    import mole.cli as cli
    from mole.cli import info as cli_info

    def boom(args):
        raise AssertionError("a bug")

    monkeypatch.setattr(cli_info, "_cmd_info", boom)
    parser_args = ["info", str(tmp_path / "x")]
    monkeypatch.setattr(cli, "build_parser", _parser_with(cli, boom))
    assert main(parser_args) == 1
    [err] = _errors(caplog)
    assert "internal error AssertionError: a bug (run with --debug" in err.getMessage()


def _parser_with(cli, func):
    from mole.cli._common import leaf_parsers

    build = cli.build_parser

    def patched():
        parser = build()
        for sub in leaf_parsers(parser):
            if sub.prog.endswith(" info"):
                sub.set_defaults(func=func)
        return parser

    return patched


def test_verbosity_flags_set_the_level_before_or_after_the_subcommand(tmp_path, caplog):
    import logging

    missing = str(tmp_path / "missing.safetensors")
    cases = {(): logging.WARNING, ("-v",): logging.INFO, ("-vv",): logging.DEBUG, ("-q",): logging.ERROR}
    for flags, level in cases.items():
        for argv in (["info", missing, *flags], [*flags, "info", missing]):
            caplog.clear()
            assert main(argv) == 2
            assert logging.getLogger("mole").level == level, argv
            assert len(_errors(caplog)) == 1  # the error shows even with -q
    logging.getLogger("mole").setLevel(logging.NOTSET)


def test_info_is_short_and_json_is_complete(tmp_path, capsys):
    from mole import save_mole

    model = tiny_unet("sd15")
    inject_mole(model, [random_expert(model, "face", rank=4, seed=1), random_expert(model, "hand", rank=2, seed=2)])
    path = save_mole(model, tmp_path / "m.safetensors", base_model="tiny/base")
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) <= 10 and "face (r=4, 48 layers)" in text and "tiny/base" in text and "--json" in text
    assert "weight_signature" not in text and "structure_sha256" not in text
    assert main(["info", str(path), "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["base_model"]["name"] == "tiny/base" and len(full["layers"]) == len(mole_layers(model))


@pytest.mark.parametrize("fmt", [ExpertFormat.DIFFUSERS, ExpertFormat.KOHYA])
def test_saved_experts_load_back_identically(tmp_path, fmt):
    model = tiny_unet("sd15")
    expert = random_expert(model, "face", rank=4, alpha=2.0, seed=3)
    path = save_expert(expert, tmp_path / f"face_{fmt.value}.safetensors", fmt)
    back = load_expert(path, "face")
    inject_mole(model, [back])  # kohya names resolve against the model
    for key, pair in expert.layers.items():
        got = mole_layers(model)[key].expert("face")
        assert torch.equal(got.down, pair.down) and torch.equal(got.up, pair.up) and got.alpha == 2.0


def test_diffusers_reads_our_expert_files(tmp_path):
    """An expert saved in diffusers format loads with diffusers' own loader and computes the same as MoLE."""
    pytest.importorskip("peft")
    model = tiny_unet("sd15").eval()
    inputs = unet_inputs(model, hw=(16, 12))
    expert = random_expert(model, "face", rank=4, alpha=8.0, seed=3, std=0.2)
    path = save_expert(expert, tmp_path / "face.safetensors")
    model.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="unet", adapter_name="face")
    by_diffusers = out_of(model, inputs)
    plain = tiny_unet("sd15").eval()
    inject_mole(plain, [load_expert(path, "face")], MoLEConfig(gate_init="zero"))
    with torch.no_grad():
        for layer in mole_layers(plain).values():
            layer.gates.local_bias.fill_(40.0)
            layer.gates.global_bias.fill_(40.0)
    torch.testing.assert_close(out_of(plain, inputs), by_diffusers, rtol=1e-4, atol=1e-5)


def test_dit_expert_round_trip(tmp_path):
    model = tiny_pixart()
    expert = random_expert(model, "hand", rank=2, seed=1)
    path = save_expert(expert, tmp_path / "hand.safetensors", component="transformer")
    back = load_expert(path, "hand", component="transformer")
    assert set(back.layers) == set(expert.layers)
    with pytest.raises(Exception, match="no LoRA layers"):
        load_expert(path, "hand", component="unet")


def test_native_stderr_is_quieted_and_restored():
    import subprocess
    import sys

    code = ("import os; from mole.native_logs import quiet_native_stderr\n"
            "with quiet_native_stderr(): os.write(2, b'native-noise')\n"
            "os.write(2, b'after')")  # fmt: skip
    import os

    quiet = {k: v for k, v in os.environ.items() if k != "MOLE_NATIVE_LOGS"}  # (a -vv test may have set it)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=quiet)
    assert out.stderr == "after"
    env = {**quiet, "MOLE_NATIVE_LOGS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stderr == "native-noiseafter"


def test_mediapipe_detectors_leave_stderr_empty():
    """mediapipe's graph threads log ("W0000 ... Feedback manager ...") a moment after the constructors return:
    the detectors wait for them inside the quiet window, so nothing reaches stderr, even a second later."""
    import os
    import subprocess
    import sys

    pytest.importorskip("mediapipe")
    code = ("import time; import numpy as np; from PIL import Image\n"
            "from mole.data.detect import Detector; from mole.eval.metrics import build_scorer\n"
            "d = Detector(); s = build_scorer('facehand'); time.sleep(1.0)\n"
            "im = Image.fromarray(np.full((96, 96, 3), 200, np.uint8)); d(im); s.score([im], ['p'])\n"
            "time.sleep(0.5); print('ok')")  # fmt: skip
    quiet = {k: v for k, v in os.environ.items() if k != "MOLE_NATIVE_LOGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=quiet, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
    assert out.stderr == ""
