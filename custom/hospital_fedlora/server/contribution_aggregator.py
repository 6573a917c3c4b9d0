"""The base of both aggregators: what every contribution must pass, and what a round needs to close."""

from __future__ import annotations

from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.app_constant import AppConstants

from ..protocol import ERROR_HEADER, Meta


class ContributionAggregator(Aggregator):
    """Checks each contribution before it counts; ends the job rather than average fewer hospitals.

    Every contribution must carry the site's OK, answer the current round, be the site's first this round,
    be a DXO of ``expected_kind`` with a positive integer example count and the same LoRA configuration as
    the others; then the subclass's ``add`` checks and takes in the payload. A rejected contribution is
    logged with the site and the reason. ``aggregate`` refuses a round with fewer accepted contributions
    than required, naming every rejection, and otherwise returns the subclass's ``result`` with the
    round's example counts and each site's training metrics in its metadata.

    Args:
        min_contributions: accepted contributions needed per round; 0 means every site in the job.
    """

    expected_kind = ""
    kind_hint = ""  # appended to the wrong-kind message: what to check in the job

    def __init__(self, min_contributions: int = 0):
        super().__init__()
        self.min_contributions = min_contributions
        self.reset(None)

    def reset(self, fl_ctx: FLContext | None) -> None:
        self.example_counts: dict[str, int] = {}
        self.site_metrics: dict[str, dict] = {}
        self.adapter_config: dict | None = None
        self.rejected: dict[str, str] = {}

    # ------------------------------------------------------------------------------------ subclass hooks
    def add(self, site: str, dxo: DXO, fl_ctx: FLContext) -> str | None:
        """Check the payload further and add it to the round's sum; return a reason to reject instead."""
        raise NotImplementedError

    def result(self, fl_ctx: FLContext) -> DXO:
        """The round's aggregate; called only when enough contributions were accepted."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- accepting
    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "unknown site")
        try:
            reason = self._check_and_add(site, shareable, fl_ctx)
        except ValueError as err:  # payload checks raise with the site named
            reason = str(err)
        if reason:
            self.rejected[site] = reason
            self.log_error(fl_ctx, f"rejected contribution from {site}: {reason}")
            return False
        self.log_info(fl_ctx, f"accepted contribution from {site} ({self.example_counts[site]} examples)")
        return True

    def _check_and_add(self, site: str, shareable: Shareable, fl_ctx: FLContext) -> str | None:
        rc = shareable.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            cause = shareable.get_header(ERROR_HEADER)
            return f"site reported {rc}" + (f": {cause}" if cause else "")
        current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        contributed = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        if current is not None and contributed != current:
            return f"result is for round {contributed}, the current round is {current}"
        if site in self.example_counts:
            return "a second contribution in the same round"
        try:
            dxo = from_shareable(shareable)
        except Exception as err:
            return f"not a DXO ({err})"
        if dxo.data_kind != self.expected_kind:
            return f"expected {self.expected_kind}{self.kind_hint}, got {dxo.data_kind}"
        count = dxo.get_meta_prop(Meta.EXAMPLE_COUNT)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            return f"example count (meta '{Meta.EXAMPLE_COUNT}') must be a positive integer, got {count!r}"
        config = dxo.get_meta_prop(Meta.ADAPTER_CONFIG)
        if self.adapter_config and config and config != self.adapter_config:
            return "its LoRA configuration differs from the other sites'"
        reason = self.add(site, dxo, fl_ctx)
        if reason:
            return reason
        self.example_counts[site] = count
        self.site_metrics[site] = dict(dxo.get_meta_prop(Meta.METRICS) or {})
        self.adapter_config = self.adapter_config or config
        return None

    # ---------------------------------------------------------------------------------------- aggregating
    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        required = self.min_contributions or len(fl_ctx.get_engine().get_clients())
        if len(self.example_counts) < required:
            rejected = "; ".join(f"{s}: {r}" for s, r in self.rejected.items()) or "none rejected, too few arrived"
            reason = f"round {rnd}: {len(self.example_counts)} accepted contributions, {required} required ({rejected})"
            self.system_panic(reason, fl_ctx)
            raise RuntimeError(reason)
        dxo = self.result(fl_ctx)
        dxo.meta.update(
            {
                Meta.ROUND: rnd,
                Meta.EXAMPLE_COUNTS: dict(self.example_counts),
                Meta.SITE_METRICS: dict(self.site_metrics),
                Meta.ADAPTER_CONFIG: self.adapter_config,
            }
        )
        return dxo.to_shareable()
