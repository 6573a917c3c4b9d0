"""Weighted FedAvg of plaintext adapter differences: the plaintext job's aggregator."""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext

from ..adapter_layout import AdapterLayout
from ..protocol import Meta
from .contribution_aggregator import ContributionAggregator


class FedAvgAdapterAggregator(ContributionAggregator):
    """Averages the sites' adapter differences (``WEIGHT_DIFF``), weighted by their example counts.

    Besides the checks of ``ContributionAggregator``, a difference must be non-empty, finite and have the
    adapter layout of the round's first contribution. The aggregate is a ``WEIGHT_DIFF`` for FLARE's
    ``FullModelShareableGenerator`` to add to the global adapter.

    Args:
        min_contributions: accepted contributions needed per round; 0 means every site in the job.
    """

    expected_kind = DataKind.WEIGHT_DIFF

    def reset(self, fl_ctx: FLContext | None) -> None:
        super().reset(fl_ctx)
        self._sum: dict[str, np.ndarray] = {}
        self._layout: AdapterLayout | None = None
        self._total_weight = 0

    def add(self, site: str, dxo: DXO, fl_ctx: FLContext) -> str | None:
        if not dxo.data:
            return "empty adapter difference"
        layout = AdapterLayout.from_tensors(dxo.data)
        if self._layout is not None:
            self._layout.check(dxo.data, source="contribution")
        bad = [k for k, v in dxo.data.items() if not np.all(np.isfinite(v))]
        if bad:
            return f"non-finite values in {bad[:3]}"
        weight = dxo.get_meta_prop(Meta.EXAMPLE_COUNT)
        for k, v in dxo.data.items():
            acc = self._sum.setdefault(k, np.zeros(np.shape(v), dtype=np.float64))
            acc += weight * np.asarray(v, dtype=np.float64)
        self._total_weight += weight
        self._layout = layout
        return None

    def result(self, fl_ctx: FLContext) -> DXO:
        average = {k: (v / self._total_weight).astype(np.float32) for k, v in self._sum.items()}
        self.log_info(fl_ctx, f"averaged {len(self.example_counts)} sites, example counts {self.example_counts}")
        return DXO(DataKind.WEIGHT_DIFF, data=average)
