"""One sweep table from parts run separately (``--every``/``--offset`` pieces of the same sweep:
same method, split and fold, disjoint subgroups), its summary recomputed over all their rows
(``clipforget.sweep.summarise``) — what ``clipforget sweep`` would have written had it run them
in one go, for ``compare_sweeps.py`` and ``fold_means.py`` to read.

    python bench/join_sweeps.py OUT_DIR PART.json PART.json [...]
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipforget.data.task import SplitConfig  # noqa: E402
from clipforget.sweep import markdown, summarise  # noqa: E402


def main(out: str, *paths: str) -> None:
    tables = [json.loads(Path(p).read_text()) for p in paths]
    if len({t["method"] for t in tables}) != 1 or len({json.dumps(t.get("split"), sort_keys=True) for t in tables}) != 1:
        raise SystemExit("the parts differ in method or split: join pieces of one sweep only")
    rows = [r for t in tables for r in t["rows"]]
    keys = [(r["superclass"], r["subgroup"], r["style"], r["fold"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise SystemExit("a subgroup appears in more than one part")
    split = SplitConfig(**tables[0]["split"]) if tables[0].get("split") else None
    joined = summarise(rows, tables[0]["method"], split)
    joined["split"] = tables[0].get("split")   # the parts' own record: fields added to SplitConfig since are not theirs
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "sweep.json").write_text(json.dumps(joined, indent=1))
    (Path(out) / "sweep.md").write_text(markdown(joined))
    print(f"{joined['requests']} subgroups from {len(paths)} parts: median {joined['median_score']:.2f}, "
          f"min {joined['min_score']:.2f}, at chance {joined['target_at_or_below_chance']}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
