"""Weighted FedAvg of plaintext adapter differences (weights = each site's example count).

Used by the plaintext job (simulator, comparison runs). Every contribution is checked before it counts;
a rejected one is logged with the site and the reason, and a round with fewer accepted contributions than
required ends the job rather than quietly averaging fewer hospitals.
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.app_constant import AppConstants

from .adapter_state import check_same_layout
from .contribution_checks import check_contribution


class FedAvgAdapterAggregator(Aggregator):
    def __init__(self, min_contributions: int = 0):
        """``min_contributions``: accepted sites needed per round; 0 means every site in the job."""
        super().__init__()
        self.min_contributions = min_contributions
        self.reset(None)

    def reset(self, fl_ctx: FLContext | None) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._total_weight = 0
        self._weights: dict[str, int] = {}
        self._site_metrics: dict[str, dict] = {}
        self._adapter_config: dict | None = None
        self._rejected: dict[str, str] = {}

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "unknown site")
        reason = self._check(site, shareable, fl_ctx)
        if reason:
            self._rejected[site] = reason
            self.log_error(fl_ctx, f"rejected contribution from {site}: {reason}")
            return False
        dxo = from_shareable(shareable)
        weight = int(dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND))
        for k, v in dxo.data.items():
            acc = self._sum.setdefault(k, np.zeros(np.shape(v), dtype=np.float64))
            acc += weight * np.asarray(v, dtype=np.float64)
        self._total_weight += weight
        self._weights[site] = weight
        self._site_metrics[site] = dict(dxo.get_meta_prop("metrics") or {})
        self._adapter_config = self._adapter_config or dxo.get_meta_prop("adapter_config")
        self.log_info(fl_ctx, f"accepted contribution from {site} (weight {weight})")
        return True

    def _check(self, site: str, shareable: Shareable, fl_ctx: FLContext) -> str | None:
        reason, dxo = check_contribution(site, shareable, fl_ctx, self._weights, DataKind.WEIGHT_DIFF)
        if reason:
            return reason
        weight = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
        if not isinstance(weight, int) or isinstance(weight, bool) or weight <= 0:
            return f"weight (example count, meta '{MetaKey.NUM_STEPS_CURRENT_ROUND}') must be a positive integer, got {weight!r}"
        if not dxo.data:
            return "empty adapter difference"
        if self._sum:
            try:
                check_same_layout(self._sum, dxo.data, source="contribution")
            except ValueError as err:
                return str(err)
        bad = [k for k, v in dxo.data.items() if not np.all(np.isfinite(v))]
        if bad:
            return f"non-finite values in {bad[:3]}"
        config = dxo.get_meta_prop("adapter_config")
        if self._adapter_config and config and config != self._adapter_config:
            return "its LoRA configuration differs from the other sites'"
        return None

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        required = self.min_contributions or len(fl_ctx.get_engine().get_clients())
        if len(self._weights) < required:
            rejected = "; ".join(f"{s}: {r}" for s, r in self._rejected.items()) or "none rejected, too few arrived"
            reason = (
                f"round {fl_ctx.get_prop(AppConstants.CURRENT_ROUND)}: {len(self._weights)} accepted contributions, "
                f"{required} required ({rejected})"
            )
            self.system_panic(reason, fl_ctx)
            raise RuntimeError(reason)
        average = {k: (v / self._total_weight).astype(np.float32) for k, v in self._sum.items()}
        meta = {
            "site_weights": dict(self._weights),
            "site_metrics": dict(self._site_metrics),
            "adapter_config": self._adapter_config,
        }
        self.log_info(fl_ctx, f"aggregated {len(self._weights)} sites, weights {self._weights}")
        return DXO(DataKind.WEIGHT_DIFF, data=average, meta=meta).to_shareable()
