"""FLARE components in one process: the slice of FLARE's engine they use, and the contexts FLARE gives them.

Components are the real ones, driven through their FLARE interfaces (events, ``process``, ``accept``,
``aggregate``); only the engine that would hand them to each other is this small stand-in.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants


class Engine:
    """Components by id, the job's clients and the participant's workspace, as FLARE's engine offers them."""

    def __init__(self, components: dict | None = None, clients=(), workspace: Workspace | None = None):
        self.components = dict(components or {})
        self.clients = list(clients)
        self.workspace = workspace
        self.events: list[str] = []

    def get_component(self, component_id: str):
        return self.components.get(component_id)

    def get_clients(self):
        return [SimpleNamespace(name=c) for c in self.clients]

    def get_workspace(self) -> Workspace | None:
        return self.workspace

    def fire_event(self, event_type: str, fl_ctx: FLContext) -> None:
        self.events.append(event_type)  # FLARE's log_error and system_panic announce themselves this way

    @contextmanager
    def new_context(self):
        """A fresh context on this engine (FLARE's metric sender fires its events in one)."""
        yield fl_ctx("engine", engine=self)


def kit_workspace(root, name: str) -> Workspace:
    """A participant's workspace as FLARE lays it out (startup/ and local/)."""
    for folder in ("startup", "local"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    return Workspace(str(root), name)


def fl_ctx(identity: str, rnd: int | None = None, engine: Engine | None = None, job_id: str | None = None) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, identity, private=False, sticky=False)
    # Key files here are written by the test, not by provisioning: nothing is signed.
    ctx.set_prop(FLContextKey.SECURE_MODE, False, private=True, sticky=False)
    if rnd is not None:
        ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=False, sticky=False)
    if engine is not None:
        ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
        if engine.workspace is not None:
            ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, engine.workspace, private=True, sticky=False)
    if job_id is not None:
        ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=False, sticky=False)
    return ctx


def start_run(components, ctx: FLContext) -> None:
    """Deliver ABOUT_TO_START_RUN, then START_RUN, to each component, in the given order, as FLARE does when a
    job starts."""
    for event in (EventType.ABOUT_TO_START_RUN, EventType.START_RUN):
        for c in components:
            c.handle_event(event, ctx)
