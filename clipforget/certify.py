"""A forgetting certificate: is the forgotten subgroup gone, or only hidden?

    cert = certify(bundle, "runs/poodle")          # θ₀ + α·Δ from the run folder vs θ₀
    save_certificate(cert, "runs/poodle")          # certificate.json + certificate.md, atomically
    print(cert["verdict"])

Three attacks on the unlearned model, each also run on the original for comparison:

- **relearning**: fine-tune the whole image tower for a few steps on a small sample of the
  forgotten subgroup paired with its coarse label, and follow the target accuracy on *other*
  images of the subgroup (a subgroup of the embedded gallery has one image per drawing style, so
  the sample is some styles and the evaluation the others; see :func:`split_groups`). As a
  control, the same fine-tuning on an unrelated subgroup: it shows how much of the recovery any
  fine-tuning causes. Fine-tuning goes through the one loop, ``train.loop.optimize``.
- **linear probes** on frozen image embeddings, evaluated on held-out groups: (a) how well the
  forgotten subgroup is still separated from its siblings (the subgroup is still *identifiable*),
  (b) whether a probe trained to recognise the coarse class on the *other* images of the
  superclass still recognises the forgotten images (the association is hidden, not gone).
- **retrieval**: recall@k of the forgotten subgroup's gallery images for the coarse label, the
  subgroup name and paraphrases, before and after.

A model that forgot everything passes all three, so one more check asks that the rest is **kept**:
zero-shot accuracy on other superclasses' images, after against before.

The verdict combines the checks whose thresholds are in :class:`Thresholds`; every number it
uses is in the certificate next to the threshold.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .data.gallery import Gallery, Item, display
from .data.prompts import article, class_prompts
from .data.task import ForgetRequest, ViewCache, ViewSet, resolve
from .embed import class_embeddings, encode_images, encode_texts, to_input
from .io import write_json, write_text
from .models import ClipBundle
from .train.loop import Callback, LoopConfig, emit, optimize

log = logging.getLogger(__name__)

CERTIFICATE_JSON = "certificate.json"
CERTIFICATE_MD = "certificate.md"


# ---- configuration -------------------------------------------------------------------------------

@dataclass
class RelearnConfig:
    steps: int = 20                 # fine-tuning steps of the attack
    eval_every: int = 5             # target accuracy is measured every this many steps (and at 0)
    lr: float = 1e-4                # Adam on the whole image tower (BatchNorm statistics frozen)
    batch_size: int = 16
    train_views: int = 8            # augmented views per relearning image
    eval_views: int = 4             # augmented views per evaluation image
    sample_fraction: float = 0.4    # share of the subgroup's groups (styles / images) used to relearn
    anchor_images: int = 64         # images of other superclasses mixed into every batch with their own
                                    # labels, so fine-tuning cannot just predict one class for everything
    control: str | None = None      # control subgroup ("superclass/subgroup"); None: picked by seed

    def __post_init__(self):
        for name in ("steps", "eval_every", "batch_size", "train_views", "eval_views", "anchor_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"relearn.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"relearn.batch_size must be >= 2 (half sample, half anchors), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"relearn.lr must be > 0, got {self.lr}")
        if not 0 < self.sample_fraction < 1:
            raise ValueError(f"relearn.sample_fraction must be in (0, 1), got {self.sample_fraction}")
        if self.control is not None and self.control.count("/") != 1:
            raise ValueError(f"relearn.control must be 'superclass/subgroup', got {self.control!r}")


@dataclass
class ProbeConfig:
    train_views: int = 4            # augmented views per image to fit a probe
    eval_views: int = 4             # augmented views per held-out image
    steps: int = 150                # full-batch Adam steps of the logistic regression
    lr: float = 0.05
    weight_decay: float = 1e-4
    max_negatives: int = 400        # other-superclass images for the coarse probe (sampled by seed)

    def __post_init__(self):
        for name in ("train_views", "eval_views", "steps", "max_negatives"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"probe.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"probe.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class RetrievalConfig:
    k: int = 20                     # recall@k
    pool: int | None = None         # at most this many gallery images besides the target superclass
                                    # (None: the whole gallery); a smaller pool is a quicker check
    paraphrases: tuple[str, ...] = ("a picture of a {}", "a drawing of a {}", "an image showing a {}")

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"retrieval.k must be >= 1, got {self.k}")
        if self.pool is not None and self.pool < 1:
            raise ValueError(f"retrieval.pool must be >= 1 or None, got {self.pool}")
        self.paraphrases = tuple(self.paraphrases)
        for p in self.paraphrases:
            if p.count("{}") != 1:
                raise ValueError(f"retrieval.paraphrases: each template needs exactly one '{{}}', got {p!r}")


@dataclass
class Thresholds:
    """What the verdict asks of the unlearned model; each is compared with a measured number."""
    max_target_accuracy: float = 0.1    # zero-shot target accuracy on held-out images, before relearning
    max_relearn_recovery: float = 0.5   # best target accuracy during the relearning attack / the original's
    max_coarse_recall_ratio: float = 0.25  # recall@k for the coarse label: after / before
    max_coarse_probe_ratio: float = 0.5    # forgotten images a coarse-class probe still recognises:
                                           # after / before
    min_kept_ratio: float = 0.9         # zero-shot accuracy on other superclasses' images: after / before
                                        # (at least; a model that forgot everything is not certified)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not 0 <= v <= 1:
                raise ValueError(f"thresholds.{f.name} must be in [0, 1], got {v}")


@dataclass
class CertifyConfig:
    relearn: RelearnConfig = field(default_factory=RelearnConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    thresholds: Thresholds = field(default_factory=Thresholds)
    kept_images: int = 256          # other superclasses' images for the "rest kept" check (sampled by seed)
    seed: int = 0

    def __post_init__(self):
        if self.kept_images < 1:
            raise ValueError(f"kept_images must be >= 1, got {self.kept_images}")
        for name, cls in (("relearn", RelearnConfig), ("probe", ProbeConfig), ("retrieval", RetrievalConfig),
                          ("thresholds", Thresholds)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "CertifyConfig":
        from .methods.base import config_from_dict
        return config_from_dict(cls, d)


# ---- the run folder --------------------------------------------------------------------------------

@dataclass
class RunRecord:
    """What the certificate needs from a run folder: the delta, α, the request, where it ran."""
    path: Path
    delta: dict
    alpha: float
    request: ForgetRequest
    method: str
    model: str
    pretrained: str | None
    gallery: str
    gallery_hash: str | None


def read_run(run_dir: str | Path) -> RunRecord:
    from .pipeline import load_delta
    run_dir = Path(run_dir)
    rec_path = run_dir / "run.json"
    if not rec_path.is_file() or not (run_dir / "delta.safetensors").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it needs run.json and delta.safetensors "
                                "(written by `clipforget forget --out DIR`)")
    rec = json.loads(rec_path.read_text())
    delta, meta = load_delta(run_dir)
    alpha = float(rec.get("alpha", meta.get("alpha", 1.0)))
    return RunRecord(run_dir, delta, alpha, ForgetRequest.from_dict(rec["request"]), rec.get("method", "?"),
                     rec.get("model", "embedded"), rec.get("pretrained"), rec.get("gallery", "embedded"),
                     rec.get("gallery_hash"))


def load_run_model(record: RunRecord, device: str = "auto") -> ClipBundle:
    """The original model a run was made from (the embedded model's weights are found in this
    installation when the recorded path no longer exists)."""
    from .models import EMBEDDED, EMBEDDED_ARCH, load_clip
    if record.model in (EMBEDDED, EMBEDDED_ARCH):
        weights = record.pretrained if record.pretrained and Path(record.pretrained).is_file() else None
        return load_clip(EMBEDDED, weights, device)
    return load_clip(record.model, record.pretrained, device)


# ---- small pieces ------------------------------------------------------------------------------------

def split_groups(items: list[Item], fraction: float, seed: int) -> tuple[str, list[Item], list[Item]]:
    """Split a subgroup's images into a relearning sample and evaluation images that share no
    image. Images are grouped by style when they span several styles (one image per style in the
    embedded gallery), else by subgroup (a style request), else by image. Returns (mode, sample,
    evaluation); mode "views" (a single image) means sample and evaluation are disjoint augmented
    views of the same image — a weaker test, and the certificate says so."""
    mode, key = group_key(items)
    if mode == "views":
        return mode, list(items), list(items)
    groups = sorted({key(it) for it in items})
    rng = random.Random(seed)
    n = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    sample = set(rng.sample(groups, n))
    return mode, [it for it in items if key(it) in sample], [it for it in items if key(it) not in sample]


def group_key(items: list[Item]) -> tuple[str, Callable[[Item], str]]:
    for mode, key in (("style", lambda it: it.style), ("subgroup", lambda it: it.subgroup or it.concept),
                      ("image", lambda it: it.path)):
        if len({key(it) for it in items}) >= 2:
            return mode, key
    return "views", lambda it: it.path


def _superclass_texts(bundle: ClipBundle, gallery: Gallery) -> tuple[list[str], torch.Tensor]:
    scs = gallery.superclasses()
    return scs, class_embeddings(bundle, class_prompts(scs))


@torch.no_grad()
def _accuracy(bundle: ClipBundle, model: nn.Module, views: ViewSet, label: int | torch.Tensor,
              class_emb: torch.Tensor) -> float:
    """Zero-shot accuracy of ``views`` for one label or a label per view."""
    emb = encode_images(bundle, views.images, model)
    return float(((emb @ class_emb.t()).argmax(-1) == label).float().mean())


def _trainable_copy(bundle: ClipBundle, delta: dict, alpha: float) -> nn.Module:
    from .pipeline import edited_model
    model = edited_model(bundle, delta, alpha)
    for p in model.visual.parameters():
        p.requires_grad_(True)
    return model


def relearn_curve(bundle: ClipBundle, model: nn.Module, sample: ViewSet, sample_label: int, anchors: ViewSet,
                  anchor_labels: torch.Tensor, evaluate: ViewSet, eval_label: int, class_emb: torch.Tensor,
                  cfg: RelearnConfig, seed: int, stage: str, callbacks: Iterable[Callback] = ()) -> list[dict]:
    """Fine-tune ``model``'s image tower on batches of half ``sample`` views (labelled
    ``sample_label``) and half ``anchors`` (their own labels) — zero-shot cross-entropy over the
    superclass prompts — and measure the accuracy of ``evaluate`` for ``eval_label`` at step 0 and
    every ``eval_every`` steps. BatchNorm stays in eval mode (a few images would wreck its running
    statistics). ``model`` is modified."""
    model.visual.eval()
    class_emb = class_emb.to(bundle.device)
    scale = float(model.logit_scale.exp().clamp(max=100))
    g = torch.Generator().manual_seed(seed)
    curve = [{"step": 0, "accuracy": _accuracy(bundle, model, evaluate, eval_label, class_emb)}]
    half = cfg.batch_size // 2

    def loss_fn(step):
        i = torch.randint(len(sample), (cfg.batch_size - half,), generator=g)
        j = torch.randint(len(anchors), (half,), generator=g)
        x = to_input(bundle, torch.cat([sample.images[i], anchors.images[j]]), model)
        y = torch.cat([torch.full((len(i),), sample_label), anchor_labels[j]]).to(bundle.device)
        logits = scale * F.normalize(model.encode_image(x).float(), dim=-1) @ class_emb.t()
        return F.cross_entropy(logits, y)

    done = 0
    while done < cfg.steps:
        loop = LoopConfig(steps=min(cfg.eval_every, cfg.steps - done), lr=cfg.lr, grad_clip=1.0)
        offset = done

        def shifted(event, offset=offset):
            emit(callbacks, **{**event, "step": offset + event.get("step", 0), "total": cfg.steps,
                               "fraction": (offset + event.get("step", 0)) / cfg.steps})
        optimize(list(model.visual.parameters()), loss_fn, loop, stage=stage, callbacks=[shifted])
        done += loop.steps
        curve.append({"step": done, "accuracy": _accuracy(bundle, model, evaluate, eval_label, class_emb)})
    return curve


def fit_probe(x: torch.Tensor, y: torch.Tensor, cfg: ProbeConfig, seed: int) -> nn.Linear:
    """Logistic regression on (N, D) features with 0/1 labels, classes weighted equally."""
    torch.manual_seed(seed)
    probe = nn.Linear(x.shape[1], 1)
    pos = float(y.sum())
    weight = torch.where(y > 0, len(y) / (2 * max(pos, 1.0)), len(y) / (2 * max(len(y) - pos, 1.0)))
    # features are unit vectors: a fixed gain keeps the optimisation well scaled
    xs = x * 10.0

    def loss_fn(step):
        return F.binary_cross_entropy_with_logits(probe(xs).squeeze(-1), y.float(), weight=weight)

    optimize(probe.parameters(), loss_fn, LoopConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                     optimizer="adamw", grad_clip=None), stage="probe")
    return probe


def _probe_predict(probe: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (probe(x * 10.0).squeeze(-1) > 0).long()


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    accs = [float((pred[y == c] == c).float().mean()) for c in (0, 1) if (y == c).any()]
    return sum(accs) / len(accs)


# ---- the certificate -------------------------------------------------------------------------------

class _Encoder:
    """Embeddings of views with the original and the unlearned model, memoised per ViewSet."""

    def __init__(self, bundle: ClipBundle, models: dict[str, nn.Module]):
        self.bundle, self.models = bundle, models
        self._memo: dict[tuple[str, int], tuple[ViewSet, torch.Tensor]] = {}

    def __call__(self, which: str, views: ViewSet) -> torch.Tensor:
        key = (which, id(views))
        hit = self._memo.get(key)
        if hit is None or hit[0] is not views:
            hit = (views, encode_images(self.bundle, views.images, self.models[which]))
            self._memo[key] = hit
        return hit[1]


def certify(bundle: ClipBundle, run_dir: str | Path, gallery: Gallery | None = None,
            config: CertifyConfig | None = None, alpha: float | None = None,
            callbacks: Iterable[Callback] = (), cache: ViewCache | None = None) -> dict:
    """The certificate of the run in ``run_dir`` (a dict; :func:`save_certificate` writes it).

    ``bundle`` is the original model the run started from; ``alpha`` overrides the run's
    calibrated strength (α = 0 is the original model: a sham run that forgot nothing)."""
    from .pipeline import edited_model
    cfg = config or CertifyConfig()
    callbacks = list(callbacks)
    run = read_run(run_dir)
    gallery = gallery or (cache.gallery if cache else Gallery.embedded())
    if run.gallery_hash and run.gallery_hash != gallery.content_hash:
        raise ValueError(f"run {run.path} was made on gallery {run.gallery!r} ({run.gallery_hash}); this gallery "
                         f"{gallery.name!r} is {gallery.content_hash}: pass the run's gallery (--gallery)")
    alpha = run.alpha if alpha is None else float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    cache = cache or ViewCache(gallery)
    req = run.request
    size = bundle.image_size
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    emit(callbacks, stage="certify: prepare", step=0, total=0, fraction=0.0, message="start")
    forget_items, retain_items, retain_names, _ = resolve(gallery, req)
    superclasses, sc_emb = _superclass_texts(bundle, gallery)
    models = {"original": bundle.model, "unlearned": edited_model(bundle, run.delta, alpha)}
    enc = _Encoder(bundle, models)

    # ---- relearning attack --------------------------------------------------------------------
    t0 = time.perf_counter()
    relearn = relearning_attack(bundle, run.delta, alpha, gallery, cache, req, forget_items, superclasses, sc_emb,
                                cfg, callbacks)
    seconds["relearn"] = time.perf_counter() - t0

    # ---- the rest kept ------------------------------------------------------------------------
    t0 = time.perf_counter()
    emit(callbacks, stage="certify: rest kept", step=0, total=1, fraction=0.0)
    kept = _kept(bundle, models, gallery, cache, req, superclasses, sc_emb, cfg)
    seconds["kept"] = time.perf_counter() - t0

    # ---- linear probes ------------------------------------------------------------------------
    t0 = time.perf_counter()
    emit(callbacks, stage="certify: probes", step=0, total=2, fraction=0.0)
    probes = {"subgroup": _subgroup_probe(enc, cache, size, forget_items, retain_items, cfg),
              "coarse": _coarse_probe(enc, cache, size, gallery, req, forget_items, cfg)}
    emit(callbacks, stage="certify: probes", step=2, total=2, fraction=1.0)
    seconds["probes"] = time.perf_counter() - t0

    # ---- retrieval ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    retrieval = _retrieval(bundle, models, gallery, req, forget_items, cfg, callbacks)
    seconds["retrieval"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all

    cert = {"run": str(run.path), "method": run.method, "request": req.to_dict(), "label": req.label,
            "model": bundle.arch, "alpha": alpha, "run_alpha": run.alpha, "gallery": gallery.name,
            "retain_subgroups": retain_names, "config": dataclasses.asdict(cfg),
            "kept": kept, "relearn": relearn, "probes": probes, "retrieval": retrieval, "seconds": seconds}
    cert["checks"] = checks(cert, cfg.thresholds)
    cert["certified"] = all(c["passed"] for c in cert["checks"])
    cert["verdict"] = verdict_line(cert)
    return cert


def relearning_attack(bundle: ClipBundle, delta: dict, alpha: float, gallery: Gallery, cache: ViewCache,
                      req: ForgetRequest, forget_items: list[Item], superclasses: list[str], sc_emb: torch.Tensor,
                      cfg: CertifyConfig, callbacks: list[Callback]) -> dict:
    """Relearn the forgotten subgroup from a small sample (and, as a control, an unrelated
    subgroup), each on a fresh copy of θ₀ + α·Δ; target accuracy on held-out images per step."""
    size = bundle.image_size
    target = superclasses.index(req.superclass)
    rc = cfg.relearn
    mode, sample, held = split_groups(forget_items, rc.sample_fraction, cfg.seed)
    relearn_views = cache.views(sample, "train", rc.train_views, size)
    eval_views = cache.views(held, "test", rc.eval_views, size)
    control = _control_subgroup(gallery, req, rc.control, cfg.seed)
    c_items = gallery.select(superclass=control[0], subgroup=control[1],
                             style=req.style if req.style and not req.subgroup else None)
    _, c_sample, _ = split_groups(c_items, rc.sample_fraction, cfg.seed)
    c_train = cache.views(c_sample, "train", rc.train_views, size)
    c_index = superclasses.index(control[0])
    anchor_pool = [it for it in gallery.select(kind="hierarchy")
                   if it.superclass != req.superclass and it.subgroup != control[1]]
    anchor_items = sorted(random.Random(cfg.seed).sample(anchor_pool, min(rc.anchor_images, len(anchor_pool))),
                          key=anchor_pool.index)
    anchors = cache.views(anchor_items, "train", 1, size)
    anchor_labels = torch.tensor([superclasses.index(it.superclass) for it in anchors.items])
    original_acc = _accuracy(bundle, bundle.model, eval_views, target, sc_emb)
    curves = {}
    for name, views, label, what in (("forget", relearn_views, target, "the forgotten subgroup"),
                                     ("control", c_train, c_index, "a control subgroup")):
        model = _trainable_copy(bundle, delta, alpha)
        curves[name] = relearn_curve(bundle, model, views, label, anchors, anchor_labels, eval_views, target,
                                     sc_emb, rc, cfg.seed, f"certify: relearn on {what}", callbacks)
        del model
    curve = [{"step": a["step"], "forget_sample": a["accuracy"], "control_sample": b["accuracy"]}
             for a, b in zip(curves["forget"], curves["control"])]
    recover_at = next((r["step"] for r in curve if original_acc and r["forget_sample"] >= 0.5 * original_acc), None)
    return {
        "split": mode,
        "split_note": _split_note(mode),
        "sample": sorted({_group_label(mode, it) for it in sample}),
        "evaluated_on": sorted({_group_label(mode, it) for it in held}),
        "sample_views": len(relearn_views), "evaluation_views": len(eval_views),
        "control": f"{control[0]}/{control[1]}",
        "control_views": len(c_train),
        "anchor_images": len(anchors),
        "steps": rc.steps, "lr": rc.lr,
        "original_accuracy": original_acc,
        "chance": 1 / len(superclasses),
        "curve": curve,
        "steps_to_half_original": recover_at,
        # the peak over the attack: what an attacker who stops at the best step gets back
        "recovery": max(r["forget_sample"] for r in curve) / original_acc if original_acc else None,
        "control_recovery": max(r["control_sample"] for r in curve) / original_acc if original_acc else None,
    }


def _kept(bundle: ClipBundle, models: dict[str, nn.Module], gallery: Gallery, cache: ViewCache,
          req: ForgetRequest, superclasses: list[str], sc_emb: torch.Tensor, cfg: CertifyConfig) -> dict:
    """Zero-shot accuracy on held-out views of other superclasses' images, before and after: the
    certificate is about forgetting one thing, so it also checks the rest was not forgotten too."""
    pool = [it for it in gallery.select(kind="hierarchy") if it.superclass != req.superclass]
    if not pool:
        return {"images": 0, "before": None, "after": None}
    items = sorted(random.Random(cfg.seed).sample(pool, min(cfg.kept_images, len(pool))), key=pool.index)
    views = cache.views(items, "test", 1, bundle.image_size)
    labels = torch.tensor([superclasses.index(it.superclass) for it in views.items])
    return {"images": len(views), **{_side(w): _accuracy(bundle, m, views, labels, sc_emb) for w, m in models.items()}}


def _control_subgroup(gallery: Gallery, req: ForgetRequest, control: str | None, seed: int) -> tuple[str, str]:
    if control is not None:
        sc, sg = control.split("/")
        gallery.check(superclass=sc, subgroup=sg)
        if sc == req.superclass:
            raise ValueError(f"relearn.control {control!r} is in the forgotten superclass {req.superclass!r}; "
                             "pick an unrelated subgroup")
        return sc, sg
    others = [(sc, sg) for sc in gallery.superclasses() if sc != req.superclass for sg in gallery.subgroups(sc)]
    if not others:
        raise ValueError("the gallery has a single superclass: there is no unrelated subgroup for the control")
    return random.Random(seed).choice(others)


def _group_label(mode: str, it: Item) -> str:
    return {"style": it.style, "subgroup": it.subgroup or it.concept}.get(mode, it.path)


def _split_note(mode: str) -> str:
    return {"style": "relearned on the subgroup's images in some drawing styles, evaluated on its images "
                     "in the other styles (no image shared)",
            "subgroup": "relearned on some of the forgotten subgroups' images, evaluated on the others "
                        "(no image shared)",
            "image": "relearned on some of the subgroup's images, evaluated on the others (no image shared)",
            "views": "the forget set is a single image: relearned and evaluated on disjoint augmented views "
                     "of that image (a weaker test: same source image)"}[mode]


def _subgroup_probe(enc: _Encoder, cache: ViewCache, size: int, forget_items: list[Item],
                    retain_items: list[Item], cfg: CertifyConfig) -> dict:
    """Forgotten subgroup vs its siblings (the retain set), leave-one-group-out: every fold holds
    out one style (or subgroup / image) of both classes and is scored by balanced accuracy."""
    pc = cfg.probe
    if not retain_items:
        return {"skipped": "no siblings to separate the subgroup from"}
    items = forget_items + retain_items
    mode, key = group_key(forget_items)
    groups = sorted({key(it) for it in forget_items})
    train_v = cache.views(items, "train", pc.train_views, size)
    test_v = cache.views(items, "test", pc.eval_views, size)
    forget_paths = {it.path for it in forget_items}

    def labels(v):
        return torch.tensor([int(it.path in forget_paths) for it in v.items])

    out = {"split": mode, "folds": len(groups) if mode != "views" else 1, "chance": 0.5,
           "positives": len(forget_items), "negatives": len(retain_items)}
    y_tr, y_te = labels(train_v), labels(test_v)
    for which in ("original", "unlearned"):
        x_tr, x_te = enc(which, train_v), enc(which, test_v)
        if mode == "views":
            probe = fit_probe(x_tr, y_tr, pc, cfg.seed)
            out[_side(which)] = balanced_accuracy(_probe_predict(probe, x_te), y_te)
            continue
        preds, ys = [], []
        for g in groups:
            tr = torch.tensor([key(it) != g for it in train_v.items])
            te = torch.tensor([key(it) == g for it in test_v.items])
            if not (y_tr[tr] == 1).any() or not te.any():
                continue
            probe = fit_probe(x_tr[tr], y_tr[tr], pc, cfg.seed)
            preds.append(_probe_predict(probe, x_te[te]))
            ys.append(y_te[te])
        out[_side(which)] = balanced_accuracy(torch.cat(preds), torch.cat(ys))
    return out


def _coarse_probe(enc: _Encoder, cache: ViewCache, size: int, gallery: Gallery, req: ForgetRequest,
                  forget_items: list[Item], cfg: CertifyConfig) -> dict:
    """A probe for the coarse class (target superclass vs the others) fitted on every image except
    the forgotten ones; the number is the share of the forgotten images' views it calls the coarse
    class. The forgotten images never train the probe: this is held-out by construction."""
    pc = cfg.probe
    forget_paths = {it.path for it in forget_items}
    pos = [it for it in gallery.select(superclass=req.superclass, kind="hierarchy") if it.path not in forget_paths]
    if not pos:
        return {"skipped": f"no other images of {req.superclass!r} to fit a probe for the coarse class"}
    neg = [it for it in gallery.select(kind="hierarchy") if it.superclass != req.superclass]
    if len(neg) > pc.max_negatives:
        neg = sorted(random.Random(cfg.seed).sample(neg, pc.max_negatives), key=neg.index)
    train_v = cache.views(pos + neg, "train", pc.train_views, size)
    y = torch.tensor([int(it.superclass == req.superclass) for it in train_v.items])
    held = cache.views(forget_items, "test", pc.eval_views, size)
    check = cache.views(pos, "test", 1, size)
    out = {"positives": len(pos), "negatives": len(neg), "forgotten_views": len(held)}
    for which in ("original", "unlearned"):
        probe = fit_probe(enc(which, train_v), y, pc, cfg.seed)
        out[_side(which)] = float(_probe_predict(probe, enc(which, held)).float().mean())
        # sanity: the probe recognises held-out views of the rest of the superclass
        out[f"{_side(which)}_rest_of_superclass"] = float(_probe_predict(probe, enc(which, check)).float().mean())
    return out


def _side(which: str) -> str:
    return "before" if which == "original" else "after"


def retrieval_queries(req: ForgetRequest, gallery: Gallery, paraphrases: Iterable[str]) -> list[tuple[str, str]]:
    """(kind, query): the coarse label, the subgroup name and paraphrases of both."""
    sc = display(req.superclass)
    names = [("coarse", sc)] + ([("subgroup", display(req.subgroup))] if req.subgroup else [])
    bases = [(kind, f"{article(name)} {name}") for kind, name in names]
    out = []
    if req.style:                  # the style's own phrase first: "a black and white line drawing of a car"
        phrase = gallery.style_phrase(req.style)
        out += [(kind, f"{article(phrase)} {phrase} of {q}") for kind, q in bases]
    for (kind, name), base in zip(names, bases):
        out.append(base)
        out += [(f"{kind} paraphrase", t.format(name)) for t in paraphrases]
    if req.subgroup:
        x = display(req.subgroup)
        out.append(("subgroup", f"{article(x)} {x}, a kind of {sc}"))
    seen, uniq = set(), []
    for k, q in out:
        q = _fix_article(q)
        if q not in seen:
            seen.add(q)
            uniq.append((k, q))
    return uniq


def _fix_article(text: str) -> str:
    """'a picture of a owl' -> 'a picture of an owl' (templates are filled blindly)."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = article(words[i + 1])
    return " ".join(words)


def _retrieval(bundle: ClipBundle, models: dict[str, nn.Module], gallery: Gallery, req: ForgetRequest,
               forget_items: list[Item], cfg: CertifyConfig, callbacks: list[Callback], chunk: int = 512) -> dict:
    rc = cfg.retrieval
    forget_paths = {it.path for it in forget_items}
    near = [it for it in gallery.items if it.superclass == req.superclass or it.path in forget_paths]
    rest = [it for it in gallery.items if it.superclass != req.superclass and it.path not in forget_paths]
    if rc.pool is not None and len(rest) > rc.pool:
        rest = sorted(random.Random(cfg.seed).sample(rest, rc.pool), key=rest.index)
    pool = near + rest
    relevant = torch.tensor([it.path in forget_paths for it in pool])
    queries = retrieval_queries(req, gallery, rc.paraphrases)
    q_emb = encode_texts(bundle, [q for _, q in queries])
    k = min(rc.k, len(pool))
    rows = [{"kind": kind, "query": q} for kind, q in queries]
    parts = [pool[i:i + chunk] for i in range(0, len(pool), chunk)]
    embs: dict[str, list[torch.Tensor]] = {w: [] for w in models}
    for i, part in enumerate(parts):      # in chunks: bounded memory, and a cancel is seen between them
        emit(callbacks, stage="certify: retrieval", step=i, total=len(parts), fraction=i / len(parts))
        images, _ = gallery.load(part, bundle.image_size)
        for which, model in models.items():
            embs[which].append(encode_images(bundle, images, model))
    for which in models:
        emb = torch.cat(embs[which])
        top = (q_emb @ emb.t()).topk(k, dim=1).indices
        for row, idx in zip(rows, top):
            row[_side(which)] = float(relevant[idx].sum()) / float(relevant.sum())
    return {"k": k, "pool": len(pool), "relevant": int(relevant.sum()), "queries": rows}


# ---- verdict --------------------------------------------------------------------------------------

def checks(cert: dict, th: Thresholds) -> list[dict]:
    """One row per verdict check: the measured value, the threshold, passed."""
    rl, pr, rt = cert["relearn"], cert["probes"], cert["retrieval"]
    out = []

    def add(name, value, limit, text, op="<="):
        ok = value is not None and (value <= limit if op == "<=" else value >= limit)
        out.append({"name": name, "value": value, "threshold": limit, "op": op, "passed": ok, "text": text})

    add("target accuracy", rl["curve"][0]["forget_sample"], th.max_target_accuracy,
        "zero-shot accuracy of the forgotten subgroup's held-out images, before any relearning")
    add("relearning", rl["recovery"], th.max_relearn_recovery,
        f"best accuracy within {rl['steps']} relearning steps / the original model's accuracy")
    coarse = [q for q in rt["queries"] if q["kind"] == "coarse"]
    ratio = _ratio(coarse[0]["after"], coarse[0]["before"]) if coarse else None
    add("coarse-label retrieval", ratio, th.max_coarse_recall_ratio,
        f"recall@{rt['k']} for '{coarse[0]['query']}' after / before" if coarse else "no coarse query")
    cp = pr["coarse"]
    add("coarse-class probe", _ratio(cp.get("after"), cp.get("before")), th.max_coarse_probe_ratio,
        "forgotten images a linear coarse-class probe still recognises, after / before")
    kp = cert["kept"]
    add("rest kept", _ratio(kp["after"], kp["before"]), th.min_kept_ratio,
        f"zero-shot accuracy on {kp['images']} held-out images of other superclasses, after / before", op=">=")
    return out


def _ratio(after, before):
    if after is None or before is None:
        return None
    return after / before if before > 0 else (0.0 if after == 0 else 1.0)


def verdict_line(cert: dict) -> str:
    """One line: CERTIFIED / NOT CERTIFIED, then every check as measured vs its threshold."""
    parts = []
    for c in cert["checks"]:
        v = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        op = c.get("op", "<=")
        shown = op if c["passed"] else {"<=": ">", ">=": "<"}[op]
        parts.append(f"{c['name']} {v} {shown} {c['threshold']:.2f} "
                     f"{'pass' if c['passed'] else 'FAIL'}")
    head = "CERTIFIED" if cert["certified"] else "NOT CERTIFIED"
    return f"{head}: {cert['label']} — " + "; ".join(parts)


# ---- report -----------------------------------------------------------------------------------------

def markdown(cert: dict) -> str:
    rl, pr, rt = cert["relearn"], cert["probes"], cert["retrieval"]
    f3 = _fmt
    half = rl["steps_to_half_original"]
    back = half if half is not None else f"not within {rl['steps']}"
    lines = [f"# Forgetting certificate: {cert['label']} ({cert['request']['superclass']})", "",
             f"**{cert['verdict']}**", "",
             f"- run: `{cert['run']}` · method `{cert['method']}` · model `{cert['model']}` · "
             f"α = {cert['alpha']:.2f}" + ("" if cert["alpha"] == cert["run_alpha"] else
                                          f" (the run's calibrated α is {cert['run_alpha']:.2f})"),
             "", "## Checks", "", "| check | measured | threshold | result |", "|---|---:|---:|---|"]
    for c in cert["checks"]:
        bound = "≥" if c.get("op") == ">=" else "≤"
        lines.append(f"| {c['name']} — {c['text']} | {f3(c['value'])} | {bound} {c['threshold']:.2f} | "
                     f"{'pass' if c['passed'] else '**fail**'} |")
    lines += ["", "## Relearning attack", "",
              f"Split by {rl['split']}: {rl['split_note']}. Sample: {', '.join(rl['sample'])} ({rl['sample_views']} "
              f"views); evaluation: {', '.join(rl['evaluated_on'])} ({rl['evaluation_views']} views). Control: the "
              f"same fine-tuning on `{rl['control']}` ({rl['control_views']} views). Every batch is half these "
              f"views, half {rl['anchor_images']} images of other superclasses with their own labels; Adam lr "
              f"{rl['lr']}, whole image tower, BatchNorm statistics frozen.", "",
              f"The original model's accuracy on these images: {f3(rl['original_accuracy'])} "
              f"(chance {rl['chance']:.3f}). Steps until half of it is back: {back}. Best recovery within "
              f"{rl['steps']} steps: {f3(rl['recovery'])} of the original's accuracy (control fine-tuning: "
              f"{f3(rl['control_recovery'])}).",
              "", "| step | target acc., relearning on the subgroup | target acc., control fine-tuning |",
              "|---:|---:|---:|"]
    lines += [f"| {r['step']} | {f3(r['forget_sample'])} | {f3(r['control_sample'])} |" for r in rl["curve"]]
    lines += ["", "## Linear probes on frozen image embeddings (held-out evaluation)", "",
              "| probe | before (original) | after (unlearned) | note |", "|---|---:|---:|---|"]
    sp, cp = pr["subgroup"], pr["coarse"]
    if "skipped" in sp:
        lines.append(f"| subgroup vs siblings | – | – | skipped: {sp['skipped']} |")
    else:
        lines.append(f"| subgroup vs siblings (balanced accuracy) | {f3(sp['before'])} | {f3(sp['after'])} | "
                     f"leave-one-{sp['split']}-out, {sp['folds']} folds, chance 0.5 |")
    if "skipped" in cp:
        lines.append(f"| coarse class on the forgotten images | – | – | skipped: {cp['skipped']} |")
    else:
        lines.append(f"| coarse class on the forgotten images (share recognised) | {f3(cp['before'])} | "
                     f"{f3(cp['after'])} | fitted without them; rest of the superclass: "
                     f"{f3(cp['before_rest_of_superclass'])} → {f3(cp['after_rest_of_superclass'])} |")
    kp = cert["kept"]
    lines += ["", "## The rest kept", "",
              f"Zero-shot superclass accuracy on held-out views of {kp['images']} images of the other superclasses: "
              f"{f3(kp['before'])} before, {f3(kp['after'])} after."]
    lines += ["", f"## Retrieval: recall@{rt['k']} of the forgotten images ({rt['relevant']} of {rt['pool']} "
              "gallery images)", "", "| query | kind | before | after |", "|---|---|---:|---:|"]
    lines += [f"| {q['query']} | {q['kind']} | {f3(q['before'])} | {f3(q['after'])} |" for q in rt["queries"]]
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in cert["seconds"].items())]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def save_certificate(cert: dict, run_dir: str | Path) -> tuple[Path, Path]:
    """certificate.json and certificate.md next to the run, each written atomically."""
    run_dir = Path(run_dir)
    write_text(run_dir / CERTIFICATE_MD, markdown(cert))
    write_json(run_dir / CERTIFICATE_JSON, cert)       # last: its presence marks a complete certificate
    return run_dir / CERTIFICATE_JSON, run_dir / CERTIFICATE_MD


def load_certificate(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / CERTIFICATE_JSON
    return json.loads(path.read_text()) if path.is_file() else None

