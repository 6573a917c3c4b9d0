"""A committed job's components for one server and several hospitals, in one process, round by round.

Every component is built from the job's own config files (class paths and arguments) and driven through
its FLARE interface; messages cross between participants as FOBS bytes (``Shareable.to_bytes`` /
``from_bytes``), exactly what FLARE puts on the wire before streaming. The server's task-data filters run
on the train task as it leaves and its task-result filters on every upload before the aggregator, as
FLARE's server runner applies them (a failing result filter turns the upload into FLARE's
``TASK_RESULT_FILTER_ERROR`` reply). Used by the round-path test and
the HE benchmark, so both measure what the jobs ship.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from flare_harness import Engine, fl_ctx, kit_workspace, start_run

REPO = Path(__file__).resolve().parents[1]
JOB_ID = "job-in-process"


def build(entry: dict, **overrides):
    """An instance of a job-config component entry ``{"path": ..., "args": ...}``."""
    module, _, cls = entry["path"].rpartition(".")
    return getattr(importlib.import_module(module), cls)(**{**entry.get("args", {}), **overrides})


def filters(config: dict, key: str, leave_out: tuple[str, ...] = ()) -> list:
    """The filters of a config's ``task_data_filters`` / ``task_result_filters``, in order, built."""
    return [build(f) for entry in config.get(key, []) for f in entry["filters"] if f["path"] not in leave_out]


def job_config(job_dir: Path, side: str) -> dict:
    return json.loads((job_dir / "app" / "config" / f"config_fed_{side}.json").read_text())


@dataclass
class Site:
    name: str
    engine: Engine
    data_filters: list  # on the task data, in order
    result_filters: list  # on the train result, in order
    executor: object | None = None
    components: list = field(default_factory=list)

    def ctx(self, rnd: int | None = None):
        ctx = fl_ctx(self.name, rnd, self.engine, JOB_ID)
        ctx.set_peer_context(fl_ctx("server"))  # a site's task comes from the server
        return ctx


class JobInProcess:
    """Server and hospitals of the job in ``job_dir``, in one process.

    ``root`` gets one kit-like workspace per participant; ``startup_files`` (``{"server": {name: bytes},
    "client": {name: bytes}}``) are written into their ``startup/`` folders, as provisioning does for the
    key files. With ``site_configs`` every hospital also runs the job's executor on its own data,
    otherwise the caller supplies each round's train result. ``client_args`` override the arguments of
    client components (and the executor) by id. ``leave_out``: class paths of filters not to build on
    either side (a benchmark's fp32 reference without the plaintext job's quantized transport).
    """

    def __init__(self, job_dir: Path, root: Path, sites: list[str], startup_files: dict[str, dict[str, bytes]],
                 site_configs: Path | None = None, client_args: dict[str, dict] | None = None,
                 leave_out: tuple[str, ...] = ()):  # fmt: skip
        self.sites: dict[str, Site] = {}
        client, server = job_config(job_dir, "client"), job_config(job_dir, "server")
        overrides = client_args or {}
        for name in sites:
            workspace = kit_workspace(root / name, name)
            for file, data in startup_files.get("client", {}).items():
                Path(workspace.get_startup_kit_dir(), file).write_bytes(data)
            app_config = Path(workspace.get_client_app_config_file_path(JOB_ID))
            app_config.parent.mkdir(parents=True)
            app_config.write_text(json.dumps(client))
            components = {c["id"]: build(c, **overrides.get(c["id"], {})) for c in client["components"]}
            data_filters = filters(client, "task_data_filters", leave_out)
            result_filters = filters(client, "task_result_filters", leave_out)
            site = Site(name, Engine(components, sites, workspace), data_filters, result_filters)
            if site_configs is not None:
                (Path(workspace.get_root_dir()) / "local" / "site_config.yaml").write_text(
                    (site_configs / f"{name}.yaml").read_text()
                )
                entry = client["executors"][0]["executor"]
                site.executor = build(entry, **overrides.get(entry["id"], {}))
            site.components = [*components.values(), *data_filters, *result_filters] + ([site.executor] if site.executor else [])
            start_run(site.components, site.ctx())
            self.sites[name] = site

        workspace = kit_workspace(root / "server", "server")
        for file, data in startup_files.get("server", {}).items():
            Path(workspace.get_startup_kit_dir(), file).write_bytes(data)
        Path(workspace.get_run_dir(JOB_ID)).mkdir(parents=True)
        self.server = {c["id"]: build(c) for c in server["components"]}
        self.server_data_filters = filters(server, "task_data_filters", leave_out)
        self.server_result_filters = filters(server, "task_result_filters", leave_out)
        self.server_engine = Engine(self.server, sites, workspace)
        self.global_model = None
        started = time.process_time()
        start_run([*self.server.values(), *self.server_data_filters, *self.server_result_filters], self.server_ctx())
        self.server_start_cpu_s = time.process_time() - started  # loading the server's keys, once per job
        self.global_model = self.server["persistor"].load_model(self.server_ctx())

    def server_ctx(self, rnd: int | None = None):
        ctx = fl_ctx("server", rnd, self.server_engine, JOB_ID)
        ctx.set_prop(AppConstants.GLOBAL_MODEL, self.global_model, private=True, sticky=False)
        return ctx

    # -------------------------------------------------------------------------------------------- server
    def fire(self, event_type: str, ctx) -> None:
        """An event to every server component, as FLARE's engine delivers it."""
        for component in self.server.values():
            component.handle_event(event_type, ctx)

    def task_data(self, rnd: int) -> bytes:
        """The ``train`` task every site receives in round ``rnd`` (with ``ScatterAndGather``'s events)."""
        ctx = self.server_ctx(rnd)
        self.fire(AppEventType.ROUND_STARTED, ctx)
        task = self.server["shareable_generator"].learnable_to_shareable(self.global_model, ctx)
        task.set_header(AppConstants.CURRENT_ROUND, rnd)
        ctx.set_prop(AppConstants.TRAIN_SHAREABLE, task, private=True, sticky=False)
        self.fire(AppEventType.BEFORE_TRAIN_TASK, ctx)
        for f in self.server_data_filters:  # as the task leaves for a site
            task = f.process(task, ctx)
        return task.to_bytes()

    def server_filtered(self, result: Shareable, rnd: int) -> Shareable:
        """An upload after the server's task-result filters, as FLARE's server runner hands it on."""
        ctx = self.server_ctx(rnd)
        ctx.set_peer_context(fl_ctx(result.get_peer_prop(ReservedKey.IDENTITY_NAME, "unknown site")))
        try:
            for f in self.server_result_filters:
                result = f.process(result, ctx)
        except Exception:  # FLARE logs the cause at the server and hands on an error reply for the same task
            reply = make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)
            for key in (ReservedHeaderKey.PEER_PROPS, ReservedHeaderKey.COOKIE_JAR, ReservedHeaderKey.TASK_ID):
                if result.get_header(key) is not None:
                    reply.set_header(key, result.get_header(key))
            result = reply
        return result

    def aggregate(self, rnd: int, uploads: dict[str, bytes]) -> None:
        """The server's side of a round: accept every upload, sum, append to the log, persist, record."""
        ctx = self.server_ctx(rnd)
        aggregator = self.server["aggregator"]
        aggregator.reset(ctx)
        for site, data in uploads.items():
            result = Shareable.from_bytes(data)
            result.set_peer_props({ReservedKey.IDENTITY_NAME: site})
            result.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd)
            result = self.server_filtered(result, rnd)
            ctx.set_prop(AppConstants.TRAINING_RESULT, result, private=True, sticky=False)
            self.fire(AppEventType.BEFORE_CONTRIBUTION_ACCEPT, ctx)
            accepted = aggregator.accept(result, ctx)
            ctx.set_prop(AppConstants.AGGREGATION_ACCEPTED, accepted, private=True, sticky=False)
            self.fire(AppEventType.AFTER_CONTRIBUTION_ACCEPT, ctx)
            if not accepted:
                raise AssertionError(f"{site} rejected: {getattr(aggregator, 'rejected', {}).get(site)}")
        self.fire(AppEventType.BEFORE_AGGREGATION, ctx)
        summed = aggregator.aggregate(ctx)
        ctx.set_prop(AppConstants.AGGREGATION_RESULT, summed, private=True, sticky=False)
        self.fire(AppEventType.AFTER_AGGREGATION, ctx)  # before the generator takes the sum, as ScatterAndGather
        self.global_model = self.server["shareable_generator"].shareable_to_learnable(summed, ctx)
        self.server["persistor"].save_model(self.global_model, self.server_ctx(rnd))

    def end(self) -> None:
        """The job's end at the server (``END_RUN``)."""
        self.fire(EventType.END_RUN, self.server_ctx())

    # --------------------------------------------------------------------------------------------- sites
    def receive(self, site: str, task_bytes: bytes, rnd: int) -> Shareable:
        """A site's task data after its task-data filters."""
        s = self.sites[site]
        task = Shareable.from_bytes(task_bytes)
        ctx = s.ctx(rnd)
        ctx.set_prop(FLContextKey.TASK_DATA, task, private=True, sticky=False)
        for component in s.components:
            component.handle_event(EventType.BEFORE_TASK_EXECUTION, ctx)
        for f in s.data_filters:
            task = f.process(task, ctx)
        return task

    def train(self, site: str, task: Shareable, rnd: int) -> Shareable:
        s = self.sites[site]
        result = s.executor.execute("train", task, s.ctx(rnd), Signal())
        if result.get_return_code() != "OK":
            raise AssertionError(f"{site}: train failed: {result.get_header('hospital_fedlora_error')}")
        return result

    def send(self, site: str, result: Shareable, rnd: int) -> bytes:
        """A site's train result after its task-result filters, as bytes for the server."""
        ctx = self.sites[site].ctx(rnd)
        for f in self.sites[site].result_filters:
            result = f.process(result, ctx)
        return result.to_bytes()

    def round(self, rnd: int) -> None:
        """One whole round with the sites' executors: task out, decrypt, train, encrypt, sum, log."""
        task = self.task_data(rnd)
        uploads = {}
        for site in self.sites:
            received = self.receive(site, task, rnd)
            uploads[site] = self.send(site, self.train(site, received, rnd), rnd)
        self.aggregate(rnd, uploads)
