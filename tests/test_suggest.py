"""Retain-set suggestions: exactly the siblings for gallery subgroups, at-risk warnings, sensible
neighbours for a user's folder and for example images with a coarse label."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from clipforget.data.gallery import Gallery, Item
from clipforget.data.task import ForgetRequest, resolve
from clipforget.suggest import (GalleryEmbeddings, SuggestConfig, suggest_for_examples, suggest_for_request)


@pytest.fixture(scope="module")
def gallery():
    """In this module: the embedded gallery's every subgroup drawing and one drawing of each other
    concept (a third of its images: the suggestions below are about subgroups, the other pool only
    has to be there)."""
    from conftest import app_gallery
    return app_gallery(superclasses=None, per_concept=1)


@pytest.fixture(scope="module")
def emb(bundle, gallery):
    return GalleryEmbeddings.compute(bundle, gallery)


# ---- without a model: the rules on hand-made embeddings ---------------------------------------------

def _toy():
    """dog/{poodle, guide-dog}, cat/{cat, twin}, _other/{rock}: 'twin' sits right on the poodles."""
    items, vecs = [], []

    def add(sc, sg, vec, n=3, kind="hierarchy"):
        for i in range(n):
            items.append(Item(f"{sc or '_other'}/{sg}/{i}.png", sg, sc, sg if sc else "", f"s{i}", kind))
            vecs.append(torch.tensor(vec) + 0.05 * torch.randn(4, generator=gen))

    gen = torch.Generator().manual_seed(0)
    add("dog", "poodle", [1.0, 0.0, 0.0, 0.0])
    add("dog", "guide-dog", [0.6, 0.8, 0.0, 0.0])
    add("cat", "cat", [0.0, 0.0, 1.0, 0.0])
    add("cat", "twin", [1.0, 0.05, 0.0, 0.0])
    add("", "rock", [0.0, 0.0, 0.0, 1.0], kind="other")
    g = Gallery("/nonexistent", items, "toy")
    return g, GalleryEmbeddings(items, torch.nn.functional.normalize(torch.stack(vecs), dim=-1))


def test_at_risk_is_a_neighbour_as_close_as_the_forget_images_are_to_each_other():
    g, emb = _toy()
    s = suggest_for_request(None, g, ForgetRequest("dog", "poodle"), embeddings=emb)
    assert s.retain == ["guide-dog"] and s.retain_source == "siblings"
    names = [n.name for n in s.neighbours]
    assert names[0] == "twin" and "poodle" not in names and "guide-dog" not in names
    twin = s.neighbours[0]
    assert twin.at_risk and twin.ratio >= 0.9
    assert not any(n.at_risk for n in s.neighbours if n.name in ("cat", "rock"))
    assert any("twin" in w and "over-forgotten" in w for w in s.warnings)
    # a stricter ratio warns about nothing; a retain set that protects 'twin' does not warn about it
    strict = suggest_for_request(None, g, ForgetRequest("dog", "poodle"), SuggestConfig(risk_ratio=1.5), emb)
    assert not strict.at_risk and not strict.warnings
    mine = suggest_for_request(None, g, ForgetRequest("dog", "poodle", retain=("guide-dog", "twin")), embeddings=emb)
    assert mine.retain == ["guide-dog"]                  # the suggestion is still the siblings
    assert "twin" not in [n.name for n in mine.neighbours] and not mine.warnings


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="risk_ratio"):
        SuggestConfig(risk_ratio=0)
    with pytest.raises(ValueError, match="neighbours"):
        SuggestConfig(neighbours=0)


# ---- the embedded world ----------------------------------------------------------------------------

def test_suggestion_is_exactly_the_siblings_for_every_gallery_subgroup(bundle, gallery, emb):
    for sc in gallery.superclasses():
        for sg in gallery.subgroups(sc):
            req = ForgetRequest(sc, sg)
            s = suggest_for_request(bundle, gallery, req, embeddings=emb)
            assert s.retain == resolve(gallery, req)[2] == [x for x in gallery.subgroups(sc) if x != sg], (sc, sg)
            assert s.request["retain"] is None                       # the default request, as the sweep runs it
            assert all(n.superclass != sc for n in s.neighbours)      # neighbours are outside the retain set
            sims = [n.similarity for n in s.neighbours]
            assert sims == sorted(sims, reverse=True)


def test_style_request_compares_within_the_style(bundle, gallery, emb):
    s = suggest_for_request(bundle, gallery, ForgetRequest("car", style="line-art"), embeddings=emb)
    assert s.retain == gallery.subgroups("car") and s.forget_images == len(gallery.subgroups("car"))
    assert s.neighbours and all(n.style == "line-art" for n in s.neighbours)
    # the nearest line-art subgroups outside the cars are trucks
    assert next(n for n in s.neighbours if n.superclass).superclass == "truck"
    assert s.at_risk                                   # line-art trucks look like line-art cars


def _user_folder(gallery, root, picks):
    for sc, sg in picks:
        for it in gallery.select(superclass=sc, subgroup=sg):
            dst = root / sc / sg / f"{it.style}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(gallery.root / it.path, dst)
    return Gallery.open(root)


USER_PICKS = [("dog", "poodle"), ("dog", "dog"), ("dog", "dog-face"), ("cat", "cat"), ("cat", "cat-face"),
              ("car", "taxi"), ("car", "police-car"), ("fruit", "banana"), ("flower", "rose")]


def test_user_folder_gets_its_siblings_and_sensible_neighbours(bundle, gallery, tmp_path):
    user = _user_folder(gallery, tmp_path / "mine", USER_PICKS)
    assert user.styles() == []                                       # root/superclass/subgroup/*.png
    emb = GalleryEmbeddings.compute(bundle, user, cache_dir=tmp_path / "cache")
    again = GalleryEmbeddings.compute(bundle, user, cache_dir=tmp_path / "cache")   # read from the cache
    assert len(list((tmp_path / "cache").iterdir())) == 1 and torch.equal(emb.embeddings, again.embeddings)
    s = suggest_for_request(bundle, user, ForgetRequest("dog", "poodle"), embeddings=emb)
    assert s.retain == ["dog", "dog-face"]
    order = [n.superclass for n in s.neighbours]
    assert order[:2] == ["cat", "cat"], order                        # animals before cars, fruit, flowers
    s_taxi = suggest_for_request(bundle, user, ForgetRequest("car", "taxi"), embeddings=emb)
    assert s_taxi.retain == ["police-car"] and "taxi" not in [n.name for n in s_taxi.neighbours]


def test_cli_suggest_for_a_folder_and_for_example_images(gallery, tmp_path, monkeypatch, capsys):
    from clipforget.cli import main as cli_main
    monkeypatch.setenv("CLIPFORGET_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "mine"
    _user_folder(gallery, root, USER_PICKS)
    assert cli_main(["suggest", "--gallery", str(root), "--superclass", "dog", "--subgroup", "poodle"]) == 0
    out = capsys.readouterr().out
    assert "suggested retain set (siblings): dog, dog-face" in out and "cat/" in out
    assert cli_main(["suggest", "--gallery", str(root), "--examples", str(root / "dog" / "poodle"),
                     "--label", "dog", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["match"]["subgroup"] == "poodle" and got["retain"] == ["dog", "dog-face"]
    assert cli_main(["suggest", "--gallery", str(root), "--examples", str(root)]) == 2
    assert "--label" in capsys.readouterr().err


def test_example_images_with_a_gallery_coarse_label(bundle, gallery, emb):
    paths = [gallery.root / it.path for it in gallery.select(superclass="dog", subgroup="poodle")]
    s = suggest_for_examples(bundle, gallery, paths, "dog", embeddings=emb)
    assert s.match and (s.match["superclass"], s.match["subgroup"]) == ("dog", "poodle")
    assert s.retain == [x for x in gallery.subgroups("dog") if x != "poodle"]     # the siblings again
    assert s.request is None and s.forget_images == len(paths)


def test_example_images_with_an_unknown_coarse_label(bundle, gallery, emb):
    paths = [gallery.root / it.path for it in gallery.select(superclass="dog", subgroup="poodle")]
    s = suggest_for_examples(bundle, gallery, paths, "canine", SuggestConfig(retain_neighbours=4), emb)
    assert len(s.retain) == 4 and "poodle" not in s.retain
    assert s.retain[0] == "dog", s.retain                             # the nearest subgroup is a dog
    sims = list(s.retain_similarity.values())
    assert sims == sorted(sims, reverse=True)                         # ... nearest first
    assert any("not a superclass" in w for w in s.warnings)


def test_example_images_need_a_label_and_two_images(bundle, gallery, emb):
    paths = [gallery.root / it.path for it in gallery.select(superclass="dog", subgroup="poodle")]
    with pytest.raises(ValueError, match="coarse label"):
        suggest_for_examples(bundle, gallery, paths, " ", embeddings=emb)
    with pytest.raises(ValueError, match="at least 2 example images"):
        suggest_for_examples(bundle, gallery, paths[:1], "dog", embeddings=emb)


# ---- in the app: the editable retain set and uploaded examples ------------------------------------------

# ``core``: the app tests' shared AppCore (conftest), loaded once for the session


@pytest.mark.slow
def test_app_retain_editor_and_edited_retain_set(core):
    gallery = core.gallery
    ed = core.retain_editor("dog", "poodle")
    siblings = [x for x in gallery.subgroups("dog") if x != "poodle"]
    assert ed["value"] == siblings and ed["choices"][:len(siblings)] == siblings
    assert set(ed["choices"]) == set(gallery.subgroups()) and "Suggested retain set" in ed["markdown"]
    req = core.request("dog", "poodle")
    assert core.with_retain(req, siblings[::-1]) is req                  # the siblings: retain=None, as the sweep
    assert core.with_retain(req, siblings[:2] + ["tiger"]).retain == (*siblings[:2], "tiger")
    with pytest.raises(ValueError, match="poodel"):
        core.with_retain(req, ["poodel"])
    with pytest.raises(ValueError, match="forget subgroup"):
        core.with_retain(req, ["poodle"])


@pytest.mark.slow
def test_app_upload_examples_for_a_retain_suggestion(core, gallery, tmp_path):
    from clipforget.uploads import UploadError
    paths = [str(gallery.root / it.path) for it in gallery.select(superclass="dog", subgroup="poodle")]
    res = core.suggest_uploads(paths, "dog")
    assert res["match"]["subgroup"] == "poodle"
    assert res["retain"] == [x for x in gallery.subgroups("dog") if x != "poodle"]
    assert "pick **poodle**" in res["markdown"]
    stored = list((core.runs_dir / "uploads" / res["batch"]).iterdir())
    assert len(stored) == len(paths) and all(p.suffix == ".png" for p in stored)
    bad = tmp_path / "evil.png"
    bad.write_text("<script>alert(1)</script>" * 10)
    with pytest.raises(UploadError, match="not an image"):
        core.suggest_uploads(paths[:2] + [str(bad)], "dog")


def test_the_cache_key_follows_a_local_dir_model_s_files(tmp_path, monkeypatch):
    """A ``local-dir:`` export folder rewritten in place (same path, new weights) gets new gallery
    embeddings, in the retain suggestions' cache and the app's alike (one key): the key stamps the
    folder's files, as it stamps a checkpoint file; a gallery named by a relative path is the same gallery."""
    import os
    from pathlib import Path
    from types import SimpleNamespace

    from clipforget.suggest import model_gallery_key, weights_stamp
    folder = tmp_path / "export"
    folder.mkdir()
    weights = folder / "open_clip_model.safetensors"
    weights.write_bytes(b"a" * 10)
    (folder / "open_clip_config.json").write_text("{}")
    bundle = SimpleNamespace(arch=f"local-dir:{folder}", pretrained=f"local-dir:{folder}", image_size=32)
    gallery = SimpleNamespace(content_hash="h", root=tmp_path)
    key = model_gallery_key(bundle, gallery)
    assert model_gallery_key(bundle, gallery) == key                  # the same folder: the cache is used
    monkeypatch.chdir(tmp_path.parent)
    assert model_gallery_key(bundle, SimpleNamespace(content_hash="h", root=Path(tmp_path.name))) == key
    weights.write_bytes(b"b" * 11)
    assert model_gallery_key(bundle, gallery) != key
    key = model_gallery_key(bundle, gallery)
    weights.write_bytes(b"c" * 11)                                     # the same size, written later
    t = weights.stat().st_mtime_ns + 2_000_000_000
    os.utime(weights, ns=(t, t))
    assert model_gallery_key(bundle, gallery) != key
    st = weights.stat()
    assert weights_stamp(str(weights)) == f"{st.st_size}-{st.st_mtime_ns}" and weights_stamp("openai") == ""
