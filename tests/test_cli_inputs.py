"""Numeric options through the CLI, as a user meets them: nan / inf are refused by every float option (not written
into images.jsonl as NaN), absurd sizes stop before anything allocates, and messages speak CLI (`--overwrite`)."""

from __future__ import annotations

import argparse
import math

import pytest

from mole.cli import build_parser, main
from mole.cli._common import expert_weights, finite_float


def _float_options():
    stack = [build_parser()]
    while stack:
        parser = stack.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif action.type in (float, finite_float):
                yield parser, action


def test_every_float_option_refuses_nan_and_inf():
    options = list(_float_options())
    assert len(options) >= 18  # guidance scale (generate, inspect), the data thresholds, estimate --fits
    plain = [f"{p.prog} {a.option_strings[-1]}" for p, a in options if a.type is float]
    assert plain == []  # a plain float parses "nan" and "inf" without a word
    for text in ("nan", "inf", "-inf", "NaN"):
        with pytest.raises(argparse.ArgumentTypeError, match="finite"):
            finite_float(text)
    assert finite_float("7.5") == 7.5 and finite_float("-1e-3") == -1e-3


@pytest.mark.parametrize("argv", [
    ["generate", "--base", "mole-tiny", "--mole", "mole-tiny", "--prompt", "a face", "--guidance-scale", "nan"],
    ["inspect", "--base", "mole-tiny", "--mole", "mole-tiny", "--prompt", "a face", "--guidance-scale", "inf"],
])  # fmt: skip
def test_nan_guidance_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--guidance-scale" in err and "finite" in err


def test_nan_expert_weight_is_refused():
    with pytest.raises(ValueError, match="face=nan"):
        expert_weights(["face=nan"])
    assert expert_weights(["face=0.5,hand"]) == {"face": 0.5, "hand": 1.0}
    assert not any(math.isnan(v) for v in expert_weights(["face=1"]).values())


def test_huge_size_stops_before_loading(tmp_path, caplog):
    code = main(["generate", "--base", "mole-tiny", "--mole", "mole-tiny", "--prompt", "a face",
                 "--height", "100000", "--out", str(tmp_path / "g")])  # fmt: skip
    err = " | ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert code == 2 and "--height 100000" in err and "4096" in err and "\n" not in err
    assert not (tmp_path / "g").exists()


def test_existing_output_messages_name_the_cli_flag(tmp_path):
    from mole.outputs import OutputExistsError, check_output_dir

    (tmp_path / "images.jsonl").write_text("{}\n")
    with pytest.raises(OutputExistsError) as exc:
        check_output_dir(tmp_path, ["images.jsonl"], False, "mole generate")
    assert "--overwrite" in str(exc.value) and "overwrite=True" not in str(exc.value)
