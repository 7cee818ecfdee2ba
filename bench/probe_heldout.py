"""What separates a subgroup's held-out drawings from its siblings' in the ORIGINAL model (the
evidence behind stand-ins, docs/results/sweep-ours.md): per request, the AUC of the subgroup-text score
s(x, t_sub) - max_sibling s(x, t_sib) and of the direction between the forget examples' and the retain
images' mean features, on the held-out target vs held-out retain files.

    python bench/probe_heldout.py [EVERY]      # every EVERY-th subgroup (default 16)
"""
import sys

import numpy as np
import torch

torch.set_num_threads(1)
from clipforget.models import load_clip
from clipforget.data.gallery import Gallery
from clipforget.data.task import build_task, ForgetRequest, SplitConfig, ViewCache
from clipforget.embed import encode_images, encode_texts
from clipforget.sweep import sweep_requests
b = load_clip("embedded", None, "cpu", "fp32"); g = Gallery.embedded(); cache = ViewCache(g)
reqs = sweep_requests(g, every=int(sys.argv[1]) if len(sys.argv) > 1 else 16)
def auc(pos, neg):
    pos, neg = np.asarray(pos), np.asarray(neg)
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
rows = []
for req in reqs:
    t = build_task(g, req, b.image_size, SplitConfig(), cache)
    F = lambda vs: encode_images(b, vs.images)
    f_ex, f_r = F(t.forget), F(t.retain)
    f_tt, f_tr = F(t.test["target"].views), F(t.test["retain"].views)
    subs = [req.subgroup] + t.retain_subgroups
    T = encode_texts(b, [f"a drawing of a {s.replace('-', ' ')}" for s in subs])
    def z(f): s = f @ T.t(); return (s[:, 0] - s[:, 1:].max(1).values).numpy()
    # linear probe (ridge / LDA-ish): mean difference direction
    w = f_ex.mean(0) - f_r.mean(0)
    p = lambda f: (f @ w).numpy()
    # text probe accuracy on train: are forget examples above siblings?
    rows.append((req.subgroup, auc(z(f_tt), z(f_tr)), auc(p(f_tt), p(f_tr)), auc(z(f_ex), z(f_r)), float((z(f_tt) > 0).mean()), float((z(f_tr) > 0).mean())))
    print("%-28s text-AUC held-out %.2f  meandiff-AUC held-out %.2f  text-AUC train %.2f  heldout-target top1 %.2f  heldout-sib->target %.2f" % rows[-1], flush=True)
a = np.array([r[1:] for r in rows]); print("mean", a.mean(0).round(3))
