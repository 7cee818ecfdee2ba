"""A tiny world for fast end-to-end tests: a folder gallery of a few embedded-gallery icons and the
tiny random ResNet CLIP registered in conftest (``test-tiny-rn``), saved as a checkpoint file. A
whole forget job on it takes seconds, so the robustness tests run real jobs through every stage."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

# superclass -> subgroups; "fish" has a single subgroup: forgetting it leaves nothing to retain
TINY_HIERARCHY = {"dog": ["poodle", "dog", "dog-face"], "cat": ["cat", "cat-face"],
                  "car": ["taxi", "police-car"], "fish": ["shark"]}
TINY_STYLES = ("noto", "twemoji", "openmoji")    # three files a subgroup: 1 example, 1 calibration, 1 test
ONLY_STYLE = {"cat-face": "noto"}         # cat face has no twemoji image here: an empty forget set
TINY_OTHER = ("1st-place-medal", "anchor", "umbrella")
TINY_MODEL = "test-tiny-rn"

# every stage of "ours" runs, each for a step or two
TINY_CONFIG = {"forget": {"fisher_samples": 4, "batch_size": 8, "target_accuracy": None,
                          "loop": {"steps": 1, "lr": 1e-3}},
               "remind": {"batch_size": 8, "align": {"steps": 1}, "loop": {"steps": 1}},
               "restore": {"grid_points": 2}}
TINY_SPLIT = {"train_views": 1, "forget_views": 1, "calib_views": 1, "calib_target_views": 1, "test_views": 1,
              "calib_other_images": 4, "calib_concept_images": 3, "max_other_images": 4,
              "test_images": 1, "calib_images": 1}


def make_tiny_gallery(src_root: Path, dest: Path) -> Path:
    """Copy a few icons of the embedded gallery into ``dest/superclass/subgroup/style/0.png``."""
    for sc, subgroups in TINY_HIERARCHY.items():
        for sg in subgroups:
            for style in TINY_STYLES:
                if ONLY_STYLE.get(sg, style) != style:
                    continue
                (dest / sc / sg / style).mkdir(parents=True, exist_ok=True)
                shutil.copy(src_root / "images" / style / f"{sg}.png", dest / sc / sg / style / "0.png")
    for concept in TINY_OTHER:
        (dest / "_other" / concept).mkdir(parents=True, exist_ok=True)
        shutil.copy(src_root / "images" / "noto" / f"{concept}.png", dest / "_other" / concept / "0.png")
    return dest


def recognising_checkpoint(gallery_dir: Path, out: Path, superclass: str, subgroup: str) -> Path:
    """A seeded random tiny model, saved as safetensors, that zero-shot classifies the request's
    test images as their superclass (a model that does not is refused: nothing to forget). A random
    model puts almost every image in one class, so a few seeds are tried."""
    import open_clip

    from clipforget.data.gallery import Gallery
    from clipforget.data.task import ForgetRequest, SplitConfig, ViewCache, build_task
    from clipforget.io import save_safetensors
    from clipforget.models import load_clip
    from clipforget.pipeline import Evaluator

    gallery = Gallery.open(gallery_dir)
    cache = ViewCache(gallery)
    for seed in range(64):
        torch.manual_seed(seed)
        model, _, _ = open_clip.create_model_and_transforms(TINY_MODEL)
        save_safetensors(model.state_dict(), out)
        bundle = load_clip(TINY_MODEL, str(out), device="cpu")
        task = build_task(gallery, ForgetRequest(superclass, subgroup), bundle.image_size,
                          SplitConfig(**TINY_SPLIT), cache)
        if Evaluator(bundle).before(task)["target"] > 0:
            return out
    raise RuntimeError(f"no seed in 0..63 gives a tiny model that recognises {subgroup} as {superclass}")


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def state_hash(model) -> str:
    """Every tensor of the state dict (weights and BatchNorm buffers), in key order."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def tree(root: Path) -> list[str]:
    """Every file and folder under ``root`` (hidden ones included), relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))
