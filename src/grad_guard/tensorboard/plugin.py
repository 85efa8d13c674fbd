"""The "Gradients" tab: grad_guard's TensorBoard plugin.

Registered with the ``tensorboard_plugins`` entry point (name ``grad_guard``), so
``tensorboard --logdir DIR`` finds it once grad-guard is installed. The tab is active
when some run has a ``grad_norm/`` scalar and hidden otherwise. JSON routes, under
``/data/plugin/grad_guard/``:

* ``runs``: the runs with grad_guard data, ``[{"run", "quantities", "layers",
  "clipping", "config"}, ...]``;
* ``heatmap?run=R&tag=grad_norm``: ``{"layers", "steps", "values"}``, layers input
  first, one column per logged step, raw values, ``null`` where a layer has none
  (``tag`` is any of :data:`grad_guard.tensorboard.data.QUANTITIES`);
* ``events?run=R``: the anomaly events, ``[{"step", "kind", "action", "text"}, ...]``;
* ``timeline?run=R``: the run-level ``grad_guard/...`` series (total norm, clipping,
  counters) as ``{"series": {name: [[step, value], ...]}}``;
* ``report?run=R``: the run's health report (``grad_guard.report``'s JSON).

The frontend is the ES module ``static/index.js``, served from ``static/``.
"""

from __future__ import annotations

import mimetypes
import os
from typing import Any

from tensorboard import context as tb_context
from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from grad_guard.tensorboard import order
from grad_guard.tensorboard.data import QUANTITIES, RunData
from grad_guard.tensorboard.report_data import build_report_json

PLUGIN_NAME = "grad_guard"
TAB_NAME = "Gradients"
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class GradGuardPlugin(base_plugin.TBPlugin):
    """TensorBoard plugin serving the Gradients dashboard and its JSON routes.

    Args:
        context: TensorBoard's ``base_plugin.TBContext`` (its ``data_provider`` and
            ``logdir`` are used).

    Example::

        from tensorboard import program
        from grad_guard.tensorboard import GradGuardLoader

        tb = program.TensorBoard(plugins=[GradGuardLoader])  # or just `tensorboard --logdir`
    """

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._data = RunData(context.data_provider, context.logdir)

    def get_plugin_apps(self) -> dict[str, Any]:
        return {
            "/runs": self._serve_runs,
            "/heatmap": self._serve_heatmap,
            "/events": self._serve_events,
            "/timeline": self._serve_timeline,
            "/report": self._serve_report,
            "/static/*": self._serve_static,
        }

    def is_active(self) -> bool:
        """Active when some run has a ``grad_norm/`` scalar."""
        if self._data.provider is None:
            return False
        return self._data.has_data(tb_context.RequestContext(), "")

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/static/index.js", tab_name=TAB_NAME)

    # ------------------------------------------------------------------ routes
    @staticmethod
    def _request(request: Any) -> tuple[Any, str]:
        return plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)

    def _run_arg(self, request: Any) -> str:
        run = request.args.get("run")
        if run is None:
            raise errors.InvalidArgumentError("missing query argument run (a run name)")
        return run

    @staticmethod
    def _json(request: Any, body: Any) -> Any:
        return http_util.Respond(request, body, "application/json")

    @wrappers.Request.application
    def _serve_runs(self, request: Any) -> Any:
        ctx, experiment = self._request(request)
        return self._json(request, self._data.runs(ctx, experiment))

    @wrappers.Request.application
    def _serve_heatmap(self, request: Any) -> Any:
        ctx, experiment = self._request(request)
        run = self._run_arg(request)
        quantity = request.args.get("tag", "grad_norm")
        if quantity not in QUANTITIES:
            raise errors.InvalidArgumentError(
                f"tag={quantity!r} is not one of {', '.join(QUANTITIES)}"
            )
        try:
            body = self._data.heatmap(ctx, experiment, run, quantity)
        except KeyError as err:
            raise errors.NotFoundError(str(err.args[0])) from None
        return self._json(request, body)

    @wrappers.Request.application
    def _serve_events(self, request: Any) -> Any:
        ctx, experiment = self._request(request)
        return self._json(request, self._data.events(ctx, experiment, self._run_arg(request)))

    @wrappers.Request.application
    def _serve_timeline(self, request: Any) -> Any:
        ctx, experiment = self._request(request)
        return self._json(request, self._data.timeline(ctx, experiment, self._run_arg(request)))

    @wrappers.Request.application
    def _serve_report(self, request: Any) -> Any:
        run = self._run_arg(request)
        run_dir = order.run_directory(self._data.logdir, run)
        if run_dir is None or not order.event_files(run_dir):
            raise errors.NotFoundError(
                f"no local event files for run={run!r} under the logdir "
                f"{self._data.logdir!r}: the report is built from a run's files on disk"
            )
        try:
            body = build_report_json(run_dir)
        except Exception as err:  # the report is optional: say why, keep the tab working
            message = f"the report of run={run!r} could not be built: {type(err).__name__}: {err}"
            return http_util.Respond(request, {"error": message}, "application/json", code=500)
        return self._json(request, body)

    @wrappers.Request.application
    def _serve_static(self, request: Any) -> Any:
        name = request.path.rsplit("/static/", 1)[-1]
        path = os.path.normpath(os.path.join(STATIC_DIR, *name.split("/")))
        if not path.startswith(STATIC_DIR + os.sep) or not os.path.isfile(path):
            return http_util.Respond(request, "Not found", "text/plain", code=404)
        mimetype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if path.endswith(".js"):
            mimetype = "text/javascript"
        with open(path, "rb") as handle:
            return http_util.Respond(request, handle.read(), content_type=mimetype)


class GradGuardLoader(base_plugin.TBLoader):
    """Loads :class:`GradGuardPlugin` (what the ``tensorboard_plugins`` entry point names).

    Example::

        from tensorboard import program
        program.TensorBoard(plugins=[GradGuardLoader()])
    """

    def load(self, context: base_plugin.TBContext) -> GradGuardPlugin:
        return GradGuardPlugin(context)
