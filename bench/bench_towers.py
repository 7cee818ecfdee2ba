"""Real open_clip towers at their real input size: a whole run of ours with the ``quick`` preset
(clipforget/presets.py) and its seconds per stage, then the gallery encode at several gallery sizes
(what the app's index and each α-grid point cost as a gallery grows).

The weights are random (this machine has no model hub): each tower is built by open_clip, saved as a
local safetensors checkpoint and loaded back through ``load_clip``'s local-checkpoint path — the one
a user's own RN50 file takes. Untrained weights recognise nothing, so the run skips the "nothing to
forget" check (``forget(check=False)``): the figures say what the stages cost, not what they forget.

    python bench/bench_towers.py                               # RN50 and ViT-B-32 on the CPU
    python bench/bench_towers.py --towers RN50,RN101,ViT-B-32 --sizes 1000,4000,16000 --device cuda
Prints the stage lines of each run as it goes, one line per figure, and a JSON line at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import common  # puts this checkout first on sys.path; print_figures


def run_tower(arch: str, args, gallery, folder: Path) -> dict:
    import open_clip
    import torch
    from safetensors.torch import save_file

    from clipforget.data.request import ForgetRequest, SplitConfig
    from clipforget.methods.base import config_from_dict, get_method
    from clipforget.models import load_clip
    from clipforget.pipeline import forget
    from clipforget.presets import preset_config, preset_split
    from clipforget.train.events import LogProgress

    torch.manual_seed(0)
    weights = folder / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.create_model(arch).state_dict().items()}, str(weights))
    fig: dict = {}
    t0 = time.perf_counter()
    bundle = load_clip(arch, str(weights), device=args.device, precision=args.precision)
    fig["load_s"] = time.perf_counter() - t0
    fig["image_size"] = bundle.image_size
    config = config_from_dict(get_method("ours").Config, preset_config("quick", "ours", {}))
    t0 = time.perf_counter()
    run = forget(bundle, ForgetRequest(*args.request.split("/")), "ours", config, gallery,
                 config_from_dict(SplitConfig, preset_split("quick", {})), callbacks=[LogProgress(logging.getLogger(arch))],
                 check=False)
    fig["run_s"] = time.perf_counter() - t0
    fig["stage_s"] = {k: round(v, 1) for k, v in run.report["seconds"].items() if k != "total"}
    fig["images_per_column"] = {k: c["images"] for k, c in run.report["columns"].items()}
    del run
    fig["gallery_encode"] = [encode_size(bundle, gallery, n) for n in args.sizes]
    return fig


def encode_size(bundle, gallery, n: int, chunk: int = 512) -> dict:
    """Decode ``n`` gallery images at the tower's size (cycling through the gallery beyond its
    size), encode them and build the FAISS index, a chunk at a time (no n-image pixel tensor)."""
    import torch

    from clipforget import index as fx
    from clipforget.embed import encode_images
    items = [gallery.items[i % len(gallery.items)] for i in range(n)]
    load = enc = 0.0
    out = []
    for i in range(0, n, chunk):
        t0 = time.perf_counter()
        images, _ = gallery.load(items[i:i + chunk], bundle.image_size)
        t1 = time.perf_counter()
        out.append(encode_images(bundle, images))
        load, enc = load + t1 - t0, enc + time.perf_counter() - t1
    t0 = time.perf_counter()
    fx.build(torch.cat(out))
    return {"images": n, "decode_s": round(load, 1), "encode_s": round(enc, 1),
            "index_s": round(time.perf_counter() - t0, 3), "images_per_s": round(n / enc, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--towers", default="RN50,ViT-B-32", help="comma-separated open_clip architectures")
    ap.add_argument("--request", default="dog/poodle", help="SUPERCLASS/SUBGROUP of the embedded gallery")
    ap.add_argument("--sizes", default="1000,4000", help="gallery sizes to encode (comma-separated)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from clipforget.data.gallery import Gallery
    gallery = Gallery.embedded()
    figures: dict = {"machine_before": common.machine_load(), "device": args.device, "precision": args.precision,
                     "request": args.request, "preset": "quick"}
    with tempfile.TemporaryDirectory(prefix="clipforget-towers-") as tmp:
        for arch in args.towers.split(","):
            figures[arch] = run_tower(arch, args, gallery, Path(tmp))
            print(json.dumps({arch: figures[arch]}), flush=True)      # each tower's figures as soon as they exist
    figures["machine_after"] = common.machine_load()
    return common.print_figures(figures)


if __name__ == "__main__":
    main()
