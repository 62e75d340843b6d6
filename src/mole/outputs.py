"""Output folders and files that never silently replace a user's earlier results.

    check_output_dir(out, ["images.jsonl", "index.json", "mole"], overwrite, what="mole generate")
        -> raises OutputExistsError when `out` holds any of these (naming --overwrite), or, with overwrite=True,
           removes exactly these (and nothing else of the folder)
    fresh_dir("runs/generate") -> runs/generate, or runs/generate-2, -3, ... when that one is already used
    check_output_file(path, overwrite)
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)


class OutputExistsError(ValueError):
    """An output folder or file holds earlier results; the message names it and how to proceed."""


def used_entries(out: str | Path, names: Iterable[str]) -> list[str]:
    """The entries of `names` (names or glob patterns: files, or non-empty folders) that exist in `out`."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for pattern in names:
        for p in sorted(out.glob(pattern)):
            if p.is_file() or (p.is_dir() and any(p.iterdir())):
                found.append(p.name)
    return found


def check_output_dir(out: str | Path, names: Iterable[str], overwrite: bool, what: str, resume_hint: str = "") -> None:
    """Refuse an output folder that holds a previous run's `names`, or remove exactly those when overwrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output folder {str(out)!r} is a file; choose a folder path")
    found = used_entries(out, names)
    if not found:
        return
    if not overwrite:
        hint = f"; {resume_hint}" if resume_hint else ""
        raise OutputExistsError(
            f"{what}: output folder {str(out)!r} already holds results ({', '.join(found)}); pass --overwrite to "
            f"replace them, or choose another output folder{hint}"
        )
    for name in found:
        p = out / name
        logger.warning("--overwrite: removing %s", p)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def fresh_dir(path: str | Path, names: Iterable[str] = ()) -> Path:
    """`path` when it is unused (missing, empty, or holding none of `names`), else path-2, path-3, ..."""
    path = Path(path)
    names = list(names)

    def used(p: Path) -> bool:
        if not p.exists():
            return False
        if not p.is_dir():
            return True
        return bool(used_entries(p, names)) if names else any(p.iterdir())

    if not used(path):
        return path
    k = 2
    while used(path.with_name(f"{path.name}-{k}")):
        k += 1
    return path.with_name(f"{path.name}-{k}")


def check_output_file(path: str | Path, overwrite: bool, what: str) -> Path:
    """Refuse an existing output file unless overwrite; refuse a folder in its place."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{what}: {str(path)!r} is a folder; give a file path")
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{what}: {str(path)!r} already exists; pass --overwrite to replace it, or choose "
            "another file name"
        )
    return path
