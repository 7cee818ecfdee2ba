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
    styles: dict[str, dict]                     # style id -> {set, package, version, phrase[, names,
                                                #   strip_dashes, unseen]}
    other_rules: dict = field(default_factory=dict)
    min_trained_styles: int = 8                 # every subgroup exists in this many trained styles

    @property
    def subgroup_to_superclass(self) -> dict[str, str]:
        return {sg: sc for sc, sgs in self.superclasses.items() for sg in sgs}

    @property
    def unseen_styles(self) -> list[str]:
        """Styles never used to train the embedded model (a check of generalisation to new styles)."""
        return sorted(s for s, spec in self.styles.items() if spec.get("unseen"))


@lru_cache(maxsize=4)
def load_hierarchy(path: str | Path = HIERARCHY_PATH) -> Hierarchy:
    data = json.loads(Path(path).read_text())
    return Hierarchy(data["superclasses"], data["styles"], data.get("other_pool", {}),
                     data.get("min_trained_styles", 8))
