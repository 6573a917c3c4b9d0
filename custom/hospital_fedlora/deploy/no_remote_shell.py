"""A hospital kit component: the site runs no shell command sent to it (``ls``, ``cat``, ``head``, ``tail``,
``grep``, ``pwd``), whoever sends it.

FLARE 2.9 runs these inside a site's workspace, which is the kit: ``startup/`` and its key files included.
The hospital's ``local/authorization.json`` (``deploy/kits.py``) denies them to every admin role, but a
FLARE client checks its policy only when the server's request asks it to (``RequestHeader.REQUIRE_AUTHZ``
in ``nvflare/private/fed/client/admin.py``), so a server running modified code could skip the check.
``make kits`` adds this component to every hospital's ``local/resources.json``: at system start it
replaces the shell-command processor of the site's admin agent with one that refuses every command.
"""

from __future__ import annotations

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.private.admin_defs import Message
from nvflare.private.defs import SysCommandTopic
from nvflare.private.fed.client.admin import RequestProcessor

REFUSAL = "Error: this hospital runs no shell commands sent to it (hospital_fedlora.deploy.no_remote_shell)"


class RefuseShellCommands(RequestProcessor):
    """FLARE's request processor for shell commands, answering every one with ``REFUSAL``."""

    def get_topics(self) -> list[str]:
        return [SysCommandTopic.SHELL]

    def process(self, req: Message, app_ctx) -> Message:
        return Message(topic="reply_" + req.topic, body=REFUSAL)


class NoRemoteShell(FLComponent):
    """At system start, puts ``RefuseShellCommands`` in place of FLARE's shell-command processor."""

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != EventType.SYSTEM_START:
            return
        processors = getattr(getattr(fl_ctx.get_engine(), "admin_agent", None), "processors", None)
        if not isinstance(processors, dict) or SysCommandTopic.SHELL not in processors:
            # FLARE's admin agent changed: say so loudly; the site's authorization.json still applies
            self.log_error(fl_ctx, "cannot turn off remote shell commands: this FLARE version's client admin agent differs")
            return
        processors[SysCommandTopic.SHELL] = RefuseShellCommands()
        self.log_info(fl_ctx, "shell commands sent to this site are refused")
