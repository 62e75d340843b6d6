"""File formats other tools write: kohya's module names (incl. SDXL's SGM layout) and the official MoLE gate file.

Only this package's error type lives here, so that the modules below stay independent of one another
(``mole.io`` reads and writes files through them; they put weights into models through ``mole.inject``).
"""

from __future__ import annotations


class MoLEFileError(ValueError):
    """A MoLE file does not fit the model or is malformed; the message names the key or expert."""
