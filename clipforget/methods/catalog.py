"""Which modules of this package hold methods, found by reading their source: every module of
``clipforget.methods`` (every folder of the package's ``__path__``) with a class decorated
``@register_method``. Nothing is imported here (no torch: the app's page shows the method menu,
names and one-line summaries, while the model stack loads). :func:`.base.list_methods` imports the
modules found here, so a method file dropped into the package is in the registry, the CLI, the app
and the tests without editing a list; a test checks that the menu and the registry agree."""
from __future__ import annotations

import ast
import pkgutil
import sys
from functools import lru_cache
from pathlib import Path


SOUP_SUFFIX = "+soup"      # ``ga+soup``: a learned method followed by ours' restore stage (.soup)


def menu_order(name: str) -> tuple[bool, str]:
    """Sort key of method names wherever they are listed: ``ours`` first, then alphabetical (a
    ``+soup`` variant right after its method)."""
    return name != "ours", name


def soup_summary(summary: str) -> str:
    """The one-line summary of ``<method>+soup`` from its method's (here, so the menu needs no torch)."""
    return f"{summary} — then ours' restore: θ₀ + α·Δ, α calibrated on the calibration set"


def soup_base(name: str) -> str | None:
    """The method a ``+soup`` variant runs (``ga+soup`` -> ``ga``); None for any other name."""
    return name.removesuffix(SOUP_SUFFIX) if name.endswith(SOUP_SUFFIX) else None


def _strings(cls: ast.ClassDef) -> dict[str, str | bool]:
    """The class-level string and bool constants of a class body: ``x = "..."``, ``learned = True``
    and ``x, Y = "...", Y``."""
    out = {}
    for node in cls.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        pairs = (zip(target.elts, value.elts) if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                 else [(target, value)])
        for t, v in pairs:
            if isinstance(t, ast.Name) and isinstance(v, ast.Constant) and isinstance(v.value, (str, bool)):
                out[t.id] = v.value
    return out


def _registered(path: Path) -> dict[str, str]:
    """{name: summary} of the ``@register_method`` classes at the top level of one source file, and
    of the ``+soup`` variant registering one makes when it says ``learned = True`` (and not
    ``restores = True``) in its own body, as :func:`.base.register_method` does."""
    found = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "register_method" for d in node.decorator_list):
            consts = _strings(node)
            found[consts["name"]] = consts.get("summary", "")
            if consts.get("learned") is True and consts.get("restores") is not True:
                found[consts["name"] + SOUP_SUFFIX] = soup_summary(consts.get("summary", ""))
    return found


@lru_cache(maxsize=8)
def _scan(folders: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """{module: {name: summary}} for the modules in ``folders`` that register a method."""
    out = {}
    for info in pkgutil.iter_modules(list(folders)):
        if info.ispkg or info.name.startswith("_"):
            continue
        path = Path(info.module_finder.path) / f"{info.name}.py"
        if path.is_file() and (found := _registered(path)):
            out[info.name] = found
    return out


def _folders() -> tuple[str, ...]:
    return tuple(sys.modules[__package__].__path__)


def method_modules() -> list[str]:
    """Names of the package's modules that register a method (what ``list_methods`` imports)."""
    return sorted(_scan(_folders()))


def builtin_methods() -> dict[str, str]:
    """{name: summary} of every ``@register_method`` class in the package's modules, ``ours`` first."""
    found = {name: summary for module in _scan(_folders()).values() for name, summary in module.items()}
    return {name: found[name] for name in sorted(found, key=menu_order)}
