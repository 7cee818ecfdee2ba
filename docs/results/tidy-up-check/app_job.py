"""The app's poodle job through AppCore at the checkout in the working directory (the tidy-up check,
run.sh), with a split the five-style world can hold (2 test + 2 calibration images + examples)."""
import json, sys, time, resource
sys.path.insert(0, '.')
try:
    from clipforget.app import AppCore
except ImportError:
    from clipforget.appcore import AppCore
import tempfile
t0 = time.perf_counter()
core = AppCore(runs_dir=tempfile.mkdtemp(), job_split={"test_images": 2, "calib_images": 2})
core.resources()
t_load = time.perf_counter() - t0
t1 = time.perf_counter()
job = core.start_job("dog", "poodle")
try:
    job = core.jobs.wait(job.id, results=True)
except TypeError:
    job = core.jobs.wait(job.id)
t_ready = time.perf_counter() - t1
r = core.search("a dog", job.id)
job = core.jobs.wait(job.id)
t_done = time.perf_counter() - t1
s = job.summary
print(json.dumps({"status": job.status, "load_s": round(t_load, 1), "click_to_results_s": round(t_ready, 1),
                  "job_done_s": round(t_done, 1), "alpha": s.get("alpha"), "score": s.get("score"),
                  "stage_seconds": {k: round(v, 1) for k, v in (s.get("stage_seconds") or {}).items()},
                  "recall_left": r.get("recall_left"), "recall_right": r.get("recall_right"),
                  "right": [h["concept"] for h in r.get("right", [])][:6],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
core.close()
