"""Model names resolve the same way in every command and config (issue 21, item 3): a base (`--base`, `model = ...`,
`[[models]] base`) is mole-tiny, a single-file checkpoint, a diffusers pipeline folder or a hub id, by the one rule
of mole.models.check_base_name; a bad one is a user error (exit 2) in one line that names the field, the value and
the fix, worded alike in every command, and checked before anything loads. An uncached hub id offline says so in
CLI terms (not diffusers' `local_files_only=False`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mole.cli import main
from mole.mole_tiny import ASSETS

needs_tiny = pytest.mark.skipif(not (ASSETS / "mole.safetensors").is_file(), reason="mole-tiny not built")
HUB = "nobody-xyz/not-a-model"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may try the network
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)


def _argv(command: str, base: str, tmp: Path) -> tuple[list[str], str]:
    """The command line giving `base` where the command takes a base, and the field its message names."""
    out = str(tmp / "out")
    if command in ("generate", "inspect"):
        return [command, "--base", base, "--mole", "mole-tiny", "--prompt", "a face", "--out", out], "--base"
    if command == "convert":
        return ["convert", "--base", base, "--mole", "mole-tiny", "--out", out], "--base"
    if command == "bake":
        return ["bake", "--mole", "mole-tiny", "--base", base, "--weights", "face=1", "--out", f"{out}.safetensors"], \
            "--base"  # fmt: skip
    if command == "demo":
        return ["demo", "--base", base, "--out", out], "--base"
    if command == "ui":
        return ["ui", "--base", base], "--base"
    if command == "estimate":
        return ["estimate", "--base", base, "--preset", "stage3"], "--base"
    if command == "train":
        return ["train", "--preset", "stage2-face", "--set", f"model={base}", "--print-config"], "model"
    bench = tmp / "bench.jsonl"
    bench.write_text(json.dumps({"id": 0, "prompt": "a close-up photo of a face"}) + "\n")
    if command == "eval-ablation":
        return ["eval", "ablation", "--benchmark", str(bench), "--base", base, "--out", out], "--base"
    assert command == "eval-run"
    config = tmp / "eval.toml"
    config.write_text(f'benchmark = "{bench}"\nout_dir = "{out}"\nnum_prompts = 1\nrepeats = 1\nsteps = 1\n'
                      f'[[models]]\nname = "m"\nbase = "{base}"\n[[metrics]]\nname = "facehand"\n')  # fmt: skip
    return ["eval", "run", "--config", str(config)], "models[m].base"


COMMANDS = ["generate", "inspect", "convert", "bake", "demo", "ui", "train", "eval-run", "eval-ablation"]
# what each bad base is, and the class of wording every command uses for it
BAD = {
    "folder": ("is not a diffusers pipeline folder", "model_index.json"),
    "missing-file": ("no such file or folder", "check the path"),
    "hub": ("not in the local Hugging Face cache and the hub cannot be reached",
            f"huggingface-cli download {HUB}"),
}  # fmt: skip


def _bad_base(kind: str, tmp: Path) -> str:
    if kind == "folder":
        (tmp / "not-a-pipeline").mkdir()
        (tmp / "not-a-pipeline" / "notes.txt").write_text("no model_index.json here")
        return str(tmp / "not-a-pipeline")
    return str(tmp / "missing" / "model.safetensors") if kind == "missing-file" else HUB


@pytest.mark.parametrize("kind", sorted(BAD))
@pytest.mark.parametrize("command", [*COMMANDS, "estimate"])
def test_a_bad_base_is_one_line_naming_the_field_value_and_fix(command, kind, tmp_path, caplog, capsys):
    base = _bad_base(kind, tmp_path)
    argv, field = _argv(command, base, tmp_path)
    assert main(argv) == 2, argv  # a user error, not 1 (internal) and not a success
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    (line,) = errors
    what, fix = BAD[kind]
    assert line.startswith(f"{field} {base}") and what in line and fix in line, line
    assert "\n" not in line and len(line) < 300, line
    for python in ("local_files_only", "=False", "=True", "None", "Traceback", "stacktrace"):
        assert python not in line, line
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()  # nothing written


@needs_tiny
@pytest.mark.parametrize("command", COMMANDS)
def test_mole_tiny_passes_the_same_rule_in_every_command(command, tmp_path, caplog, monkeypatch):
    """Each command checks its base through mole.models.check_base_name (spied on), and mole-tiny passes it; the
    spy stops the command right after the check, so nothing loads."""
    import mole.models as models

    seen = []
    real = models.check_base_name

    class Checked(ValueError):
        pass

    def spy(base, field="--base"):
        resolved = real(base, field)
        seen.append((field, base, resolved))
        raise Checked("base checked")

    monkeypatch.setattr(models, "check_base_name", spy)
    argv, field = _argv(command, "mole-tiny", tmp_path)
    assert main(argv) == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == ["base checked"]
    ((f, base, resolved),) = seen
    assert (f, base) == (field, "mole-tiny") and (Path(resolved) / "model_index.json").is_file()


def test_train_print_config_takes_mole_tiny(capsys):
    assert main(["train", "--preset", "stage2-face", "--set", "model=mole-tiny", "--print-config"]) == 0
    assert 'model = "mole-tiny"' in capsys.readouterr().out


def test_an_uncached_hub_id_at_load_time_is_one_line_in_cli_terms(monkeypatch):
    """Where the early check cannot know (the hub was thought reachable), diffusers' error at load is translated
    into the same line."""
    import mole.models as models
    from mole.models import DiffusionModel, ModelLoadError

    monkeypatch.setattr(models, "hub_offline", lambda: False)  # diffusers tries, and fails offline
    with pytest.raises(ModelLoadError) as err:
        DiffusionModel.from_pretrained(HUB)
    text = str(err.value)
    assert text.startswith(f"base model {HUB}: not in the local Hugging Face cache and the hub cannot be reached")
    assert f"huggingface-cli download {HUB}" in text and "local_files_only" not in text and "\n" not in text


def test_a_layer_the_model_lacks_names_the_path_and_the_nearest_ones():
    """Issue 21 item 7: a module path from a file or manifest that the model lacks was torch's internal
    "UNet2DConditionModel has no attribute `not`" (exit 1); now a LookupError (exit 2) with the nearest paths."""
    from mole.cli._common import USER_ERRORS
    from mole.identity import weight_signature
    from mole.tiny import tiny_unet

    unet = tiny_unet("sd15")
    with pytest.raises(LookupError) as err:
        weight_signature(unet, ["conv_in.not"])
    assert isinstance(err.value, USER_ERRORS)
    text = str(err.value)
    assert "'conv_in.not' is not a module of UNet2DConditionModel" in text and "nearest: conv_in" in text
    assert "has no attribute" not in text
