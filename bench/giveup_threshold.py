"""What a give-up threshold on restore's fallback would give, computed from measured rows — no new
run. `restore.infeasible = "score"` (when no α forgets D_m, take the α with the best Score on D_m,
usually 0: the original model back) changed 35 of 169 rows at fold 0; applying it only where the
least D_m forget accuracy on the α-curve is at least m keeps the defaults' row elsewhere. Runs are
deterministic, so each subgroup's row is the defaults' or the score fallback's; D_m's least forget
accuracy comes from the escalation re-run, which records it for every run whose α-curve is
infeasible (``escalate[0].against_target``: D_m's forget accuracy at the α that forgets it most).

    python bench/giveup_threshold.py DEFAULTS.json SCORE_FALLBACK.json RERUN.json [M ...]
"""
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipforget.eval.score import at_or_below_chance  # noqa: E402


def rows(path: str) -> dict:
    return {(r["superclass"], r["subgroup"]): r for r in json.load(open(path))["rows"]}


def summary(table: list[dict]) -> str:
    scores = [r["score"] for r in table]
    low = min(table, key=lambda r: r["score"])
    chance = sum(map(at_or_below_chance, table))
    return (f"median {statistics.median(scores):.2f}  min {low['score']:.2f} ({low['subgroup']})  "
            f"at chance {chance}  mean {statistics.mean(scores):.2f}")


def main(defaults: str, fallback: str, rerun: str, thresholds: list[float]) -> None:
    base, score, dm = rows(defaults), rows(fallback), rows(rerun)
    changed = [k for k in base if abs(base[k]["score"] - score[k]["score"]) > 1e-9]
    missing = [k[1] for k in changed if k not in dm]
    if missing:
        sys.exit(f"the re-run lacks D_m's forget accuracy for {missing}")
    least = {k: dm[k]["escalate"][0]["against_target"] for k in changed}
    print(f"{len(changed)} of {len(base)} rows differ between the defaults and the score fallback")
    print(f"{'defaults':>10}: {summary(list(base.values()))}")
    for m in thresholds:
        table = [score[k] if k in least and least[k] >= m - 1e-9 else base[k] for k in base]
        gave_up = sorted(k[1] for k in least if least[k] >= m - 1e-9)
        print(f"{'m = ' + format(m, 'g'):>10}: {summary(table)}  ({len(gave_up)} fall back: {', '.join(gave_up)})")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(*sys.argv[1:4], [float(m) for m in sys.argv[4:]] or [0.25, 0.5, 0.75, 1.0])
