"""Tower adapters: what clipforget needs to know about each family of image towers (base.py)."""
from .base import (NoTowerAdapter, TowerAdapter, adapter_for, called_layers, get_adapter, list_adapters,
                   register_adapter)

__all__ = ["TowerAdapter", "NoTowerAdapter", "register_adapter", "adapter_for", "get_adapter", "list_adapters",
           "called_layers"]
