"""Drive the Prefect dashboard in headless Chromium: a real server, a browser, waits, screenshots.

Facts this relies on, measured against the Prefect UI this project pins:
- only `prefect server start` serves the UI (prefect_test_harness and the ephemeral server never do);
- the SPA asks PREFECT_UI_API_URL (else PREFECT_API_URL) where the API is, so both must name our port;
- v2 pages live under /v2/ and carry stable data-testids; artifact content renders only on
  /v2/artifacts/artifact/<id>, never on the run's Artifacts tab or /artifacts/key/<key>;
- React re-renders make WebElement.text stale inside waits, so every wait reads innerText in JS.

Typical use (tests/test_dashboard.py does this on the demo run):

    with prefect_server(tmp_path) as server, browser() as driver:
        run_flow_script(server, script)
        open_flow_run(driver, server, flow_run_id)
        wait_for_state(driver, "Completed")
        md = artifact_by_key(server, flow_run_id, "demo-summary")
        artifact_page(driver, server, md)
        sizes = wait_for_images(driver)
        screenshot(driver, SCREENSHOT_DIR / "summary.png")
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT_DIR = REPO_ROOT / "test-output" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
    # The UI always calls amplitude.com; offline that stalls on DNS. Refusing every host but
    # loopback makes it fail at once and guarantees the test never reaches the internet.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)

# Stable v2 selectors (prefect 3.8.8); v1 has none of these.
LOGS = "[role=log]"
STATE_BADGE = "[data-slot=badge]"     # the run header's state ("Completed", "Failed", ...)
TABS = "[role=tab]"                   # Details, Logs, Task Runs, Subflow Runs, Artifacts, ...
ARTIFACTS_GRID = "[data-testid=flow-run-artifacts-grid]"
MARKDOWN = "[data-testid=markdown-display]"
MARKDOWN_IMAGES = "[data-testid=markdown-display] img"
TABLE = "[data-testid=table-display]"
PROGRESS = "[data-testid=progress-display]"
CONTENT_SELECTOR = {"markdown": MARKDOWN, "table": TABLE, "progress": PROGRESS}


def missing_browser() -> str | None:
    """Why the browser test cannot run here, or None. Use as a skip reason. Only the system
    packages (apt, as root) may be missing; selenium is a required test dependency (conftest.py)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} missing: run .ci/browser-deps.sh as root"
    return None


# ---- the server ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Server:
    url: str         # http://127.0.0.1:PORT, where the UI is (/v2/...)
    api_url: str     # http://127.0.0.1:PORT/api
    pid: int         # the `prefect server start` process; also its process group id
    home: str        # the server's PREFECT_HOME
    log_path: str    # its stdout and stderr
    tmp_dir: str
    proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that runs flows against this server."""
        env = _clean_env()
        env.update({
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": os.path.join(self.tmp_dir, "client-home"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        })
        env.update(extra)
        return env


def _clean_env() -> dict[str, str]:
    """os.environ without PREFECT_* (a stray PREFECT_UI_ENABLED=0 or API URL would silently
    change what we test), with analytics and telemetry off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_server(tmp_dir, port: int | None = None, startup_timeout: float = 120.0,
                   extra_env: dict[str, str] | None = None, wait: bool = True):
    """`prefect server start` on loopback with UI, a fresh PREFECT_HOME under tmp_dir; yields a
    Server once /api/health answers and /ui-settings names our port. Stopped by PID on exit.

    wait=False yields as soon as the process is started, so that clients can do their imports
    while the server migrates its database (~15 s of one core); call wait_healthy(server) then,
    and have each client call wait_until_up(PREFECT_API_URL) before it talks to the API."""
    tmp_dir = Path(tmp_dir)
    port = port or free_port()
    url, home = f"http://127.0.0.1:{port}", tmp_dir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = _server_env(url, str(home), tmp_dir)
    env.update(extra_env or {})
    log_path = tmp_dir / "prefect-server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        # Own session: the server's children (services, uvicorn) share its process group.
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(url, url + "/api", proc.pid, str(home), str(log_path), str(tmp_dir), proc)
    try:
        if wait:
            wait_healthy(server, startup_timeout)
        yield server
    finally:
        stop_process_group(proc)


def _server_env(url: str, home: str, tmp_dir: Path) -> dict[str, str]:
    import prefect
    env = _clean_env()
    env.update({
        "PREFECT_HOME": home,
        "PREFECT_API_URL": url + "/api",
        "PREFECT_UI_API_URL": url + "/api",
        "PREFECT_SERVER_UI_ENABLED": "true",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    })
    # The first start copies the built UI next to the package; elsewhere if that is read-only.
    if not os.access(os.path.join(os.path.dirname(prefect.__file__), "server"), os.W_OK):
        env["PREFECT_UI_STATIC_DIRECTORY"] = str(tmp_dir / "ui-static")
    return env


def wait_healthy(server: Server, timeout: float = 120.0) -> None:
    """Until /api/health answers (failing at once if the server exited), then check that the
    dashboard calls this server's API."""
    def exited():
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.proc.returncode}:\n{_tail(server.log_path)}")

    try:
        wait_until_up(server.api_url, timeout, check=exited)
    except TimeoutError:
        raise TimeoutError(f"prefect server not healthy after {timeout:.0f} s:\n{_tail(server.log_path)}") from None
    ui_api = api(server, "/ui-settings", base=server.url).get("api_url")
    if ui_api != server.api_url:
        raise RuntimeError(f"the dashboard would call {ui_api!r}, not {server.api_url!r}")


def wait_until_up(api_url: str, timeout: float = 120.0, check=None) -> None:
    """Until GET {api_url}/health answers 200; `check()` runs between tries (it may raise).
    Light on purpose: client subprocesses call it after their slow imports."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        try:
            with urllib.request.urlopen(api_url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{api_url}/health did not answer within {timeout:.0f} s")
        time.sleep(0.25)


def _tail(path: str, n: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def stop_process_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process and its group, SIGKILL whatever is left after `grace` seconds."""
    if proc.poll() is None:
        _signal(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Children that outlived the leader still carry its group id (start_new_session).
    _signal(proc.pid, signal.SIGKILL, group_only=True)


def _signal(pid: int, sig: int, group_only: bool = False) -> None:
    targets = [os.killpg] if group_only else [os.kill, os.killpg]
    for send in targets:
        try:
            send(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def api(server: Server, path: str, body: dict | None = None, base: str | None = None):
    """GET (or POST when body is given) a JSON endpoint of the server; `path` is under /api."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request((base or server.api_url) + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # the body says which field the API refused
        raise RuntimeError(f"{req.get_method()} {req.full_url}: {e.code} {e.read()[:1000]!r}") from None


def run_flow_script(server: Server, script, *args: str, timeout: float = 180.0,
                    **env: str) -> subprocess.CompletedProcess:
    """Run `python script args...` against the server; raise with its output if it fails."""
    proc = subprocess.run([sys.executable, str(script), *args], env=server.client_env(**env),
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"{script} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def flow_run(server: Server, flow_run_id: str) -> dict:
    """The flow run as the API has it: name, state_name ("Completed"), state_type, ..."""
    return api(server, f"/flow_runs/{flow_run_id}")


def flow_run_artifacts(server: Server, flow_run_id: str) -> list[dict]:
    """Artifacts created by a flow run (id, key, type, description, data), newest first."""
    return api(server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}},
                                             "sort": "CREATED_DESC"})


def artifact_by_key(server: Server, flow_run_id: str, key: str) -> dict:
    """The latest artifact with `key` from this flow run."""
    found = [a for a in flow_run_artifacts(server, flow_run_id) if a.get("key") == key]
    if not found:
        raise LookupError(f"flow run {flow_run_id} has no artifact with key {key!r}")
    return found[0]


# ---- the browser ---------------------------------------------------------------------------

@contextmanager
def browser(width: int = 1440, height: int = 1100, page_load_timeout: float = 60.0,
            driver_log: str | None = None):
    """A headless Chromium driven by Debian's chromedriver, fresh profile; quit and killed on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ckptflow-chromium-")
    opts = webdriver.ChromeOptions()
    # An explicit binary and driver: otherwise selenium-manager tries to download a driver.
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + (f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    service = Service(CHROMEDRIVER, log_output=driver_log or subprocess.DEVNULL)
    driver = None
    try:
        driver = webdriver.Chrome(service=service, options=opts)
        driver.set_page_load_timeout(page_load_timeout)
        yield driver
    finally:
        _quit(driver, service)
        shutil.rmtree(profile, ignore_errors=True)


def _quit(driver, service) -> None:
    proc = getattr(service, "process", None)
    descendants = _descendants(proc.pid) if proc else []
    try:
        if driver is not None:
            driver.quit()
        else:
            service.stop()
    except Exception:  # a dead driver must not mask the test's own failure
        pass
    if proc and proc.poll() is None:
        _signal(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    for child in descendants:  # chromium processes chromedriver started
        try:
            if child.is_running():
                child.kill()
        except Exception:
            pass


def _descendants(pid: int) -> list:
    try:
        import psutil
        return psutil.Process(pid).children(recursive=True)
    except Exception:
        return []


def screenshot(driver, path, full_page: bool = True) -> Path:
    """PNG of the page (the whole document with full_page, else the viewport)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not full_page:
        driver.save_screenshot(str(path))
        return path
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


# ---- pages ---------------------------------------------------------------------------------

def flow_run_url(server: Server, flow_run_id: str, tab: str | None = None) -> str:
    """The v2 page of a flow run; tab: "Logs", "Artifacts", "TaskRuns", ... (None: Logs)."""
    return f"{server.url}/v2/runs/flow-run/{flow_run_id}" + (f"?tab={tab}" if tab else "")


def open_flow_run(driver, server: Server, flow_run_id: str, tab: str | None = None,
                  timeout: float = 30.0) -> dict:
    """Load the flow run page and wait until it shows the run's name; returns the API's run."""
    run = flow_run(server, flow_run_id)
    driver.get(flow_run_url(server, flow_run_id, tab))
    wait_for_text(driver, run["name"], timeout=timeout)
    return run


def wait_for_state(driver, state_name: str, timeout: float = 30.0) -> None:
    """Until the run header's state badge reads exactly `state_name` (a log line saying
    "Finished in state Completed()" does not count)."""
    wait_for(driver, "return [...document.querySelectorAll(arguments[0])]"
                     ".some(e => e.innerText.trim() === arguments[1]);",
             STATE_BADGE, state_name, timeout=timeout, what=f"state badge {state_name!r}")


def click_tab(driver, name: str, timeout: float = 30.0) -> None:
    """Click the run page's tab called `name` and wait until it is the selected one."""
    find = "[...document.querySelectorAll(arguments[0])].find(e => e.innerText.trim() === arguments[1])"
    tab = wait_for(driver, f"return {find};", TABS, name, timeout=timeout, what=f"tab {name!r}")
    tab.click()
    wait_for(driver, f"const t = {find}; return t && t.getAttribute('aria-selected') === 'true';",
             TABS, name, timeout=timeout, what=f"tab {name!r} selected")


def artifact_url(server: Server, artifact_id: str) -> str:
    return f"{server.url}/v2/artifacts/artifact/{artifact_id}"


def artifact_page(driver, server: Server, artifact, timeout: float = 30.0) -> dict:
    """Load an artifact's own page (the only one that renders its content) and wait for that
    content: artifact is the dict from flow_run_artifacts/artifact_by_key, or an id."""
    if isinstance(artifact, str):
        artifact = api(server, f"/artifacts/{artifact}")
    driver.get(artifact_url(server, artifact["id"]))
    selector = CONTENT_SELECTOR.get(artifact["type"])
    if selector:
        wait_for_selector(driver, selector, timeout=timeout)
    return artifact


# ---- waiting on the DOM --------------------------------------------------------------------

def wait_for(driver, script: str, *args, timeout: float = 30.0, what: str | None = None):
    """Poll `script` (a JS function body that returns a value) until it returns something truthy;
    return that value. A timeout names what it waited for, the URL and the start of the page text."""
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = driver.execute_script(script, *args)
        except WebDriverException:  # a re-render or a navigation in between
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what or script} on {driver.current_url}; "
                               f"page text: {page_text(driver)[:800]!r}")
        time.sleep(0.2)


def wait_for_text(driver, text: str, selector: str = "body", timeout: float = 30.0) -> None:
    """Until an element matching `selector` has `text` in its innerText."""
    wait_for(driver, "return [...document.querySelectorAll(arguments[0])]"
                     ".some(e => e.innerText.includes(arguments[1]));",
             selector, text, timeout=timeout, what=f"{text!r} in {selector}")


def wait_for_selector(driver, selector: str, timeout: float = 30.0) -> int:
    """Until at least one element matches; returns how many do."""
    return wait_for(driver, "return document.querySelectorAll(arguments[0]).length;",
                    selector, timeout=timeout, what=f"an element {selector}")


def text_of(driver, selector: str = "body") -> str:
    """innerText of every element matching `selector`, one per line ("" if none)."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])]"
                                 ".map(e => e.innerText).join('\\n');", selector)


def page_text(driver) -> str:
    try:
        return text_of(driver)
    except Exception:
        return ""


def image_sizes(driver, selector: str = MARKDOWN_IMAGES) -> list[dict]:
    """[{src (first 40 chars), complete, naturalWidth, naturalHeight}] for each matching <img>."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(i => ({src: i.src.slice(0, 40),"
        " complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}));",
        selector)


def wait_for_images(driver, selector: str = MARKDOWN_IMAGES, min_count: int = 1,
                    timeout: float = 30.0) -> list[dict]:
    """Until at least min_count images match and every one has loaded with a non-zero size;
    returns image_sizes. A broken image (complete, naturalWidth 0) times out."""
    def loaded():
        imgs = image_sizes(driver, selector)
        ok = len(imgs) >= min_count and all(i["complete"] and i["naturalWidth"] > 0 for i in imgs)
        return imgs if ok else None

    deadline = time.monotonic() + timeout
    while (imgs := loaded()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"images {selector} not loaded after {timeout:.0f} s: {image_sizes(driver, selector)}")
        time.sleep(0.2)
    return imgs
