"""Importing this module imports (and so registers) every built-in method."""
from . import ours  # noqa: F401
