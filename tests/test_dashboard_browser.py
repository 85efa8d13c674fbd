"""The Gradients tab in a real ``tensorboard`` process and a real (headless) Chromium.

The server is ``tensorboard --logdir X`` in a subprocess on a free loopback port, so the
plugin is found through its entry point and reads through TensorBoard's default data
provider (the Rust data server where it is installed). The route test needs no browser;
the browser tests need the ``playwright`` package and Debian's Chromium: without them
they skip with the reason, except under CI (``CI=true``), where they fail.

``GRAD_GUARD_SCREENSHOT=docs/dashboard.png`` also saves the README's screenshot.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from test_plugin_routes import LAYERS, assert_matches_accumulator, make_logdir

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STARTUP_LIMIT_S = 120  # waiting for the server to load the runs, not a performance check


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = str(tmp_path_factory.mktemp("dashboard_browser"))
    # a longer fit for the README picture, the short one for the checks
    runs = make_logdir(root, steps=40 if os.environ.get("GRAD_GUARD_SCREENSHOT") else 12)
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", root]
    command += ["--port", str(port), "--host", "127.0.0.1", "--reload_interval", "1"]
    with open(os.path.join(root, "tensorboard.log"), "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_runs(url, process, len(runs), log.name)
            yield {"url": url, "runs": runs, "root": root}
        finally:
            process.terminate()
            process.wait(timeout=30)


def wait_for_runs(url: str, process: subprocess.Popen, count: int, log_name: str) -> None:
    """Poll the runs route until the server lists ``count`` runs (fail if it never does)."""
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if len(fetch(f"{url}/data/plugin/grad_guard/runs")) == count:
                return
        except OSError:
            pass
        time.sleep(0.5)
    with open(log_name) as handle:
        pytest.fail(f"tensorboard did not list {count} runs at {url}: {handle.read()[-3000:]}")


def route(server: dict[str, Any], name: str, **params: str) -> Any:
    return fetch(f"{server['url']}/data/plugin/grad_guard/{name}?{urllib.parse.urlencode(params)}")


def test_routes_through_the_tensorboard_server(server: dict[str, Any]) -> None:
    listing = fetch(f"{server['url']}/data/plugins_listing")
    assert listing["grad_guard"]["enabled"] is True
    for run in ("relu", "sigmoid"):
        body = route(server, "heatmap", run=run, tag="grad_norm")
        assert body["layers"] == LAYERS  # forward order even from the Rust data server
        assert_matches_accumulator(body, server["runs"][run], "grad_norm")
    events = route(server, "events", run="relu")
    assert {(e["step"], e["kind"]) for e in events} >= {(3, "exploding"), (7, "nonfinite")}


def chromium_or_skip() -> Any:
    """playwright's sync API, or skip (fail under CI) saying what is missing."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the python package playwright (pip install playwright)")
        sync_playwright = None
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + "; CI=true, so this is an error, not a skip")
        pytest.skip(reason)
    return sync_playwright


@pytest.fixture(scope="module")
def browser(server: dict[str, Any]) -> Iterator[Any]:
    sync_playwright = chromium_or_skip()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def tab(browser: Any, server: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    page = browser.new_page(viewport={"width": 1400, "height": 1500})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"{server['url']}/#grad_guard")
    frame = page.frame_locator("iframe")
    frame.locator(".gg-heatmap canvas").first.wait_for(timeout=60_000)
    yield page, frame
    page.close()
    assert errors == [], errors


def hover_cell(frame: Any, heatmap: Any, row: int, col: int) -> Any:
    canvas = heatmap.locator("canvas")
    w, h = float(canvas.get_attribute("data-cell-w")), float(canvas.get_attribute("data-cell-h"))
    canvas.hover(position={"x": (col + 0.5) * w, "y": (row + 0.5) * h})
    tip = frame.locator(".gg-tooltip")
    tip.wait_for(state="visible")
    return tip


def test_heatmap_has_one_row_per_layer_and_a_tooltip(tab: Any, server: dict[str, Any]) -> None:
    _page, frame = tab
    body = route(server, "heatmap", run="relu", tag="grad_norm")
    heatmap = frame.locator('.gg-heatmap[data-run="relu"]')
    canvas = heatmap.locator("canvas")
    assert int(canvas.get_attribute("data-rows")) == len(LAYERS)
    assert int(canvas.get_attribute("data-cols")) == len(body["steps"])
    assert heatmap.locator(".gg-row-label").all_inner_texts() == LAYERS  # input at the top
    for row, col in ((0, 0), (len(LAYERS) - 1, len(body["steps"]) - 1), (2, 5)):
        tip = hover_cell(frame, heatmap, row, col)
        assert tip.get_attribute("data-layer") == LAYERS[row]
        assert int(tip.get_attribute("data-step")) == body["steps"][col]
        expected = body["values"][row][col]
        assert float(tip.get_attribute("data-value")) == pytest.approx(expected, rel=1e-6)
        text = tip.inner_text()
        assert f"layer: {LAYERS[row]}" in text and "grad_norm:" in text


def test_clicking_a_column_shows_the_gradient_flow(tab: Any, server: dict[str, Any]) -> None:
    _page, frame = tab
    body = route(server, "heatmap", run="relu", tag="grad_norm")
    heatmap = frame.locator('.gg-heatmap[data-run="relu"]')
    hover_cell(frame, heatmap, 1, 4)
    heatmap.locator("canvas").click(
        position={"x": 4.5 * float(heatmap.locator("canvas").get_attribute("data-cell-w")), "y": 3}
    )
    flow = frame.locator(".gg-flow")
    flow.wait_for()
    assert int(flow.get_attribute("data-step")) == body["steps"][4]
    bars = flow.locator("rect.gg-bar")
    assert [bars.nth(j).get_attribute("data-layer") for j in range(bars.count())] == LAYERS
    for j in range(len(LAYERS)):
        value = float(bars.nth(j).get_attribute("data-value"))
        assert value == pytest.approx(body["values"][j][4], rel=1e-6)
    assert heatmap.locator(".gg-col-marker").is_visible()
    frame.locator('.gg-heatmap[data-run="relu"] .gg-row-label', has_text="blocks.3").click()
    frame.locator('.gg-series[data-layer="blocks.3"]').wait_for()


def test_small_multiples_share_one_colour_scale(tab: Any, server: dict[str, Any]) -> None:
    page, frame = tab
    frame.locator('.gg-run-picker input[value="sigmoid"]').check()
    frame.locator('.gg-heatmap[data-run="sigmoid"]').wait_for()
    assert frame.locator(".gg-heatmap").count() == 2
    assert frame.locator(".gg-legend").count() == 1
    finite = [
        v
        for run in ("relu", "sigmoid")
        for row in route(server, "heatmap", run=run, tag="grad_norm")["values"]
        for v in row
        if isinstance(v, float) and v > 0
    ]
    ticks = frame.locator(".gg-legend .gg-tick").all_inner_texts()
    assert ticks == [
        f"1e{math.floor(math.log10(min(finite)))}",
        f"1e{math.ceil(math.log10(max(finite)))}",
    ]
    frame.locator('.gg-quantities button[data-quantity="update_ratio"]').click()
    frame.locator('.gg-heatmap[data-tag="update_ratio"][data-run="sigmoid"]').wait_for()
    frame.locator('.gg-timeline[data-run="relu"] .gg-marker[data-kind="exploding"]').wait_for(
        state="attached"
    )
    frame.locator('.gg-report[data-run="sigmoid"] h3').wait_for()
    target = os.environ.get("GRAD_GUARD_SCREENSHOT")
    if target:
        frame.locator('.gg-quantities button[data-quantity="grad_norm"]').click()
        heatmap = frame.locator('.gg-heatmap[data-run="sigmoid"][data-tag="grad_norm"]')
        heatmap.wait_for()
        hover_cell(frame, heatmap, 0, 6)
        heatmap.locator("canvas").click(
            position={
                "x": 6.5 * float(heatmap.locator("canvas").get_attribute("data-cell-w")),
                "y": 3,
            }
        )
        frame.locator(".gg-flow").first.wait_for()
        hover_cell(frame, heatmap, 0, 6)
        page.screenshot(path=target)


def test_nonfinite_and_missing_cells_and_activation_heatmaps(tab: Any) -> None:
    _page, frame = tab
    frame.locator('.gg-run-picker input[value="relu"]').uncheck()
    frame.locator('.gg-run-picker input[value="synthetic"]').check()
    heatmap = frame.locator('.gg-heatmap[data-run="synthetic"]')
    heatmap.wait_for()
    assert heatmap.locator(".gg-row-label").all_inner_texts() == ["in", "mid", "out"]
    tip = hover_cell(frame, heatmap, 0, 1)
    assert tip.get_attribute("data-value") == "NaN" and "grad_norm: NaN" in tip.inner_text()
    tip = hover_cell(frame, heatmap, 1, 2)
    assert tip.get_attribute("data-value") == "null" and "no gradient" in tip.inner_text()
    assert hover_cell(frame, heatmap, 2, 1).get_attribute("data-value") == "0"
    assert frame.locator(".gg-legend").inner_text().count("zero") == 1
    frame.locator('.gg-quantities button[data-quantity="activation_std"]').click()
    frame.locator('.gg-heatmap[data-run="synthetic"][data-tag="activation_std"]').wait_for()


@pytest.mark.parametrize(
    ("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_missing_browser_skips_outside_ci_and_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="Chromium at /nonexistent/chromium"):
        chromium_or_skip()
