"""The `mole` command set: every command and subcommand with its arguments, in order; every leaf has a handler; the
console script and `python -m mole.cli` reach the same parser. Adding or renaming an option means updating COMMANDS."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from mole.cli import build_parser, main

COMMON = {"help", "verbose", "quiet", "debug"}  # on every parser (-h, -v, -q, --debug)

# prog -> its arguments in the order the parser adds them (positionals by name, options by their long form,
# a subcommand group as {a,b,...})
COMMANDS = {
    "mole": "{demo,pretrain,train,generate,inspect,eval,data,convert,bake,ui,estimate,info,tiny}",
    "mole demo": "--out --overwrite --base --mole --train --train-steps --rank --steps --seeds --seed --json",
    "mole pretrain": (
        "--data --tokenizer --out --steps --vae-steps --latent-channels --vae-edge-weight --batch-size "
        "--checkpoint-every --sample-every --seed --resume --overwrite"
    ),
    "mole train": "--config --preset --set --print-config --tokenizer --overwrite --accept-changes --json",
    "mole generate": (
        "--base --tokenizer --mole --expert --prompt --prompt-file --image --condition-type --steps --guidance-scale "
        "--scheduler --height --width --seed --dtype --device --no-strict-base --overwrite --json --out --num-images "
        "--seeds "
        "--negative-prompt --batch-size --no-mole --experts --compare --preset"
    ),
    "mole inspect": (
        "--base --tokenizer --mole --expert --prompt --prompt-file --image --condition-type --steps --guidance-scale "
        "--scheduler --height --width --seed --dtype --device --no-strict-base --overwrite --json --out --map-steps "
        "--prompt-kind"
    ),
    "mole eval": "{prompts,run,ablation}",
    "mole eval prompts": "kind source --out --limit --seed --overwrite --json",
    "mole eval run": "--config --num-prompts --repeats --out --tokenizer --overwrite --json",
    "mole eval ablation": (
        "--benchmark --base --tokenizer --stage1 --mole --experts --gating --metric --out --num-prompts "
        "--repeats --steps --seed --overwrite --json"
    ),
    "mole data": "{scenes,closeups,merge,train-filter}",
    "mole data merge": "parts --out --shard-size --overwrite --json",
    "mole data scenes": (
        "source out --size --min-sharpness --blur-filter --min-blur-score --captioner --captions-json "
        "--caption-prompt --tokenizer --min-confidence --min-face-confidence --min-scale --dedupe-distance "
        "--max-overlap --clip-filter "
        "--min-clip --workers --shard-size --shard --overwrite --json --window --stride --min-pose-presence "
        "--min-person "
        "--little-person --min-person-agreement --no-pose-tiles --tile-landmarks --min-head-face --min-wrist-hand"
    ),
    "mole data closeups": (
        "source out --size --min-sharpness --blur-filter --min-blur-score --captioner --captions-json "
        "--caption-prompt --tokenizer --min-confidence --min-face-confidence --min-scale --dedupe-distance "
        "--max-overlap --clip-filter "
        "--min-clip --workers --shard-size --shard --overwrite --json --part --margin"
    ),
    "mole data train-filter": "--good --bad --out --epochs --no-synthetic --overwrite --json",
    "mole convert": "--mole --expert --base --out --tokenizer --overwrite",
    "mole bake": (
        "--mole --weights --from-prompts --base --rank --steps --guidance-scale --seed --out --overwrite --json"
    ),
    "mole ui": (
        "--base --tokenizer --mole --expert --host --port --steps --max-side --run --out --dtype --device "
        "--no-strict-base"
    ),
    "mole estimate": (
        "config --base --preset --stage --batch-size --resolution --precision --optimizer "
        "--gradient-checkpointing --rank --experts --gpus --strategy --fits --json"
    ),
    "mole info": "file --json",
    "mole tiny": "kind --out --instruct --seed --overwrite --json",
}


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _arguments(parser: argparse.ArgumentParser) -> tuple[str, list[str]]:
    names, common = [], set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            names.append("{" + ",".join(action.choices) + "}")
        elif action.dest in COMMON:
            common.add(action.dest)
        else:
            names.append(action.option_strings[-1] if action.option_strings else action.dest)
    return " ".join(names), sorted(common)


def test_every_command_and_its_options():
    found = {p.prog: _arguments(p) for p in _parsers(build_parser())}
    assert {prog: args for prog, (args, _) in found.items()} == COMMANDS
    assert {prog: common for prog, (_, common) in found.items() if common != sorted(COMMON)} == {}


def test_every_leaf_command_has_a_handler_and_groups_need_a_subcommand(capsys):
    for parser in _parsers(build_parser()):
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if groups:
            assert groups[0].required, parser.prog
        else:
            assert callable(parser.get_default("func")), parser.prog
    assert main(["info", "--json", os.devnull]) == 2  # a leaf runs its handler (here: refuses a non-file)
    logging.getLogger("mole").setLevel(logging.NOTSET)
    with pytest.raises(SystemExit) as exc:
        main(["data"])
    assert exc.value.code == 2 and "required: data_command" in capsys.readouterr().err


def test_console_script_and_python_m_reach_the_same_parser(monkeypatch):
    [script] = [e for e in entry_points(group="console_scripts") if e.name == "mole"]
    assert script.value == "mole.cli:main" and script.load() is main
    env = {**os.environ, "COLUMNS": "100"}
    monkeypatch.setenv("COLUMNS", "100")
    out = subprocess.run([sys.executable, "-m", "mole.cli", "eval", "ablation", "--help"], env=env,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    [ablation] = [p for p in _parsers(build_parser()) if p.prog == "mole eval ablation"]
    assert out == ablation.format_help() and "--gating MODE=FILE" in out


def test_importing_the_cli_and_building_its_parser_stay_light():
    code = (
        "import sys, mole.cli; mole.cli.build_parser(); print(','.join(m for m in ('diffusers', 'transformers', "
        "'peft', 'accelerate', 'mediapipe', 'cv2', 'open_clip', 'tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_nan_and_inf_are_refused_in_every_numeric_option_and_config_value(capsys):
    # the class: no option anywhere parses with a bare float (which takes nan / inf)
    bare = [f"{p.prog} {a.option_strings}" for p in _parsers(build_parser()) for a in p._actions if a.type is float]
    assert bare == []
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(SystemExit) as exc:
            main(["generate", "--base", "b", "--prompt", "x", f"--guidance-scale={value}"])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # argparse's usage, then one error line naming the option and value
        assert exc.value.code == 2 and f"--guidance-scale: {value!r} is not a finite number" in last
    for value in ("nan", "inf"):  # a config value (TOML reads nan / inf as floats)
        assert main(["train", "--preset", "stage2-face", "--set", "model=m", "--set", "data.path=d",
                     "--set", f"optim.lr={value}", "--print-config"]) == 2  # fmt: skip


def test_one_word_per_concept_and_messages_in_cli_terms():
    # every command that replaces files says --overwrite (mole convert said --force)
    words = {s for p in _parsers(build_parser()) for a in p._actions for s in a.option_strings}
    assert "--overwrite" in words and "--force" not in words
    import tempfile
    from pathlib import Path

    from mole.outputs import OutputExistsError, check_output_dir

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.toml").write_text("")
        with pytest.raises(OutputExistsError) as exc:
            check_output_dir(Path(d), ("config.toml",), False, "mole train")
    assert "--overwrite" in str(exc.value) and "overwrite=True" not in str(exc.value)


def test_inspect_without_mole_is_a_one_line_error(caplog):
    assert main(["inspect", "--base", "b", "--prompt", "x"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "needs --mole" in errors[0] and "internal error" not in errors[0]


def test_all_unknown_config_keys_reported_at_once_with_the_nearest(caplog):
    assert main(["train", "--preset", "stage2-face", "--set", "model=m", "--set", "data.path=d", "--set",
                 "max_step=3", "--set", "chekpoint_every=2", "--print-config"]) == 2  # fmt: skip
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "max_step (did you mean max_steps?)" in error and "chekpoint_every (did you mean checkpoint_every?)" in error
