"""Escalation against the defaults on one sweep's held-out files, from two measured sweeps and no
third: runs are deterministic, so a subgroup the escalation sweep did not escalate, or escalated
and kept the default run of, has the defaults' row — checked here on the escalated subgroups,
which the defaults' re-run (``--subgroup``) runs again. Prints both summaries and the rule the
fold-1 check was judged by (docs/results/sweep-ours.md, fixed before it ran).

    python bench/escalate_fold.py ESCALATE.json DEFAULTS_RERUN.json [DEFAULTS_OUT.json]

DEFAULTS_OUT.json: the defaults' table on this fold so composed, as a sweep.json
(``clipforget.sweep.summarise``; bench/fold_means.py averages such tables over folds).
"""
import statistics
import sys
from pathlib import Path

from escalate_trigger import at_chance, rows, summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(escalate: str, rerun: str, write: str | None = None) -> None:
    esc, again = rows(escalate), rows(rerun)
    escalated = {k for k, r in esc.items() if r.get("escalate")}
    kept = {k for k in escalated if any(e["kept"] for e in esc[k]["escalate"])}
    if not escalated <= set(again):
        raise SystemExit(f"the defaults' re-run lacks {sorted(escalated - set(again))}")
    same = [k for k in escalated - kept if again[k]["score"] == esc[k]["score"]]
    print(f"escalated {len(escalated)}, kept the stronger run on {len(kept)}; of the {len(escalated - kept)} "
          f"that kept the default run, {len(same)} equal the defaults' re-run")
    base = {k: again[k] if k in kept else r for k, r in esc.items()}
    print(f"defaults: {summary(base)}")
    if write:
        from clipforget.io import write_json
        from clipforget.sweep import summarise
        write_json(write, summarise(list(base.values()), "ours"))
    print(f"escalate: {summary(esc)}")
    for k in sorted(kept, key=lambda k: esc[k]["score"] - base[k]["score"]):
        print(f"   {k} {base[k]['score']:.1f} -> {esc[k]['score']:.1f}, held-out target "
              f"{base[k]['target_after']:.2f} -> {esc[k]['target_after']:.2f}")
    score = lambda t, f: f(x["score"] for x in t.values())                            # noqa: E731
    checks = {"minimum not lower": score(esc, min) >= score(base, min),
              "mean not lower by more than 0.1": score(esc, statistics.mean) >= score(base, statistics.mean) - 0.1,
              "at chance not lower": at_chance(esc) >= at_chance(base)}
    print("rule: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items())
          + f" -> {'adopt' if all(checks.values()) else 'do not adopt'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
