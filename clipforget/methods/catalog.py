"""The built-in methods' names and one-line summaries, read from their modules' source without
importing them (no torch: the app's page shows the method menu while the model stack loads). The
registry (:func:`clipforget.methods.base.list_methods`) stays the source of truth; the tests check
that the two agree."""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

# the modules of the built-in methods, in the order _load_all imports them
BUILTIN_MODULES = ("ours", "ccup", "clip_lip", "emmn", "fisher", "ft", "ga", "lip", "task_negation", "unsir")


def menu_order(name: str) -> tuple[bool, str]:
    """Sort key of method names wherever they are listed: ``ours`` first, then alphabetical."""
    return name != "ours", name


def _strings(cls: ast.ClassDef) -> dict[str, str]:
    """The class-level string constants of a class body: ``x = "..."`` and ``x, Y = "...", Y``."""
    out = {}
    for node in cls.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        pairs = (zip(target.elts, value.elts) if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                 else [(target, value)])
        for t, v in pairs:
            if isinstance(t, ast.Name) and isinstance(v, ast.Constant) and isinstance(v.value, str):
                out[t.id] = v.value
    return out


@lru_cache(maxsize=1)
def builtin_methods() -> dict[str, str]:
    """{name: summary} of every ``@register_method`` class in the built-in modules, ``ours`` first."""
    found = {}
    for module in BUILTIN_MODULES:
        tree = ast.parse((Path(__file__).parent / f"{module}.py").read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(d, ast.Name) and d.id == "register_method" for d in node.decorator_list):
                consts = _strings(node)
                found[consts["name"]] = consts.get("summary", "")
    return {name: found[name] for name in sorted(found, key=menu_order)}
