"""The Gradients dashboard's JSON routes, on event files written by real Lightning fits.

The app is TensorBoard's own WSGI app with the in-process multiplexer data provider; the
browser test (test_dashboard_browser.py) runs the same routes through a ``tensorboard``
process (the Rust data server where it is installed).
"""

from __future__ import annotations

import json
import math
import os
from importlib.metadata import entry_points
from typing import Any

import lightning as L
import pytest
import torch
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider as tb_data_provider
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from werkzeug import test as werkzeug_test

from grad_guard import GradGuard
from grad_guard.loggers import write_scalars
from grad_guard.tensorboard.plugin import GradGuardLoader, GradGuardPlugin

from helpers import event_accumulator, make_loader

LAYERS = ["stem", "blocks.1", "blocks.3", "blocks.5", "a_head"]  # forward order, not sorted
EVENT = "**{kind}** at step {step} — action `{action}`\n\n| layer | gradient norm |\n|---|---|\n| `stem` | nan |"


class NamedNet(L.LightningModule):
    """A deep MLP whose layer names do not sort into forward order."""

    def __init__(self, activation: str = "relu", lr: float = 0.05) -> None:
        super().__init__()
        act = nn.Sigmoid if activation == "sigmoid" else nn.ReLU
        self.stem = nn.Linear(4, 16)
        self.blocks = nn.Sequential(
            act(), nn.Linear(16, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 16), act()
        )
        self.a_head = nn.Linear(16, 2)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a_head(self.blocks(self.stem(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def fit_run(root: str, name: str, activation: str = "relu", steps: int = 12) -> str:
    """A real fit with GradGuard (monitor, detection, AutoClip) logging to ``root/name``."""
    torch.manual_seed(0)
    logger = L.pytorch.loggers.TensorBoardLogger(root, name=name, version="")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        log_every_n_steps=1,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[GradGuard(clipping="autoclip", print_report=False)],
    )
    trainer.fit(NamedNet(activation), make_loader(n=64, features=4, batch_size=8))
    run_dir = logger.log_dir
    writer = SummaryWriter(run_dir)  # anomaly events in the detection callback's format
    writer.add_text(
        "grad_guard/anomaly_events", EVENT.format(kind="exploding", step=3, action="skip"), 3
    )
    writer.add_text(
        "grad_guard/anomaly_events", EVENT.format(kind="nonfinite", step=7, action="rollback"), 7
    )
    writer.close()
    return run_dir


def synthetic_run(root: str) -> str:
    """NaN, Inf, zero and missing cells, written in the monitor's format (one event a step)."""
    run_dir = os.path.join(root, "synthetic")
    writer = SummaryWriter(run_dir)
    writer.add_text("grad_guard/config", json.dumps({"version": 1, "precision": "16-mixed"}), 0)
    rows = {
        0: {"in": 1.0, "mid": 0.5, "out": 0.25},
        1: {"in": float("nan"), "mid": float("inf"), "out": 0.0},
        2: {"in": 2.0, "out": 4.0},  # "mid" has no gradient on step 2
    }
    for step, values in rows.items():
        write_scalars(writer, {f"grad_norm/{k}": v for k, v in values.items()}, step)
        # activation statistics, as ActivationMonitor logs them (module names, own event)
        write_scalars(
            writer, {"activation_std/act1": 0.5 * (step + 1), "dead_fraction/act1": 0.0}, step
        )
    writer.close()
    return run_dir


def plain_run(root: str) -> str:
    """A run without grad_guard data."""
    writer = SummaryWriter(os.path.join(root, "plain"))
    for step in range(3):
        writer.add_scalar("loss", 1.0 / (step + 1), step)
    writer.close()
    return os.path.join(root, "plain")


def make_logdir(root: str, steps: int = 12) -> dict[str, str]:
    """run name -> folder, for the runs the dashboard tests read."""
    return {
        "relu": fit_run(root, "relu", steps=steps),
        "sigmoid": fit_run(root, "sigmoid", activation="sigmoid", steps=steps),
        "synthetic": synthetic_run(root),
    }


def make_client(logdir: str) -> werkzeug_test.Client:
    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        size_guidance={"scalars": 0, "tensors": 0}
    )
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    provider = tb_data_provider.MultiplexerDataProvider(multiplexer, logdir)
    context = base_plugin.TBContext(logdir=logdir, data_provider=provider, multiplexer=multiplexer)
    plugin = GradGuardLoader().load(context)
    return werkzeug_test.Client(application.TensorBoardWSGI([plugin], data_provider=provider))


def get(client: werkzeug_test.Client, route: str, **params: str) -> Any:
    response = client.get(f"/data/plugin/grad_guard/{route}", query_string=params)
    assert response.status_code == 200, response.get_data(as_text=True)
    return json.loads(response.get_data(as_text=True))


def assert_matches_accumulator(body: dict[str, Any], run_dir: str, quantity: str) -> None:
    """Every cell equals what EventAccumulator reads (1e-6 relative); absent cells are null."""
    accumulator = event_accumulator(run_dir)
    tags = [t for t in accumulator.Tags()["scalars"] if t.startswith(quantity + "/")]
    expected = {t: {e.step: e.value for e in accumulator.Scalars(t)} for t in tags}
    assert sorted(body["layers"]) == sorted(t.split("/", 1)[1] for t in tags)
    assert body["steps"] == sorted({s for series in expected.values() for s in series})
    for layer, row in zip(body["layers"], body["values"]):
        series = expected[f"{quantity}/{layer}"]
        for step, got in zip(body["steps"], row):
            if step not in series:
                assert got is None
            elif math.isnan(series[step]):
                assert got == "NaN"
            elif math.isinf(series[step]):
                assert got == ("Infinity" if series[step] > 0 else "-Infinity")
            else:
                assert got == pytest.approx(series[step], rel=1e-6, abs=0.0)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    root = str(tmp_path_factory.mktemp("dashboard_logs"))
    runs = make_logdir(root)
    plain_run(root)
    return root, runs


@pytest.fixture(scope="module")
def client(logdir: tuple[str, dict[str, str]]) -> werkzeug_test.Client:
    return make_client(logdir[0])


def test_runs_lists_only_runs_with_grad_guard_data(client: werkzeug_test.Client) -> None:
    runs = {r["run"]: r for r in get(client, "runs")}
    assert sorted(runs) == ["relu", "sigmoid", "synthetic"]
    assert runs["relu"]["layers"] == len(LAYERS)
    assert {"grad_norm", "param_norm", "update_ratio"} <= set(runs["relu"]["quantities"])
    assert runs["relu"]["clipping"] is True
    assert runs["synthetic"]["config"] == {"version": 1, "precision": "16-mixed"}


@pytest.mark.parametrize("quantity", ["grad_norm", "update_ratio", "param_norm"])
def test_heatmap_equals_event_accumulator_in_forward_order(
    client: werkzeug_test.Client, logdir: tuple[str, dict[str, str]], quantity: str
) -> None:
    for run in ("relu", "sigmoid"):
        body = get(client, "heatmap", run=run, tag=quantity)
        assert body["layers"] == LAYERS
        assert len(body["values"]) == len(LAYERS)
        assert all(len(row) == len(body["steps"]) for row in body["values"])
        assert_matches_accumulator(body, logdir[1][run], quantity)
    assert len(get(client, "heatmap", run="relu", tag="grad_norm")["steps"]) == 12


def test_heatmap_marks_nonfinite_zero_and_missing_cells(
    client: werkzeug_test.Client, logdir: tuple[str, dict[str, str]]
) -> None:
    body = get(client, "heatmap", run="synthetic", tag="grad_norm")
    assert body["layers"] == ["in", "mid", "out"]
    assert body["steps"] == [0, 1, 2]
    assert body["values"] == [[1.0, "NaN", 2.0], [0.5, "Infinity", None], [0.25, 0.0, 4.0]]
    assert_matches_accumulator(body, logdir[1]["synthetic"], "grad_norm")


def test_heatmap_serves_activation_statistics(
    client: werkzeug_test.Client, logdir: tuple[str, dict[str, str]]
) -> None:
    runs = {r["run"]: r for r in get(client, "runs")}
    assert {"activation_std", "dead_fraction"} <= set(runs["synthetic"]["quantities"])
    assert "activation_std" not in runs["relu"]["quantities"]
    body = get(client, "heatmap", run="synthetic", tag="activation_std")
    assert body["layers"] == ["act1"] and body["values"] == [[0.5, 1.0, 1.5]]
    dead = get(client, "heatmap", run="synthetic", tag="dead_fraction")
    assert_matches_accumulator(dead, logdir[1]["synthetic"], "dead_fraction")


def test_events_parse_the_anomaly_text(client: werkzeug_test.Client) -> None:
    events = get(client, "events", run="relu")
    mine = [(e["step"], e["kind"], e["action"]) for e in events if e["step"] in (3, 7)]
    assert (3, "exploding", "skip") in mine and (7, "nonfinite", "rollback") in mine
    assert all({"step", "kind", "action", "text"} <= set(e) for e in events)
    assert [e["step"] for e in events] == sorted(e["step"] for e in events)
    assert get(client, "events", run="synthetic") == []


def test_timeline_has_clipping_series(
    client: werkzeug_test.Client, logdir: tuple[str, dict[str, str]]
) -> None:
    series = get(client, "timeline", run="relu")["series"]
    expected = {
        e.step: e.value
        for e in event_accumulator(logdir[1]["relu"]).Scalars("grad_guard/clip/pre_norm")
    }
    assert {s: v for s, v in series["clip/pre_norm"]} == pytest.approx(expected, rel=1e-6)
    assert "clip/post_norm" in series and "total_grad_norm" in series


def test_report_is_the_runs_health_report(client: werkzeug_test.Client) -> None:
    report = get(client, "report", run="sigmoid")
    assert [row["name"] for row in report["layers"]] == LAYERS
    assert isinstance(report["findings"], list) and "healthy" in report


@pytest.mark.parametrize(
    ("params", "code"),
    [({"tag": "grad_norm"}, 400), ({"run": "relu", "tag": "loss"}, 400), ({"run": "nope"}, 404)],
)
def test_heatmap_rejects_bad_arguments(
    client: werkzeug_test.Client, params: dict[str, str], code: int
) -> None:
    response = client.get("/data/plugin/grad_guard/heatmap", query_string=params)
    assert response.status_code == code


def test_static_files_are_served_and_confined(client: werkzeug_test.Client) -> None:
    for name in ("index.js", "heatmap.js", "charts.js", "panels.js", "style.css"):
        response = client.get(f"/data/plugin/grad_guard/static/{name}")
        assert response.status_code == 200, name
    assert client.get("/data/plugin/grad_guard/static/index.js").mimetype == "text/javascript"
    assert client.get("/data/plugin/grad_guard/static/../plugin.py").status_code == 404
    assert client.get("/data/plugin/grad_guard/static/nope.js").status_code == 404


def test_plugin_is_active_only_with_grad_guard_data(
    tmp_path: Any, logdir: tuple[str, dict[str, str]]
) -> None:
    listing = json.loads(make_client(logdir[0]).get("/data/plugins_listing").get_data())
    assert listing["grad_guard"]["enabled"] is True
    assert listing["grad_guard"]["tab_name"] == "Gradients"
    assert listing["grad_guard"]["loading_mechanism"]["module_path"].endswith("/static/index.js")
    plain_run(str(tmp_path))
    listing = json.loads(make_client(str(tmp_path)).get("/data/plugins_listing").get_data())
    assert listing["grad_guard"]["enabled"] is False


def test_entry_point_loads_the_plugin() -> None:
    (point,) = [e for e in entry_points(group="tensorboard_plugins") if e.name == "grad_guard"]
    loader = point.load()
    assert issubclass(loader, base_plugin.TBLoader)
    assert loader is GradGuardLoader
    assert GradGuardPlugin.plugin_name == "grad_guard"
