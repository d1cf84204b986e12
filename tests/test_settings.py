"""Prefect defaults: set only what the environment does not set, before prefect is imported."""
import subprocess
import sys

from ckptflow.settings import PREFECT_DEFAULTS, apply_prefect_defaults


def test_defaults_fill_only_what_is_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    applied = apply_prefect_defaults(env)
    assert env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "300"    # the user's value wins
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in applied
    assert env["DO_NOT_TRACK"] == "1" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_HOME"] == str(tmp_path / ".ckptflow" / "prefect")
    assert (tmp_path / ".ckptflow" / "prefect").is_dir()      # prefect makes no parents itself
    assert set(PREFECT_DEFAULTS) <= set(env)


def test_the_cli_applies_them_before_prefect_reads_its_settings(tmp_path):
    code = ("import os; os.environ.pop('PREFECT_HOME', None); os.environ['HOME'] = %r\n"
            "import flows.finetune\n"
            "from prefect.settings import get_current_settings as s\n"
            "print(s().home, s().server.ephemeral.startup_timeout_seconds, s().server.analytics_enabled)") % str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(tmp_path / ".ckptflow" / "prefect"), "120", "False"]
