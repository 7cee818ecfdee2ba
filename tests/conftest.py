"""Shared fixtures. Tests run on the CPU, offline; tiny open_clip configs are registered here."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_RN = {  # a BatchNorm ResNet CLIP small enough to build in milliseconds
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session", autouse=True)
def tiny_configs():
    from clipforget.models import register_model_config
    register_model_config("test-tiny-rn", TINY_RN)
    register_model_config("test-tiny-vit", TINY_VIT)


@pytest.fixture(scope="session")
def gallery():
    from clipforget.data.gallery import Gallery
    return Gallery.embedded()


@pytest.fixture(scope="session")
def bundle():
    from clipforget.models import load_clip
    return load_clip("embedded", device="cpu")


@pytest.fixture(scope="session")
def view_cache(gallery):
    from clipforget.data.task import ViewCache
    return ViewCache(gallery)


@pytest.fixture(scope="session")
def poodle_task(bundle, gallery, view_cache):
    from clipforget.data.task import ForgetRequest, build_task
    return build_task(gallery, ForgetRequest("dog", "poodle"), bundle.image_size, cache=view_cache)


# ---- the tiny world (tests/tinyworld.py): real jobs in seconds ------------------------------------

@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, tiny_configs):
    """A folder gallery of 15 icons in 4 superclasses (fish/shark alone: nothing to retain)."""
    from clipforget.data.gallery import default_gallery_dir
    from tinyworld import make_tiny_gallery
    return make_tiny_gallery(default_gallery_dir(), tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_world, tmp_path_factory):
    """A tiny-model checkpoint file that recognises dog/poodle."""
    from tinyworld import recognising_checkpoint
    return recognising_checkpoint(tiny_world, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors",
                                  "dog", "poodle")
