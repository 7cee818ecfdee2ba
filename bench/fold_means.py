"""A sweep's figures over several folds from one table per fold: each subgroup's Score and
held-out target accuracy are the mean over its folds (``clipforget.sweep.summarise``, as
``clipforget sweep --folds`` reports them), so a subgroup's figure does not hang on one fold's files.

    python bench/fold_means.py FOLD_A.json FOLD_B.json [...]
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json  # noqa: E402
from clipforget.sweep import summarise  # noqa: E402


def main(*paths: str) -> None:
    tables = [json.loads(Path(p).read_text()) for p in paths]
    keys = [{(r["superclass"], r["subgroup"], r["style"]) for r in t["rows"] if "skipped" not in r} for t in tables]
    if any(k != keys[0] for k in keys):
        raise SystemExit("the tables hold different subgroups: one table per fold of the same sweep")
    s = summarise([r for t in tables for r in t["rows"]], tables[0]["method"])
    req = s["per_request"]
    low = min(req, key=lambda r: r["score"])
    print(f"{s['requests']} subgroups, {len(paths)} folds: at chance (mean over folds) {s['target_at_or_below_chance']}, "
          f"median {s['median_score']:.2f}, min {low['score']:.2f} ({low['subgroup']}), "
          f"mean {statistics.mean(r['score'] for r in req):.2f}, below 80: {sum(r['score'] < 80 for r in req)}")


if __name__ == "__main__":
    if len(sys.argv) < 3 or any(a.startswith("-") for a in sys.argv[1:]):
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
