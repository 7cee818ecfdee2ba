"""An export is self-contained: copied to another folder (the original gone), plain open_clip loads
its model and its tokenizer from the copy, from another working directory, and they give the
project's own loader's features."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from conftest import fill_hub_cache
from PIL import Image

from clipforget.app import zip_export
from clipforget.models import MINILM_HUB_ID, export_open_clip, load_clip

TEXTS = ["a photo of a poodle", "line art of a Taxi, café au lait!"]

# Plain open_clip only (no clipforget import), run in a fresh process elsewhere.
PLAIN = r"""
import sys, numpy as np, open_clip, torch
from PIL import Image
texts, out = sys.argv[1].split("|"), {}
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8))
for d in sys.argv[3:]:
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{d}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{d}")
    model.eval()
    tokens = tokenizer(texts)
    with torch.no_grad():
        out[d] = {"tokens": tokens, "image": model.encode_image(preprocess(image)[None]),
                  "text": model.encode_text(tokens)}
torch.save(out, sys.argv[2])
"""


def _image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8))


def _features(bundle, model=None):
    model = model or bundle.model
    tokens = bundle.tokenizer(TEXTS)
    with torch.no_grad():
        return {"tokens": tokens, "image": model.encode_image(bundle.preprocess(_image())[None]),
                "text": model.encode_text(tokens)}


def _edited(bundle) -> dict[str, torch.Tensor]:
    """The bundle's weights with both towers changed, as an unlearned model's are: the text tower of
    a copied export must come from the export, not from the hub or an installed package."""
    g = torch.Generator().manual_seed(0)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.dim() > 1 else v
            for k, v in bundle.model.state_dict().items()}


def _moved(export: Path, to: Path) -> Path:
    """The export copied to ``to`` and the original deleted: nothing can point back at it."""
    shutil.copytree(export, to)
    shutil.rmtree(export)
    return to


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def _assert_portable(folder: Path, tmp: Path):
    for f in folder.glob("*.json"):
        for s in _strings(json.loads(f.read_text())):
            assert not os.path.isabs(s) and "site-packages" not in s and str(tmp) not in s, (f.name, s)


def _plain_open_clip(folders: list[Path], tmp: Path, hub_cache: Path) -> dict:
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_CACHE=str(hub_cache))
    out = tmp / "plain.pt"
    proc = subprocess.run([sys.executable, "-c", PLAIN, "|".join(TEXTS), str(out), *map(str, folders)],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {Path(k): v for k, v in torch.load(out).items()}


def _assert_same(got: dict, want: dict, atol=1e-5):
    assert torch.equal(got["tokens"], want["tokens"])
    for k in ("image", "text"):       # to 1e-5: the project's image tower runs channels-last
        assert torch.allclose(got[k], want[k], atol=atol), (k, (got[k] - want[k]).abs().max())


def test_copied_export_and_app_zip_load_in_plain_open_clip(bundle, tmp_path):
    edited = _edited(bundle)
    reference = open_clip.create_model_and_transforms(bundle.arch)[0].eval()    # the edited model, built here
    reference.load_state_dict(edited)
    want = _features(bundle, reference)

    emb = _moved(export_open_clip(bundle, edited, tmp_path / "a" / "export"), tmp_path / "copy" / "export")
    assert {"open_clip_config.json", "open_clip_model.safetensors", "config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in emb.iterdir()}
    _assert_portable(emb, tmp_path)
    text_cfg = json.loads((emb / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == MINILM_HUB_ID

    zip_export(emb, tmp_path / "model.zip")
    with zipfile.ZipFile(tmp_path / "model.zip") as z:
        assert all(n.startswith("export/") for n in z.namelist())
        z.extractall(tmp_path / "unzipped")
    unzipped = tmp_path / "unzipped" / "export"

    tiny = load_clip("test-tiny-rn", device="cpu")       # open_clip's own text tower and tokenizer
    tiny_export = _moved(export_open_clip(tiny, tiny.model.state_dict(), tmp_path / "b" / "tiny"),
                         tmp_path / "copy" / "tiny")
    _assert_portable(tiny_export, tmp_path)

    # plain open_clip names the text tower by its hub id and reads its config.json from the hub or
    # the local Hugging Face cache: a cache as on a machine that has read it once (no network here)
    cache = fill_hub_cache(tmp_path / "hf", MINILM_HUB_ID, [emb / "config.json"])
    plain = _plain_open_clip([emb, unzipped, tiny_export], tmp_path, cache)
    _assert_same(plain[emb], want)
    _assert_same(plain[unzipped], want)
    _assert_same(plain[tiny_export], _features(tiny))

    # the project's loader reads the copy without any hub cache, and agrees
    ours = load_clip(f"local-dir:{emb}", device="cpu")
    _assert_same(_features(ours), want)
    assert ours.image_size == bundle.image_size and ours.mean == bundle.mean
