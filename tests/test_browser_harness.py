"""The browser harness's own checks: processes stopped by their group, broken images told from
loaded ones. The harness end to end (server, flow, dashboard pages) is tests/test_dashboard.py,
on the real demo run: one server and one browser session for the default run."""
import subprocess
import time

import pytest

from tests.browser import harness


def test_stop_process_group_kills_the_leader_and_its_children():
    import psutil
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


def test_wait_until_up_waits_for_health_and_gives_up_on_time():
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    port = harness.free_port()
    url = f"http://127.0.0.1:{port}/api"
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not answer"):
        harness.wait_until_up(url, timeout=0.5)
    assert time.monotonic() - t0 < 3
    with pytest.raises(RuntimeError, match="exited"):
        harness.wait_until_up(url, timeout=5, check=lambda: (_ for _ in ()).throw(RuntimeError("exited")))
    # The server comes up a moment after the client started waiting: the client still gets through.
    servers = []

    def come_up():
        servers.append(http.server.HTTPServer(("127.0.0.1", port), Health))
        servers[0].serve_forever()

    threading.Timer(0.5, come_up).start()
    try:
        harness.wait_until_up(url, timeout=10)
    finally:
        servers[0].shutdown()
        servers[0].server_close()


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
