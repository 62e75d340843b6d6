"""Ctrl-C / SIGTERM during training: finish the current optimizer step, write a checkpoint, stop cleanly.

    with StopRequest() as stop:
        while ...:
            ...one optimizer step...
            if stop.requested:
                save_checkpoint(...); raise TrainingInterrupted(step, path, output_dir, stop.signal_name)
A second Ctrl-C aborts at once (KeyboardInterrupt) without saving.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; resume with resume='latest'."""

    def __init__(self, step: int, checkpoint: Path | None, output_dir: Path, signal_name: str = "SIGINT") -> None:
        self.step, self.checkpoint, self.output_dir, self.signal_name = step, checkpoint, Path(output_dir), signal_name
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (sharded state saved by accelerate)"
        super().__init__(f"training stopped by {signal_name} at step {step}; {where}; resume with resume='latest'")

    @property
    def exit_code(self) -> int:
        return 128 + getattr(signal, self.signal_name, signal.SIGINT)


class StopRequest:
    """Turns the first SIGINT / SIGTERM into a flag (`requested`); a second one raises KeyboardInterrupt."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested:
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s: stopping after this optimizer step and writing a checkpoint (again to abort at once)",
                       self.signal_name)  # fmt: skip

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals can only be handled there
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self._restore()
