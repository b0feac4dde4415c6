"""The replay output folder: actions.csv, summary.json, PNG plots, report.md + index.html,
and a bag of the predicted actions. Written into a temporary folder that is renamed into place
only when complete (a run stopped early is finalised and marked partial)."""
from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path

import numpy as np

from .metrics import DIMS


def write_csv(path: Path, rows: list) -> None:
    cols = (["frame", "stamp_ns", "stamp_s", "bag_time_s", "instruction", "status"] + [f"pred_{d}" for d in DIMS]
            + [f"norm_{d}" for d in DIMS] + [f"token_{i}" for i in range(7)] + ["out_of_range", "latency_ms"]
            + [f"gt_{d}" for d in DIMS] + ["accepted"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            pred = r.get("action") if r.get("action") is not None else [math.nan] * 7
            norm = r.get("normalized") if r.get("normalized") is not None else [math.nan] * 7
            toks = r.get("tokens") if r.get("tokens") is not None else [""] * 7
            gt = r.get("gt") if r.get("gt") is not None else [math.nan] * 7
            w.writerow([r["frame"], r["stamp_ns"], f"{r['stamp_ns'] / 1e9:.6f}", f"{r['bag_time_ns'] / 1e9:.6f}", r.get("instruction", ""),
                        r["status"]] + [f"{v:.7g}" for v in pred] + [f"{v:.7g}" for v in norm] + [int(t) if t != "" else ""
                        for t in toks] + [int(r.get("out_of_range", 0)), f"{r.get('latency_ms', math.nan):.3f}"]
                       + [f"{v:.7g}" for v in gt] + ["" if r.get("accepted") is None else int(r["accepted"])])


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=False), encoding="utf-8")


def plot_all(out: Path, rows: list, latency_ms: np.ndarray, rate_t: np.ndarray, rate: np.ndarray,
             title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    done = [r for r in rows if r.get("action") is not None]
    t0 = rows[0]["stamp_ns"] if rows else 0
    t = np.array([(r["stamp_ns"] - t0) / 1e9 for r in done])
    pred = np.array([r["action"] for r in done]) if done else np.zeros((0, 7))
    gt = np.array([r["gt"] if r.get("gt") is not None else [np.nan] * 7 for r in done]) if done else np.zeros((0, 7))
    fig, axes = plt.subplots(7, 1, figsize=(10, 13), sharex=True)
    for d, ax in enumerate(axes):
        ax.plot(t, pred[:, d], ".-", lw=1, ms=3, label="predicted")
        if np.isfinite(gt[:, d]).any():
            ax.plot(t, gt[:, d], ".-", lw=1, ms=3, label="ground truth")
        ax.set_ylabel(DIMS[d])
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right")
    axes[0].set_title(title)
    axes[-1].set_xlabel("image stamp (s from first frame)")
    fig.tight_layout()
    fig.savefig(out / "actions.png", dpi=80)
    plt.close(fig)
    files.append("actions.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    lat = latency_ms[np.isfinite(latency_ms)]
    ax.hist(lat, bins=min(50, max(5, lat.size // 5 or 5)))
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("frames")
    ax.set_title("latency per action")
    fig.tight_layout()
    fig.savefig(out / "latency_hist.png", dpi=80)
    plt.close(fig)
    files.append("latency_hist.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rate_t, rate, "-")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("actions / s")
    ax.set_title("achieved rate (rolling)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "rate.png", dpi=80)
    plt.close(fig)
    files.append("rate.png")
    return files


def _fmt(v, nd=4):
    return "n/a" if v is None else (f"{v:.{nd}g}" if isinstance(v, float) else str(v))


def _speculation_lines(sp: dict | None, mode: str) -> list[str]:
    if sp is None:
        return [f"Speculative decoding: not measured in {mode} mode (the node reports it on /diagnostics).", ""]
    if not sp["enabled"]:
        return [f"Speculative decoding: off ({sp['actions']} actions decoded plainly).", ""]
    lines = [f"Speculative decoding (previous action as the draft, at most {sp['max_age_s']:g} s old): "
             f"{sp['drafted']} of {sp['actions']} actions had a draft; acceptance rate "
             f"{_fmt(sp['acceptance_rate'], 3)}, mean accepted {_fmt(sp['mean_accepted'], 3)} of 6 per drafted "
             "action. Actions per accepted count (no draft counts as 0):", "",
             "| accepted | " + " | ".join(str(k) for k in range(len(sp["histogram"]))) + " |",
             "|---" * (len(sp["histogram"]) + 1) + "|",
             "| actions | " + " | ".join(str(v) for v in sp["histogram"]) + " |", ""]
    return lines


def write_report(out: Path, summary: dict, plots: list[str]) -> None:
    lines = [f"# OpenVLA replay report{' (PARTIAL: stopped early)' if summary['partial'] else ''}", ""]
    b, m, f = summary["bag"], summary["model"], summary["frames"]
    lines += [f"- bag: `{b['path']}` ({b['storage']}, {b['duration_s']:.1f} s), images `{b['image_topic']}`",
              f"- model: `{m.get('weights_path')}` on {m.get('backend')} {m.get('device', '')} {m.get('dtype', '')}",
              f"- mode: {summary['mode']}; frames: {f['processed']} processed of {f['selected']} selected "
              f"({f['in_bag']} in bag); rejected {f['rejected']}, dropped {f['dropped']}, "
              f"skipped without instruction {f['no_instruction']}",
              f"- out-of-range tokens: {summary['out_of_range_tokens']} in {summary['frames_with_out_of_range']} frames",
              f"- latency ms: p50 {_fmt(summary['latency_ms']['p50'])}, p95 {_fmt(summary['latency_ms']['p95'])}, "
              f"max {_fmt(summary['latency_ms']['max'])}; achieved rate {_fmt(summary['achieved_rate_hz'])} Hz"]
    if m.get("node_stream"):  # live, into one of the node's streams
        c = m.get("node_counts")
        counted = "n/a (no status of it on /diagnostics)" if c is None else ", ".join(
            f"{what} {c.get(k, 'n/a')}" for what, k in (
                ("received", "frames_received"), ("dropped", "frames_dropped"), ("processed", "frames_processed"),
                ("rejected", "rejected_total")))
        lines.append(f"- node stream `{m['node_stream']}` of `{m.get('node')}` (actions from "
                     f"`{m.get('action_topic')}`); the node's counters over the replay: {counted}")
    lines.append("")
    if summary.get("errors_vs_gt"):
        lines += ["| dim | n | MAE | RMSE | corr |", "|---|---|---|---|---|"]
        for d, e in summary["errors_vs_gt"].items():
            lines.append(f"| {d} | {e['n']} | {_fmt(e['mae'])} | {_fmt(e['rmse'])} | {_fmt(e['corr'], 3)} |")
        lines += ["", f"Gripper agreement (threshold {summary['gripper_threshold']}): "
                      f"{_fmt(summary['gripper_agreement'], 3)}", ""]
    else:
        lines += ["No ground-truth actions in the bag: predictions only.", ""]
    lines += _speculation_lines(summary.get("speculative"), summary["mode"])
    lines += [f"![{p}]({p})" for p in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows_html = []
    for ln in lines:
        if ln.startswith("|---"):
            continue
        if ln.startswith("|"):
            cells = [c.strip() for c in ln.strip("|").split("|")]
            rows_html.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        elif ln.startswith("# "):
            rows_html.append(f"<h1>{html.escape(ln[2:])}</h1>")
        elif ln and not ln.startswith("!["):
            rows_html.append(f"<p>{html.escape(ln.lstrip('- '))}</p>")
    text = "\n".join(rows_html).replace("</p>\n<tr>", "</p>\n<table border=1 cellpadding=4><tr>")
    text = text.replace("</tr>\n<p>", "</tr></table>\n<p>")
    if text.endswith("</tr>"):
        text += "</table>"
    imgs = "\n".join(f'<img src="{p}" alt="{p}" style="max-width:100%">' for p in plots)
    (out / "index.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>OpenVLA replay</title>\n{text}\n{imgs}\n", encoding="utf-8")


def write_streams_report(out: Path, summary: dict) -> None:
    """report.md + index.html of a several-stream replay: one row per stream, linking its own
    report (<stream>/report.md), and how the frames were batched (live: by the node)."""
    b, m, live = summary["batch"] or {}, summary["model"], summary["mode"] == "live"
    header = ["stream", "bag", "image topic"] + (["node stream"] if live else []) + [
        "processed / selected", "rejected", "dropped", "latency p50 ms", "mean MAE", "gripper agreement",
        "mean accepted"]
    if live:
        how = [f"- mode: live, into the streams of the node `{m.get('node')}`: it ran {_fmt(b.get('batches'))} batches "
               f"for {_fmt(b.get('items'))} frames during the replay, mean batch {_fmt(b.get('mean_size'))}, "
               f"largest {_fmt(b.get('max_size'))} (its /diagnostics; n/a without them)",
               "- latency: from publishing a stream's image to receiving its action (the node's batching included)"]
    else:
        how = [f"- mode: {summary['mode']}, batched: {b.get('batches')} predict_batch calls for {b.get('items')} "
               f"actions, mean batch {_fmt(b.get('mean_size'))} (calls per batch size: {b.get('sizes')}); "
               + ("the backend batches them" if b.get("batched_backend") else "the backend runs them one by one"),
               "- latency: what a stream waits for its action, i.e. the whole batch"]
    lines = [f"# OpenVLA replay report, {len(summary['streams'])} streams"
             f"{' (PARTIAL: stopped early)' if summary['partial'] else ''}", "",
             f"- model: `{m.get('weights_path')}` on {m.get('backend')} {m.get('device', '')} {m.get('dtype', '')}",
             *how, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]

    def cells(name, s, link, code):
        f = s["frames"]
        return [link(name), code(s["bag"]), code(s["image_topic"])] + ([code(s.get("node_stream"))] if live else []) + [
            f"{f['processed']} / {f['selected']}", str(f["rejected"]), str(f["dropped"]), _fmt(s["latency_ms"]["p50"]),
            _fmt(s["mean_mae"]), _fmt(s["gripper_agreement"], 3), _fmt(s["mean_accepted"], 3)]

    for name, s in summary["streams"].items():
        lines.append("| " + " | ".join(cells(name, s, lambda n: f"[{n}]({n}/report.md)", lambda v: f"`{v}`")) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = []
    for ln in lines:
        if ln.startswith("# "):
            items.append(f"<h1>{html.escape(ln[2:])}</h1>")
        elif ln.startswith("- "):
            items.append(f"<p>{html.escape(ln[2:])}</p>")
    rows = ["<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>"]
    for name, s in summary["streams"].items():
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells(
            name, s, lambda n: f"<a href='{html.escape(n)}/index.html'>{html.escape(n)}</a>",
            lambda v: html.escape(str(v)))) + "</tr>")
    (out / "index.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>OpenVLA replay</title>\n" + "\n".join(items)
        + "\n<table border=1 cellpadding=4>\n" + "\n".join(rows) + "\n</table>\n", encoding="utf-8")
