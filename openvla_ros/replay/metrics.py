"""Replay metrics: plain numpy functions over per-frame arrays (no ROS, no state)."""
from __future__ import annotations

import numpy as np

DIMS = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")


def _finite_or_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _varies(x: np.ndarray) -> bool:
    return bool(x.std() > 1e-9 * max(1.0, float(np.abs(x).max())))


def action_errors(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Per-dimension MAE, RMSE and Pearson correlation over the rows where both are finite.
    pred, gt: (N, 7). Correlation is None when either side is constant or < 2 rows."""
    out = {}
    for d, name in enumerate(DIMS):
        ok = np.isfinite(pred[:, d]) & np.isfinite(gt[:, d])
        p, g = pred[ok, d].astype(np.float64), gt[ok, d].astype(np.float64)
        if len(p) == 0:
            out[name] = {"n": 0, "mae": None, "rmse": None, "corr": None}
            continue
        err = p - g
        corr = None
        if len(p) >= 2 and _varies(p) and _varies(g):
            corr = float(np.corrcoef(p, g)[0, 1])
        out[name] = {"n": int(len(p)), "mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
                     "corr": corr}
    return out


def gripper_agreement(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> float | None:
    """Fraction of frames where predicted and GT gripper fall on the same side of threshold."""
    ok = np.isfinite(pred) & np.isfinite(gt)
    if not ok.any():
        return None
    return float(((pred[ok] > threshold) == (gt[ok] > threshold)).mean())


def speculation_summary(stats: dict | None) -> dict | None:
    """The offline run's speculative decoding counts (AcceptanceStats.as_dict() + enabled,
    max_age_s) for summary.json: rates as numbers or None (no drafted action), and histogram[k] =
    actions acted on whose first k tokens came from the draft, the actions without a draft
    (first frame, instruction change, too old, speculative off) in bin 0, so it sums to
    `actions`. None without counts (live mode: the node reports them on /diagnostics)."""
    if not stats:
        return None
    hist = [int(v) for v in stats["histogram"]]
    hist[0] += int(stats["actions"]) - int(stats["drafted"])
    return {"enabled": bool(stats["enabled"]), "max_age_s": float(stats["max_age_s"]),
            "actions": int(stats["actions"]), "drafted": int(stats["drafted"]),
            "accepted_total": int(stats["accepted_total"]),
            "acceptance_rate": _finite_or_none(stats["acceptance_rate"]),
            "mean_accepted": _finite_or_none(stats["mean_accepted"]), "histogram": hist}


def latency_stats(latency_ms: np.ndarray) -> dict:
    lat = np.asarray(latency_ms, dtype=np.float64)
    lat = lat[np.isfinite(lat)]
    if lat.size == 0:
        return {"p50": None, "p95": None, "max": None, "mean": None}
    return {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "max": float(lat.max()), "mean": float(lat.mean())}


def achieved_rate(times_s: np.ndarray) -> float | None:
    """Events per second over the span of the event times (N-1 intervals / span)."""
    t = np.sort(np.asarray(times_s, dtype=np.float64))
    if t.size < 2 or t[-1] <= t[0]:
        return None
    return float((t.size - 1) / (t[-1] - t[0]))


def rolling_rate(times_s: np.ndarray, window: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(t, rate) with rate = window / time taken by the last `window` intervals."""
    t = np.sort(np.asarray(times_s, dtype=np.float64))
    if t.size <= window:
        window = max(t.size - 1, 1)
    if t.size < 2:
        return np.array([]), np.array([])
    span = t[window:] - t[:-window]
    with np.errstate(divide="ignore"):
        return t[window:], np.where(span > 0, window / span, np.nan)
