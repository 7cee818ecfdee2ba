"""The retrieval path without the app, on the embedded model and gallery: model load, gallery load,
gallery encode throughput, FAISS index build, text-embedding and search latency.

    python bench/bench_core.py [--device cpu]
Prints one line per figure and a JSON line at the end.
"""
from __future__ import annotations

import argparse
import statistics
import time

import common  # puts this checkout first on sys.path; print_figures


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--queries", type=int, default=30, help="distinct text queries to time")
    args = ap.parse_args(argv)
    from clipforget import index as fx
    from clipforget.data.gallery import Gallery
    from clipforget.data.gallery import display
    from clipforget.embed import encode_images, encode_texts
    from clipforget.models import load_clip

    figures: dict = {"machine_before": common.machine_load()}
    t0 = time.perf_counter()
    bundle = load_clip("embedded", device=args.device)
    figures["model_load_s"] = time.perf_counter() - t0
    gallery = Gallery.embedded()
    t0 = time.perf_counter()
    images, _ = gallery.load(gallery.items, bundle.image_size)
    figures["gallery_load_s"] = time.perf_counter() - t0
    encode_images(bundle, images[:64])                               # warm-up
    t0 = time.perf_counter()
    emb = encode_images(bundle, images)
    dt = time.perf_counter() - t0
    figures["gallery_images"] = len(images)
    figures["gallery_encode_images_per_s"] = len(images) / dt
    t0 = time.perf_counter()
    index = fx.build(emb)
    figures["index_build_s"] = time.perf_counter() - t0

    queries = [f"a {display(s)}" for s in sorted({it.subgroup for it in gallery.items if it.subgroup})][:args.queries]
    text_ms, search_ms = [], []
    for q in queries:
        t0 = time.perf_counter()
        e = encode_texts(bundle, [q])
        text_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        fx.search(index, e, 12)
        search_ms.append((time.perf_counter() - t0) * 1000)
    figures["text_embed_ms_p50"] = statistics.median(text_ms)
    figures["faiss_search_ms_p50"] = statistics.median(search_ms)
    figures["search_ms_p50"] = statistics.median(a + b for a, b in zip(text_ms, search_ms))
    figures["machine_after"] = common.machine_load()
    return common.print_figures(figures, digits=3)


if __name__ == "__main__":
    main()
