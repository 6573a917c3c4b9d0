"""Server widget: one JSON line per round with every site's weight and metrics.

It reads only what the aggregator put in the aggregate's metadata (example counts and losses, never
weights), so it serves the plaintext and the encrypted aggregators alike. ``<run>/round_metrics.jsonl`` is
what the demo prints as the per-round table and what an operator downloads with the job.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

ROUND_METRICS_FILE = "round_metrics.jsonl"


class RoundMetricsLog(Widget):
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != AppEventType.AFTER_AGGREGATION:
            return
        result = fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT)
        try:
            meta = from_shareable(result).meta
        except Exception:
            return  # a failed round is reported by the aggregator itself
        record = {
            "round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
            "site_weights": meta.get("site_weights", {}),
            "site_metrics": meta.get("site_metrics", {}),
        }
        run = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        with open(run / ROUND_METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        for site, m in sorted(record["site_metrics"].items()):
            self.log_info(
                fl_ctx,
                f"round {record['round']} {site}: train loss {m.get('train_loss', float('nan')):.4f}, "
                f"validation loss {m.get('val_loss_global', float('nan')):.4f} -> {m.get('val_loss_local', float('nan')):.4f}",
            )
