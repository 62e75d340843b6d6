"""Settings in CLI terms (issue 21, item 8): every unknown key of a training TOML, `--set` or an eval TOML is
reported at once, each with the nearest valid key, wherever it sits (a nested table, a [[models]] entry); a value
of the wrong type is named as TOML writes it ("got a table (model.not = 1)"), never as Python's repr
("model={'not': 1} must be a string"), with the fix. Before this, only the unknown keys of the first table that had
one were reported, and type errors showed Python values."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mole.cli import main

PYTHON = ("{'", "['", "': ", "None", "True", "False", "dict", "NoneType", "must be a string")


def _error(caplog) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0]
    return errors[0]


def _train(caplog, *sets: str, config: Path | None = None) -> str:
    argv = ["train", "--preset", "stage2-face", "--set", "model=mole-tiny", "--print-config"]
    argv += ["--config", str(config)] if config else []
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    return _error(caplog)


def test_every_unknown_train_key_is_reported_at_once_with_the_nearest(caplog, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text('seeed = 3\n[optim]\nlrr = 1e-4\n[data]\nresolutio = 64\n')
    line = _train(caplog, "expert.rnak=8", "max_step=10", config=config)
    for key, near in [("seeed", "seed"), ("optim.lrr", "optim.lr"), ("data.resolutio", "data.resolution"),
                      ("expert.rnak", "expert.rank"), ("max_step", "max_steps")]:  # fmt: skip
        assert f"{key} (did you mean {near}?)" in line, line
    assert "--print-config" in line  # where the valid keys are listed
    assert not any(p in line for p in PYTHON), line


def test_every_unknown_eval_key_is_reported_at_once_with_the_nearest(caplog, tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"id": 0, "prompt": "a close-up photo of a face"}) + "\n")
    config = tmp_path / "eval.toml"
    config.write_text(f'benchmark = "{bench}"\nnum_prompt = 1\nrepeats = 1\n[[models]]\nname = "m"\n'
                      'bsae = "mole-tiny"\n[[metrics]]\nnmae = "facehand"\n')  # fmt: skip
    assert main(["eval", "run", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    line = _error(caplog)
    for key, near in [("num_prompt", "num_prompts"), ("models[0].bsae", "models[0].base"),
                      ("metrics[0].nmae", "metrics[0].name")]:  # fmt: skip
        assert f"{key} (did you mean {near}?)" in line, line
    assert "--print-config" not in line and not any(p in line for p in PYTHON), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("model.not=1", r"^model must be a model name or path .*, got a table \(model\.not = 1\); set model itself "
                        r"\(--set model=PATH\)"),
        ("resume=3", r'^resume must be "latest", "none" or a checkpoint folder, got 3$'),
        ("data.resolution=abc", r'^data\.resolution must be a whole number, got "abc"$'),
        ("optim.lr=[1, 2]", r"^optim\.lr must be a number, got a list \(\[1, 2\]\)$"),
        ("optim=3", r"^optim must be a table of options \(\[optim\] in the TOML\), got 3$"),
        ("mixed_precision=bf32", r'^mixed_precision = "bf32" is not valid; use one of no, fp16, bf16$'),
        ("gradient_checkpointing=1", r"^gradient_checkpointing must be true or false, got 1$"),
    ],
)
def test_a_wrong_type_is_named_in_toml_terms_with_the_fix(setting, expected, caplog):
    line = _train(caplog, setting)
    assert re.search(expected, line), line
    assert not any(p in line for p in PYTHON), line


def test_eval_type_errors_are_in_toml_terms(caplog, tmp_path):
    config = tmp_path / "eval.toml"
    config.write_text('benchmark = "b.jsonl"\nnum_prompts = 1\n[[models]]\nname = "m"\nbase.not = 1\n')
    assert main(["eval", "run", "--config", str(config)]) == 2
    line = _error(caplog)
    assert line.startswith("models[0].base must be a model name or path") and "got a table (models[0].base.not = 1)" \
        in line, line  # fmt: skip
    assert "--set" not in line and not any(p in line for p in PYTHON), line


def test_an_unknown_expert_weight_names_the_files_experts_in_cli_terms(caplog, tmp_path):
    out = tmp_path / "g"
    argv = ["generate", "--base", "mole-tiny", "--mole", "mole-tiny", "--experts", "eye=1", "--prompt", "a face",
            "--steps", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    line = _error(caplog)
    assert line == "no expert named eye in this MoLE file; its experts are face, hand (e.g. --experts face=1)", line
    assert not out.exists()
