"""Unlearning methods. Each module registers its method with ``@register_method`` and is found by
scanning this package (:mod:`.catalog`): adding a method is adding its file. ``list_methods()`` is
the single source of names. Importing this package imports no torch (the
app's page lists the methods before the model stack loads): the names below load ``base`` on first
use, and :mod:`.catalog` reads the built-in methods' names and summaries from their source."""
from __future__ import annotations

__all__ = ["Context", "UnlearnResult", "Unlearner", "get_method", "list_methods", "register_method"]


def __getattr__(name: str):
    if name in __all__:
        from . import base
        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
