"""How far the seed alone moves a sweep: two sweeps of the same code, split and subgroups at two
seeds (``--set seed=1``), compared over the whole table and over random samples of a screen's size.
A screen compares a setting's rows with the defaults' at one seed; what the seed does to a sample
of that size is the noise such a comparison has to clear.

    python bench/seed_noise.py SEED0.json SEED1.json [--sample 21] [--draws 2000]

Prints the two tables' summaries, the per-row Score differences, the rows that reach or lose
chance, and, over ``--draws`` random samples of ``--sample`` subgroups, the spread of the
difference in the count at chance and in the mean Score.
"""
import argparse
import random
import statistics

from escalate_trigger import rows, summary   # also puts this checkout on sys.path

from clipforget.eval.score import at_or_below_chance


def main(a: str, b: str, sample: int, draws: int) -> None:
    ta, tb = rows(a), rows(b)
    if set(ta) != set(tb):
        raise SystemExit("the tables hold different subgroups: run both sweeps over the same ones")
    keys = sorted(ta)
    print(f"{len(keys)} subgroups\nA: {summary(ta)}\nB: {summary(tb)}")
    d = [tb[k]["score"] - ta[k]["score"] for k in keys]
    ad = sorted(abs(x) for x in d)
    print(f"Score B − A per row: mean {statistics.mean(d):+.2f}, sd {statistics.stdev(d):.2f}, |Δ| median "
          f"{statistics.median(ad):.2f}, 90th percentile {ad[int(0.9 * (len(ad) - 1))]:.2f}, max {ad[-1]:.2f}; "
          f"rows equal {sum(x == 0 for x in d)}")
    gained = [k for k in keys if at_or_below_chance(tb[k]) and not at_or_below_chance(ta[k])]
    lost = [k for k in keys if at_or_below_chance(ta[k]) and not at_or_below_chance(tb[k])]
    print(f"at chance in A only: {len(lost)} ({', '.join(lost)})")
    print(f"at chance in B only: {len(gained)} ({', '.join(gained)})")
    if sample >= len(keys):
        return
    rng = random.Random(0)
    dc, dm = [], []
    for _ in range(draws):
        s = rng.sample(keys, sample)
        dc.append(sum(at_or_below_chance(tb[k]) for k in s) - sum(at_or_below_chance(ta[k]) for k in s))
        dm.append(statistics.mean(tb[k]["score"] - ta[k]["score"] for k in s))
    share = lambda xs, f: sum(map(f, xs)) / len(xs)      # noqa: E731
    print(f"{draws} random samples of {sample}: Δ at chance sd {statistics.pstdev(dc):.2f}, |Δ| ≥ 2 in "
          f"{share(dc, lambda x: abs(x) >= 2):.0%}, ≥ +2 in {share(dc, lambda x: x >= 2):.0%}; Δ mean Score sd "
          f"{statistics.pstdev(dm):.2f}, |Δ| ≥ 0.3 in {share(dm, lambda x: abs(x) >= 0.3):.0%}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--sample", type=int, default=21, help="a screen's size (default 21)")
    p.add_argument("--draws", type=int, default=2000)
    args = p.parse_args()
    main(args.a, args.b, args.sample, args.draws)
