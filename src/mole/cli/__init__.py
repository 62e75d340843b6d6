"""The `mole` command line. Each subcommand turns its arguments into an options dataclass and calls the library;
only this package prints or sets exit codes. One module per command or command group (its `register` adds the
parser, its `_cmd_*` functions run it); `_common` holds what several share."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from . import _common as common
from . import bake, convert, data, demo, estimate, eval, generate, info, pretrain, tiny, train, ui
from ._common import USER_ERRORS, NothingProduced, common_args, leaf_parsers, logger, one_line, quiet_dependencies

# in the order `mole --help` lists them
COMMANDS = (demo, pretrain, train, generate, eval, data, convert, bake, ui, estimate, info, tiny)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mole", description="Mixture of Low-rank Experts for diffusion models")
    common_args(parser, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    for action in leaf_parsers(parser):
        common_args(action, argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    verbose = getattr(args, "verbose", 0) or 0
    quiet = bool(getattr(args, "quiet", False))
    debug = bool(getattr(args, "debug", False))
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("mole").setLevel(level)
    quiet_dependencies(verbose if not debug else max(verbose, 2), load=args.command != "info")
    if quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    func: Callable[[argparse.Namespace], int] = args.func
    saved_env = dict(os.environ)
    if getattr(args, "base_tokenizer", None):  # read wherever a single-file base is loaded (also in workers)
        from ..formats.ldm import TOKENIZER_ENV

        os.environ[TOKENIZER_ENV] = args.base_tokenizer
    try:
        return func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        logger.error("interrupted")
        return common.EXIT_INTERRUPTED
    except NothingProduced as exc:  # not even --debug makes this a traceback: it is a result, not a fault
        logger.error("%s", one_line(exc))
        return common.EXIT_NOTHING
    except Exception as exc:
        if debug:
            raise
        from ..eval.metrics import MetricUnavailable

        if isinstance(exc, USER_ERRORS + (MetricUnavailable,)):  # ours name the field, value and fix
            logger.error("%s", one_line(exc))
            return common.EXIT_USAGE
        if isinstance(exc, RuntimeError) and "out of memory" in str(exc):
            logger.error("out of memory: lower --batch-size / the resolution, or use --dtype fp16")
            return common.EXIT_USAGE
        logger.error("internal error %s: %s (run with --debug for the traceback; please report it)",
                     type(exc).__name__, one_line(exc))  # fmt: skip
        return common.EXIT_INTERNAL
    finally:
        if getattr(args, "base_tokenizer", None):  # main() called as a function leaves the environment as it was
            os.environ.clear()
            os.environ.update(saved_env)
