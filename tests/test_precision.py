"""Precision is an argument: bf16 unlearns end to end (the embedded model's Hugging Face text tower
included); fp16 serves inference and refuses to train with advice, instead of turning the weights
to inf at the first step."""
import pytest
import torch

from clipforget.data.request import ForgetRequest, SplitConfig
from clipforget.models import load_clip
from clipforget.pipeline import unlearn
from clipforget.presets import preset_config, preset_split
from clipforget.train.loop import LoopConfig, optimize

QUICK = preset_config("quick", "ours", {"remind": {"loop": {"steps": 4}}, "forget": {"loop": {"steps": 4}}})


@pytest.fixture(scope="module")
def bf16_bundle():
    return load_clip("embedded", device="cpu", precision="bf16")


def test_bf16_embedded_model_encodes_texts_and_images(bf16_bundle, bundle):
    from clipforget.embed import encode_images, encode_texts
    text = bf16_bundle.model.text
    assert {p.dtype for p in text.parameters()} == {torch.bfloat16}     # the whole HF tower, LayerNorms too
    a, b = encode_texts(bf16_bundle, ["a poodle"]), encode_texts(bundle, ["a poodle"])
    assert float((a * b).sum()) > 0.99                                  # the same embedding, to bf16's precision
    imgs = torch.randint(0, 255, (2, 3, bundle.image_size, bundle.image_size), dtype=torch.uint8)
    assert float((encode_images(bf16_bundle, imgs) * encode_images(bundle, imgs)).sum(-1).min()) > 0.98


def test_ours_unlearns_in_bf16(bf16_bundle, gallery, view_cache):
    made = unlearn(bf16_bundle, ForgetRequest("dog", "poodle"), "ours", QUICK, gallery=gallery,
                   split=SplitConfig(**preset_split("quick", {})), cache=view_cache)
    delta = made.result.delta
    assert delta and all(bool(torch.isfinite(v).all()) for v in delta.values())
    assert {"stand-ins", "forget", "remind", "restore"} <= set(made.result.seconds)


def test_fp16_refuses_to_train_with_advice(gallery, view_cache):
    fp16 = load_clip("embedded", device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="--precision bf16"):
        unlearn(fp16, ForgetRequest("dog", "poodle"), "ours", QUICK, gallery=gallery,
                split=SplitConfig(**preset_split("quick", {})), cache=view_cache)
    w = torch.zeros(3, dtype=torch.float16, requires_grad=True)       # the shared loop itself refuses too
    with pytest.raises(ValueError, match="bf16"):
        optimize([w], lambda step: (w.float() - 1).pow(2).sum(), LoopConfig(steps=1))
