"""``<method>+soup``: a learned method followed by ours' restore stage, so a table shows what
restore alone buys.

Registering a method with ``learned = True`` (and not ``restores = True``) registers its variant
(:func:`.base.register_method` calls :func:`soup_variant`); no file per baseline. The variant

- runs the method unchanged (same config fields, same seed, so the same delta Δ = θ_u − θ₀),
- then :func:`clipforget.stages.restore.restore_stage` with ours' :class:`RestoreConfig` defaults
  (the ``restore`` field its Config adds): the α-curve on the calibration set D_m and α by
  :func:`~clipforget.stages.restore.choose_alpha` — the same rule as ours,
- so its result holds the full delta, the chosen α, the α-curve and ``info["restore"]``.

Its Config is the method's Config with one more field, ``restore``: every override of the method
(``{"loop": {"lr": 1e-4}}``, a tuned config) is valid for its variant as it is, and the variant's
search space is the method's (the tuner and the benchmark reuse the method's tuned overrides).
"""
from __future__ import annotations

import dataclasses
from dataclasses import field

from ..stages.restore import RestoreConfig, restore_stage
from .catalog import SOUP_SUFFIX, soup_summary


def soup_config(config_cls: type) -> type:
    """``config_cls`` plus a ``restore: RestoreConfig`` field (ours' defaults)."""
    if any(f.name == "restore" for f in dataclasses.fields(config_cls)):
        raise TypeError(f"{config_cls.__name__} already has a `restore` field: the method restores itself "
                        "(declare `restores = True` instead of a +soup variant)")
    name = f"{config_cls.__name__}Soup"
    cls = dataclasses.make_dataclass(
        name, [("restore", RestoreConfig, field(default_factory=RestoreConfig))], bases=(config_cls,),
        namespace={"__doc__": f"{config_cls.__name__} and ours' restore stage (the +soup variant)"})
    cls.__module__ = __name__
    globals()[name] = cls            # picklable by name, like a class written here
    return cls


def soup_variant(base: type) -> type:
    """The ``+soup`` subclass of the learned method class ``base`` (not yet registered)."""
    if not base.learned or base.restores:
        raise TypeError(f"{base.name}: only a learned method without its own restore stage gets a +soup variant")
    config = soup_config(base.Config)

    def unlearn(self, ctx) -> None:
        base.unlearn(self, ctx)                       # Δ exactly as the method alone makes it
        with ctx.stage("restore"):
            ctx.info["restore"] = restore_stage(ctx, self.config.restore)

    name = f"{base.__name__}Soup"
    cls = type(name, (base,), {
        "__module__": __name__, "__qualname__": name,
        "__doc__": f"{base.name} followed by ours' restore stage (see clipforget.methods.soup).",
        "name": base.name + SOUP_SUFFIX, "Config": config, "summary": soup_summary(base.summary),
        "restores": True, "soup_of": base.name, "unlearn": unlearn})
    globals()[name] = cls
    return cls
