"""What a stricter escalation trigger (``escalate.min_recognised``) would give over the whole sweep,
computed from measured rows — no new run: runs are deterministic, so a subgroup that would not
escalate under the stricter trigger has the defaults' row, and one that would has the row of the
sweep with escalation always on (checked here: its non-escalated rows equal the defaults' to the
last digit, and the re-run of its escalated subgroups — which records D_m's forget accuracy —
equals its rows).

    python bench/escalate_trigger.py DEFAULTS.json ESCALATE.json RERUN.json [THRESHOLD ...] [--write OUT.json]

--write: the last threshold's table as a sweep.json (``clipforget.sweep.summarise``; bench/fold_means.py
averages such tables over folds).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipforget.eval.score import at_or_below_chance  # noqa: E402


def rows(path: str) -> dict:
    return {r["subgroup"]: r for r in json.load(open(path))["rows"]}


def at_chance(table: dict) -> int:
    """Subgroups whose held-out target accuracy after is at or below chance."""
    return sum(map(at_or_below_chance, table.values()))


def summary(table: dict) -> str:
    r = list(table.values())
    s = [x["score"] for x in r]
    low = min(r, key=lambda x: x["score"])
    mean = lambda col: statistics.mean(x["columns"][col]["after"] for x in r)    # noqa: E731
    return (f"at chance {at_chance(table)}, median {statistics.median(s):.2f}, "
            f"min {low['score']:.2f} ({low['subgroup']}), mean {statistics.mean(s):.2f}, held-out target "
            f"{mean('target'):.3f}, retain {mean('retain'):.3f}, other superclasses {mean('other_superclasses'):.3f}, "
            f"other concepts {mean('other_concepts'):.3f}, Score >= 90 / < 80: {sum(x >= 90 for x in s)} / "
            f"{sum(x < 80 for x in s)}")


def main(defaults: str, escalate: str, rerun: str, thresholds: list[float], write: str | None = None) -> None:
    base, esc, again = rows(defaults), rows(escalate), rows(rerun)
    escalated = {k for k, r in esc.items() if r.get("escalate")}
    same = [k for k in base if k not in escalated and esc[k]["score"] == base[k]["score"]]
    print(f"not escalated: {len(same)} of {len(base) - len(escalated)} rows equal the defaults'; re-run: "
          f"{sum(again[k]['score'] == esc[k]['score'] for k in again)} of {len(again)} equal; "
          f"escalated {len(escalated)}, re-run {len(escalated & set(again))}")
    print(f"defaults: {summary(base)}")
    for t in [None, *thresholds]:
        table, moved = {}, []
        for k in base:
            fires = k in escalated and (t is None or again[k]["escalate"][0]["against_target"] >= t - 1e-9)
            table[k] = esc[k] if fires else base[k]
            if fires and esc[k]["escalate"][0]["kept"]:
                moved.append(f"{k} {base[k]['score']:.1f} -> {esc[k]['score']:.1f}")
        print(f"min_recognised {t if t is not None else 'None (any)'}: escalates "
              f"{sum(k in escalated and table[k] is esc[k] for k in base)}, keeps γ 10 on {len(moved)}: {summary(table)}")
        print("   " + "; ".join(moved))
    if write:
        from clipforget.io import write_json
        from clipforget.sweep import summarise
        write_json(write, summarise(list(table.values()), "ours"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("defaults")
    ap.add_argument("escalate")
    ap.add_argument("rerun")
    ap.add_argument("thresholds", nargs="*", type=float)
    ap.add_argument("--write", default=None, help="the last threshold's table as a sweep.json")
    a = ap.parse_args()
    main(a.defaults, a.escalate, a.rerun, a.thresholds, a.write)
