"""Package hygiene: the public API is importable and optional heavy packages are not imported."""

from __future__ import annotations

import subprocess
import sys

import mole


def test_public_names_exist():
    missing = [n for n in mole.__all__ if not hasattr(mole, n)]
    assert missing == []


def test_import_does_not_pull_optional_packages():
    code = (
        "import sys, mole; "
        "bad = [m for m in ('peft', 'transformers', 'accelerate', 'open_clip', 'timm', 'hpsv2', 'ImageReward', "
        "'torchvision') if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
