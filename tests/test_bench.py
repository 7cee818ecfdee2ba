"""The bench suite's code paths at tiny scale (the benches themselves print figures, never assert
timings): the GPU section's job + encode comparison on the CPU with a tiny ResNet CLIP, and the
load-test percentiles."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_bench_module

BENCH = Path(__file__).resolve().parents[1] / "bench"
LoadResult = load_bench_module("loadtest").LoadResult
TINY_JOB = {"forget": {"fisher_samples": 4, "batch_size": 8, "loop": {"steps": 2}, "target_accuracy": None},
            "remind": {"batch_size": 8, "loop": {"steps": 2}, "align": {"steps": 1}},
            "restore": {"grid_points": 3}}


def load_bench(name: str):
    sys.path.insert(0, str(BENCH))           # the bench scripts import their ``common`` helper
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.slow
def test_gpu_bench_runs_the_job_and_the_encode_comparison_at_tiny_scale(tmp_path):
    gpu = load_bench("bench_gpu")
    fig = gpu.run("test-tiny-rn", forget_images=8, device="cpu", config=TINY_JOB, alpha_points=3,
                  workdir=tmp_path, encode_batch=16, repeats=1)
    assert fig["image_size"] == 32 and fig["device"] == "cpu" and fig["gallery_images"] == 8 + 2 * 4 + 4 * 2
    assert {"forget", "remind", "restore", "evaluate"} <= set(fig["job_stage_seconds"])
    assert fig["stages"][0] == "prepare" and {"alpha-grid", "save"} <= set(fig["stages"])
    assert fig["alpha_grid_points"] >= 3 and fig["alpha_grid_s"] > 0
    assert fig["encode_images_per_s"] > 0 and fig["plain_open_clip_images_per_s"] > 0
    assert fig["encode_max_abs_diff"] <= 1e-3
    assert (tmp_path / "job" / "run" / "report.json").is_file()
    assert (tmp_path / "job" / "run" / "export" / "open_clip_model.safetensors").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without a GPU")
def test_gpu_bench_says_why_it_skips_without_cuda(capsys):
    fig = load_bench("bench_gpu").main(["--device", "cuda"])
    assert "no CUDA GPU" in fig["skipped"] and "no CUDA GPU" in capsys.readouterr().out


def test_load_result_percentiles():
    r = LoadResult(clients=2, searches=50, latencies_ms=[float(i) for i in range(1, 101)])
    assert r.requests == 100 and r.p50_ms == 50.5 and r.p99_ms == 99.0 and r.percentile(100) == 100.0
    r.errors.append("client 0: search 3: boom")
    assert r.requests == 101 and r.summary()["errors"] == 1 and r.summary()["first_errors"] == ["client 0: search 3: boom"]
    assert LoadResult(1, 1).p99_ms != LoadResult(1, 1).p99_ms            # NaN without a success


def test_seed_noise_counts_the_rows_the_seed_moves(tmp_path, capsys):
    import json

    def row(sub, score, target):
        return {"superclass": "dog", "subgroup": sub, "style": None, "score": score, "target_after": target,
                "chance": 0.04, "columns": {c: {"after": 0.5} for c in
                                            ("target", "retain", "other_superclasses", "other_concepts")}}
    a = [row("a", 90.0, 0.0), row("b", 80.0, 0.5), row("c", 95.0, 0.0), row("d", 70.0, 0.0)]
    b = [row("a", 90.0, 0.0), row("b", 84.0, 0.0), row("c", 93.0, 0.2), row("d", 70.0, 0.0)]
    for name, rows in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"rows": rows}))
    load_bench("seed_noise").main(str(tmp_path / "a.json"), str(tmp_path / "b.json"), sample=2, draws=50)
    out = capsys.readouterr().out
    assert "mean +0.50" in out and "rows equal 2" in out and "max 4.00" in out
    assert "at chance in A only: 1 (c)" in out and "at chance in B only: 1 (b)" in out
    assert "50 random samples of 2" in out
