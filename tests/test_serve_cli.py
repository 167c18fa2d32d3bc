"""`python -m launcher.serve` (what `make serve` runs) as a user runs it: it finds the run's newest
export, serves the API, says where Prometheus scrapes its metrics, and stops cleanly on Ctrl-C.
In a module of its own, so that no other test's Ray runs in this process meanwhile."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conftest import REPO, free_port, interruptible_popen
from lm.export import export_checkpoint

pytestmark = pytest.mark.slow


def test_serve_command_serves_the_runs_newest_export_and_metrics_until_ctrl_c(trained, tmp_path):
    _, checkpoints, prepared = trained
    export_checkpoint(checkpoints["gpt2-trained"], tmp_path / "runs" / "cli" / "exports" / "fp32-step000300", "fp32",
                      prepared.tokens("val"))
    port, metrics_port = free_port(), free_port()
    proc = interruptible_popen([sys.executable, "-m", "launcher.serve", "run.name=cli", f"run.storage={tmp_path}/runs",
                                f"serve.port={port}", f"serve.metrics_port={metrics_port}"], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        lines = []
        deadline = time.time() + 180
        while time.time() < deadline and not any("OpenAI-compatible API on" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines[-30:])
            lines.append(line)
        assert f"OpenAI-compatible API on http://127.0.0.1:{port}/v1 (Ctrl-C stops it)\n" in lines
        assert f"Prometheus metrics (Ray's, Serve's and the engine's ray_lm_*) on http://127.0.0.1:{metrics_port}" \
               "/metrics\n" in lines

        url = f"http://127.0.0.1:{port}"
        assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]] == ["cli"]
        reply = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": "cli", "prompt": "def main(", "max_tokens": 4, "temperature": 0}).json()
        assert reply["usage"]["completion_tokens"] == 4
        assert "\nray_" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text

        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
