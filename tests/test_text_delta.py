"""Deltas that edit the text tower (CLIP-LIP): the edited model, merging with an image delta, the
run folder, the export in plain open_clip, the app's query embeddings at α and its α-grid. The
deltas here are made by hand (seeded noise on text-tower weights), so each test is about the
plumbing; tests/test_baselines.py runs CLIP-LIP itself."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from clipforget.merge import image_part, sum_deltas, text_part, towers
from clipforget.methods.base import editable_copy, text_state
from clipforget.pipeline import edited_model
from tinyworld import state_hash

TEXTS = ["a poodle", "a picture of a dog", "a taxi"]


@pytest.fixture(scope="module")
def tiny():
    from clipforget.models import load_clip
    torch.manual_seed(0)
    return load_clip("test-tiny-rn", device="cpu")


def noise_delta(model, keys_of, scale=0.5, seed=0) -> dict:
    """Seeded noise on the matrices of ``model.state_dict()`` whose keys ``keys_of(key)`` accepts."""
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()
            if keys_of(k) and v.is_floating_point() and v.dim() == 2}


def text_delta(model, seed=0):
    return noise_delta(model, lambda k: not k.startswith("visual.") and "transformer" in k, seed=seed)


def image_delta(model, seed=1):
    return noise_delta(model, lambda k: k.startswith("visual.attnpool."), scale=0.05, seed=seed)


def encode_text(bundle, model, texts=TEXTS):
    from clipforget.embed import encode_texts
    return encode_texts(bundle, texts, model)


def encode_image(bundle, model):
    x = bundle.normalize(torch.rand(4, 3, bundle.image_size, bundle.image_size, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        return model.eval().encode_image(x)


# ---- the edited model ------------------------------------------------------------------------------

def test_a_text_delta_edits_a_private_text_tower_and_alpha_zero_is_the_original(tiny):
    before = state_hash(tiny.model)
    d = text_delta(tiny.model)
    assert d and towers(d) == ["text"] and not image_part(d)
    original = encode_text(tiny, tiny.model)
    assert torch.allclose(encode_text(tiny, edited_model(tiny, d, 0.0)), original, atol=1e-6)
    half, full = encode_text(tiny, edited_model(tiny, d, 0.5)), encode_text(tiny, edited_model(tiny, d, 1.0))
    assert not torch.allclose(full, original, atol=1e-3) and not torch.allclose(half, full, atol=1e-3)
    assert torch.equal(encode_image(tiny, edited_model(tiny, d, 1.0)), encode_image(tiny, tiny.model))
    assert state_hash(tiny.model) == before                    # the original is never touched
    # the weights are exactly θ₀ + α·Δ on the text side
    sd = edited_model(tiny, d, 0.5).state_dict()
    assert all(torch.allclose(sd[k], tiny.model.state_dict()[k] + 0.5 * v) for k, v in d.items())


def test_an_image_delta_still_shares_the_text_tower(tiny):
    """Most methods stay as cheap as before: no copy of the text tower unless a delta edits it."""
    model = edited_model(tiny, image_delta(tiny.model), 1.0)
    assert model.transformer is tiny.model.transformer and model.visual is not tiny.model.visual
    copy = editable_copy(tiny.model, text=True, visual=False)
    assert copy.visual is tiny.model.visual and copy.transformer is not tiny.model.transformer
    assert copy.text_projection is not tiny.model.text_projection
    assert all(not p.requires_grad for p in copy.transformer.parameters())


def test_merging_a_text_delta_and_an_image_delta_edits_both_towers(tiny, tmp_path):
    from clipforget import runfolder
    from clipforget.io import save_safetensors
    from clipforget.pipeline import merge_runs
    t, i = text_delta(tiny.model), image_delta(tiny.model)
    runs = []
    for name, d, alpha in (("text", t, 1.0), ("image", i, 0.5)):
        runs.append(tmp_path / name)
        save_safetensors(d, runs[-1] / runfolder.DELTA, {"alpha": alpha, "towers": ",".join(towers(d))})
    assert runfolder.load_text_delta(runs[0]).keys() == t.keys() and runfolder.load_text_delta(runs[1]) == {}
    merged = merge_runs(runs)                              # Σ α_i Δ_i over the union of keys
    assert towers(merged) == ["image", "text"] and text_part(merged).keys() == t.keys()
    assert sum_deltas([t, i]).keys() == merged.keys()
    model = edited_model(tiny, merged, 1.0)
    assert torch.allclose(encode_text(tiny, model), encode_text(tiny, edited_model(tiny, t, 1.0)), atol=1e-6)
    assert torch.allclose(encode_image(tiny, model), encode_image(tiny, edited_model(tiny, i, 0.5)), atol=1e-5)
    assert not torch.allclose(encode_image(tiny, model), encode_image(tiny, tiny.model), atol=1e-4)


def test_a_text_delta_key_that_is_no_weight_is_refused(tiny):
    with pytest.raises(ValueError, match="'transformer.nope.weight' is not a weight of this model: the delta "
                                         "was made from another model"):
        edited_model(tiny, {"transformer.nope.weight": torch.zeros(2)}, 1.0)


# ---- evaluation at α -------------------------------------------------------------------------------

def test_class_embeddings_of_a_text_delta_come_from_the_edited_tower_at_alpha(tiny):
    from clipforget.eval.zeroshot import TextCache
    from clipforget.pipeline import texts_for
    d = text_delta(tiny.model)
    names = ["dog", "cat", "car"]
    original = TextCache(tiny)
    assert texts_for(tiny, image_delta(tiny.model), tiny.model, original) is original
    at0 = texts_for(tiny, d, edited_model(tiny, d, 0.0), original)
    at1 = texts_for(tiny, d, edited_model(tiny, d, 1.0), original)
    assert torch.allclose(at0.classes(names), original.classes(names), atol=1e-6)
    assert not torch.allclose(at1.classes(names), original.classes(names), atol=1e-3)
    assert at1.classes(names) is at1.classes(names)          # cached per class list


def test_text_caches_of_one_model_share_until_its_text_tower_changes(tiny, monkeypatch):
    """Every evaluator of a run builds its own TextCache: for one model they share the class
    embeddings, and a change to the text tower in place (as restore makes at each α) is noticed."""
    import copy

    from clipforget.eval import zeroshot
    model = copy.deepcopy(tiny.model)
    calls = []
    real = zeroshot.class_embeddings
    monkeypatch.setattr(zeroshot, "class_embeddings", lambda *a: calls.append(1) or real(*a))
    names = ["dog", "cat"]
    first = zeroshot.TextCache(tiny, model).classes(names)
    assert zeroshot.TextCache(tiny, model).classes(names) is first and len(calls) == 1
    with torch.no_grad():
        model.token_embedding.weight.mul_(1.5).add_(0.1)                     # the text tower edited in place
    changed = zeroshot.TextCache(tiny, model).classes(names)
    assert len(calls) == 2 and not torch.allclose(changed, first, atol=1e-4)
    with torch.no_grad():
        model.visual.conv1.weight.mul_(2)                                    # an image-side change: still shared
    assert zeroshot.TextCache(tiny, model).classes(names) is changed and len(calls) == 2


# ---- export -------------------------------------------------------------------------------------------

def test_export_of_a_text_delta_loads_in_plain_open_clip_with_the_edited_text(tiny, tmp_path):
    import open_clip

    from clipforget.models import export_open_clip
    d = text_delta(tiny.model)
    model = edited_model(tiny, d, 0.7)
    export_open_clip(tiny, model.state_dict(), tmp_path / "export")
    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'export'}")(TEXTS)
    with torch.no_grad():
        got = plain.eval().encode_text(tokens)
        want, orig = model.encode_text(tokens), tiny.model.eval().encode_text(tokens)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, orig, atol=1e-3)


@pytest.mark.slow
def test_export_of_a_text_delta_on_the_hugging_face_tower(bundle, tmp_path):
    """The embedded model's MiniLM text tower (open_clip's HFTextEncoder): the export carries the
    edited tower and the project's loader reads it back (hub-free)."""
    from clipforget.models import export_open_clip, load_clip
    d = noise_delta(bundle.model, lambda k: k.startswith("text.") and "layer.5." in k, scale=0.02)
    assert d and towers(d) == ["text"]
    model = edited_model(bundle, d, 1.0)
    export_open_clip(bundle, model.state_dict(), tmp_path / "export")
    again = load_clip(f"local-dir:{tmp_path / 'export'}", device="cpu")
    got, want = encode_text(again, again.model), encode_text(bundle, model)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, encode_text(bundle, bundle.model), atol=1e-4)


# ---- the app: queries at α, the α-grid -------------------------------------------------------------

def test_text_alpha_embeds_queries_at_alpha_and_caches_them(tiny, monkeypatch):
    from clipforget import index
    d = text_delta(tiny.model)
    ta = index.TextAlpha(tiny, {**d, **image_delta(tiny.model)})      # only the text part is used
    assert ta.model.visual is tiny.model.visual
    assert torch.allclose(ta.encode(TEXTS, 0.0), encode_text(tiny, tiny.model), atol=1e-6)
    assert torch.allclose(ta.encode(TEXTS, 1.0), encode_text(tiny, edited_model(tiny, d, 1.0)), atol=1e-6)
    assert torch.allclose(ta.encode(TEXTS[:1], 0.5), encode_text(tiny, edited_model(tiny, d, 0.5), TEXTS[:1]),
                          atol=1e-6)
    calls = []
    monkeypatch.setattr(ta.model, "encode_text", lambda *a, **k: calls.append(1))
    ta.encode(TEXTS, 1.0)                                       # every (α, text) cached: no forward
    assert not calls
    with pytest.raises(ValueError, match="text-side"):
        index.TextAlpha(tiny, image_delta(tiny.model))


def test_alpha_grid_of_a_text_delta_reuses_the_gallery_embeddings(tiny, monkeypatch):
    from clipforget import index
    from clipforget.embed import encode_images
    images = (torch.rand(5, 3, tiny.image_size, tiny.image_size, generator=torch.Generator().manual_seed(0))
              * 255).to(torch.uint8)
    original = encode_images(tiny, images)
    d = text_delta(tiny.model)
    given = index.AlphaGrid(tiny, images, d, batch_size=2, original=original)
    assert torch.equal(given.encode(0.5), original) and torch.equal(given.encode(1.0), original)
    grid, _ = index.encode_alpha_grid(tiny, images, d, [0.5, 1.0], batch_size=2)    # encoded once
    assert torch.allclose(grid[0], original, atol=1e-6) and torch.equal(grid[0], grid[1])


def _retrieval_fixture(tiny, tmp_path, delta, gallery, alpha=1.0):
    """A Retrieval over ``gallery`` with one finished job whose run folder holds ``delta`` and an
    α-grid of the original gallery embeddings (stand-ins for the app's loader and job registry)."""
    from clipforget import index, runfolder
    from clipforget.app.retrieval import Retrieval
    from clipforget.data.request import ForgetRequest
    from clipforget.embed import encode_images
    from clipforget.io import save_safetensors
    images, _ = gallery.load(gallery.items, tiny.image_size)
    emb = encode_images(tiny, images)
    run = tmp_path / "run"
    save_safetensors(delta, run / runfolder.DELTA, {"alpha": alpha})
    runfolder.plan_alpha_grid(run, [0.5, 1.0], gallery.content_hash, len(images))
    for a in (0.5, 1.0):
        runfolder.save_alpha_point(run, a, emb, gallery.content_hash)
    job = SimpleNamespace(spec={"request": ForgetRequest("dog", "poodle").to_dict()}, summary={"alpha": alpha})
    jobs = SimpleNamespace(run_dir=lambda job_id: run, get=lambda job_id: job)
    loader = SimpleNamespace(gallery=gallery, original_index=index.build(emb), model_name="tiny", pretrained=None,
                             resources=lambda timeout=None: SimpleNamespace(bundle=tiny))
    return Retrieval(loader, jobs, tmp_path / "cache"), emb


def test_app_search_of_a_text_delta_job_embeds_the_query_with_the_edited_tower(tiny, tiny_world, tmp_path):
    from clipforget.data.gallery import Gallery
    gallery = Gallery.open(tiny_world)
    d = text_delta(tiny.model)
    retrieval, emb = _retrieval_fixture(tiny, tmp_path, d, gallery)
    out = retrieval.search("a poodle", "job1", 1.0, k=5)
    assert out["text_edited"] and out["alpha_shown"] == 1.0
    q1 = encode_text(tiny, edited_model(tiny, d, 1.0), ["a poodle"])[0]
    q0 = encode_text(tiny, tiny.model, ["a poodle"])[0]
    assert [h["score"] for h in out["right"]] == pytest.approx(sorted((emb @ q1).tolist(), reverse=True)[:5], abs=1e-5)
    assert [h["score"] for h in out["left"]] == pytest.approx(sorted((emb @ q0).tolist(), reverse=True)[:5], abs=1e-5)
    half = retrieval.search("a poodle", "job1", 0.5, k=5)
    q5 = encode_text(tiny, edited_model(tiny, d, 0.5), ["a poodle"])[0]
    assert [h["score"] for h in half["right"]] == pytest.approx(sorted((emb @ q5).tolist(), reverse=True)[:5], abs=1e-5)
    zero = retrieval.search("a poodle", "job1", 0.0, k=5)      # α = 0: the original, on both sides
    assert [h["score"] for h in zero["right"]] == pytest.approx([h["score"] for h in zero["left"]])


def test_app_search_of_an_image_delta_job_keeps_the_original_query(tiny, tiny_world, tmp_path):
    from clipforget.data.gallery import Gallery
    gallery = Gallery.open(tiny_world)
    retrieval, _ = _retrieval_fixture(tiny, tmp_path, image_delta(tiny.model), gallery)
    out = retrieval.search("a poodle", "job1", 1.0, k=5)
    assert not out["text_edited"] and retrieval.grid("job1").text is None
    assert [h["score"] for h in out["right"]] == pytest.approx([h["score"] for h in out["left"]])
