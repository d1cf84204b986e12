"""What a person reads about a run: the loss curve, the summary markdown, the metrics table.

Plain functions over plain dicts, so the flow turns them into Prefect artifacts
(create_markdown_artifact / create_table_artifact) and anything else can print them.
matplotlib is imported inside `loss_curve_png` only: importing ckptflow stays light.

The run record (`{storage}/{run_id}/run.json`) that `summary_markdown` reads. Every key but
`run_id` may be missing while the run is in progress:

    {
      "run_id": "demo",
      "source": {"uri": "hf://org/name", "revision": "<resolved commit>"},
      "stages": [{"name": "train", "state": "Completed" | "Running" | "Failed" | ...,
                  "started": "<ISO time>", "finished": "<ISO time>" | None,
                  "seconds": 12.3 | None, "output": "<URI>" | None}],
      "checkpoints": [{"step": 20, "uri": "<URI>", "size_bytes": 123, "saved_at": "<ISO time>",
                       "save_seconds": 0.4 | None}],
      "eval": {"before": {"loss": 3.1, "perplexity": 22.2}, "after": {"loss": ..., "perplexity": ...},
               "lm_eval": {"before": {"<task>": {"acc": 0.25, "acc_stderr": 0.05, ...}}, "after": {...}}},
      "export_command": "ckptflow export ./runs/demo ./out --format original",
      "export_deployment": "export/export-run",
      "export_deployment_command": "prefect deployment run export/export --params '{...}'",
      "loss_curve_png": b"\\x89PNG..." | "data:image/png;base64,..." | "https://..."
    }

A metrics row (one per logged step, from the training loop's metrics.jsonl):

    {"step": 10, "loss": 2.31, "eval_loss": 2.4 | None, "lr": 3e-4,
     "tokens_per_s": 5120.0, "checkpoint": "<URI>" | None}
"""
from __future__ import annotations

import base64
import datetime as dt
import io
import logging
import math

from ckptflow.benchmarks import is_stderr
from ckptflow.errors import CkptError

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI_PREFIX = "data:image/png;base64,"
# 8 x 4.5 inches at 100 dpi: 800 x 450 px, wide enough for the dashboard's artifact column.
FIGSIZE_IN = (8.0, 4.5)
DPI = 100
MISSING = "—"


# ---- the loss curve ------------------------------------------------------------------------

def loss_curve_png(metrics: list[dict], checkpoints: list[dict], title: str) -> bytes:
    """Training loss (line) and eval loss (points) against step, a dashed line per checkpoint.

    Always 800x450 px: no tight bbox, so the size does not depend on the data.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on an Agg canvas: no pyplot, so no global backend switch and no
    # figure registry that leaks memory across calls in a long-lived flow process.
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _plot_losses(ax, metrics)
    _plot_checkpoints(ax, checkpoints)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no steps logged yet", transform=ax.transAxes, ha="center", va="center")
    buf = io.BytesIO()
    # No "Software" text chunk: the bytes then depend on the data, not the matplotlib version.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    png = buf.getvalue()
    log.debug("loss curve: %d points, %d checkpoints, %d bytes", len(metrics), len(checkpoints), len(png))
    return png


def _plot_losses(ax, metrics: list[dict]) -> None:
    train = [(m["step"], m["loss"]) for m in metrics if _finite(m.get("loss"))]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if _finite(m.get("eval_loss"))]
    if train:
        ax.plot(*zip(*train), color="tab:blue", linewidth=1.5, label="train loss")
    if evals:
        ax.plot(*zip(*evals), linestyle="none", marker="o", markersize=6,
                color="tab:orange", label="eval loss")


def _plot_checkpoints(ax, checkpoints: list[dict]) -> None:
    for i, ckpt in enumerate(checkpoints):
        # One legend entry for all of them: a label per line would flood the legend.
        ax.axvline(ckpt["step"], color="tab:green", linestyle="--", linewidth=1, alpha=0.8,
                   label="checkpoint" if i == 0 else None)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def png_data_uri(png: bytes) -> str:
    """`data:image/png;base64,...`: the dashboard renders it inside a markdown artifact."""
    if not png.startswith(PNG_SIGNATURE):
        raise CkptError("png_data_uri: the bytes are not a PNG (no PNG signature)")
    return DATA_URI_PREFIX + base64.b64encode(png).decode("ascii")


# ---- the summary markdown ------------------------------------------------------------------

def summary_markdown(run: dict) -> str:
    """The run summary for the dashboard, from the run record (shape in the module docstring)."""
    if not run.get("run_id"):
        raise CkptError("run.json: missing key 'run_id'")
    parts = [
        f"# Fine-tune run {run['run_id']}",
        _source_line(run.get("source") or {}),
        "## Stages\n\n" + _stages_table(run.get("stages") or []),
        "## Loss curve\n\n" + _loss_curve_line(run.get("loss_curve_png")),
        "## Checkpoints\n\n" + _checkpoints_table(run.get("checkpoints") or []),
        "## Eval\n\n" + _eval_table(run.get("eval") or {}),
        "## Export\n\n" + _export_section(run.get("export_command"), run.get("export_deployment"),
                                          run.get("export_deployment_command")),
    ]
    return "\n\n".join(parts) + "\n"


def _source_line(source: dict) -> str:
    uri = source.get("uri")
    if not uri:
        return "Source: not downloaded yet."
    rev = source.get("revision")
    pinned = f"pinned at revision `{rev}`" if rev else "revision not pinned yet"
    return f"Source: `{uri}`, {pinned}."


def _stages_table(stages: list[dict]) -> str:
    if not stages:
        return "No stage has started yet."
    rows = [[s.get("name", "?"), s.get("state") or "Pending", _stage_time(s), _code(s.get("output"))]
            for s in stages]
    return _table(["stage", "state", "time", "output"], rows)


def _stage_time(stage: dict) -> str:
    if stage.get("seconds") is not None:
        return _nowrap(format_seconds(stage["seconds"]))
    if stage.get("started") and not stage.get("finished"):
        return f"running since {stage['started']}"
    return MISSING


def _loss_curve_line(png) -> str:
    if png is None:
        return "No loss curve yet."
    if isinstance(png, (bytes, bytearray)):
        src = png_data_uri(bytes(png))
    elif isinstance(png, str) and png.startswith((DATA_URI_PREFIX, "http://", "https://")):
        src = png
    else:
        raise CkptError("run.json: 'loss_curve_png' must be PNG bytes, a data:image/png URI or an http(s) URL")
    return f"![loss curve]({src})"


def _checkpoints_table(checkpoints: list[dict]) -> str:
    if not checkpoints:
        return "No checkpoint committed yet."
    # How long a save took is shown only where it was measured: a column of dashes says nothing.
    timed = any(_finite(c.get("save_seconds")) for c in checkpoints)
    header = ["step", "size", "saved at", *(["save time"] if timed else []), "URI"]
    rows = [[str(c["step"]), _nowrap(format_bytes(c.get("size_bytes"))), format_time(c.get("saved_at")),
             *([_nowrap(format_seconds(c.get("save_seconds")))] if timed else []), _code(c.get("uri"))]
            for c in sorted(checkpoints, key=lambda c: c["step"])]
    return _table(header, rows)


def _eval_table(ev: dict) -> str:
    before, after = ev.get("before") or {}, ev.get("after") or {}
    scores = ev.get("lm_eval") or {}
    if not before and not after and not scores:
        return "Not evaluated yet."
    parts = []
    if before or after:
        rows = [[name, _num(before.get(name), digits), _num(after.get(name), digits),
                 _change(before.get(name), after.get(name), digits)]
                for name, digits in (("loss", 4), ("perplexity", 2))]
        parts.append(_table(["metric", "before", "after", "change"], rows))
    if scores:
        parts.append("Benchmarks (lm-evaluation-harness), base model before and fine-tuned after:\n\n"
                     + _scores_table(scores.get("before") or {}, scores.get("after") or {}))
    return "\n\n".join(parts)


def _scores_table(before: dict, after: dict) -> str:
    """One row per task and metric (stderr shown beside its metric, not as a row of its own)."""
    rows = []
    for task in sorted(set(before) | set(after)):
        b, a = before.get(task) or {}, after.get(task) or {}
        for metric in [m for m in dict.fromkeys([*a, *b]) if not is_stderr(m)]:
            rows.append([task, metric, _score(b, metric), _score(a, metric), _score_change(b.get(metric), a.get(metric))])
    return _table(["task", "metric", "before", "after", "change"], rows)


def _score(scores: dict, metric: str) -> str:
    name, sep, filt = metric.partition(",")
    err = scores.get(f"{name}_stderr{sep}{filt}")
    value = scores.get(metric)
    if not _finite(value):
        return MISSING
    fmt = _fraction if 0 <= value <= 1 else _sig
    return _nowrap(f"{fmt(value)} ± {fmt(err)}") if _finite(err) and err else fmt(value)


def _score_change(before, after) -> str:
    """Scores in [0, 1] (accuracies): the difference; others (perplexities): also the ratio."""
    if not (_finite(before) and _finite(after)):
        return MISSING
    if 0 <= before <= 1 and 0 <= after <= 1:
        return f"{after - before:+.4f}"
    return f"{after - before:+.4g}" + (f" (×{after / before:.3g})" if before else "")


def _fraction(x: float) -> str:
    return f"{x:.4f}"


def _sig(x: float) -> str:
    return f"{x:.4g}"


def _change(before, after, digits: int) -> str:
    if not (_finite(before) and _finite(after)):
        return MISSING
    delta = after - before
    rel = f" ({delta / before:+.1%})" if before else ""
    return f"{delta:+.{digits}f}{rel}"


def _export_section(command: str | None, deployment: str | None, deployment_command: str | None = None) -> str:
    lines = []
    if command:
        lines.append("Export this run from the command line (any step in the table above: change `--step`):\n\n"
                     + _fenced(command))
    if deployment:
        line = f"Or run the deployment `{deployment}` from the dashboard (Deployments, {deployment.split('/')[-1]}, Run)"
        lines.append(line + (", or with Prefect's CLI:\n\n" + _fenced(deployment_command) if deployment_command
                             else "."))
    return "\n\n".join(lines) if lines else "Not exported yet."


def _fenced(command: str) -> str:
    fence = "```" + "`" * _longest_backtick_run(command)
    return f"{fence}sh\n{command}\n{fence}"


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return longest


# ---- the metrics table ---------------------------------------------------------------------

METRICS_COLUMNS = ("step", "loss", "eval loss", "learning rate", "tokens/s", "checkpoint URI")


def metrics_table(metrics: list[dict]) -> list[dict]:
    """Rows for create_table_artifact: METRICS_COLUMNS, rounded for reading, None where missing."""
    return [{
        "step": int(m["step"]),
        "loss": _round(m.get("loss"), 4),
        "eval loss": _round(m.get("eval_loss"), 4),
        # Three significant digits: 3e-4 and 2.97e-4 differ by the schedule, not by noise.
        "learning rate": float(f"{m['lr']:.3g}") if _finite(m.get("lr")) else None,
        "tokens/s": _round(m.get("tokens_per_s"), 1),
        "checkpoint URI": m.get("checkpoint") or None,
    } for m in metrics]


def _round(x, digits: int):
    return round(float(x), digits) if _finite(x) else None


# ---- formatting helpers --------------------------------------------------------------------

def format_seconds(seconds) -> str:
    """`0.42 s`, `12.3 s`, `2 min 05 s`, `1 h 02 min`."""
    if not _finite(seconds):
        return MISSING
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def format_time(iso) -> str:
    """`2026-11-23 18:02:06 UTC` from an ISO time (as manifests record it); the text as is if unparsable."""
    if not iso:
        return MISSING
    try:
        t = dt.datetime.fromisoformat(str(iso).replace("Z", "+00:00"))
    except ValueError:
        return str(iso)
    if t.tzinfo is not None:
        t = t.astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if t.tzinfo is not None else "")


def format_bytes(n) -> str:
    """Decimal units, as the Hub and `ls -h --si` show sizes: `512 B`, `1.2 MB`."""
    if not _finite(n):
        return MISSING
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _num(x, digits: int) -> str:
    return f"{x:.{digits}f}" if _finite(x) else MISSING


def _nowrap(text: str) -> str:
    # The dashboard squeezes these columns beside long URIs: "0.22 s" broke into "0.22" / "s".
    return text.replace(" ", "\u00a0")


def _code(text) -> str:
    return f"`{text}`" if text else MISSING


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [_row(header), "|" + "---|" * len(header)]
    lines += [_row(r) for r in rows]
    return "\n".join(lines)


def _row(cells: list[str]) -> str:
    # A pipe or newline inside a cell would end the cell or the table (GFM).
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
