"""Two sweeps of the same subgroups side by side: each one's summary (escalate_trigger.summary) and
the rows that differ — a change that touches only some runs (a restore rule, a trigger) shows
where it acted, and every other row must equal the baseline's to the last digit.

    python bench/compare_sweeps.py BASELINE.json VARIANT.json
"""
import sys

from escalate_trigger import rows, summary


def main(baseline: str, variant: str) -> None:
    base, var = rows(baseline), rows(variant)
    if set(base) != set(var):
        raise SystemExit(f"the sweeps differ in subgroups: {sorted(set(base) ^ set(var))}")
    moved = [k for k in base if var[k]["score"] != base[k]["score"]]
    print(f"{len(base) - len(moved)} of {len(base)} rows equal; {len(moved)} differ "
          f"({sum(var[k]['score'] > base[k]['score'] for k in moved)} up)")
    print(f"baseline: {summary(base)}")
    print(f"variant:  {summary(var)}")
    for k in sorted(moved, key=lambda k: var[k]["score"] - base[k]["score"]):
        b, v = base[k], var[k]
        print(f"   {k}: Score {b['score']:.1f} -> {v['score']:.1f}, α {b['alpha']:.1f} -> {v['alpha']:.1f}, held-out "
              f"target {b['target_after']:.2f} -> {v['target_after']:.2f}, retain "
              f"{b['columns']['retain']['after']:.2f} -> {v['columns']['retain']['after']:.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
