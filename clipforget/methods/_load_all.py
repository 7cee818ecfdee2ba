"""Importing this module imports (and so registers) every built-in method."""
import importlib

from .catalog import BUILTIN_MODULES

for _module in BUILTIN_MODULES:
    importlib.import_module(f"{__package__}.{_module}")
