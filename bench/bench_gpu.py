"""A real-size CLIP on a GPU: the app's forget job (forget, evaluate, α-grid, save) with a randomly
initialised RN50 at 224 px on ~1,300 forget images, and gallery-encode throughput of clipforget's
``encode_images`` against plain open_clip encoding in the same run (our overhead should be ≤ 10 %).

    python bench/bench_gpu.py                  # needs a CUDA GPU; without one it says so and skips
    python bench/bench_gpu.py --arch RN50 --forget-images 1300 --device cuda

The gallery is synthetic (random shapes on random backgrounds, a folder gallery written to a
temporary directory): the forget subgroup ``target`` with two siblings in one superclass, and two
other superclasses. Random weights make the accuracies meaningless; the seconds are the
point. The tests run :func:`run` at tiny scale on the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common  # puts this checkout first on sys.path; print_figures
from clipforget.index import DEFAULT_ALPHA_POINTS  # noqa: E402

FAST_SPLIT = {"train_views": 1, "calib_views": 1, "calib_target_views": 1, "test_views": 1}


SUPERCLASSES = ("shape", "plant", "animal")


def synthetic_gallery(root: Path, forget_images: int, size: int, names: tuple[str, ...] = SUPERCLASSES,
                      seed: int = 0):
    """A folder gallery: ``forget_images`` images in ``names[0]/target``, half as many in each of
    two siblings, and an eighth in each of two subgroups of ``names[1]`` and ``names[2]``."""
    import numpy as np
    from PIL import Image, ImageDraw

    from clipforget.data.gallery import Gallery

    n_other = max(2, forget_images // 8)
    layout = {names[0]: {"target": forget_images, "sibling-a": max(2, forget_images // 2),
                         "sibling-b": max(2, forget_images // 2)},
              names[1]: {"tree": n_other, "bush": n_other}, names[2]: {"fish": n_other, "bird": n_other}}
    rng = np.random.default_rng(seed)
    for k, (sc, subs) in enumerate(layout.items()):
        for j, (sg, n) in enumerate(subs.items()):
            folder = root / sc / sg
            folder.mkdir(parents=True, exist_ok=True)
            hue = np.array([(k * 97 + j * 41) % 256, (k * 53 + j * 151) % 256, (k * 199 + j * 23) % 256])
            for i in range(n):
                bg = tuple(int(c) for c in rng.integers(0, 256, 3))
                img = Image.new("RGB", (size, size), bg)
                draw = ImageDraw.Draw(img)
                for _ in range(3):
                    x0, y0 = rng.integers(0, size // 2, 2)
                    w, h = rng.integers(max(1, size // 8), max(2, size // 2), 2)
                    color = tuple(int(c) for c in np.clip(hue + rng.integers(-40, 41, 3), 0, 255))
                    (draw.ellipse if (j + i) % 2 else draw.rectangle)([int(x0), int(y0), int(x0 + w), int(y0 + h)],
                                                                      fill=color)
                img.save(folder / f"{i:05d}.png")
    return Gallery.from_folder(root)


def name_the_forget_superclass(bundle, images, names: tuple[str, ...] = SUPERCLASSES) -> tuple[str, ...]:
    """``names`` reordered so that the first is the class a (random) model predicts most for
    ``images``: the target column then starts above 0 and the job has a Score to report (a random
    model recognises nothing; the seconds, not the accuracies, are what this bench measures)."""
    from clipforget.data.prompts import class_prompts
    from clipforget.embed import class_embeddings, encode_images

    pred = (encode_images(bundle, images) @ class_embeddings(bundle, class_prompts(list(names))).T).argmax(1)
    first = int(pred.bincount(minlength=len(names)).argmax())
    return (names[first],) + tuple(n for i, n in enumerate(names) if i != first)


def plain_open_clip_encode(model, images, mean, std, device, batch_size: int):
    """What a plain open_clip user writes: normalise, ``encode_image(normalize=True)``, to the CPU."""
    import torch
    mean_t = torch.tensor(mean, device=device)[:, None, None]
    std_t = torch.tensor(std, device=device)[:, None, None]
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = (images[i:i + batch_size].to(device).float() / 255.0 - mean_t) / std_t
            out.append(model.encode_image(x, normalize=True).float().cpu())
    return torch.cat(out)


def encode_comparison(bundle, images, batch_size: int = 256, repeats: int = 3) -> dict:
    """images/s of ``encode_images`` and of plain open_clip on the same images, alternated and
    repeated (median), after one warm-up each; the embeddings must agree."""
    import torch

    from clipforget.embed import encode_images

    def timed(fn):
        if bundle.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if bundle.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    ours = lambda: encode_images(bundle, images, batch_size=batch_size)  # noqa: E731
    plain = lambda: plain_open_clip_encode(bundle.model, images, bundle.mean, bundle.std,  # noqa: E731
                                           bundle.device, batch_size)
    ours(), plain()
    t_ours, t_plain = [], []
    for _ in range(repeats):
        t, a = timed(ours)
        t_ours.append(t)
        t, b = timed(plain)
        t_plain.append(t)
    diff = float((a - b).abs().max())
    if diff > 1e-3:
        raise AssertionError(f"encode_images and plain open_clip disagree by {diff:.2e}")
    ours_s, plain_s = statistics.median(t_ours), statistics.median(t_plain)
    return {"encode_images_per_s": len(images) / ours_s, "plain_open_clip_images_per_s": len(images) / plain_s,
            "encode_overhead_pct": 100 * (ours_s / plain_s - 1), "encode_max_abs_diff": diff}


def run(arch: str = "RN50", forget_images: int = 1300, device: str = "cuda", config: dict | None = None,
        split: dict | None = None, alpha_points: int = DEFAULT_ALPHA_POINTS, workdir: str | Path | None = None,
        encode_batch: int = 256, repeats: int = 3) -> dict:
    """The app's job (``ForgetWork``) on a randomly initialised ``arch`` and a synthetic gallery,
    then the encode comparison. Returns the figures."""
    import torch

    from clipforget.data.task import ViewCache
    from clipforget.embed import encode_images
    from clipforget.jobs import Job
    from clipforget.work import ForgetWork, Resources
    from clipforget.models import load_clip

    work = Path(workdir or tempfile.mkdtemp(prefix="clipforget-gpu-"))
    t0 = time.perf_counter()
    bundle = load_clip(arch, None, device=device)          # no pretrained weights: random init
    figures: dict = {"arch": arch, "image_size": bundle.image_size, "device": str(bundle.device),
                     "model_load_s": time.perf_counter() - t0}
    if bundle.device.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(bundle.device)
    t0 = time.perf_counter()
    probe = synthetic_gallery(work / "probe", min(forget_images, 64), bundle.image_size)
    names = name_the_forget_superclass(bundle, probe.load(probe.select(subgroup="target"), bundle.image_size)[0])
    gallery = synthetic_gallery(work / "gallery", forget_images, bundle.image_size, names)
    images, _ = gallery.load(gallery.items, bundle.image_size)
    figures.update(gallery_images=len(gallery), forget_images=forget_images,
                   gallery_make_s=time.perf_counter() - t0)
    original = encode_images(bundle, images, batch_size=encode_batch)
    resources = Resources(bundle, gallery, ViewCache(gallery, source_size=bundle.image_size), images, original)
    job = Job("0" * 32, f"target ({names[0]})", {"request": {"superclass": names[0], "subgroup": "target"},
                                            "method": "ours", "config": config, "split": split or FAST_SPLIT})
    stages: list[str] = []
    t0 = time.perf_counter()
    ready = ForgetWork(lambda: resources, alpha_points)(
        job, lambda e: stages.append(e["stage"]) if not stages or stages[-1] != e["stage"] else None,
        work / "job")
    figures["job_to_results_s"] = time.perf_counter() - t0        # what the app shows its grids after
    more = ready.run_rest()                        # then the evaluation (it adds to ready.summary) and the α-grid
    summary = {**ready.summary, **more}
    figures["job_s"] = time.perf_counter() - t0
    figures["job_stage_seconds"] = {k: round(v, 2) for k, v in summary["stage_seconds"].items()}
    figures.update(alpha_grid_points=summary["alpha_grid_points"], alpha_grid_s=summary["alpha_grid_seconds"],
                   stages=stages)
    figures.update(encode_comparison(bundle, images, encode_batch, repeats))
    return figures


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="RN50")
    ap.add_argument("--forget-images", type=int, default=1300)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--alpha-points", type=int, default=DEFAULT_ALPHA_POINTS)
    args = ap.parse_args(argv)
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        figures = {"skipped": "no CUDA GPU on this machine (torch.cuda.is_available() is False); "
                              "run on a GPU machine, or pass --device cpu for a (slow) CPU run"}
    else:
        figures = run(args.arch, args.forget_images, args.device, alpha_points=args.alpha_points)
    return common.print_figures(figures)


if __name__ == "__main__":
    main()
