"""Two sweeps of the same subgroups side by side: each one's summary (escalate_trigger.summary) and
the rows that differ — a change that touches only some runs (a restore rule, a trigger) shows
where it acted, and every other row must equal the baseline's to the last digit. A variant run on a
sample (``--every``) is compared with the baseline's rows of the same subgroups.

    python bench/compare_sweeps.py BASELINE.json VARIANT.json
"""
import sys

from escalate_trigger import rows, summary


def main(baseline: str, variant: str) -> None:
    base, var = rows(baseline), rows(variant)
    if not set(var) <= set(base):
        raise SystemExit(f"the baseline has no row for: {sorted(set(var) - set(base))}")
    if len(var) < len(base):
        print(f"the baseline's rows of the variant's {len(var)} subgroups (of {len(base)})")
        base = {k: base[k] for k in var}
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
