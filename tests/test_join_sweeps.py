"""bench/join_sweeps.py: pieces of one sweep joined give what the sweep itself summarised."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HALF = ROOT / "docs/results/sweep-ours-feature-stand-ins/fold-1-half/sweep.json"


def _piece(table: dict, rows: list, path: Path) -> str:
    path.write_text(json.dumps({**table, "rows": rows}))
    return str(path)


def _join(out: Path, *parts: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench/join_sweeps.py"), str(out), *parts],
                          capture_output=True, text=True)


def test_joined_pieces_summarise_as_the_whole_sweep(tmp_path):
    table = json.loads(HALF.read_text())
    a = _piece(table, table["rows"][0::2], tmp_path / "a.json")
    b = _piece(table, table["rows"][1::2], tmp_path / "b.json")
    done = _join(tmp_path / "joined", a, b)
    assert done.returncode == 0, done.stderr
    joined = json.loads((tmp_path / "joined/sweep.json").read_text())
    for key in ("requests", "median_score", "min_score", "target_at_or_below_chance", "split"):
        assert joined[key] == table[key], key
    assert sorted(r["subgroup"] for r in joined["rows"]) == sorted(r["subgroup"] for r in table["rows"])
    assert (tmp_path / "joined/sweep.md").read_text().startswith("# Sweep: ours over 85 requests")


def test_a_subgroup_in_two_pieces_or_another_split_is_refused(tmp_path):
    table = json.loads(HALF.read_text())
    a = _piece(table, table["rows"][:3], tmp_path / "a.json")
    overlap = _piece(table, table["rows"][2:5], tmp_path / "b.json")
    assert "more than one part" in _join(tmp_path / "x", a, overlap).stderr
    other = _piece({**table, "split": {**table["split"], "fold": 0}}, table["rows"][5:8], tmp_path / "c.json")
    assert "differ in method or split" in _join(tmp_path / "y", a, other).stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("part", ["fold-1-half", "fold-1-quarter", "fold-1-rest"])
def test_the_committed_fold_1_table_is_its_pieces(part):
    whole = {r["subgroup"]: r for r in json.loads(
        (ROOT / "docs/results/sweep-ours-feature-stand-ins/fold-1/sweep.json").read_text())["rows"]}
    for r in json.loads((ROOT / f"docs/results/sweep-ours-feature-stand-ins/{part}/sweep.json").read_text())["rows"]:
        assert whole[r["subgroup"]] == r
