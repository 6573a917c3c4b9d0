"""Server widget: one JSON line per round with every site's example count and training metrics."""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from ..protocol import Meta, Metric

ROUND_METRICS_FILE = "round_metrics.jsonl"


class RoundMetricsLog(Widget):
    """Appends ``<run>/round_metrics.jsonl`` after each aggregation and logs every site's losses.

    It reads only what the aggregator put in the aggregate's metadata (example counts and metrics, never
    weights), so it serves the plaintext and the encrypted job alike. No arguments.
    """

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != AppEventType.AFTER_AGGREGATION:
            return
        result = fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT)
        try:
            meta = from_shareable(result).meta
        except Exception:
            return  # a failed round is reported by the aggregator itself
        record = {
            Meta.ROUND: fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
            Meta.EXAMPLE_COUNTS: meta.get(Meta.EXAMPLE_COUNTS, {}),
            Meta.SITE_METRICS: meta.get(Meta.SITE_METRICS, {}),
        }
        run = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        with open(run / ROUND_METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        nan = float("nan")
        for site, m in sorted(record[Meta.SITE_METRICS].items()):
            self.log_info(
                fl_ctx,
                f"round {record[Meta.ROUND]} {site}: train loss {m.get(Metric.TRAIN_LOSS, nan):.4f}, validation loss "
                f"{m.get(Metric.VAL_LOSS_GLOBAL, nan):.4f} -> {m.get(Metric.VAL_LOSS_LOCAL, nan):.4f}",
            )
