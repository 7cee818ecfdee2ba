"""What forgetting every held-out drawing would cost, by the original model's own word (issue 16's
first bar, read against what the model knows). Not a method and not a weight edit: for each request,
the ORIGINAL model's embeddings of the held-out test columns, and an edit that knows the test labels
(an oracle) — every view whose subgroup readout reaches the lowest readout among the held-out target
views the original recognises loses its superclass direction (ĝ₀(x) − 2·t_c, renormalised), the rest
are untouched. By construction all held-out target views are then gated; what it costs is every
retain and other-superclass view the readout cannot tell from them. Two readouts:

- ``mean``: r(x) = ĝ₀(x)·(t_sub − mean t_sibling), the edited teacher's (remind.teacher);
- ``margin``: s(x, t_sub) − max_sibling s(x, t_sib), the stand-ins' (stage 0).

    python bench/probe_ceiling.py [--every N] [--offset K] [--fold F] [--rows SWEEP.json]

Per request: the readout's AUC (held-out target views against held-out retain views) and, per readout,
held-out target / retain / other superclasses after the oracle edit and a Score bound (other concepts
and unseen styles assumed kept: their ratios counted as 1). With ``--rows`` (a sweep.json of ours at
the same fold) the summary also splits the subgroups the method leaves above chance.
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from clipforget.data.gallery import Gallery
from clipforget.data.task import SplitConfig, ViewCache, build_task
from clipforget.eval.score import at_or_below_chance, score
from clipforget.methods.base import Context
from clipforget.models import load_clip
from clipforget.stages.synthesize import subgroup_texts
from clipforget.stages.teacher import READOUTS, SubgroupReadout, original_features
from clipforget.sweep import sweep_requests
from probe_teacher import auc

EDIT = 2.0          # how far a gated view moves against the superclass direction: enough to lose it
RETAIN_KEPT = (0.95, 0.9, 0.8)   # the summary counts subgroups forgotten at these retain ratios or better


def oracle_edit(ctx, feats: torch.Tensor, r: torch.Tensor, bar: float) -> torch.Tensor:
    gated = (r >= bar).float()[:, None]
    return F.normalize(feats - EDIT * gated * ctx.coarse_emb.float()[None], dim=-1)


def probe(ctx, task) -> dict:
    cols = {"target": "target", "retain": "retain", "other": "other_superclasses"}
    feats = {k: original_features(ctx, ctx.inputs(task.test[c].views)) for k, c in cols.items()}
    labels = {k: task.test[c].labels for k, c in cols.items()}
    before = {k: ctx.superclass_accuracy(feats[k], labels[k]) for k in cols}
    texts, _ = subgroup_texts(ctx)                     # the subgroup's prompt first, then its siblings'
    logits = feats["target"] @ ctx.superclass_emb.float().t()
    known = logits.argmax(1) == labels["target"].to(logits.device)     # the target views the original recognises
    out = {"before": before}
    for name in READOUTS:
        readout = SubgroupReadout(texts, threshold=0.0, kind=name)
        r = {k: readout.read(f) for k, f in feats.items()}
        bar = float(r["target"][known].min()) if known.any() else float("inf")
        after = {k: ctx.superclass_accuracy(oracle_edit(ctx, feats[k], r[k], bar), labels[k]) for k in cols}
        columns = {"target": {"before": before["target"], "after": after["target"]},
                   "retain": {"before": before["retain"], "after": after["retain"]},
                   "other_superclasses": {"before": before["other"], "after": after["other"]},
                   "other_concepts": {"before": 1.0, "after": 1.0}, "unseen_styles": {"before": 1.0, "after": 1.0}}
        out[name] = {"auc": auc(r["target"], r["retain"]), "after": after, "score": score(columns),
                     "retain_kept": after["retain"] / before["retain"] if before["retain"] > 0 else 1.0}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--rows", help="a sweep.json of ours at the same fold: split the summary by its held-out target")
    args = p.parse_args()
    torch.set_num_threads(1)
    bundle = load_clip("embedded", None, "cpu", "fp32")
    gallery = Gallery.embedded()
    cache = ViewCache(gallery)
    split = SplitConfig(fold=args.fold)
    results = {}
    for req in sweep_requests(gallery, every=args.every, offset=args.offset):
        task = build_task(gallery, req, bundle.image_size, split, cache)
        res = probe(Context(bundle, task), task)
        results[req.subgroup] = res
        print(f"{req.label:34s} " + "  ".join(
            f"{n}: AUC {res[n]['auc']:.3f} target {res[n]['after']['target']:.2f} retain "
            f"{res['before']['retain']:.2f}->{res[n]['after']['retain']:.2f} other {res[n]['after']['other']:.2f} "
            f"Score<={res[n]['score']:.1f}" for n in READOUTS), flush=True)
    method = None
    if args.rows:
        rows = json.load(open(args.rows))["rows"]
        method = {r["subgroup"]: at_or_below_chance(r) for r in rows}
    print(f"\n{len(results)} subgroups, fold {args.fold}; the oracle edit gates every held-out target view "
          f"the original recognises (EDIT {EDIT})")
    for name in READOUTS:
        res = [r[name] for r in results.values()]
        kept = ", ".join(f"retain kept >= {k:.2f} in {sum(r['retain_kept'] >= k for r in res)}" for k in RETAIN_KEPT)
        print(f"{name}: AUC median {statistics.median(r['auc'] for r in res):.3f}; {kept}; "
              f"mean retain kept {statistics.mean(r['retain_kept'] for r in res):.3f}; "
              f"Score bound median {statistics.median(r['score'] for r in res):.1f}, "
              f"min {min(r['score'] for r in res):.1f}")
        if method is not None:
            for at_chance, what in ((True, "the method at chance"), (False, "the method above chance")):
                sub = [results[s][name] for s in results if s in method and method[s] == at_chance]
                if sub:
                    print(f"  {what} ({len(sub)}): retain kept >= 0.9 in {sum(r['retain_kept'] >= 0.9 for r in sub)}, "
                          f"mean retain kept {statistics.mean(r['retain_kept'] for r in sub):.3f}, "
                          f"AUC median {statistics.median(r['auc'] for r in sub):.3f}")


if __name__ == "__main__":
    main()
