"""What clipforget needs to know about an image tower, and the registry of tower adapters.

Every stage reads the image tower through its adapter, never through ``isinstance`` checks of its
own: which stages the frozen trunk may cache (:mod:`clipforget.trunk`), which layers relative Fisher
ranks and LoRA edits and which of those the tower uses functionally (:mod:`.stages.forget`), which
norm layers alignment matches (:mod:`.stages.align`) and which projection CCUP edits
(:mod:`.methods.ccup`). One adapter per tower family, one file per adapter in this package:

    @register_adapter
    class MyTowerAdapter(TowerAdapter):
        \"\"\"What is special about MyTower.\"\"\"
        name, tower = "mytower", MyTower
        def projection(self, visual):
            return "head.proj", "out_in"

A file dropped into ``clipforget/towers/`` is found by :func:`list_adapters` without editing a list,
and the parametrized tests (``tests/test_towers.py``) run it on a tiny tower of its family. The
base class's defaults suit any tower (the forward pass is probed where a tower could surprise);
an adapter overrides what it knows better.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
import sys
from typing import ClassVar

import torch
from torch import nn

PRUNABLE = (nn.Conv2d, nn.Linear)
# peft's get_peft_model wraps the tower; its stages and modules are those of the wrapped model
PEFT_PREFIXES = ("base_model.model.",)


class NoTowerAdapter(TypeError):
    """The image tower's class has no registered adapter."""


def unwrap(visual: nn.Module) -> nn.Module:
    """The tower under a peft wrapper (LoRA layers stay inside it, so its stages run them)."""
    get_base = getattr(visual, "get_base_model", None)
    return get_base() if callable(get_base) else visual


def strip_prefixes(name: str) -> str:
    """A module or parameter name relative to the tower: without ``visual.`` or peft's prefixes."""
    name = name.removeprefix("visual.")
    for p in PEFT_PREFIXES:
        name = name.removeprefix(p)
    return name


def called_layers(visual: nn.Module, x: torch.Tensor, names: list[str]) -> set[str]:
    """Layers whose ``forward`` runs in a forward pass on ``x[:1]``: the probe behind
    :meth:`TowerAdapter.functional_layers`. A layer that exists but whose ``forward`` never runs
    has its weight used functionally (``F.linear(x, layer.weight)``), so peft's wrapper, which
    replaces ``forward``, would never be applied to it."""
    seen: set[str] = set()
    mods = dict(visual.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: seen.add(n)) for n in names]
    was = visual.training
    visual.eval()
    try:
        with torch.no_grad():
            visual(x[:1])
    finally:
        visual.train(was)
        for h in hooks:
            h.remove()
    return seen


class TowerAdapter:
    """The tower-specific knowledge of one family of image towers (``tower`` and its subclasses).

    A new adapter sets ``name`` and ``tower`` and overrides what the defaults get wrong:

    - :meth:`stages`, :meth:`stage_of`, :meth:`run_stage`: the tower's forward pass as an ordered
      list of stages, so the trunk before the first edited stage is computed once. Default: no
      stages (the tower always runs whole; exact, only slower).
    - :meth:`prunable_layers`: what relative Fisher ranks and LoRA edits, in forward order (the
      forget stage ranks only the last ``candidate_fraction`` of it). Default: every Conv2d/Linear.
    - :meth:`functional_layers`: which of those the tower uses through their weights, not their
      ``forward`` (they get the parametrization path). Default: probed with one forward pass.
    - :meth:`norm_layers`: what remind's alignment matches. Default: BatchNorm, else LayerNorm.
    - :meth:`projection`: the image projection CCUP edits. No default: raises.
    - :meth:`speed_up`: exact rewrites of the tower's forward that compute less (same outputs,
      same weights, same state dict); :func:`clipforget.models.load_clip` applies them. Default: none.
    """
    name: ClassVar[str]
    tower: ClassVar[type[nn.Module]]

    # ---- the frozen trunk ------------------------------------------------------------------------
    def stages(self, visual: nn.Module) -> tuple[str, ...]:
        """The tower's forward pass as stage names, in order; () when it cannot be split."""
        return ()

    def stage_of(self, name: str) -> str | None:
        """The stage holding module or parameter ``name`` (relative to the tower); None: no stage
        (the tower is then not split)."""
        return None

    def run_stage(self, visual: nn.Module, stage: str, x: torch.Tensor) -> torch.Tensor:
        """Stage ``stage`` of ``visual`` on ``x``, the previous stage's output (or model inputs)."""
        raise NotImplementedError(f"{type(self).__name__} has no stages")

    # ---- the forget stage ------------------------------------------------------------------------
    def prunable_layers(self, visual: nn.Module) -> dict[str, nn.Module]:
        """Conv2d / Linear modules by qualified name, in registration order (forward order for
        the towers open_clip builds)."""
        return {name: m for name, m in visual.named_modules() if isinstance(m, PRUNABLE)}

    def functional_layers(self, visual: nn.Module, names: list[str], example: torch.Tensor) -> set[str]:
        """Those of ``names`` whose weights the tower uses functionally. The default asks a forward
        pass on ``example`` (model inputs): any tower, one extra forward."""
        return set(names) - called_layers(visual, example, names)

    # ---- remind's alignment ----------------------------------------------------------------------
    def norm_layers(self, visual: nn.Module) -> tuple[str, list[nn.Module]]:
        """(kind, layers) whose input statistics alignment matches: "batchnorm" (matched to their
        running statistics), "layernorm" (to moments measured on reference images) or "none"."""
        bn = [m for m in visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if bn:
            return "batchnorm", bn
        ln = [m for m in visual.modules() if isinstance(m, nn.LayerNorm)]
        return ("layernorm", ln) if ln else ("none", [])

    # ---- CCUP -------------------------------------------------------------------------------------
    def projection(self, visual: nn.Module) -> tuple[str, str]:
        """(parameter or module name, layout) of the image projection, the last linear map to the
        embedding: "out_in" for a Linear (embedding = W h + b), "in_out" for a matrix applied as
        ``x @ proj``."""
        raise ValueError(f"no image projection known for {type(visual).__name__}: override projection() "
                         f"in {type(self).__name__}")

    # ---- speed -------------------------------------------------------------------------------------
    def speed_up(self, visual: nn.Module) -> list[str]:
        """Rewrite parts of ``visual`` in place to compute the same outputs with less work (module
        classes swapped for exact subclasses: weights, state dict and ``isinstance`` unchanged);
        returns what was rewritten, for the log."""
        return []


# ---- the registry -----------------------------------------------------------------------------------

_REGISTRY: dict[str, TowerAdapter] = {}


def register_adapter(cls: type[TowerAdapter]) -> type[TowerAdapter]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if not (isinstance(getattr(cls, "name", None), str) and isinstance(getattr(cls, "tower", None), type)):
        raise TypeError(f"{cls.__name__}: a tower adapter sets `name` (a string) and `tower` (the tower class)")
    known = _REGISTRY.get(cls.name)
    if known is not None and type(known).__qualname__ != cls.__qualname__:
        raise ValueError(f"tower adapter name {cls.name!r} is taken by {type(known).__name__}")
    _REGISTRY[cls.name] = cls()
    return cls


@functools.cache
def _import_adapter_modules() -> None:
    """Import every module of this package (each registers its adapters when imported), once: the
    trunk asks for a tower's adapter every batch. Unlike the method catalog, nothing is read
    without importing: an adapter is only needed where a tower, so torch, is already loaded."""
    package = sys.modules[__package__]
    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg and not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__package__}.{info.name}")


def list_adapters() -> list[str]:
    """Names of every registered tower adapter, sorted; the tests parametrize over it."""
    _import_adapter_modules()
    return sorted(_REGISTRY)


def get_adapter(name: str) -> TowerAdapter:
    if name not in list_adapters():
        raise KeyError(f"no tower adapter named {name!r}; known: {', '.join(list_adapters())}")
    return _REGISTRY[name]


def adapter_for(visual: nn.Module) -> TowerAdapter:
    """The adapter of ``visual``'s class (under a peft wrapper: of the wrapped tower); the most
    specific one when adapters for a class and its base class both match."""
    visual = unwrap(visual)
    list_adapters()
    matches = [a for a in _REGISTRY.values() if isinstance(visual, a.tower)]
    if not matches:
        cls = type(visual).__name__
        known = ", ".join(f"{a.tower.__name__} ({a.name})" for a in sorted(_REGISTRY.values(), key=lambda a: a.name))
        raise NoTowerAdapter(
            f"no tower adapter for {cls}: clipforget needs its stages, prunable layers, norm layers and image "
            f"projection. Add one in clipforget/towers/ with @register_adapter (see towers/base.py). "
            f"Adapters exist for: {known}")
    return max(matches, key=lambda a: len(a.tower.__mro__))
