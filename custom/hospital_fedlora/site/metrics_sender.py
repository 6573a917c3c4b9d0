"""The site's end of FLARE's metric streaming, limited to numbers.

FLARE's ``AnalyticsSender`` streams whatever it is given (text, images, parameters); a hospital's sender
must carry only scalar metrics, so no patient text can leave through it whatever code calls it. Being a
class of this package, it is also covered by the kits' class allow list, which FLARE's own sender is not.
"""

from __future__ import annotations

import math

from nvflare.apis.analytix import AnalyticsDataType
from nvflare.app_common.widgets.streaming import AnalyticsSender


class ScalarMetricsSender(AnalyticsSender):
    """``AnalyticsSender`` that sends finite scalars and refuses everything else."""

    def add(self, tag: str, value, data_type: AnalyticsDataType = AnalyticsDataType.SCALAR, global_step=None, **kwargs):
        if data_type not in (AnalyticsDataType.SCALAR, AnalyticsDataType.METRIC):
            raise ValueError(f"metric {tag!r}: only scalar metrics leave a hospital, not {data_type.value}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"metric {tag!r}: {value!r} is not a finite number")
        super().add(tag, float(value), data_type, global_step=global_step, **kwargs)
