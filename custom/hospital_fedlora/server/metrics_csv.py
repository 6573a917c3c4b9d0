"""The hospitals' streamed metrics as one CSV at the server, beside FLARE's TensorBoard receiver.

Hospitals send scalars through FLARE's metric streaming (``AnalyticsSender`` at the site, the
``fed.analytix_log_stats`` event to the server); this receiver appends each as a row
``site,round,metric,value`` to ``<run folder>/metrics.csv``, flushed per row so a crash loses nothing
already received. Scalars only: no text leaves a site through it.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.widgets.streaming import AnalyticsReceiver

METRICS_CSV = "metrics.csv"
COLUMNS = ("site", "round", "metric", "value")


class MetricsCsvReceiver(AnalyticsReceiver):
    """Writes every streamed scalar metric to ``<run folder>/<file_name>``."""

    def __init__(self, file_name: str = METRICS_CSV, events: list[str] | None = None):
        super().__init__(events=events)
        self.file_name = file_name
        self._file = None
        self._writer = None

    def initialize(self, fl_ctx: FLContext) -> None:
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        path = run_dir / self.file_name
        new = not path.exists()
        self._file = path.open("a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(COLUMNS)
            self._file.flush()

    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin: str) -> None:
        data = AnalyticsData.from_dxo(from_shareable(shareable))
        if data is None or data.data_type not in (AnalyticsDataType.SCALAR, AnalyticsDataType.METRIC):
            return
        value = float(data.value)
        if self._writer is None or not math.isfinite(value):
            return
        self._writer.writerow((record_origin, data.step, data.tag, repr(value)))
        self._file.flush()

    def finalize(self, fl_ctx: FLContext) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None
