"""Unlearning methods. Each module registers its method with ``@register_method``;
``list_methods()`` is the single source of names."""
from .base import Context, UnlearnResult, Unlearner, get_method, list_methods, register_method

__all__ = ["Context", "UnlearnResult", "Unlearner", "get_method", "list_methods", "register_method"]
