"""An external evaluator: clip-benchmark scores a run's export on the report's columns.

    python bench/external_eval.py runs/poodle              # per column: report, clip-benchmark, difference
    python bench/external_eval.py runs/poodle --amp        # clip-benchmark's own default, autocast (CPU: bf16)
    python bench/external_eval.py runs/poodle --json out.json

What runs through clipforget and what through clip-benchmark (``pip install -r
requirements-external.txt``):

- **the model**: the run folder's ``export/`` is copied to a temporary folder and loaded from the
  copy by clip-benchmark's loader (``clip_benchmark.models.load_clip("open_clip", "local-dir:COPY")``,
  i.e. plain open_clip), with the export's own preprocessing and tokenizer. clipforget's model
  code is not used.
- **the images**: each column's held-out test images, rebuilt from the run's request, split
  (``run.json``'s ``split``) and gallery by ``clipforget.data.task.build_task`` — deterministic and
  seeded, the same pixels the report scored — written as lossless PNG files into one
  ImageFolder per column (a folder per class), and read back through the export's preprocessing.
- **the labels and prompts**: the column's classes (superclasses, or other concepts) with the
  report's prompt ensemble (``clipforget.data.prompts.class_prompts``: "a dog", "a picture of a
  dog", with "an" before a vowel), handed to clip-benchmark as class-specific prompts.
- **the accuracy**: clip-benchmark's ``zeroshot_classification.zero_shot_classifier`` (the class
  embeddings: each prompt's normalised text embedding, averaged, normalised) and
  ``run_classification`` (the images' normalised embeddings against them) — the two steps of its
  ``evaluate`` —, then top-1 accuracy, the argmax of those logits against the labels. (``evaluate``
  itself stops in its ``accuracy`` under numpy 2: clip-benchmark 1.6.2 calls ``float()`` on a
  one-element array.)

Like for like: the report runs in float32, so ``amp`` is off unless ``--amp`` asks for
clip-benchmark's default (autocast: bfloat16 on the CPU), which moves near-ties.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:      # bench/ runs as scripts: import this checkout's clipforget
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")    # clip-benchmark's progress bars


def column_folder(column, root: Path) -> Path:
    """A column's views as PNG files in an ImageFolder layout: ``root/<class index>/<i>.png``, one
    folder per class of the column (empty ones too, so folder order is class order)."""
    from PIL import Image
    width = len(str(len(column.classes)))
    for k in range(len(column.classes)):
        (root / f"{k:0{width}d}").mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(column.views.images, column.labels.tolist())):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / f"{label:0{width}d}" / f"{i:06d}.png")
    return root


def hub_cache_from_export(export: Path, root: Path) -> Path | None:
    """Plain open_clip reads a Hugging Face text tower's config.json by its hub id (the weights come
    from the export): offline, a hub cache holding the export's own copy of that file."""
    cfg = json.loads((export / "open_clip_config.json").read_text())["model_cfg"].get("text_cfg", {})
    repo = cfg.get("hf_model_name")
    if not repo or not (export / "config.json").is_file():
        return None
    rev = "0" * 40
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(rev)
    (folder / "snapshots" / rev).mkdir(parents=True, exist_ok=True)
    shutil.copy(export / "config.json", folder / "snapshots" / rev / "config.json")
    return root


def run_columns(run_dir: Path, gallery=None) -> tuple[dict, dict]:
    """The run's report and its columns' test images ({name: Column}: ``columns`` then
    ``trained_on``), rebuilt from run.json's request and split on ``gallery`` (default: the
    embedded one; its hash must be the run's)."""
    from clipforget.data.gallery import Gallery
    from clipforget.data.task import ForgetRequest, SplitConfig, build_task
    from clipforget.runfolder import EXPORT, RUN_JSON, read_report
    report = read_report(run_dir)
    rec = json.loads((run_dir / RUN_JSON).read_text())
    if rec.get("split") is None:
        raise ValueError(f"{run_dir}/run.json records no split (written before it did): its test images "
                         "cannot be rebuilt for sure; re-run the forget command")
    gallery = gallery if gallery is not None else Gallery.embedded()
    if rec.get("gallery_hash") and gallery.content_hash != rec["gallery_hash"]:
        raise ValueError(f"the gallery {gallery.name} is not the run's (hash {gallery.content_hash} != "
                         f"{rec['gallery_hash']}): pass the run's gallery")
    model_cfg = json.loads((run_dir / EXPORT / "open_clip_config.json").read_text())["model_cfg"]
    size = model_cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    task = build_task(gallery, ForgetRequest.from_dict(rec["request"]), size, SplitConfig(**rec["split"]))
    columns = {**task.test, **task.trained}
    wanted = [*report["columns"], *report.get("trained_on", {})]
    if set(wanted) != set(columns):
        raise ValueError(f"rebuilt columns {sorted(columns)} are not the report's {sorted(wanted)}")
    return report, {n: columns[n] for n in wanted}


def external_eval(run_dir: str | Path, gallery=None, amp: bool = False, batch_size: int = 64,
                  device: str | None = None, hub_cache: str | Path | None = None,
                  templates: list[str] | None = None, only: tuple[str, ...] | None = None) -> dict:
    """{column: {report, clip_benchmark, difference, images, report_images, images_apart}} for the
    run's export. ``hub_cache``: a Hugging Face hub cache for a HF text tower's config.json (see
    :func:`hub_cache_from_export`); None: the environment's. ``templates``: None, the report's
    prompts; else clip-benchmark's generic templates ("a photo of a {c}.") filled with the classes'
    display names — not like for like, a control that shows the comparison notices other prompts.
    ``only``: these columns alone."""
    import torch
    from clip_benchmark.metrics import zeroshot_classification
    from clip_benchmark.models import load_clip
    from torchvision.datasets import ImageFolder

    from clipforget.data.gallery import display
    from clipforget.data.prompts import class_prompts
    from clipforget.runfolder import EXPORT
    run_dir = Path(run_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    report, columns = run_columns(run_dir, gallery)
    if only is not None and set(only) - set(columns):
        raise ValueError(f"no column {sorted(set(only) - set(columns))} in this run; it has {sorted(columns)}")
    after = {**report["columns"], **report.get("trained_on", {})}
    out = {}
    with tempfile.TemporaryDirectory(prefix="clipforget-external-") as tmp:
        tmp = Path(tmp)
        copy = shutil.copytree(run_dir / EXPORT, tmp / "model")       # loaded from the copy only
        if hub_cache is not None:
            import huggingface_hub.constants
            huggingface_hub.constants.HF_HUB_CACHE = str(hub_cache)
        model, transform, tokenizer = load_clip(model_type="open_clip", model_name=f"local-dir:{copy}",
                                                pretrained=None, cache_dir=None, device=device)
        model.eval()
        classifiers = {}
        for name, col in columns.items():
            if only is not None and name not in only:
                continue
            ds = ImageFolder(str(column_folder(col, tmp / "data" / name)), transform=transform, allow_empty=True)
            assert [int(c) for c in ds.classes] == list(range(len(col.classes)))
            ds.classes = list(col.classes)
            if templates is None:           # the report's prompts, per class (clip-benchmark's dict form)
                prompts = dict(zip(col.classes, class_prompts(col.classes)))
            else:
                prompts = {c: [t.format(c=display(c)) for t in templates] for c in col.classes}
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
            # evaluate()'s two steps; its accuracy() then fails under numpy 2 (float() of a 1-element array).
            # The class embeddings once per class list: five columns share the 26 superclasses, and
            # zero_shot_classifier encodes one class's prompts per forward pass
            key = (tuple(ds.classes), json.dumps(prompts, sort_keys=True))
            if key not in classifiers:
                classifiers[key] = zeroshot_classification.zero_shot_classifier(model, tokenizer, ds.classes,
                                                                                prompts, device, amp=amp)
            classifier = classifiers[key]
            logits, target = zeroshot_classification.run_classification(model, classifier, loader, device, amp=amp)
            n = len(ds)
            ours, theirs = after[name]["after"], float((logits.argmax(1) == target).float().mean())
            out[name] = {"report": ours, "clip_benchmark": theirs, "difference": theirs - ours, "images": n,
                         "report_images": after[name]["images"],
                         "images_apart": round(abs(theirs - ours) * n)}
    return out


def table(results: dict) -> str:
    lines = [f"{'column':20s} {'images':>6s} {'report':>8s} {'clip-bench':>10s} {'difference':>10s} {'images apart':>12s}"]
    for name, r in results.items():
        lines.append(f"{name:20s} {r['images']:6d} {r['report']:8.4f} {r['clip_benchmark']:10.4f} "
                     f"{r['difference']:+10.4f} {r['images_apart']:12d}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a run folder written by `clipforget forget --out` (with export/)")
    p.add_argument("--gallery", default=None, help="the run's gallery (default: the embedded one)")
    p.add_argument("--amp", action="store_true", help="clip-benchmark's autocast (its CLI default; not like for like)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--use-hub", action="store_true",
                   help="read a Hugging Face text tower's config.json from the hub or the environment's cache "
                        "(default: a temporary hub cache holding the export's own config.json)")
    p.add_argument("--templates", default=None,
                   help="'|'-separated clip-benchmark templates instead of the report's prompts, e.g. "
                        "'a photo of a {c}.' (a control: not like for like)")
    p.add_argument("--columns", default=None,
                   help="comma-separated columns to score, e.g. 'target,retain,forget_examples' "
                        "(default: every column; other_concepts' hundreds of classes take most of the time)")
    p.add_argument("--json", default=None, help="write the figures here too")
    args = p.parse_args(argv)
    from clipforget.data.gallery import Gallery
    gallery = Gallery.open(args.gallery)
    run_dir = Path(args.run_dir)
    with tempfile.TemporaryDirectory(prefix="clipforget-hub-") as hub:
        cache = None if args.use_hub else hub_cache_from_export(run_dir / "export", Path(hub))
        results = external_eval(run_dir, gallery, amp=args.amp, batch_size=args.batch_size,
                                device=args.device, hub_cache=cache,
                                templates=args.templates.split("|") if args.templates else None,
                                only=tuple(args.columns.split(",")) if args.columns else None)
    print(f"{run_dir}: the report's accuracy after unlearning vs clip-benchmark's zero-shot accuracy of the "
          f"copied export (amp {'on' if args.amp else 'off'}; prompts: "
          f"{args.templates or 'the report' + chr(39) + 's'})")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
