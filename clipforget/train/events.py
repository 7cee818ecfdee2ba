"""What a stage reports and how a job stops it: progress events go to callbacks, and a callback may
raise :class:`Cancelled`. No torch here (the job registry imports it before any model loads)."""
from __future__ import annotations

from typing import Callable

Callback = Callable[[dict], None]


class Cancelled(Exception):
    """Raised by a callback to stop a job; the loop lets it through untouched."""
