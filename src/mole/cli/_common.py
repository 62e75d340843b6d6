"""What several commands share: input checks that run before anything heavy, the output folder rule,
the sampling arguments (generate / inspect), -v / -q / --debug, dependencies' log levels and one-line errors."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

logger = logging.getLogger("mole")


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan / inf are refused with a one-line error naming the value)."""

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a number such as 7.5")
    return value


def quiet_dependencies(verbose: int, load: bool = True) -> None:
    """transformers / diffusers / huggingface_hub / absl (mediapipe) / TFLite: errors only and no loading bars,
    unless -vv. Environment settings the user made win."""
    if verbose >= 2:
        os.environ.setdefault("MOLE_NATIVE_LOGS", "1")  # mediapipe's C++ warnings too (mole.native_logs)
        return
    quiet_env = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                 "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "DIFFUSERS_NO_ADVISORY_WARNINGS": "1",
                 "GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "3"}  # fmt: skip
    for key, value in quiet_env.items():
        os.environ.setdefault(key, value)
    import warnings

    for module in ("transformers", "diffusers", "huggingface_hub", "accelerate", "torch", "timm", "open_clip",
                   "google", "absl", "mediapipe", "tensorboard"):  # fmt: skip
        warnings.filterwarnings("ignore", module=module)
        logging.getLogger(module).setLevel(logging.ERROR)
    if not load and "diffusers" not in sys.modules:  # a light command (info): the environment above suffices
        return
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - optional
        pass
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def common_args(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="count", default=default, help="more output (-v info, -vv debug)")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="errors only")
    p.add_argument("--debug", action="store_true", default=default, help="show the traceback of an error")


def leaf_parsers(parser: argparse.ArgumentParser):
    """Every subcommand parser (so -v / -q / --debug also work after the subcommand)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from leaf_parsers(sub)


# exit codes (docs/cli.md#exit-codes): 0 done, 1 internal error (a bug: please report), 2 a user error (arguments,
# files, settings; one line naming the value and the fix), 3 the command ran but produced nothing (0 images kept /
# generated / scored, or every score 0), with the counts and the option that would change it; 130 interrupted
EXIT_INTERNAL, EXIT_USAGE, EXIT_NOTHING, EXIT_INTERRUPTED = 1, 2, 3, 130


class NothingProduced(Exception):
    """A command ran (or would run) and produced nothing; the message holds the counts and the option to change."""


# errors a user causes (bad arguments, files, settings); anything else is reported as an internal error
USER_ERRORS = (ValueError, OSError, LookupError, FloatingPointError)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text if len(text) <= 600 else text[:597] + "..."


def table(header: list[str], rows: list[list]) -> str:
    """The short human table a command ends with (markdown, so it pastes into notes)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def check_file(path: str | None, what: str, flag: str) -> None:
    """An input file that must exist and be a readable file (not a folder), checked before anything heavy."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist; check the path")
    if not p.is_file():
        raise ValueError(f"{flag} {path} is a folder; give the {what} file inside it")
    if not os.access(p, os.R_OK):
        raise PermissionError(f"{flag} {path}: not readable (permissions)")


def check_mole_arg(path: str | None) -> None:
    """--mole: mole-tiny or a readable MoLE file with a manifest (header only, cheap); mole.models.check_mole_name is
    the rule every command shares."""
    from ..models import check_mole_name
    from ..mole_tiny import is_mole_tiny

    if path is None or is_mole_tiny(path):
        return
    check_mole_name(path, "--mole")
    check_file(path, "MoLE .safetensors", "--mole")
    from ..formats.mole_file import read_mole_manifest
    from ..formats.official import is_official_gate_file

    if is_official_gate_file(path):  # the paper's released gate file: read with its --expert files
        return
    read_mole_manifest(path)


def check_base_arg(base: str, flag: str = "--base") -> None:
    """A base: mole-tiny, a single-file checkpoint, a diffusers pipeline folder or a hub id (org/name); the rule
    every command and config shares (mole.models.check_base_name)."""
    from ..models import check_base_name

    check_base_name(base, flag)


def output_dir(args: argparse.Namespace, default: str, names: list[str], what: str) -> str:
    """--out given: refuse a used folder unless --overwrite (then remove exactly `names`). Not given: the default,
    or default-2, -3, ... when that holds an earlier run."""
    from ..outputs import check_output_dir, fresh_dir

    if args.out is None:
        out = str(fresh_dir(default, names))
        if out != default:
            logger.warning("%s exists; writing to %s (use --out to choose)", default, out)
        return out
    check_output_dir(args.out, names, args.overwrite, what)
    return args.out


def tokenizer_arg(p: argparse.ArgumentParser) -> None:
    from ..formats.ldm import TOKENIZER_ENV

    p.add_argument("--tokenizer", dest="base_tokenizer", metavar="DIR",
                   help="CLIP tokenizer folder (vocab.json + merges.txt) for a single-file --base / model "
                        f"checkpoint (same as {TOKENIZER_ENV}=DIR)")  # fmt: skip


def sampling_args(p: argparse.ArgumentParser) -> None:
    from ..inference import SCHEDULERS

    p.add_argument("--base", required=True, help="hub id, local diffusers pipeline folder or model.safetensors")
    tokenizer_arg(p)
    p.add_argument("--mole", help="MoLE .safetensors (gates + experts), or the paper's gate file (then --expert)")
    p.add_argument("--expert", action="append", metavar="NAME=FILE",
                   help="an expert LoRA by name, e.g. --expert face=face.safetensors (needed with the paper's gate "
                        "file; else replaces the file's embedded expert)")  # fmt: skip
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompt-file", action="append", metavar="FILE",
                   help="prompts, one per line (or .json / .jsonl with a 'prompt' key); repeatable: the files add up")
    p.add_argument("--image", action="append", default=[], metavar="COND",
                   help="a condition image (repeatable, any sizes; Flux / Flux-Kontext): e.g. the photo to edit")
    p.add_argument("--condition-type", action="append", metavar="TYPE",
                   help="PixArt InstructMoLE: the type of each --image, in order (default: the file's only type)")
    p.add_argument("--steps", type=int, default=50, help="inference steps (default 50, as the paper)")
    p.add_argument("--guidance-scale", type=finite_float, default=7.5)
    p.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS))
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if present)")
    p.add_argument("--no-strict-base", action="store_true", help="accept a base whose weights differ (fine-tunes)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (default: a short table)")


MAX_SIDE = 4096  # pixels per side; 100000 would ask for tens of GB before the first step


def check_sampling_args(args: argparse.Namespace) -> None:
    """Everything a sampling command can check in milliseconds, before the pipeline loads (minutes on SD1.5)."""
    from ..inference.pipeline import check_device

    check_base_arg(args.base)
    if not getattr(args, "no_mole", False):
        check_mole_arg(args.mole)
    for path in args.prompt_file or ():
        check_file(path, "prompt", "--prompt-file")
    for image in args.image:
        check_file(image, "condition image", "--image")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v < 8 or v % 8):
            raise ValueError(f"--{name} {v}: use a positive multiple of 8 (e.g. 512)")
        if v is not None and v > MAX_SIDE:
            raise ValueError(f"--{name} {v}: at most {MAX_SIDE} px (SDXL draws 1024); give a smaller size")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: use at least 1")
    check_device(args.device)
    if not args.prompt and not args.prompt_file:
        raise ValueError("no prompt: pass --prompt TEXT or --prompt-file FILE")
    if not read_prompts(args):
        raise NothingProduced(f"--prompt-file {' '.join(args.prompt_file)}: 0 prompts (every line is blank or a # "
                              "comment); nothing to draw: give a file with one prompt per line, or --prompt TEXT")


def read_prompts(args: argparse.Namespace) -> list[str]:
    from ..inference import read_prompt_file

    prompts = list(args.prompt or [])
    for path in args.prompt_file or ():
        prompts += read_prompt_file(path)
    return prompts


def expert_weights(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    out = {}
    for item in items:
        for part in item.split(","):
            name, _, value = part.partition("=")
            try:
                out[name.strip()] = finite_float(value) if value else 1.0
            except (ValueError, argparse.ArgumentTypeError):
                raise ValueError(f"--experts {part!r}: use name=weight, e.g. face=1.0") from None
    return out


def expert_files(items: list[str] | None) -> dict[str, str] | None:
    """--expert NAME=FILE (repeatable) -> {name: file}."""
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--expert {item!r}: use NAME=FILE, e.g. --expert face=face_lora.safetensors")
        if name.strip() in out:
            raise ValueError(f"--expert {name.strip()!r} is given twice; give each expert once")
        out[name.strip()] = path.strip()
    return out
