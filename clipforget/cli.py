"""Command line: ``clipforget <command>`` — argparse -> config dataclasses -> the library API."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from .train.events import LogProgress

log = logging.getLogger("clipforget")

# glibc's default malloc thresholds make CPU training steps erratic (0.9-2.8 s instead of 0.6 s)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded",
                   help="'embedded' (ResNet), 'embedded-vit', an open_clip architecture (RN50, ViT-B-32, ...) "
                        "or local-dir:PATH")
    p.add_argument("--pretrained", default=None,
                   help="pretrained tag (needs the hub) or a local checkpoint (.safetensors; .pt via weights-only load)")
    p.add_argument("--allow-pickle", action="store_true", help="allow full unpickling of a trusted .pt checkpoint")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--gallery", default=None,
                   help="embedded (default), an image folder root/superclass/subgroup[/style]/*, or a CSV manifest")


def _preset_arg(p: argparse.ArgumentParser) -> None:
    from .presets import PRESETS
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="; ".join(f"{n}: {q.summary}" for n, q in PRESETS.items()) +
                        " (--split / --config / --set change it field by field)")


def _bundle(args):
    from .models import load_clip
    return load_clip(args.model, args.pretrained, args.device, args.precision, allow_pickle=args.allow_pickle)


def _gallery(args):
    from .data.gallery import Gallery
    return Gallery.open(args.gallery)


def _config(method: str, args):
    """Method config: --preset's, then --config JSON (file or inline), then --set key.path=value."""
    from .methods.base import config_from_dict, get_method
    from .presets import preset_config
    try:
        return config_from_dict(get_method(method).Config, preset_config(getattr(args, "preset", None), method, _overrides(args)))
    except TypeError as e:       # e.g. --set forget.loop.lr=fast: a comparison with a string
        raise ValueError(f"{method} config: a value has the wrong type ({e}); check --set / --config "
                         "(numbers unquoted, true/false for switches)") from None


def _overrides(args) -> dict:
    """--config JSON (file or inline) with --set key.path=value applied, as a nested dict."""
    data = _json_arg(getattr(args, "config", None))
    for item in getattr(args, "set", None) or []:
        key, _, value = item.partition("=")
        if not _:
            raise ValueError(f"--set expects key=value, got {item!r}")
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        try:
            node[last] = json.loads(value)
        except json.JSONDecodeError:
            node[last] = value
    return data


def _json_arg(text: str | None, option: str = "--config") -> dict:
    """A JSON option: inline, or the name of a file holding it; empty: {}."""
    if not text:
        return {}
    is_file = Path(text).is_file()
    try:
        return json.loads(Path(text).read_text() if is_file else text)
    except json.JSONDecodeError as e:
        what = f"file {text}" if is_file else f"{text[:60]!r} (not a file either)"
        raise ValueError(f"{option}: {what} is not valid JSON ({e})") from None


def _split(text: str | None, preset: str | None = None):
    """--split: SplitConfig fields as JSON (inline or a file), over --preset's."""
    from .data.request import SplitConfig
    from .methods.base import config_from_dict
    from .presets import preset_split
    return config_from_dict(SplitConfig, preset_split(preset, _json_arg(text, "--split")))


def _examples(spec: str | None, gallery) -> tuple[str, ...] | None:
    """--forget-examples: comma-separated styles or image paths, or a folder of the gallery (its images)."""
    if not spec:
        return None
    folder = gallery.root / spec
    if folder.is_dir() and spec not in gallery.styles():
        prefix = str(folder.relative_to(gallery.root)).rstrip("/") + "/"
        return tuple(it.path for it in gallery.items if it.path.startswith(prefix))
    return tuple(s.strip() for s in spec.split(",") if s.strip())


def cmd_forget(args) -> int:
    from .data.task import ForgetRequest, resolve, split_forget
    from .io import check_out_dir, check_writable
    from .pipeline import Evaluator, forget
    from .presets import get_preset
    from .runfolder import inputs, save_run
    check_writable(args.out)                            # every check that is cheap comes before the model
    config = _config(args.method, args)
    gallery = _gallery(args)
    out = check_out_dir(args.out, inputs(args.model, args.pretrained, gallery))   # no input, no folder of yours
    retain = tuple(args.retain.split(",")) if args.retain else None
    request = ForgetRequest(args.superclass, args.subgroup, args.style, retain, _examples(args.forget_examples, gallery))
    split = _split(args.split, args.preset)
    split = dataclasses.replace(split, fold=args.fold) if args.fold is not None else split
    forget_items = resolve(gallery, request)[0]         # unknown names, empty forget set: fail in a second
    split_forget(forget_items, split, request.label, request.examples)     # too few images to hold some out
    bundle = _bundle(args)
    if args.preset and not get_preset(args.preset).suggest and not args.no_suggest:
        print(f"preset {args.preset}: the over-forgetting check is skipped (it encodes the whole gallery)")
    elif not args.no_suggest:
        _print_risks(bundle, gallery, request)
    evaluator = Evaluator(bundle)
    run = forget(bundle, request, args.method, config, gallery, split, callbacks=[LogProgress(log)], evaluator=evaluator)
    if args.alpha is not None:                           # the user's strength instead of the calibrated one
        run.result.alpha = args.alpha
        run.report = {**evaluator.report(run.task, run.result), "seconds": run.report["seconds"],
                      "seed": run.report.get("seed"), "alpha_source": "--alpha"}
    save_run(run, bundle, out, export=not args.no_export)
    r = run.report
    print(f"forget {request.label} with {args.method}: Score {r['score']:.1f}, alpha {r['alpha']:.2f}")
    for name, c in r["columns"].items():
        print(f"  {name:20s} before {c['before']:.3f}  after {c['after']:.3f}  (held out)")
    for name, c in r.get("trained_on", {}).items():
        print(f"  {name:20s} before {c['before']:.3f}  after {c['after']:.3f}  (trained on; not in the Score)")
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()))
    print(f"wrote {out}/report.json, report.md, delta.safetensors, run.json" + ("" if args.no_export else ", export/"))
    return 0


def _print_risks(bundle, gallery, request) -> None:
    """Before a run: the retain set it uses and the concepts likely to be over-forgotten."""
    from .data.task import resolve
    from .suggest import GalleryEmbeddings, default_cache_dir, suggest_for_request
    resolve(gallery, request)          # unknown names fail here, before the gallery is encoded
    emb = GalleryEmbeddings.compute(bundle, gallery, cache_dir=default_cache_dir())
    s = suggest_for_request(bundle, gallery, request, embeddings=emb)
    retain = list(request.retain) if request.retain is not None else s.retain
    print(f"retain set ({'yours' if request.retain is not None else s.retain_source}): {', '.join(retain) or 'none'}")
    for w in s.warnings:
        print(f"warning: {w}")
    sys.stdout.flush()


def cmd_suggest(args) -> int:
    from .data.task import ForgetRequest
    from .suggest import (GalleryEmbeddings, SuggestConfig, default_cache_dir, suggest_for_examples,
                          suggest_for_request)
    cfg = SuggestConfig(neighbours=args.neighbours, risk_ratio=args.risk_ratio)
    if bool(args.examples) == bool(args.superclass):
        raise ValueError("give either --superclass (with --subgroup and/or --style) for a gallery subgroup, or "
                         "--examples PATH... with --label for your own images")
    if args.examples and not args.label:
        raise ValueError("--examples needs --label, the coarse label of the images (e.g. --label dog)")
    bundle, gallery = _bundle(args), _gallery(args)
    emb = GalleryEmbeddings.compute(bundle, gallery, cache_dir=default_cache_dir())
    if args.examples:
        from .data.gallery import IMAGE_SUFFIXES
        paths = []
        for p in map(Path, args.examples):
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
        s = suggest_for_examples(bundle, gallery, paths, args.label, cfg, emb)
    else:
        s = suggest_for_request(bundle, gallery, ForgetRequest(args.superclass, args.subgroup, args.style), cfg, emb)
    print(json.dumps(s.to_dict(), indent=1) if args.json else s.text())
    return 0


def cmd_certify(args) -> int:
    from .certify import CertifyConfig, certify, markdown, save_certificate
    from .io import check_writable
    from .runfolder import CERTIFICATE_JSON, load_run_model, read_run
    cfg = CertifyConfig.from_dict(_overrides(args))
    run_dir = Path(args.run_dir)
    record = read_run(run_dir)
    check_writable(run_dir / CERTIFICATE_JSON)     # the certificate goes into the run folder
    bundle = _bundle(args) if args.model else load_run_model(record, args.device)
    gallery = _gallery(args) if args.gallery else _run_gallery(record)
    cert = certify(bundle, run_dir, gallery, cfg, alpha=args.alpha, callbacks=[LogProgress(log)])
    js, md = save_certificate(cert, run_dir)
    print(markdown(cert))
    print(f"wrote {js} and {md}")
    return 0


def _run_gallery(record):
    from .data.gallery import Gallery
    if record.gallery != "embedded":
        raise ValueError(f"run {record.path} was made on gallery {record.gallery!r}: pass it with --gallery")
    return Gallery.embedded()


def unit_interval(text: str) -> float:
    """argparse type of α: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (0 = original, 1 = fully unlearned), got {text}")
    return value


def cmd_eval(args) -> int:
    from .eval.embedded import evaluate_model, format_table
    bundle = _bundle(args)
    t0 = time.perf_counter()
    rows = evaluate_model(bundle, _gallery(args), views=args.views)
    print(format_table(rows))
    print(f"({time.perf_counter() - t0:.1f}s)")
    return 0


def cmd_build_gallery(args) -> int:
    from .data.build import build_gallery
    summary = build_gallery(Path(args.out), Path(args.icons) if args.icons else None, size=args.size)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_train_embedded(args) -> int:
    from .train.embedded import default_config, default_weights, train_embedded
    cfg = default_config(args.arch, seed=args.seed, **({"steps": args.steps} if args.steps else {}))
    out = Path(args.out) if args.out else default_weights(args.arch)
    res = train_embedded(cfg, out, callback=lambda r: print(
        f"step {r['step']}/{r['steps']}  loss {r['loss']:.4f}  {r['seconds']:.0f}s", flush=True))
    print(json.dumps(res, indent=1))
    return 0


def cmd_sweep(args) -> int:
    from .io import check_writable
    from .sweep import previous_rows, run_sweep, sweep_requests
    if args.resume and not args.out:          # every check that is cheap comes before the model
        raise ValueError("--resume needs --out (the folder of the sweep to continue)")
    if args.out:
        check_writable(args.out)
    split = _split(args.split, args.preset)
    if args.resume:                           # another method's or split's sweep, or an unreadable sweep.json
        previous_rows(args.out, args.method, split)
    config = _config(args.method, args)
    gallery = _gallery(args)
    reqs = sweep_requests(gallery, args.superclass, args.every, args.style, args.offset, args.subgroup)
    bundle = _bundle(args) if args.workers <= 1 else None
    print(f"sweep: {len(reqs)} requests with {args.method}", flush=True)

    from .sweep import ModelSpec, row_line
    spec = ModelSpec(args.model, args.pretrained, args.device, args.precision, args.allow_pickle)
    s = run_sweep(bundle if args.workers <= 1 else None, gallery, reqs, args.method, config, args.out,
                  lambda r: print(row_line(r), flush=True), workers=args.workers, model_spec=spec,
                  gallery_spec=args.gallery, resume=args.resume, folds=args.folds, split=split)
    if s["median_score"] is None:
        print(f"no request was scored ({len(s['skipped'])} skipped: see sweep.md or the log for why)")
        return 1
    print(f"median Score {s['median_score']:.1f}, min {s['min_score']:.1f}, held-out target <= chance in "
          f"{s['target_at_or_below_chance']}/{s['requests']}, median {s['median_seconds']:.1f}s per job"
          + (f"; {len(s['skipped'])} skipped (" + ", ".join(sorted({r['skip_reason'].replace('_', ' ')
                                                                   for r in s['skipped']})) + ")" if s["skipped"] else ""))
    return 0


def cmd_bench(args) -> int:
    from .benchmark import run_bench
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    split = _split(args.split)
    if args.folds < 1:
        raise ValueError(f"--folds must be >= 1, got {args.folds}")
    bundle, gallery, results = _bundle(args), _gallery(args), []
    for fold in range(args.folds):
        out = Path(args.out) / f"fold-{fold}" if args.folds > 1 else args.out
        result = run_bench(args.task, methods, bundle, gallery, out, _json_arg(args.config),
                           dataclasses.replace(split, fold=split.fold + fold) if args.folds > 1 else split,
                           resume=args.resume)
        results += result.values() if args.task == "all" else [result]
    bench_log = logging.getLogger("clipforget.benchmark")
    for r in results:
        best = max(r["rows"], key=lambda row: row["score"])
        bench_log.info("%s: best %s (Score %.1f)", r["title"], best["method"], best["score"])
    bench_log.warning("wrote the benchmark tables to %s", args.out)
    return 0


def cmd_list_methods(args) -> int:
    from .methods.base import get_method, list_methods
    for name in list_methods():
        print(f"{name:14s} {get_method(name).summary}")
    return 0


def cmd_merge(args) -> int:
    from .io import check_out_dir
    from .models import export_open_clip
    from .pipeline import edited_model, merge_runs
    from .runfolder import DELTA, has_delta, inputs
    out = check_out_dir(args.out, inputs(args.model, args.pretrained, runs=args.runs))
    missing = [r for r in args.runs if not has_delta(r)]
    if missing:
        raise FileNotFoundError(f"no {DELTA} in {', '.join(map(str, missing))}; pass run folders "
                                "written by `clipforget forget`")
    delta = merge_runs(args.runs, args.mode)            # an unreadable delta fails before the model loads
    bundle = _bundle(args)
    model = edited_model(bundle, delta, 1.0)
    export_open_clip(bundle, model.state_dict(), out, {"merged_runs": [str(r) for r in args.runs],
                                                      "mode": args.mode}, keep=inputs(runs=args.runs))
    print(f"wrote {out} (open_clip export of {len(args.runs)} merged forget edits)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .methods.base import list_methods
    p = argparse.ArgumentParser(prog="clipforget", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("forget", help="unlearn a subgroup / style and write the report")
    _model_args(f)
    f.add_argument("--superclass", required=True)
    f.add_argument("--subgroup", default=None)
    f.add_argument("--style", default=None, help="forget only this style (with or without --subgroup)")
    f.add_argument("--retain", default=None, help="comma-separated retain subgroups (default: the siblings)")
    f.add_argument("--forget-examples", default=None, metavar="STYLES|PATHS|FOLDER",
                   help="the forget images the method may train on: comma-separated styles (embedded gallery), "
                        "image paths relative to the gallery, or a folder in it; the subgroup's other images are "
                        "held out for calibration and the test (default: a seeded choice)")
    f.add_argument("--fold", type=int, default=None,
                   help="which held-out files (k-fold rotation; fold f holds out the next split.test_images)")
    f.add_argument("--split", default=None,
                   help="SplitConfig fields as JSON, e.g. '{\"test_images\": 2, \"calib_images\": 1}'")
    f.add_argument("--method", default="ours", choices=list_methods())
    _preset_arg(f)
    f.add_argument("--config", default=None, help="method config as JSON (file or inline)")
    f.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one config field, e.g. --set forget.top_k_layers=2 --set remind.enabled=false")
    f.add_argument("--out", required=True)
    f.add_argument("--no-export", action="store_true", help="skip the open_clip export of the unlearned model")
    f.add_argument("--no-suggest", action="store_true",
                   help="skip the over-forgetting check printed before the run (it encodes the gallery once)")
    f.add_argument("--alpha", type=unit_interval, default=None,
                   help="unlearning strength in [0, 1] to report and export (default: the calibrated α)")
    f.set_defaults(fn=cmd_forget)

    su = sub.add_parser("suggest", help="the retain set for a subgroup (or example images) and over-forgetting "
                                        "warnings, before a run")
    _model_args(su)
    su.add_argument("--superclass", default=None)
    su.add_argument("--subgroup", default=None)
    su.add_argument("--style", default=None)
    su.add_argument("--examples", nargs="+", default=None,
                    help="example images (files or folders) of what to forget, instead of a gallery subgroup")
    su.add_argument("--label", default=None, help="the coarse label of --examples, e.g. dog")
    su.add_argument("--neighbours", type=int, default=8, help="nearest concepts listed")
    su.add_argument("--risk-ratio", type=float, default=0.9,
                    help="warn when a concept's similarity to the forget images is >= this share of their own")
    su.add_argument("--json", action="store_true", help="print the suggestion as JSON")
    su.set_defaults(fn=cmd_suggest)

    c = sub.add_parser("certify", help="forgetting certificate of a run: relearning attack, linear probes, "
                                       "retrieval leakage; writes certificate.json / .md into the run folder")
    c.add_argument("run_dir", help="a run folder written by `clipforget forget --out`")
    c.add_argument("--model", default=None,
                   help="the original model (default: the one recorded in the run's run.json)")
    c.add_argument("--pretrained", default=None)
    c.add_argument("--allow-pickle", action="store_true")
    c.add_argument("--device", default="auto")
    c.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    c.add_argument("--gallery", default=None, help="the run's gallery (default: embedded)")
    c.add_argument("--alpha", type=float, default=None,
                   help="certify the model at this strength instead of the run's calibrated α (0 = the original)")
    c.add_argument("--config", default=None, help="certificate config as JSON (file or inline)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one field, e.g. --set relearn.steps=10 --set thresholds.max_relearn_recovery=0.3")
    c.set_defaults(fn=cmd_certify)

    e = sub.add_parser("eval", help="zero-shot table of a model on held-out augmented views")
    _model_args(e)
    e.add_argument("--views", type=int, default=2, help="augmented views per image")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("build-gallery", help="render the embedded gallery from the iconify npm packages")
    g.add_argument("--out", default="gallery")
    g.add_argument("--icons", default=None, help="folder with <set>/icons.json (default: npm pack the pinned versions)")
    g.add_argument("--size", type=int, default=96)
    g.set_defaults(fn=cmd_build_gallery)

    t = sub.add_parser("train-embedded", help="train the embedded model on the gallery (~20 min on 2 cores)")
    t.add_argument("--arch", choices=["rn", "vit"], default="rn",
                   help="rn: the ResNet of --model embedded; vit: the ViT of --model embedded-vit")
    t.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the arch's config)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="weights file (default: the package's weights of that arch)")
    t.set_defaults(fn=cmd_train_embedded)

    m = sub.add_parser("merge", help="merge several forget runs into one model (continual forgetting)")
    _model_args(m)
    m.add_argument("runs", nargs="+", help="run folders written by `clipforget forget`")
    m.add_argument("--mode", choices=["sum", "average"], default="sum")
    m.add_argument("--out", required=True)
    m.set_defaults(fn=cmd_merge)

    sw = sub.add_parser("sweep", help="one forget run per subgroup; median / minimum Score")
    _model_args(sw)
    sw.add_argument("--method", default="ours", choices=list_methods())
    sw.add_argument("--superclass", default=None, help="only this superclass's subgroups")
    sw.add_argument("--subgroup", action="extend", metavar="NAME[,NAME...]", type=lambda v: [n for n in v.split(",") if n],
                    help="only these subgroups (repeat or comma-separate), e.g. to run a few of a sweep again")
    sw.add_argument("--style", default=None, help="forget each subgroup in this style only")
    sw.add_argument("--every", type=int, default=1, help="every N-th subgroup (a quicker sample)")
    sw.add_argument("--offset", type=int, default=0,
                    help="with --every N: start at the offset-th subgroup (0..N-1; --every 2 --offset 1 is the other half)")
    sw.add_argument("--split", default=None, help="SplitConfig fields as JSON, e.g. '{\"test_images\": 2}'")
    sw.add_argument("--folds", type=int, default=1,
                    help="run each subgroup once per fold, holding out other files each time; a subgroup's "
                         "figure is the mean over its folds")
    _preset_arg(sw)
    sw.add_argument("--config", default=None)
    sw.add_argument("--set", action="append", metavar="KEY=VALUE")
    sw.add_argument("--out", default=None, help="folder for sweep.json / sweep.md")
    sw.add_argument("--resume", action="store_true",
                    help="keep the rows of an earlier (stopped) sweep of the same method in --out; run the rest")
    sw.add_argument("--workers", type=int, default=1,
                    help="worker processes, one CPU thread each (2 on a 2-core machine finishes ~1.5x sooner)")
    sw.set_defaults(fn=cmd_sweep)

    from .benchmark import PRESETS
    b = sub.add_parser("bench", help="every method on one task: the paper-style table (md/csv/json/png)")
    _model_args(b)
    b.add_argument("--task", required=True,
                   help=f"a preset ({', '.join(PRESETS)}, all) or a spec: SUPER/SUB, SUPER@STYLE, class:SUPER, "
                        "continual:A+B, ablation:SPEC")
    b.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(list_methods())}")
    b.add_argument("--config", default=None, help='per-method configs as JSON (file or inline): {"ga": {...}}')
    b.add_argument("--split", default=None, help="SplitConfig fields as JSON, e.g. '{\"train_views\": 4}'")
    b.add_argument("--folds", type=int, default=1,
                   help="run the bench once per fold (other held-out files each time) into OUT/fold-K")
    b.add_argument("--resume", action="store_true",
                   help="a preset's requests whose tables are in OUT already are read back, not run again")
    b.add_argument("--out", required=True)
    b.set_defaults(fn=cmd_bench)

    lm = sub.add_parser("list-methods", help="the registered unlearning methods")
    lm.set_defaults(fn=cmd_list_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-embedded"] and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execvpe(sys.executable, [sys.executable, "-m", "clipforget.cli", *argv], {**os.environ, **MALLOC_ENV})
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("clipforget").setLevel(logging.INFO)
        logging.getLogger("clipforget.stages").setLevel(logging.WARNING)
        logging.getLogger("clipforget.methods").setLevel(logging.WARNING)
    from .data.images import ImageError
    from .io import OutputError
    from .models import ModelLoadError
    from .train.loop import NonFiniteLoss
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ModelLoadError, ImageError,
            OutputError, NonFiniteLoss) as e:
        print(f"clipforget {args.command}: error: {e}", file=sys.stderr)
        return 2
    except torch_oom() as e:
        print(f"clipforget {args.command}: out of memory ({e}). Use a smaller batch (--set "
              "forget.batch_size=16), --precision fp16 on a GPU, or --device cpu.", file=sys.stderr)
        return 3


def torch_oom():
    import torch
    return (torch.OutOfMemoryError, MemoryError)


if __name__ == "__main__":
    sys.exit(main())
