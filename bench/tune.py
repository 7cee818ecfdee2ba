"""Tune every method the same way, ours included, on tasks the benchmark never evaluates.

    python bench/tune.py                                   # the full protocol (hours on 2 CPU cores)
    python bench/tune.py --methods ga,ccup --trials 2 --tasks bird/owl --out bench/out/tune-smoke.json

Each method gets the same number of trials (``--trials``, default 8): its defaults, then a seeded
random sample of the ``search_space`` its Config declares, each run on every tuning task (default
``clipforget.tuning.TUNING_TASKS``: bird/owl and fish/shark, superclasses no benchmark preset
uses). The chosen trial is the best mean *calibration* Score among those that bring the calibration
target to chance or below on every task (else the one that forgets most); the test columns are never
evaluated. The output file is what ``clipforget bench --config FILE`` reads (``+soup`` variants
take their method's overrides). See docs/METHOD.md, "Tuning protocol".
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clipforget import tuning  # noqa: E402
from clipforget.benchmark import make_task  # noqa: E402
from clipforget.data.gallery import Gallery  # noqa: E402
from clipforget.data.task import SplitConfig, ViewCache  # noqa: E402
from clipforget.io import write_json  # noqa: E402
from clipforget.models import load_clip  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=None,
                   help=f"comma-separated (default: every method but the +soup variants: "
                        f"{','.join(tuning.tunable_methods())})")
    p.add_argument("--tasks", default=",".join(tuning.TUNING_TASKS), help="tuning task specs, comma-separated")
    p.add_argument("--trials", type=int, default=tuning.DEFAULT_TRIALS, help="trials per method (the same for all)")
    p.add_argument("--seed", type=int, default=tuning.DEFAULT_SEED, help="seed of the random search")
    p.add_argument("--model", default="embedded")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench/tuned.json", help="the chosen overrides (clipforget bench --config)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    specs = [s.strip() for s in args.tasks.split(",") if s.strip()]
    bench = {tuning.superclass_of(b) for b in tuning.bench_specs()}
    overlap = sorted(s for s in specs if tuning.superclass_of(s) in bench)
    if overlap:
        raise SystemExit(f"tuning task(s) {overlap} share a superclass with the benchmark's tasks: tune on others")
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else tuning.tunable_methods()
    bundle, gallery = load_clip(args.model, device=args.device), Gallery.embedded()
    cache = ViewCache(gallery)
    tasks = {s: make_task(s, bundle, gallery, SplitConfig(), cache) for s in specs}
    print(f"tuning {', '.join(methods)} on {', '.join(specs)}: {args.trials} trials each, seed {args.seed}", flush=True)

    def show(row):
        print(f"{row['method']:14s} trial {row['trial']} {row['spec']:12s} {json.dumps(row['overrides']):70s} "
              f"calib Score {row['score']:5.1f}  target {row['target_after']:.2f} (chance {row['chance']:.2f})  "
              f"α {row['alpha']:.2f}  ({row['seconds']:.0f}s)", flush=True)

    tuned = tuning.tune(bundle, tasks, methods, args.trials, args.seed, on_row=show)
    print()
    print(tuning.table(tuned))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), tuned)
    print(f"wrote {args.out}: clipforget bench --task all --config {args.out} --out ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
