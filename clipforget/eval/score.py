"""The paper's Score (reproduced from its own tables; see METHOD.md).

With a = accuracy before and a' = after, target column T and K columns in all:
    Score = 100/K · [ (1 − min(1, a'_T / a_T)) + Σ_{j ≠ T} min(1, a'_j / a_j) ]

Every ratio is capped at 1, the target's too (the paper's style table, FT row — target 68.1 → 99.5 —
only comes out as printed with the cap). The columns are held-out ones: a column measured on the
images the method trained on (``forget_examples``) is reported apart and never enters the Score.
"""
from __future__ import annotations


def at_or_below_chance(row: dict) -> bool:
    """A result row (sweep, bench, tuning) whose held-out target accuracy after unlearning is at or
    below chance (``row["target_after"]``, ``row["chance"]``; 1e-9 for float noise)."""
    return row["target_after"] <= row["chance"] + 1e-9


def score(columns: dict[str, dict[str, float]], target: str = "target") -> float:
    """``columns``: {name: {"before": a, "after": a'}}; accuracies as fractions."""
    if target not in columns:
        raise ValueError(f"columns must include the target column {target!r}")
    total = 0.0
    for name, c in columns.items():
        before, after = float(c["before"]), float(c["after"])
        if before <= 0:
            if name == target:
                raise ValueError("the target column has accuracy 0 before unlearning: the model does not "
                                 "recognise the subgroup, so there is nothing to forget and no Score")
            total += 1.0      # nothing known before, nothing lost
            continue
        kept = min(1.0, after / before)
        total += (1 - kept) if name == target else kept
    return 100.0 * total / len(columns)
