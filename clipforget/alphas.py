"""The α values a job precomputes gallery embeddings for (the app's slider snaps to them). No
torch here: the app's page reads the default before the model stack is imported."""
from __future__ import annotations

# α values whose gallery embeddings a job precomputes (0, 0.2, ..., 1, plus the calibrated α): on the
# embedded model one point costs about as much as a sixth of the job, so the slider snaps to steps of 0.2
DEFAULT_ALPHA_POINTS = 6


def alpha_points(n: int = DEFAULT_ALPHA_POINTS, extra: tuple[float, ...] = ()) -> list[float]:
    """``n`` even points over [0, 1] plus ``extra`` (e.g. the calibrated α), sorted, deduplicated."""
    if n < 2:
        raise ValueError(f"an α-grid needs at least 2 points, got {n}")
    pts = {round(i / (n - 1), 6) for i in range(n)} | {round(float(a), 6) for a in extra}
    return sorted(pts)


def nearest(points: list[float], alpha: float) -> float:
    """The grid point closest to ``alpha`` (ties go to the smaller α)."""
    return min(points, key=lambda a: (abs(a - alpha), a))
