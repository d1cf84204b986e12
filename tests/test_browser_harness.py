"""The browser harness, proven end to end: a real Prefect server, a flow that publishes the run
report as artifacts, and headless Chromium reading them off the v2 dashboard."""
import json
import subprocess
import time

import pytest

from tests.browser import harness

FLOW = '''
import json, math
from prefect import flow, get_run_logger
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.runtime import flow_run
from ckptflow import report

STEPS = 60


@flow(name="browser-demo")
def browser_demo():
    get_run_logger().info("BROWSER-DEMO first log line")
    progress = create_progress_artifact(progress=0.0, key="train-progress", description="training steps")
    metrics = [{"step": s, "loss": 3.0 * math.exp(-s / 30) + 0.5,
                "eval_loss": 3.0 * math.exp(-s / 30) + 0.6 if s % 20 == 0 else None,
                "lr": 3e-4, "tokens_per_s": 5000.0 + s,
                "checkpoint": f"./runs/browser-demo/train/step-{s:06d}" if s % 20 == 0 else None}
               for s in range(1, STEPS + 1)]
    checkpoints = [{"step": s, "uri": f"./runs/browser-demo/train/step-{s:06d}",
                    "size_bytes": 1_234_567, "save_seconds": 0.42} for s in (20, 40, 60)]
    update_progress_artifact(artifact_id=progress, progress=50.0)
    run = {
        "run_id": "browser-demo",
        "source": {"uri": "seed://llama?dim=64&n_layers=2", "revision": "0123abcd"},
        "stages": [{"name": "train", "state": "Completed", "seconds": 12.5,
                    "output": "./runs/browser-demo/train"}],
        "checkpoints": checkpoints,
        "eval": {"before": {"loss": 3.2, "perplexity": 24.53}, "after": {"loss": 2.4, "perplexity": 11.02}},
        "export_command": "ckptflow export ./runs/browser-demo ./out --format original",
        "export_deployment": "export/export-run",
        "loss_curve_png": report.loss_curve_png(metrics, checkpoints, "browser-demo: lora, 60 steps"),
    }
    create_markdown_artifact(markdown=report.summary_markdown(run), key="run-summary",
                             description="run summary")
    create_table_artifact(table=report.metrics_table(metrics), key="train-metrics",
                          description="per-step metrics")
    update_progress_artifact(artifact_id=progress, progress=100.0)
    return str(flow_run.id)


if __name__ == "__main__":
    print(json.dumps({"flow_run_id": browser_demo()}))
'''

KEYS = ("run-summary", "train-metrics", "train-progress")


@pytest.mark.browser
@pytest.mark.skipif(harness.missing_browser() is not None, reason=str(harness.missing_browser()))
def test_dashboard_renders_the_run_report(tmp_path):
    shots = harness.SCREENSHOT_DIR
    t0 = time.monotonic()
    script = tmp_path / "browser_demo_flow.py"
    script.write_text(FLOW)
    with harness.prefect_server(tmp_path) as server:
        t_server = time.monotonic()
        out = harness.run_flow_script(server, script)
        flow_run_id = json.loads(out.stdout.strip().splitlines()[-1])["flow_run_id"]
        assert harness.flow_run(server, flow_run_id)["state_name"] == "Completed"
        t_flow = time.monotonic()
        with harness.browser() as driver:
            harness.open_flow_run(driver, server, flow_run_id)
            harness.wait_for_state(driver, "Completed")
            harness.wait_for_text(driver, "BROWSER-DEMO first log line", selector=harness.LOGS)
            harness.screenshot(driver, shots / "flow-run.png")

            harness.click_tab(driver, "Artifacts")
            for key in KEYS:
                harness.wait_for_text(driver, key, selector=harness.ARTIFACTS_GRID)
            harness.screenshot(driver, shots / "flow-run-artifacts.png")

            harness.artifact_page(driver, server, harness.artifact_by_key(server, flow_run_id, "run-summary"))
            harness.wait_for_text(driver, "Fine-tune run browser-demo", selector=harness.MARKDOWN + " h1")
            harness.wait_for_text(driver, "./runs/browser-demo/train/step-000040",
                                  selector=harness.MARKDOWN + " table")
            assert harness.wait_for_selector(driver, harness.MARKDOWN + " table") == 3
            images = harness.wait_for_images(driver)
            assert [(i["naturalWidth"], i["naturalHeight"]) for i in images] == [(800, 450)]
            assert images[0]["src"].startswith("data:image/png;base64,")
            harness.screenshot(driver, shots / "artifact-markdown.png")

            harness.artifact_page(driver, server, harness.artifact_by_key(server, flow_run_id, "train-metrics"))
            # The table pages 10 rows at a time: 60 steps are 6 pages; row 1 is on the first.
            harness.wait_for_text(driver, "checkpoint URI", selector=harness.TABLE)
            harness.wait_for_text(driver, "3.4016", selector=harness.TABLE)
            harness.wait_for_text(driver, "Page 1 of 6")
            harness.screenshot(driver, shots / "artifact-table.png")

            harness.artifact_page(driver, server, harness.artifact_by_key(server, flow_run_id, "train-progress"))
            harness.wait_for_text(driver, "Progress: 100%", selector=harness.PROGRESS)
            harness.screenshot(driver, shots / "artifact-progress.png")
        t_browser = time.monotonic()
    timings = {"server_start_s": t_server - t0, "flow_s": t_flow - t_server,
               "browser_s": t_browser - t_flow, "teardown_s": time.monotonic() - t_browser,
               "total_s": time.monotonic() - t0}
    (shots / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}) + "\n")
    assert timings["total_s"] < 120, timings


def test_stop_process_group_kills_the_leader_and_its_children():
    psutil = pytest.importorskip("psutil")
    # A leader that ignores SIGTERM and a child in its group: both must be gone afterwards.
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60 & wait"], start_new_session=True)
    deadline = time.monotonic() + 5
    while not (children := psutil.Process(proc.pid).children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children, "the shell did not start its child"
    t0 = time.monotonic()
    harness.stop_process_group(proc, grace=0.5)
    assert proc.returncode is not None
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, alive
    assert time.monotonic() - t0 < 5


@pytest.mark.browser
@pytest.mark.skipif(harness.missing_browser() is not None, reason=str(harness.missing_browser()))
def test_wait_for_images_tells_a_broken_image_from_a_loaded_one(tmp_path):
    from ckptflow import report
    good = report.png_data_uri(report.loss_curve_png([], [], "t"))
    page = tmp_path / "page.html"
    page.write_text(f'<div data-testid="markdown-display"><img src="{good}"></div>'
                    '<div id="bad" data-testid="markdown-display"><img src="data:image/png;base64,AAAA"></div>')
    with harness.browser() as driver:
        driver.get(page.as_uri())
        with pytest.raises(TimeoutError, match="not loaded"):
            harness.wait_for_images(driver, timeout=1)
        sizes = harness.wait_for_images(driver, selector="[data-testid=markdown-display]:not(#bad) img")
        assert [(i["naturalWidth"], i["naturalHeight"]) for i in sizes] == [(800, 450)]
