"""The run report: a real PNG plot, markdown that renders to the expected tables, the metrics rows."""
import base64
import math
import re
import struct

import pytest

from ckptflow import report
from ckptflow.errors import CkptError

W, H = 800, 450


def _metrics(steps=60, eval_every=20, ckpt_every=20):
    rows = []
    for s in range(1, steps + 1):
        loss = 3.0 * math.exp(-s / 30) + 0.5
        rows.append({
            "step": s, "loss": loss,
            "eval_loss": loss + 0.1 if eval_every and s % eval_every == 0 else None,
            "lr": 3e-4 * (1 - s / (2 * steps)), "tokens_per_s": 5000.0 + s / 3,
            "checkpoint": f"./runs/demo/train/step-{s:06d}" if ckpt_every and s % ckpt_every == 0 else None,
        })
    return rows


CHECKPOINTS = [{"step": s, "uri": f"./runs/demo/train/step-{s:06d}", "size_bytes": 1_234_567,
                "saved_at": f"2026-11-23T18:0{s // 20}:06+00:00", "save_seconds": 0.42} for s in (20, 40, 60)]


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == report.PNG_SIGNATURE
    length, ctype = struct.unpack(">I4s", png[8:16])
    assert ctype == b"IHDR" and length == 13
    return struct.unpack(">II", png[16:24])


def _count(png: bytes, pred) -> int:
    """Pixels for which pred(r, g, b) holds (numpy int arrays, so the predicates vectorise)."""
    import io

    from PIL import Image
    import numpy as np
    px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(np.count_nonzero(pred(px[..., 0], px[..., 1], px[..., 2])))


# matplotlib's tab: colours; tolerant predicates because lines are anti-aliased and the
# checkpoint lines are drawn at alpha 0.8 over white.
def _blue(r, g, b): return (b > r + 100) & (b > g + 30)
def _orange(r, g, b): return (r > 200) & (g > 90) & (g < 170) & (b < 90)
def _green(r, g, b): return (g > r + 60) & (g > b + 60)
def _not_white(r, g, b): return (r < 255) | (g < 255) | (b < 255)


def test_loss_curve_png_is_a_plot_of_the_series():
    png = report.loss_curve_png(_metrics(), CHECKPOINTS, "demo: lora, 60 steps")
    assert _png_size(png) == (W, H)
    assert 10_000 < len(png) < 150_000, len(png)
    assert png == report.loss_curve_png(_metrics(), CHECKPOINTS, "demo: lora, 60 steps")
    assert _count(png, _not_white) > 5_000  # not blank
    assert _count(png, _blue) > 300        # train loss line (+ its legend sample)
    assert _count(png, _orange) > 50       # eval points
    assert _count(png, _green) > 300       # three dashed checkpoint lines


def test_loss_curve_png_draws_only_what_is_there():
    png = report.loss_curve_png(_metrics(eval_every=0, ckpt_every=0), [], "no eval, no checkpoints")
    assert _png_size(png) == (W, H)
    assert _count(png, _blue) > 300
    assert _count(png, _orange) == 0
    assert _count(png, _green) == 0


def test_loss_curve_png_without_metrics_has_the_same_size():
    png = report.loss_curve_png([], [], "just started")
    assert _png_size(png) == (W, H)
    assert _count(png, _blue) == 0


def test_png_data_uri_round_trips_and_refuses_non_png():
    png = report.loss_curve_png(_metrics(steps=5), [], "t")
    uri = report.png_data_uri(png)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == png
    with pytest.raises(CkptError, match="not a PNG"):
        report.png_data_uri(b"GIF89a....")


def _full_run(png):
    return {
        "run_id": "demo",
        "source": {"uri": "hf://org/tiny-llama", "revision": "0123abcd"},
        "stages": [
            {"name": "download", "state": "Completed", "started": "2026-11-23T18:00:00Z",
             "finished": "2026-11-23T18:00:01Z", "seconds": 1.234, "output": "./runs/demo/source"},
            {"name": "train", "state": "Completed", "started": "2026-11-23T18:00:01Z",
             "finished": "2026-11-23T18:02:06Z", "seconds": 125.0, "output": "./runs/demo/train"},
        ],
        "checkpoints": list(reversed(CHECKPOINTS)),
        "eval": {"before": {"loss": 3.2, "perplexity": 24.53}, "after": {"loss": 2.4, "perplexity": 11.02}},
        "export_command": "ckptflow export ./runs/demo ./runs/demo/export --format original",
        "export_deployment": "export/export-run",
        "export_deployment_command": ("prefect deployment run export/export-run "
                                      "--params '{\"params\": {\"source\": \"./runs/demo\", \"step\": 60}}'"),
        "loss_curve_png": png,
    }


def _render(md_text: str) -> str:
    import markdown_it
    return markdown_it.MarkdownIt("commonmark").enable("table").render(md_text)


def _table_rows(html: str, first_header: str) -> list[list[str]]:
    """The rows of the rendered table whose first header cell is `first_header`."""
    for table in re.findall(r"<table>.*?</table>", html, re.S):
        cells = [re.findall(r"<t[hd]>(.*?)</t[hd]>", tr, re.S) for tr in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
        if cells[0][0] == first_header:
            # A no-break space keeps "0.42 s" on one line in the dashboard; compare as text.
            return [[re.sub(r"</?code>", "", c).replace("\u00a0", " ") for c in row] for row in cells]
    raise AssertionError(f"no table starting with {first_header!r}")


def test_summary_markdown_renders_every_part():
    png = report.loss_curve_png(_metrics(), CHECKPOINTS, "demo")
    md = report.summary_markdown(_full_run(png))
    assert md.startswith("# Fine-tune run demo\n")
    assert "`hf://org/tiny-llama`, pinned at revision `0123abcd`" in md
    html = _render(md)
    assert _table_rows(html, "stage") == [
        ["stage", "state", "time", "output"],
        ["download", "Completed", "1.23 s", "./runs/demo/source"],
        ["train", "Completed", "2 min 05 s", "./runs/demo/train"],
    ]
    assert _table_rows(html, "step") == [
        ["step", "size", "saved at", "save time", "URI"],
        *[[str(s), "1.2 MB", f"2026-11-23 18:0{s // 20}:06 UTC", "0.42 s", f"./runs/demo/train/step-{s:06d}"]
          for s in (20, 40, 60)],
    ]
    assert "| 60 | 1.2\u00a0MB | 2026-11-23 18:03:06 UTC | 0.42\u00a0s |" in md
    assert _table_rows(html, "metric") == [
        ["metric", "before", "after", "change"],
        ["loss", "3.2000", "2.4000", "-0.8000 (-25.0%)"],
        ["perplexity", "24.53", "11.02", "-13.51 (-55.1%)"],
    ]
    assert '<code class="language-sh">ckptflow export ./runs/demo ./runs/demo/export --format original\n</code>' in html
    assert "`export/export-run`" in md
    assert ("```sh\nprefect deployment run export/export-run --params "
            "'{\"params\": {\"source\": \"./runs/demo\", \"step\": 60}}'\n```") in md
    srcs = re.findall(r'<img src="([^"]+)" alt="loss curve"', html)
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")
    assert base64.b64decode(srcs[0].split(",", 1)[1]) == png


def test_checkpoints_without_a_measured_save_time_get_no_save_time_column():
    ckpts = [{"step": 4, "uri": "s3://b/r/train/step-000004", "size_bytes": 117_628,
              "saved_at": "2026-11-23T18:29:53+00:00", "save_seconds": None},
             {"step": 2, "uri": "s3://b/r/train/step-000002", "size_bytes": 999, "saved_at": "not a time"}]
    rows = _table_rows(_render(report.summary_markdown({"run_id": "r", "checkpoints": ckpts})), "step")
    assert rows == [["step", "size", "saved at", "URI"],
                    ["2", "999 B", "not a time", "s3://b/r/train/step-000002"],
                    ["4", "117.6 KB", "2026-11-23 18:29:53 UTC", "s3://b/r/train/step-000004"]]


def test_summary_markdown_of_a_run_in_progress():
    md = report.summary_markdown({
        "run_id": "demo",
        "source": {"uri": "seed://llama?dim=64"},
        "stages": [{"name": "download", "state": "Completed", "seconds": 0.5, "output": "./runs/demo/source"},
                   {"name": "train", "state": "Running", "started": "2026-11-23T18:00:01Z", "finished": None}],
        "eval": {"before": {"loss": 3.2, "perplexity": 24.53}},
    })
    assert "revision not pinned yet" in md
    rows = _table_rows(_render(md), "stage")
    assert rows[2] == ["train", "Running", "running since 2026-11-23T18:00:01Z", "—"]
    assert "No checkpoint committed yet." in md
    assert _table_rows(_render(md), "metric")[1] == ["loss", "3.2000", "—", "—"]
    assert "No loss curve yet." in md and "Not exported yet." in md
    assert "data:image" not in md


def test_summary_markdown_of_a_bare_run():
    md = report.summary_markdown({"run_id": "r1"})
    for text in ("# Fine-tune run r1", "not downloaded yet", "No stage has started yet.",
                 "No checkpoint committed yet.", "Not evaluated yet.", "Not exported yet."):
        assert text in md
    assert "<table>" not in _render(md)


def test_summary_markdown_keeps_a_pipe_inside_its_cell():
    md = report.summary_markdown({"run_id": "r", "stages": [
        {"name": "export", "state": "Completed", "seconds": 1.0, "output": "s3://b/a|b"}]})
    assert _table_rows(_render(md), "stage")[1] == ["export", "Completed", "1.00 s", "s3://b/a|b"]


def test_summary_markdown_takes_a_data_uri_and_rejects_anything_else():
    uri = report.png_data_uri(report.loss_curve_png([], [], "t"))
    assert f"![loss curve]({uri})" in report.summary_markdown({"run_id": "r", "loss_curve_png": uri})
    with pytest.raises(CkptError, match="loss_curve_png"):
        report.summary_markdown({"run_id": "r", "loss_curve_png": "/tmp/curve.png"})
    with pytest.raises(CkptError, match="run_id"):
        report.summary_markdown({"stages": []})


def test_metrics_table_columns_and_rounding():
    rows = report.metrics_table(_metrics(steps=20))
    assert len(rows) == 20
    assert list(rows[0]) == ["step", "loss", "eval loss", "learning rate", "tokens/s", "checkpoint URI"]
    assert rows[0] == {"step": 1, "loss": 3.4016, "eval loss": None, "learning rate": 0.000292,
                       "tokens/s": 5000.3, "checkpoint URI": None}
    assert report.metrics_table([{"step": 1, "lr": 2.96789e-5}])[0]["learning rate"] == 2.97e-5
    assert rows[19]["eval loss"] == pytest.approx(round(3.0 * math.exp(-20 / 30) + 0.6, 4), abs=0)
    assert rows[19]["checkpoint URI"] == "./runs/demo/train/step-000020"
    assert report.metrics_table([{"step": 3, "loss": float("nan"), "lr": None}])[0]["loss"] is None


@pytest.mark.parametrize("seconds, text", [(0.421, "0.42 s"), (12.34, "12.3 s"), (125, "2 min 05 s"),
                                           (3725, "1 h 02 min"), (None, "—")])
def test_format_seconds(seconds, text):
    assert report.format_seconds(seconds) == text


@pytest.mark.parametrize("n, text", [(512, "512 B"), (1_234_567, "1.2 MB"), (5e9, "5.0 GB"), (None, "—")])
def test_format_bytes(n, text):
    assert report.format_bytes(n) == text
