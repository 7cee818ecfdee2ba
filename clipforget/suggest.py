"""Retain-set suggestions and over-forgetting warnings, before a run.

    emb = GalleryEmbeddings.compute(bundle, gallery)            # original model, clean images
    s = suggest_for_request(bundle, gallery, ForgetRequest("dog", "poodle"), embeddings=emb)
    s.retain        # ['dog-face', 'dog', 'guide-dog', 'service-dog']: the siblings, as a run uses them
    s.warnings      # concepts outside the retain set that look as close as poodles look to each other

    s = suggest_for_examples(bundle, gallery, ["me/p1.jpg", "me/p2.jpg"], "dog", embeddings=emb)

Everything is measured in the ORIGINAL model's image-embedding space. For a subgroup of the
gallery's hierarchy the suggested retain set is exactly its siblings (``ForgetRequest(retain=None)``,
the default every run and the quality sweep use); near concepts elsewhere are warnings the user
may add. For example images with a coarse label (no hierarchy entry) the retain set is the coarse
class's subgroups when the gallery has that class, else the nearest gallery subgroups.

The over-forgetting warning: the forget set's *own* similarity s_ff is the mean cosine between
two different forget images (two drawings of a poodle); a concept c with mean cosine s_fc to the
forget images is at risk when s_fc >= ``risk_ratio`` · s_ff, i.e. it sits about as close to the
forget images as they sit to each other, so pushing them away from their label drags it along.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.gallery import Gallery, Item, display
from .data.images import open_image
from .data.task import ForgetRequest, resolve
from .embed import encode_images
from .models import ClipBundle

log = logging.getLogger(__name__)


@dataclass
class SuggestConfig:
    neighbours: int = 8             # nearest concepts outside the retain set that are listed
    risk_ratio: float = 0.9         # at risk when similarity >= risk_ratio · the forget images' own
    match_ratio: float = 1.0        # examples "are" a gallery subgroup when its similarity reaches this
                                    # share of their own (it is then proposed as the thing to forget)
    retain_neighbours: int = 5      # examples whose coarse label is not a gallery superclass: the
                                    # nearest subgroups proposed as the retain set
    min_examples: int = 2           # example images needed (their own similarity needs two)

    def __post_init__(self):
        for name in ("neighbours", "retain_neighbours", "min_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("risk_ratio", "match_ratio"):
            if not 0 < getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in (0, 2], got {getattr(self, name)}")


@dataclass
class GalleryEmbeddings:
    """Original-model embeddings of every gallery image (clean, at the model's input size), in
    gallery order — what the app already holds for its search index."""
    items: list[Item]
    embeddings: torch.Tensor          # (N, D), L2-normalised

    def __post_init__(self):
        if len(self.items) != len(self.embeddings):
            raise ValueError(f"{len(self.items)} items but {len(self.embeddings)} embeddings")
        self.embeddings = torch.as_tensor(self.embeddings).float()
        self._groups = None
        self._pos = {it.path: i for i, it in enumerate(self.items)}

    @property
    def groups(self) -> tuple[list[tuple[str, str]], torch.Tensor]:
        """(concept keys, the key index of every image): (superclass, subgroup) for the
        hierarchy, ("", concept) for the other pool."""
        if self._groups is None:
            keys = list(dict.fromkeys(_concept_key(it) for it in self.items))
            index = {k: i for i, k in enumerate(keys)}
            self._groups = (keys, torch.tensor([index[_concept_key(it)] for it in self.items]))
        return self._groups

    @classmethod
    def compute(cls, bundle: ClipBundle, gallery: Gallery, batch: int = 512,
                cache_dir: str | Path | None = None) -> "GalleryEmbeddings":
        """Encode the gallery; with ``cache_dir``, reuse (or store) the result there, keyed by
        :func:`model_gallery_key` (the model, its weights' size and mtime, the gallery)."""
        path = Path(cache_dir) / f"gallery-{model_gallery_key(bundle, gallery)}.safetensors" if cache_dir else None
        if path is not None and path.is_file():
            from safetensors.torch import load_file
            emb = load_file(str(path))["embeddings"]
            if len(emb) == len(gallery.items):
                return cls(list(gallery.items), emb)
        chunks = []
        for i in range(0, len(gallery.items), batch):
            images, _ = gallery.load(gallery.items[i:i + batch], bundle.image_size)
            chunks.append(encode_images(bundle, images))
        out = cls(list(gallery.items), torch.cat(chunks))
        if path is not None:
            from .io import save_safetensors
            save_safetensors({"embeddings": out.embeddings}, path, {"arch": bundle.arch, "gallery": gallery.name})
        return out


def default_cache_dir() -> Path:
    """$CLIPFORGET_CACHE, else ~/.cache/clipforget (gallery embeddings of the CLI's suggestions)."""
    env = os.environ.get("CLIPFORGET_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "clipforget"


def weights_stamp(source: str | None) -> str:
    """Size and mtime of the weights a model was loaded from (``ClipBundle.pretrained``): a
    checkpoint file, or every file of a ``local-dir:`` export folder (its weights and config). A
    cache keyed by it is not reused once they are rewritten; "" for a pretrained tag."""
    if not source:
        return ""
    source = str(source)
    if source.startswith("local-dir:"):
        folder = Path(source.removeprefix("local-dir:"))
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        return ";".join(f"{p.name}:{p.stat().st_size}-{p.stat().st_mtime_ns}" for p in files)
    src = Path(source)
    return f"{src.stat().st_size}-{src.stat().st_mtime_ns}" if src.is_file() else ""


def model_gallery_key(bundle: ClipBundle, gallery: Gallery) -> str:
    """The cache key of what a model computes on a gallery (its embeddings, the app's trunk and
    index): the model, its weights (:func:`weights_stamp`: rewritten weights are encoded again),
    the image size and the gallery (its content and folder). One key for every such cache."""
    stamp = weights_stamp(bundle.pretrained)
    text = (f"{bundle.arch}|{bundle.pretrained}|{stamp}|{bundle.image_size}|{gallery.content_hash}|"
            f"{gallery.root.resolve()}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Neighbour:
    name: str                   # subgroup or other-pool concept
    superclass: str             # "" for the other pool
    style: str                  # the style compared (style requests), else ""
    similarity: float           # mean cosine to the forget images
    ratio: float                # similarity / the forget images' own similarity
    at_risk: bool
    in_retain: bool

    @property
    def label(self) -> str:
        where = f"{self.superclass}/{self.name}" if self.superclass else f"{self.name} (other concept)"
        return where + (f" in {self.style}" if self.style else "")


@dataclass
class Suggestion:
    label: str                           # what is forgotten, for people
    retain: list[str]                    # the suggested retain subgroups
    retain_source: str                   # "siblings" | "coarse class" | "nearest subgroups"
    request: dict | None                 # the ForgetRequest it applies to (None: example images only)
    self_similarity: float               # the forget images' own mean pairwise cosine
    forget_images: int
    neighbours: list[Neighbour]          # nearest concepts outside the retain set, nearest first
    retain_similarity: dict[str, float]  # similarity of each retain subgroup to the forget images
    match: dict | None = None            # examples only: the gallery subgroup they look like
    warnings: list[str] = field(default_factory=list)

    @property
    def at_risk(self) -> list[Neighbour]:
        return [n for n in self.neighbours if n.at_risk]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["at_risk"] = [n.label for n in self.at_risk]
        return d

    def text(self) -> str:
        """Plain text for the CLI."""
        lines = [f"forget {self.label}: {self.forget_images} images, their own similarity {self.self_similarity:.3f}"]
        if self.match:
            lines.append(f"the images look like gallery subgroup {self.match['superclass']}/{self.match['subgroup']} "
                         f"(similarity {self.match['similarity']:.3f}, ratio {self.match['ratio']:.2f})")
        lines.append(f"suggested retain set ({self.retain_source}): {', '.join(self.retain) or 'none'}")
        for name, s in self.retain_similarity.items():
            lines.append(f"  retain {name:28s} similarity {s:.3f}")
        lines.append("nearest concepts outside the retain set (ratio = similarity / the forget images' own):")
        for n in self.neighbours:
            lines.append(f"  {'AT RISK ' if n.at_risk else '        '}{n.label:40s} similarity {n.similarity:.3f}  "
                         f"ratio {n.ratio:.2f}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = [f"**Suggested retain set** ({self.retain_source}): "
                 + (", ".join(f"{display(n)} ({self.retain_similarity.get(n, float('nan')):.2f})" for n in self.retain)
                    or "none"),
                 f"Similarity to the {self.forget_images} forget images in the original model (their own: "
                 f"{self.self_similarity:.2f})."]
        if self.match:
            lines.insert(0, f"These images look like **{display(self.match['subgroup'])}** "
                            f"({self.match['superclass']}) from the gallery (ratio {self.match['ratio']:.2f}).")
        near = ", ".join(f"{'⚠️ ' if n.at_risk else ''}{n.label} ({n.similarity:.2f})" for n in self.neighbours)
        lines.append(f"Nearest outside the retain set: {near or 'none'}.")
        lines += [f"⚠️ {w}" for w in self.warnings]
        return "\n\n".join(lines)


# ---- similarity ------------------------------------------------------------------------------------

def _self_similarity(forget: torch.Tensor) -> float:
    """Mean cosine between two different forget images."""
    n = len(forget)
    if n < 2:
        raise ValueError("the forget images' own similarity needs at least two images")
    sim = forget @ forget.t()
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def _concept_key(it: Item) -> tuple[str, str]:
    return (it.superclass, it.subgroup) if it.kind == "hierarchy" else ("", it.concept)


def _rank(forget: torch.Tensor, emb: GalleryEmbeddings, exclude: set[str],
          style: str | None) -> list[tuple[tuple[str, str], float]]:
    """Every gallery concept (subgroup or other-pool concept) by its mean cosine to the forget
    images, nearest first; the forget images themselves are left out, and with ``style`` only
    that style's images count (a style request compares within the style)."""
    keys, group = emb.groups
    keep = torch.tensor([it.path not in exclude and not (style and it.style and it.style != style)
                         for it in emb.items])
    per_image = (forget @ emb.embeddings.t()).mean(0)            # mean over the forget images
    sums = torch.zeros(len(keys), dtype=per_image.dtype).index_add_(0, group[keep], per_image[keep])
    counts = torch.zeros(len(keys)).index_add_(0, group[keep], torch.ones(int(keep.sum())))
    present = (counts > 0).nonzero().flatten().tolist()
    ranked = [(keys[i], float(sums[i] / counts[i])) for i in present]
    return sorted(ranked, key=lambda kv: -kv[1])


def _neighbours(ranked, self_sim: float, retain: set[str], skip: set[tuple[str, str]], cfg: SuggestConfig,
                style: str | None) -> list[Neighbour]:
    out = []
    for (sc, name), s in ranked:
        if (sc, name) in skip or (sc and name in retain):
            continue
        ratio = s / self_sim if self_sim > 0 else float("inf")
        at_risk = ratio >= cfg.risk_ratio
        if len(out) >= cfg.neighbours and not at_risk:
            break
        out.append(Neighbour(name, sc, style or "", s, ratio, at_risk, False))
    return out


def _risk_warnings(neighbours: list[Neighbour], cfg: SuggestConfig) -> list[str]:
    risky = [n for n in neighbours if n.at_risk]
    if not risky:
        return []
    names = ", ".join(f"{n.label} (ratio {n.ratio:.2f})" for n in risky)
    return [f"likely over-forgotten: {names} — as close to the forget images as they are to each other "
            f"(ratio >= {cfg.risk_ratio}); add them to the retain set (--retain) to protect them"]


# ---- suggestions -------------------------------------------------------------------------------------

def suggest_for_request(bundle: ClipBundle, gallery: Gallery, request: ForgetRequest,
                        config: SuggestConfig | None = None,
                        embeddings: GalleryEmbeddings | None = None) -> Suggestion:
    """The retain set a run of ``request`` uses by default (the siblings, exactly), each sibling's
    similarity, and near concepts elsewhere that are at risk of being forgotten too (subgroups in
    ``request.retain`` count as protected, so they are not warned about)."""
    cfg = config or SuggestConfig()
    emb = embeddings or GalleryEmbeddings.compute(bundle, gallery)
    default = ForgetRequest(request.superclass, request.subgroup, request.style)   # retain=None
    forget_items, retain_items, siblings, warnings = resolve(gallery, default)
    idx = _indices(emb, forget_items)
    forget = emb.embeddings[idx]
    if len(forget) >= 2:
        self_sim, basis = _self_similarity(forget), ""
    else:
        # a subgroup in one style is one image: its own similarity is taken over the subgroup's
        # images in every style (how close drawings of the same thing are)
        same = _indices(emb, gallery.select(superclass=request.superclass, subgroup=request.subgroup))
        self_sim = _self_similarity(emb.embeddings[same]) if len(same) >= 2 else 1.0
        basis = " (one image: own similarity measured across the subgroup's styles)"
    forget_paths = {it.path for it in forget_items}
    # a style request compares within its style; a subgroup request over every style
    style = request.style if request.subgroup is None else None
    ranked = _rank(forget, emb, forget_paths, style)
    retain_set = set(siblings) | set(request.retain or ())     # the user's own retain set protects too
    sib_sim = {}
    for n in siblings:          # each retain subgroup's similarity, over the images the run retains
        idx_n = _indices(emb, [it for it in retain_items if it.subgroup == n])
        if idx_n:
            sib_sim[n] = float((forget @ emb.embeddings[idx_n].t()).mean())
    skip = {(request.superclass, request.subgroup)} if request.subgroup else set()
    neighbours = _neighbours(ranked, self_sim, retain_set, skip, cfg, style)
    warnings = list(warnings) + _risk_warnings(neighbours, cfg)
    source = "siblings" if request.subgroup else "the superclass's subgroups in the other styles"
    return Suggestion(default.label + basis, siblings, source, default.to_dict(), self_sim, len(forget_items),
                      neighbours, {n: sib_sim.get(n, float("nan")) for n in siblings}, None, warnings)


def suggest_for_examples(bundle: ClipBundle, gallery: Gallery, images: list, coarse_label: str,
                         config: SuggestConfig | None = None,
                         embeddings: GalleryEmbeddings | None = None) -> Suggestion:
    """A retain set for example images of what to forget (paths or PIL images) and their coarse
    label (e.g. 'dog'): the coarse class's subgroups when the gallery has that class (without the
    subgroup the examples look like), else the nearest gallery subgroups; plus at-risk warnings."""
    cfg = config or SuggestConfig()
    coarse_label = (coarse_label or "").strip()
    if not coarse_label:
        raise ValueError("give the coarse label of the example images (e.g. 'dog'): the method pushes the "
                         "images away from it")
    if len(images) < cfg.min_examples:
        raise ValueError(f"give at least {cfg.min_examples} example images of what to forget (got {len(images)}); "
                         "3–5 images in different looks work best")
    emb = embeddings or GalleryEmbeddings.compute(bundle, gallery)
    forget = encode_images(bundle, load_examples(images, bundle.image_size))
    self_sim = _self_similarity(forget)
    ranked = _rank(forget, emb, set(), None)
    superclass = _find_superclass(gallery, coarse_label)
    match = None
    top_sub = next(((k, s) for k, s in ranked if k[0]), None)
    if top_sub is not None and top_sub[1] >= cfg.match_ratio * self_sim:
        (sc, sg), s = top_sub
        if superclass is None or sc == superclass:
            match = {"superclass": sc, "subgroup": sg, "similarity": s, "ratio": s / self_sim}
    warnings = []
    if superclass is not None:
        retain = [sg for sg in gallery.subgroups(superclass) if not (match and sg == match["subgroup"])]
        source = f"subgroups of {superclass!r}" + (" except the one the images look like" if match else "")
    else:
        retain = [k[1] for k, _ in ranked if k[0] and not (match and k == (match["superclass"], match["subgroup"]))]
        retain = retain[:cfg.retain_neighbours]
        source = "nearest gallery subgroups"
        warnings.append(f"{coarse_label!r} is not a superclass of gallery {gallery.name!r}: the retain set is the "
                        f"{len(retain)} nearest gallery subgroups; check it")
    sims = {k[1]: s for k, s in ranked if k[0]}
    skip = {(match["superclass"], match["subgroup"])} if match else set()
    neighbours = _neighbours(ranked, self_sim, set(retain), skip, cfg, None)
    warnings += _risk_warnings(neighbours, cfg)
    return Suggestion(f"{len(images)} example images of a {coarse_label}", retain, source, None, self_sim, len(images),
                      neighbours, {n: sims.get(n, float("nan")) for n in retain}, match, warnings)


def _find_superclass(gallery: Gallery, label: str) -> str | None:
    norm = display(label).lower().strip()
    for sc in gallery.superclasses():
        if display(sc).lower() == norm:
            return sc
    return None


def _indices(emb: GalleryEmbeddings, items: list[Item]) -> list[int]:
    pos = emb._pos
    missing = [it.path for it in items if it.path not in pos]
    if missing:
        raise ValueError(f"{len(missing)} images (e.g. {missing[0]}) are not in the embedded gallery table; "
                         "recompute GalleryEmbeddings for this gallery")
    return [pos[it.path] for it in items]


def load_examples(images: list, size: int) -> torch.Tensor:
    """Example images (paths or PIL images) -> uint8 (N, 3, size, size): centre square crop, then
    resized like the gallery images. Paths are opened with the safe loader (bombs, bad files refused)."""
    out = []
    for im in images:
        img = open_image(im) if isinstance(im, (str, Path)) else im.convert("RGB")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        out.append(np.asarray(img.resize((size, size), Image.BICUBIC)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
