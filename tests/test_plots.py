import io
import math
import sys

import numpy as np
import pytest

from grad_guard import plots
from grad_guard.callbacks.monitor import GradientNormMonitor
from grad_guard.history import GradientHistory

from helpers import TinyModule, event_accumulator, make_loader, trainer

pytest.importorskip("matplotlib")
from matplotlib.image import imread

RED = np.array([228, 26, 28])
GREY = np.array([217, 217, 217])


def _history(nan_row: bool = False, no_grad_row: bool = False, steps: int = 12) -> GradientHistory:
    history = GradientHistory()
    layers = ["fc1", "fc2", "fc3", "head"]
    for step in range(steps):
        grads = [10.0 ** (i - 4) * (1 + 0.1 * step) for i in range(len(layers))]
        has_grad = [True] * len(layers)
        if nan_row:
            grads[1] = math.nan
        if no_grad_row:
            has_grad[2] = False
        history.record(step, layers, grads, total_norm=1.0, has_grad=has_grad)
    return history


def _count(image: np.ndarray, color: np.ndarray) -> int:
    return int((np.abs(image.astype(int) - color).sum(axis=-1) <= 6).sum())


def test_heatmap_has_one_row_per_layer_in_forward_order():
    history = _history()
    figure = plots.heatmap_figure(history)
    data = figure.axes[0].images[0].get_array()
    assert data.shape == (len(history.layers), len(history))
    # first layer (input end) on top: its row holds the smallest values
    assert data[0].max() < data[-1].min()
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert labels == history.layers
    image = plots.figure_to_array(figure)
    width, height = plots.heatmap_size(len(history.layers))
    assert image.shape == (height, width, 3) and image.dtype == np.uint8


def test_nonfinite_zero_and_missing_cells_are_marked_distinctly():
    plain = plots.figure_to_array(plots.heatmap_figure(_history()))
    marked = plots.heatmap_figure(_history(nan_row=True, no_grad_row=True))
    overlay = marked.axes[0].images[1].get_array()
    assert overlay[1].tolist() == [2.0] * 12  # the NaN row, in the non-finite colour
    pixels = plots.figure_to_array(marked)
    assert _count(pixels, RED) > 20 * _count(plain, RED) + 1000
    assert _count(pixels, GREY) > _count(plain, GREY) + 1000

    history = GradientHistory()
    history.record(0, ["a", "b"], [0.0, 1.0])
    history.record(1, ["a", "b"], [0.0, 2.0])
    overlay = plots.heatmap_figure(history).axes[0].images[1].get_array()
    assert overlay[0].tolist() == [1.0, 1.0]  # zero: its own colour
    assert np.ma.getmaskarray(overlay[1]).all()


def test_flow_chart_shows_mean_and_max_over_the_window_on_a_log_scale():
    history = GradientHistory()
    for step, scale in enumerate([100.0, 100.0, 1.0, 3.0]):
        history.record(step, ["a", "b"], [scale * 1e-3, scale])
    figure = plots.flow_figure(history, window=2)
    axes = figure.axes[0]
    assert axes.get_yscale() == "log"
    heights = [patch.get_height() for patch in axes.patches]
    # max bars first, then mean bars; only the last two steps count
    assert heights == pytest.approx([3e-3, 3.0, 2e-3, 2.0])
    assert plots.figure_to_array(figure).shape == (400, 800, 3)


def test_png_has_the_same_size_as_the_array(tmp_path):
    history = _history()
    paths = plots.save_pictures(history, tmp_path / "pictures")
    heatmap = imread(paths[0])
    width, height = plots.heatmap_size(len(history.layers))
    assert heatmap.shape[:2] == (height, width)
    assert imread(paths[1]).shape[:2] == (400, 800)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(plots, "_warned_missing", False)
    with pytest.raises(ImportError, match=r"grad-guard\[plot\]"):
        plots.heatmap_figure(_history())
    with pytest.warns(UserWarning, match=r"grad-guard\[plot\]"):
        assert plots.add_images([object()], _history(), step=0) is False
    assert plots.add_images([object()], _history(), step=0) is False  # warned once


def _decoded_size(encoded: bytes) -> tuple[int, int]:
    array = imread(io.BytesIO(encoded), format="png")
    return array.shape[1], array.shape[0]


def test_monitor_writes_heatmap_and_flow_images_to_tensorboard(tmp_path):
    monitor = GradientNormMonitor(log_every_n_steps=1, image_every_n_steps=2)
    t = trainer(tmp_path, max_steps=5, callbacks=[monitor])
    t.fit(TinyModule(), make_loader())
    accumulator = event_accumulator(t.logger.log_dir)
    assert set(accumulator.Tags()["images"]) == {plots.HEATMAP_TAG, plots.FLOW_TAG}
    heatmaps = accumulator.Images(plots.HEATMAP_TAG)
    # every 2nd logged step (steps 1 and 3) and at the end of fit (step 4)
    assert [e.step for e in heatmaps] == [1, 3, 4]
    width, height = plots.heatmap_size(3)  # TinyModule: net.0, net.2, net.4
    for event in heatmaps:
        assert (event.width, event.height) == (width, height)
        assert _decoded_size(event.encoded_image_string) == (width, height)
    flows = accumulator.Images(plots.FLOW_TAG)
    assert [(e.width, e.height) for e in flows] == [(800, 400)] * 3
    assert monitor.history.layers == ["net.0", "net.2", "net.4"]
    assert monitor.history.steps == [0, 1, 2, 3, 4]
    assert plots.heatmap_figure(monitor.history).axes[0].images[0].get_array().shape[0] == 3


def test_monitor_without_images(tmp_path):
    monitor = GradientNormMonitor(log_every_n_steps=1, image_every_n_steps=None)
    t = trainer(tmp_path, max_steps=3, callbacks=[monitor])
    t.fit(TinyModule(), make_loader())
    assert event_accumulator(t.logger.log_dir).Tags()["images"] == []
    assert len(monitor.history) == 3  # the history is kept all the same
    with pytest.raises(ValueError, match="image_every_n_steps"):
        GradientNormMonitor(image_every_n_steps=0)
    with pytest.raises(ValueError, match="history_size"):
        GradientNormMonitor(history_size=1)
