"""The concept hierarchy of the embedded gallery (superclass -> subgroups, styles)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

HIERARCHY_PATH = Path(__file__).with_name("hierarchy.json")


@dataclass(frozen=True)
class Hierarchy:
    superclasses: dict[str, list[str]]          # superclass -> its subgroups
    styles: dict[str, dict]                     # style id -> {set, package, version, phrase}
    other_rules: dict = field(default_factory=dict)

    @property
    def subgroup_to_superclass(self) -> dict[str, str]:
        return {sg: sc for sc, sgs in self.superclasses.items() for sg in sgs}


@lru_cache(maxsize=4)
def load_hierarchy(path: str | Path = HIERARCHY_PATH) -> Hierarchy:
    data = json.loads(Path(path).read_text())
    return Hierarchy(data["superclasses"], data["styles"], data.get("other_pool", {}))
