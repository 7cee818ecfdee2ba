"""Pick the baselines' default hyperparameters on a tuning task that no benchmark preset uses.

    python bench/tune_baselines.py                       # bird/owl, every baseline's grid
    python bench/tune_baselines.py --task fish/shark --methods lip,emmn

For each method, every point of its grid (config overrides) runs on the tuning task and the table
prints the Score and the columns. The defaults in ``clipforget/methods/*.py`` are the best points
found this way (see the note in docs/METHOD.md) — tuned on their own task, so the benchmark
compares every method at a setting chosen the same way, none weakened.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clipforget.benchmark import parse_request, row_from_report, run_method  # noqa: E402
from clipforget.data.gallery import Gallery  # noqa: E402
from clipforget.data.task import SplitConfig, ViewCache, build_task  # noqa: E402
from clipforget.models import load_clip  # noqa: E402
from clipforget.pipeline import Evaluator  # noqa: E402

# method -> {dotted config key: values}; the cartesian product is run
GRIDS = {
    "ga": {"loop.lr": [1e-5, 3e-5, 1e-4]},
    "ft": {"loop.lr": [1e-5, 1e-4, 3e-4]},
    "fisher": {"cap": [1e-3, 3e-3, 1e-2], "scale": [0.2]},
    "lip": {"loop.optimizer": ["sgd"], "loop.lr": [1e-3, 1e-2, 1e-1], "sigma": [0.1, 1.0]},
    "clip_lip_image": {"loop.lr": [2e-5, 2e-4], "sigma": [0.1, 1.0]},
    "clip_lip": {"loop.lr": [3e-4, 1e-3, 3e-3], "retain_weight": [0.3, 1.0]},      # LoRA on the text tower
    "emmn": {"impair.lr": [2e-5, 2e-4], "repair.lr": [1e-5, 1e-4]},
    "task_negation": {"loop.lr": [1e-5, 1e-4]},
    "ccup": {"retain_energy": [1.0, 0.9]},
}


FORGETS = 0.5      # a grid point "forgets" when at most this share of the forget images keeps its label


def choose(rows: list[dict]) -> dict[str, dict]:
    """Per method: the best Score among the grid points that forget; if none does, the one that
    forgets most (ties: best Score). The Score alone would pick a point that changes nothing."""
    chosen: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        own = [r for r in rows if r["method"] == method]
        forgetting = [r for r in own if r["target_after"] <= FORGETS]
        chosen[method] = (max(forgetting, key=lambda r: r["score"]) if forgetting
                          else max(own, key=lambda r: (-r["target_after"], r["score"])))
    return chosen


def nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="bird/owl", help="a request no benchmark preset uses")
    p.add_argument("--methods", default=",".join(GRIDS))
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    bundle, gallery = load_clip("embedded", device="cpu"), Gallery.embedded()
    task = build_task(gallery, parse_request(args.task), bundle.image_size, SplitConfig(), ViewCache(gallery))
    evaluator = Evaluator(bundle)
    rows = []
    print(f"tuning on {args.task}", flush=True)
    for method in args.methods.split(","):
        grid = GRIDS[method]
        for values in itertools.product(*grid.values()):
            flat = dict(zip(grid, values))
            t0 = time.perf_counter()
            run = run_method(bundle, task, method, nested(flat), evaluator)
            row = row_from_report(method, run.report, config=json.dumps(flat))
            rows.append(row)
            cols = " ".join(f"{c} {row[f'{c}_after']:.2f}" for c in ("target", "retain", "other_superclasses",
                                                                     "other_concepts") if f"{c}_after" in row)
            print(f"{method:14s} {json.dumps(flat):60s} Score {row['score']:5.1f}  {cols}  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    print("\nchosen per method (the best Score among points that forget: target after <= "
          f"{FORGETS}; where none does, the point that forgets most, then the best Score):")
    for m, r in choose(rows).items():
        print(f"  {m:14s} {r['config']:60s} Score {r['score']:.1f}  target {r['target_after']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"task": args.task, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
