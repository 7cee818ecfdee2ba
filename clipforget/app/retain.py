"""A request picked on the page: checked, worded as queries, its retain set described, suggested
and edited. The retain suggestion needs the model (:class:`RetainSuggester`); the rest needs only
the gallery."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from ..data.gallery import Gallery, display
from ..data.prompts import article
from ..data.request import ForgetRequest, SplitConfig, resolve, split_forget
from ..threads import single_threaded
from .loading import NotReady


def make_request(gallery: Gallery, superclass: str, subgroup: str | None = None,
                 style: str | None = None) -> ForgetRequest:
    """A validated request; empty strings mean 'not chosen'. Raises ValueError with advice."""
    subgroup, style = subgroup or None, style or None
    if not superclass:
        raise ValueError("pick a superclass first")
    if subgroup is None and style is None:
        raise ValueError(f"pick a subgroup of {superclass!r} (or a style) to forget; forgetting the "
                         "whole superclass is not a subgroup request")
    req = ForgetRequest(superclass, subgroup, style)
    resolve(gallery, req)     # raises with close-match suggestions
    return req


def suggested_queries(gallery: Gallery, superclass: str, subgroup: str | None = None,
                      style: str | None = None) -> list[str]:
    """The coarse label first ('a dog': the association the method removes for the forgotten
    subgroup), then the subgroup name ('a poodle') and both ('a poodle, a kind of dog')."""
    sc = display(superclass)
    coarse = f"{article(sc)} {sc}"
    out = [coarse]
    if subgroup:
        sg = display(subgroup)
        out += [f"{article(sg)} {sg}", f"{article(sg)} {sg}, a kind of {sc}"]
    if style:
        phrase = gallery.style_phrase(style)
        out = [f"{article(phrase)} {phrase} of {q}" for q in out] + out[:1]
    return list(dict.fromkeys(out))


def describe_retain(gallery: Gallery, superclass: str, subgroup: str | None = None, style: str | None = None,
                    split: SplitConfig | None = None) -> dict:
    """What a job would forget and keep, before it runs: which forget images the method trains on and
    which it holds out for calibration and the test (``split``: the job's; None: the defaults)."""
    req = make_request(gallery, superclass, subgroup, style)
    forget, retain, names, warnings = resolve(gallery, req)
    files = split_forget(forget, split or SplitConfig(), req.label)   # too few images to hold some out: raises
    counts = {n: sum(1 for it in retain if it.subgroup == n) for n in names}
    other = sum(1 for it in gallery.items if it.kind == "hierarchy" and it.superclass != superclass)
    queries = suggested_queries(gallery, superclass, subgroup, style)
    return {"label": req.label, "request": req.to_dict(),
            "forget": [it.path for it in forget], "forget_styles": sorted({it.style for it in forget}),
            "examples": [it.path for it in files.train], "example_styles": sorted({it.style for it in files.train}),
            "held_out": [it.path for it in files.calib + files.test],
            "held_out_styles": sorted({it.style for it in files.calib + files.test}),
            "retain_subgroups": names, "retain_counts": counts, "retain_images": len(retain),
            "other_superclass_images": other, "warnings": warnings, "query": queries[0], "queries": queries}


def with_retain(gallery: Gallery, req: ForgetRequest, retain: list[str] | None) -> ForgetRequest:
    """The request with an edited retain set; the siblings themselves stay ``retain=None``."""
    if retain is None:
        return req
    retain = [r for r in dict.fromkeys(retain) if r]
    if set(retain) == set(resolve(gallery, req)[2]):
        return req
    edited = replace(req, retain=tuple(retain))
    resolve(gallery, edited)          # unknown names / the forget subgroup itself raise here
    return edited


def retain_choices(gallery: Gallery, first: list[str], then: list[str]) -> list[str]:
    rest = sorted(gallery.subgroups())
    return list(dict.fromkeys(first + then + rest))


class RetainSuggester:
    """Retain suggestions in the original model's embedding space (:mod:`clipforget.suggest`),
    for a gallery request or for uploaded example images. ``resources(timeout)`` is the app's
    loaded model and gallery embeddings; it raises :class:`NotReady` while they load."""

    def __init__(self, gallery: Gallery, resources: Callable, runs_dir):
        self.gallery, self.resources, self.runs_dir = gallery, resources, runs_dir
        self._embeddings = None           # original gallery embeddings, wrapped once

    def _gallery_embeddings(self):
        res = self.resources(timeout=0.01)          # raises NotReady while loading
        from ..suggest import GalleryEmbeddings
        if self._embeddings is None:
            self._embeddings = GalleryEmbeddings(list(self.gallery.items), res.original)
        return res.bundle, self._embeddings

    def suggestion(self, req: ForgetRequest):
        """The retain suggestion for a request (siblings + at-risk neighbours); NotReady while the
        model loads."""
        bundle, emb = self._gallery_embeddings()        # NotReady before the suggestion module loads torch
        from ..suggest import suggest_for_request
        with single_threaded():
            return suggest_for_request(bundle, self.gallery, req, embeddings=emb)

    def editor(self, req: ForgetRequest) -> dict:
        """What the editable retain widget shows: every subgroup of the gallery as a choice (the
        siblings first, then the at-risk and nearest ones), the siblings selected, and the
        suggestion's markdown (or why there is none yet)."""
        siblings = resolve(self.gallery, req)[2]
        try:
            s = self.suggestion(req)
        except NotReady as e:
            return {"choices": retain_choices(self.gallery, siblings, []), "value": siblings,
                    "markdown": f"Retain suggestion: {e}", "at_risk": []}
        near = [n.name for n in s.neighbours if n.superclass]
        return {"choices": retain_choices(self.gallery, siblings, near), "value": s.retain, "markdown": s.markdown(),
                "at_risk": [n.name for n in s.at_risk if n.superclass]}

    def for_uploads(self, files: list, coarse_label: str) -> dict:
        """Example images uploaded by the user (checked and stored by ``uploads.store_uploads``)
        + their coarse label -> the retain suggestion for them."""
        from ..suggest import suggest_for_examples
        from ..uploads import store_uploads
        batch = store_uploads(files or [], self.runs_dir)
        bundle, emb = self._gallery_embeddings()
        with single_threaded():
            s = suggest_for_examples(bundle, self.gallery, batch.paths, coarse_label, embeddings=emb)
        note = ""
        if s.match:
            note = (f"\n\nTo forget them, pick **{display(s.match['subgroup'])}** in "
                    f"**{s.match['superclass']}** above.")
        return {"batch": batch.id, "retain": s.retain, "match": s.match, "markdown": s.markdown() + note,
                "suggestion": s.to_dict()}
