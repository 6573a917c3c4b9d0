"""The server's round loop: FLARE's ScatterAndGather, resumable, with one minimum for the whole round."""

from __future__ import annotations

from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

from .contribution_aggregator import ContributionAggregator


class RoundsWorkflow(ScatterAndGather):
    """``ScatterAndGather`` with three additions a long cross-silo run needs; every argument is FLARE's own.

    - One minimum: ``min_clients`` is also the aggregator's required number of accepted contributions,
      so a round that closes with the minimum is never refused by the aggregator (a job's ``meta.json``
      ``min_clients`` must match it; ``tests/test_jobs.py`` checks the committed jobs).
    - A round that closes without some sites says which, and which timeout decided it; a site's error
      reply reaches the aggregator, which logs the site's own cause (FLARE would log the return code
      only). With ``ignore_result_error`` null (the jobs' setting) the round goes on while its minimum
      can still be met; when it cannot, the job's fatal error names every failed site with its cause.
    - Resuming: when the persistor loaded rounds of an earlier run (its ``resumed_rounds``), the loop
      continues after them, so ``num_rounds`` stays the job's total.
    """

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        if isinstance(self.aggregator, ContributionAggregator):
            if self.aggregator.min_contributions not in (0, self._min_clients):
                self.system_panic(
                    f"the aggregator's min_contributions ({self.aggregator.min_contributions}) differs from the "
                    f"workflow's min_clients ({self._min_clients}); set the minimum once, as the workflow's min_clients",
                    fl_ctx,
                )
                return
            self.aggregator.min_contributions = self._min_clients
        done = getattr(self.persistor, "resumed_rounds", 0)
        if done:
            self._current_round = done
            left = max(0, self._start_round + self._num_rounds - done)
            self.log_info(fl_ctx, f"resuming after {done} completed rounds: {left} of {self._num_rounds} rounds left")

    def _accept_train_result(self, client_name: str, result: Shareable, fl_ctx: FLContext, is_unknown_task: bool = False) -> bool:
        if result.get_return_code(ReturnCode.OK) != ReturnCode.OK and isinstance(self.aggregator, ContributionAggregator):
            self.aggregator.accept(result, fl_ctx)  # records and logs the cause; never accepts an error reply
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)

    def system_panic(self, reason: str, fl_ctx: FLContext) -> None:
        # FLARE's message for a round that can no longer reach its minimum names the sites' return codes
        # only; the causes the sites sent (protocol.ERROR_HEADER) are with the aggregator.
        if isinstance(self.aggregator, ContributionAggregator) and self.aggregator.rejected:
            causes = "; ".join(f"{s}: {r}" for s, r in sorted(self.aggregator.rejected.items()))
            reason = f"{reason} Sites' causes: {causes}"
        super().system_panic(reason, fl_ctx)

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == AppEventType.BEFORE_AGGREGATION and isinstance(self.aggregator, ContributionAggregator):
            sites = sorted(c.name for c in self._engine.get_clients())
            silent = self.aggregator.silent(sites)
            if silent:
                why = (
                    f"train_timeout of {self._train_timeout} s reached"
                    if len(self.aggregator.example_counts) + len(self.aggregator.rejected) < self._min_clients
                    else f"{self._wait_time_after_min_received} s waited after the minimum of {self._min_clients} answered"
                )
                self.log_warning(
                    fl_ctx,
                    f"round {self._current_round} closes without {', '.join(silent)}: no answer ({why})",
                )
