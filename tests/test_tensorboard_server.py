"""A real TensorBoard server serves what grad_guard wrote (no mocks)."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from grad_guard import plots
from grad_guard.callbacks.monitor import GradientNormMonitor

from helpers import TinyModule, make_loader, trainer

pytest.importorskip("matplotlib")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def _wait_for(base: str, path: str, ready, server: subprocess.Popen, deadline: float):
    """Poll ``path`` until ``ready(json)`` holds; TensorBoard loads event files in the background."""
    last = None
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"tensorboard exited early:\n{server.stdout.read()}")
        try:
            last = json.loads(_get(base + path))
            if ready(last):
                return last
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{path} never became ready; last answer: {last}")


def test_live_tensorboard_serves_scalars_and_images(tmp_path):
    monitor = GradientNormMonitor(log_every_n_steps=1, image_every_n_steps=2)
    t = trainer(tmp_path, max_steps=4, callbacks=[monitor])
    t.fit(TinyModule(), make_loader())
    run = "lightning_logs/version_0"

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        scalars = _wait_for(
            base,
            "/data/plugin/scalars/tags",
            lambda d: "grad_norm/net.4" in d.get(run, {}),
            server,
            deadline,
        )
        assert {
            "grad_norm/net.0",
            "grad_norm/net.2",
            "param_norm/net.0",
            "update_ratio/net.0",
            "grad_guard/total_grad_norm",
        } <= set(scalars[run])
        images = _wait_for(
            base,
            "/data/plugin/images/tags",
            lambda d: plots.FLOW_TAG in d.get(run, {}),
            server,
            deadline,
        )
        assert plots.HEATMAP_TAG in images[run]

        query = urllib.parse.urlencode({"run": run, "tag": "grad_norm/net.0"})
        points = json.loads(_get(f"{base}/data/plugin/scalars/scalars?{query}"))
        assert [step for _, step, _ in points] == [0, 1, 2, 3]

        query = urllib.parse.urlencode({"run": run, "tag": plots.HEATMAP_TAG, "sample": 0})
        entries = json.loads(_get(f"{base}/data/plugin/images/images?{query}"))
        assert [e["step"] for e in entries] == [1, 3]
        png = _get(f"{base}/data/plugin/images/individualImage?{entries[-1]['query']}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width = int.from_bytes(png[16:20], "big")
        height = int.from_bytes(png[20:24], "big")
        assert (width, height) == plots.heatmap_size(3)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
        server.stdout.close()
    assert server.returncode is not None
