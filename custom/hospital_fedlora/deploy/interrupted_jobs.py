"""A server-kit component: a job that was running when the server died is marked finished at restart.

FLARE 2.9 leaves such a job ``RUNNING`` in its job store for ever, although nothing runs it: ``abort_job``
then answers "job is not running" and nothing can resume it. At system start (before any job is
scheduled) this marks every job still recorded as running or dispatched ``FINISHED:ABANDONED`` (FLARE's
own status for it), and logs how to resume it
(``deploy/resume_job.py``, docs/reliability.md).
"""

from __future__ import annotations

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import SystemComponents
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import RunStatus


class InterruptedJobs(FLComponent):
    """Marks jobs a crashed server left ``RUNNING``/``DISPATCHED`` as ``FINISHED:ABANDONED`` at start. No arguments."""

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != EventType.SYSTEM_START:
            return
        engine = fl_ctx.get_engine()
        job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
        if job_manager is None:
            return
        for job in job_manager.get_jobs_by_status([RunStatus.RUNNING, RunStatus.DISPATCHED], fl_ctx):
            job_manager.set_status(job.job_id, RunStatus.ABANDONED, fl_ctx)
            self.log_warning(
                fl_ctx,
                f"job {job.job_id} was running when the server stopped; marked {RunStatus.ABANDONED.value}. Its completed "
                f"rounds are in {job.job_id}/ of this workspace: resume it with python -m hospital_fedlora.deploy.resume_job "
                f"--admin-kit <admin kit> --job <its job folder> --from {job.job_id} (docs/reliability.md)",
            )
