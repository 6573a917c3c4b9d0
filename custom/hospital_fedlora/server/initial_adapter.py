"""The job's first step: FLARE's InitializeGlobalWeights, where a failing site is named and does not end the job."""

from __future__ import annotations

from nvflare.apis.controller_spec import ClientTask
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.workflows.initialize_global_weights import InitializeGlobalWeights

from ..protocol import ERROR_HEADER


class InitialAdapter(InitializeGlobalWeights):
    """Asks every site for the seeded initial adapter (the same at each) and keeps the first one received.

    FLARE's ``InitializeGlobalWeights`` ends the job at the first error reply, naming neither the cause nor
    the other sites' answers. Here a site's error reply is logged with the cause it names
    (``protocol.ERROR_HEADER``) and dropped; the job ends only if no site sent the adapter. The rounds then
    decide with their one minimum (``RoundsWorkflow``), and every failing site is in the job report
    (``job_report.JobReport``). Every argument is FLARE's own.
    """

    def _process_client_response(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        result = client_task.result
        rc = result.get_return_code(ReturnCode.OK) if isinstance(result, Shareable) else ReturnCode.OK
        if rc != ReturnCode.OK:
            cause = result.get_header(ERROR_HEADER) or f"no cause given (return code {rc})"
            self.log_error(fl_ctx, f"{client_task.client.name} sent no initial adapter: {cause}")
            client_task.result = None
            return
        super()._process_client_response(client_task, fl_ctx)
