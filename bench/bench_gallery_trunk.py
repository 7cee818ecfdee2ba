"""What the app's gallery trunk (clipforget.index.GalleryTrunk) saves: a job's first α point with
and without it, on the embedded model and the whole gallery, alternating; and what writing it
costs the app's one-time original encode.

    python bench/bench_gallery_trunk.py [--reps 2]
The delta is random on the layers a typical job edits (layer4 and the attention pool of the
embedded ResNet: poodle's run edits layer4.0.conv2/conv3 and attnpool.k_proj); its values do not
change the cost. Prints one line per figure and a JSON line at the end.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common  # puts this checkout first on sys.path; print_figures

EDITED = ("visual.layer4.0.conv2.weight", "visual.layer4.0.conv3.weight", "visual.attnpool.k_proj.weight")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions of each variant")
    args = ap.parse_args(argv)
    import torch
    from clipforget import index as fx
    from clipforget.data.gallery import Gallery
    from clipforget.embed import encode_images
    from clipforget.models import load_clip
    from clipforget.stages.forget import candidate_layers
    from clipforget.trunk import split_index

    figures: dict = {"machine_before": common.machine_load()}
    bundle, gallery = load_clip("embedded"), Gallery.embedded()
    images, _ = gallery.load(gallery.items, bundle.image_size)
    sd = bundle.model.state_dict()
    g = torch.Generator().manual_seed(0)
    delta = {k: 0.01 * torch.randn(sd[k].shape, generator=g) for k in EDITED}
    work = Path(tempfile.mkdtemp(prefix="clipforget-trunk-"))
    start = split_index(bundle.model.visual, candidate_layers(bundle.model.visual))
    t0 = time.perf_counter()
    original, trunk = fx.GalleryTrunk(work / "trunk.safetensors").encode(bundle, images, start)
    figures["original_encode_with_trunk_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = encode_images(bundle, images)
    figures["original_encode_plain_s"] = time.perf_counter() - t0
    figures["original_max_abs_diff"] = float((original - plain).abs().max())
    figures["gallery_images"], figures["trunk_file_mb"] = len(images), trunk.path.stat().st_size / 2**20
    times: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(args.reps):
        for name, given in (("without", None), ("with", trunk)):
            grid = fx.AlphaGrid(bundle, images, delta, spill=work / f".spill-{name}", original=plain,
                                gallery_trunk=given)
            t0 = time.perf_counter()
            grid.encode(0.6)
            times[name].append(time.perf_counter() - t0)
            grid.release()
    for name, ts in times.items():
        figures[f"first_point_{name}_gallery_trunk_s"] = statistics.median(ts)
    figures["machine_after"] = common.machine_load()
    return common.print_figures(figures)


if __name__ == "__main__":
    main()
