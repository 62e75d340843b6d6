"""mediapipe's C++ core writes absl / TFLite warnings ("W0000 ... landmark_projection_calculator ...") straight to
file descriptor 2, past Python's logging and warnings: `quiet_native_stderr()` points that descriptor at /dev/null
around the calls that do it. Python exceptions still propagate; set MOLE_NATIVE_LOGS=1 (or run with -vv, which sets
it) to see the native lines."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    if os.environ.get("MOLE_NATIVE_LOGS") == "1":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2 (embedded interpreters): nothing to quiet
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
