"""Bad updates from one hospital, through a committed job's real server and hospital components.

Each scenario plays a round of ``jobs/fedlora_plain`` or ``jobs/fedlora_he`` in one process
(``job_in_process.JobInProcess``). The server sends the train task to three hospitals, firing FLARE's
task-sent event so the aggregator knows which task went to whom; ``hospital-a`` and ``hospital-b`` upload
honest adapter changes through their task-result filters; ``hospital-c`` (or a stranger) sends the
scenario's bad update, or fails at its own filter, which FLARE's client runner reports to the server as
``TASK_RESULT_FILTER_ERROR``. Every upload reaches the aggregator as FLARE's server runner hands it over
(bytes, the sender's identity, the task id, the task's round cookie). The round then closes with the two
honest hospitals and its aggregate is compared with their example-weighted average.

For a benchmark::

    rows = [{"name": s.name, "rejected": run(s, tmp_dir).rejected} for s in SCENARIOS]
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.decomposers import common_decomposers

from hospital_fedlora.adapter_layout import AdapterLayout
from hospital_fedlora.config import LoraSettings
from hospital_fedlora.he.bfv_context import (
    CLIENT_CONTEXT_FILE,
    SERVER_CONTEXT_FILE,
    BFVParams,
    make_context,
    serialize_context,
)
from hospital_fedlora.he.encoding import dequantize, step_size
from hospital_fedlora.he.packed_bfv import decrypt_ints
from hospital_fedlora.he.wire_format import CHUNK_MAGIC, frame, unframe
from hospital_fedlora.protocol import Data, Meta
from hospital_fedlora.transport.quantization import max_abs_error
from hospital_fedlora.transport.quantize_filter import QuantizeFilter
from hospital_fedlora_tools.base_model import BaseModelSpec

from flare_harness import fl_ctx
from job_in_process import REPO, JobInProcess

PLAIN, HE = "fedlora_plain", "fedlora_he"
SITES = ("hospital-a", "hospital-b", "hospital-c")
HONEST, BAD = SITES[:2], SITES[2]
COUNTS = {"hospital-a": 240, "hospital-b": 160, "hospital-c": 120}
# The offline tiny model's adapter under the shipped recipe (config.LoraSettings' defaults on the 2 layers of
# BaseModelSpec), and an honest change about as large as its measured ones (see DIFF_STD).
_LORA, _SPEC = LoraSettings(), BaseModelSpec()
_H, _I = _SPEC.hidden_size, _SPEC.intermediate_size
_IN_OUT = {"q_proj": (_H, _H), "k_proj": (_H, _H), "v_proj": (_H, _H), "o_proj": (_H, _H),
           "gate_proj": (_H, _I), "up_proj": (_H, _I), "down_proj": (_I, _H)}  # fmt: skip
SHAPES = {
    f"base_model.model.model.layers.{i}.{'mlp' if proj in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}"
    f".{proj}.lora_{ab}.weight": (_LORA.r, _IN_OUT[proj][0]) if ab == "A" else (_IN_OUT[proj][1], _LORA.r)
    for i in range(_SPEC.num_layers)
    for proj in _LORA.target_modules
    for ab in ("A", "B")
}
N_VALUES = sum(int(np.prod(shape)) for shape in SHAPES.values())
DIFF_STD = 0.011  # L2 norm about 4.3 over 156,160 values (measured honest changes: 3.5-8.2), all within clip 0.06
ADAPTER_CONFIG = {"r": _LORA.r, "lora_alpha": _LORA.alpha, "target_modules": list(_LORA.target_modules)}


# ------------------------------------------------------------------------------------------- inputs
def honest_diff(site: str, rnd: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(zlib.crc32(f"{site}:{rnd}".encode()))
    return {k: (g.standard_normal(s) * DIFF_STD).astype(np.float32) for k, s in SHAPES.items()}


def train_result(diff: dict[str, np.ndarray], site: str, rnd: int, **meta) -> Shareable:
    """What ``LoraExecutor`` returns from a ``train`` task."""
    meta = {Meta.EXAMPLE_COUNT: COUNTS[site], Meta.METRICS: {"train_loss": 1.0}, Meta.ADAPTER_CONFIG: ADAPTER_CONFIG} | meta
    result = DXO(DataKind.WEIGHT_DIFF, data=diff, meta=meta).to_shareable()
    result.set_header(AppConstants.CURRENT_ROUND, rnd)
    return result


@functools.cache
def key_files() -> dict[str, dict[str, bytes]]:
    """One provisioning's key files: the hospitals' (secret key) and the server's (none)."""
    made = make_context(BFVParams(), n_threads=1)
    return {
        "client": {CLIENT_CONTEXT_FILE: serialize_context(made, secret=True)},
        "server": {SERVER_CONTEXT_FILE: serialize_context(made, secret=False)},
    }


# ------------------------------------------------------------------------------------------- one job
class Federation:
    """The job's components for the server and three hospitals; plays rounds as FLARE's runners do."""

    def __init__(self, job: str, root: Path):
        common_decomposers.register()  # numpy arrays in Shareables, as every FLARE process registers them
        self.job = job
        self.fed = JobInProcess(REPO / "jobs" / job, root, list(SITES), key_files() if job == HE else {})
        self.aggregator = self.fed.server["aggregator"]
        # The round closes with the two honest hospitals, so their aggregate can be compared with and
        # without the bad update (the workflow's min_clients sets this in a deployment).
        self.aggregator.min_contributions = len(HONEST)
        if job == PLAIN:  # what InitializeGlobalWeights collects from the sites: the seeded initial adapter
            g = np.random.default_rng(0)
            self.fed.global_model = make_model_learnable(
                {k: (g.standard_normal(s) * 0.02).astype(np.float32) for k, s in SHAPES.items()}, {}
            )
        self.task_ids: dict[tuple[str, int], str] = {}
        self.uploads: dict[tuple[str, int], bytes] = {}
        self.site_errors: dict[str, str] = {}

    def start_round(self, rnd: int) -> None:
        """The train task leaves for every hospital, which applies it (the encrypted job decrypts the log)."""
        task = Shareable.from_bytes(self.fed.task_data(rnd))
        task.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd)  # as ScatterAndGather does
        for site in SITES:
            task_id = str(uuid.uuid4())
            ctx = self.fed.server_ctx(rnd)
            ctx.set_prop(FLContextKey.TASK_NAME, "train", private=True, sticky=False)
            ctx.set_prop(FLContextKey.TASK_ID, task_id, private=True, sticky=False)
            ctx.set_prop(FLContextKey.TASK_DATA, task, private=True, sticky=False)
            ctx.set_peer_context(fl_ctx(site))
            for component in self.fed.server.values():  # FLARE's server runner, as the task leaves
                component.handle_event(EventType.AFTER_TASK_DATA_FILTER, ctx)
            self.task_ids[(site, rnd)] = task_id
            self.fed.receive(site, task.to_bytes(), rnd)

    def upload(self, site: str, result: Shareable, rnd: int) -> bytes:
        """``result`` through the site's task-result filters, as bytes; a failing filter sends FLARE's error."""
        try:
            data = self.fed.send(site, result, rnd)
        except Exception as err:  # FLARE's client runner: the cause stays in the site's log
            self.site_errors[site] = str(err)
            data = make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR).to_bytes()
        self.uploads[(site, rnd)] = data
        return data

    def submit(self, site: str, data: bytes, rnd: int, task_id: str | None = None, cookie_round: int | None = None):
        """The aggregator's verdict on ``data`` from ``site``, handed over as FLARE's server runner does.

        ``task_id``: the task the site says it answers (default: the one sent to it this round);
        ``cookie_round``: the round cookie the result carries (default: this round's, copied from the task).
        """
        result = Shareable.from_bytes(data)
        result.set_peer_props({ReservedKey.IDENTITY_NAME: site})
        result.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd if cookie_round is None else cookie_round)
        result.set_header(ReservedHeaderKey.TASK_ID, task_id or self.task_ids.get((site, rnd), str(uuid.uuid4())))
        result = self.fed.server_filtered(result, rnd)  # the job's server result filters (plaintext: dequantize)
        return self.aggregator.accept(result, self.fed.server_ctx(rnd))

    def close(self, rnd: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """The round's aggregate, as the change it makes to the global adapter, and who it counts."""
        ctx = self.fed.server_ctx(rnd)
        summed = self.aggregator.aggregate(ctx)
        dxo = from_shareable(summed)
        if self.job == PLAIN:
            average = dxo.data
        else:  # decrypted with a hospital's key, as the hospitals do
            key = self.fed.sites[HONEST[0]].result_filters[0].key
            m = dxo.meta
            ints = decrypt_ints(key.context, dxo.data[Data.CHUNKS], key.plan, m[Meta.N_VALUES], m[Meta.N_SITES])
            layout = AdapterLayout.from_manifest(m[Meta.LAYOUT])
            average = dequantize(layout.unflatten(ints), key.settings.clip, key.plan.bits, m[Meta.TOTAL_WEIGHT])
        self.fed.global_model = self.fed.server["shareable_generator"].shareable_to_learnable(summed, ctx)
        self.aggregator.reset(ctx)
        return {k: np.asarray(v, np.float64) for k, v in average.items()}, dict(dxo.meta[Meta.EXAMPLE_COUNTS])

    def tolerance(self, rnd: int) -> float:
        """How far the aggregate may be from the exact weighted average: the plaintext job's transport
        quantization bound (float32 without it), or a rounding step per site."""
        if self.job == PLAIN:
            quantizer = next((f for f in self.fed.sites[HONEST[0]].result_filters if isinstance(f, QuantizeFilter)), None)
            if quantizer is None:
                return 1e-6
            # each value of each upload restores within the mode's bound; a weighted average stays within it
            peak = max(float(np.abs(v).max()) for s in HONEST for v in honest_diff(s, rnd).values())
            return max_abs_error(quantizer.settings.mode, quantizer.settings.rounding, peak) + 1e-6
        key = self.fed.sites[HONEST[0]].result_filters[0].key
        total_weight = sum(COUNTS[s] for s in HONEST) / key.settings.full_weight
        # under one step per site (stochastic rounding), plus the float32 of the decoded average
        return step_size(key.settings.clip, key.plan.bits) * len(HONEST) / total_weight + 1e-8


# ------------------------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Outcome:
    name: str
    rejected: bool  # the bad update did not enter the round's aggregate
    where: str  # "server" (the aggregator) or "site" (its own filter, before anything was sent)
    reason: str  # what the refusing side logged
    server_reason: str  # what the aggregator logged (a site's refusal reaches it as an error reply)
    aggregated: dict[str, int] = field(default_factory=dict)  # sites in the aggregate, with example counts
    aggregate_error: float = 0.0  # largest difference from the honest sites' weighted average
    tolerance: float = 0.0


@dataclass(frozen=True)
class Scenario:
    name: str
    job: str
    expect: str  # part of the reason
    send_bad: Callable[[Federation, int], None]  # the bad site's part of the round
    round: int = 0  # rounds before it run honestly (a replay needs an earlier round)
    sender: str = BAD


def run(scenario: Scenario, root: Path | None = None) -> Outcome:
    """Play ``scenario`` in a fresh federation under ``root`` (a temporary folder when not given)."""
    if root is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run(scenario, Path(tmp))
    fed = Federation(scenario.job, root)
    for rnd in range(scenario.round + 1):
        fed.start_round(rnd)
        for site in HONEST:
            assert fed.submit(site, fed.upload(site, train_result(honest_diff(site, rnd), site, rnd), rnd), rnd)
        if rnd < scenario.round:  # an honest earlier round
            assert fed.submit(BAD, fed.upload(BAD, train_result(honest_diff(BAD, rnd), BAD, rnd), rnd), rnd)
            fed.close(rnd)
    scenario.send_bad(fed, scenario.round)
    server_reason = fed.aggregator.rejected.get(scenario.sender, "")
    rejected = scenario.sender not in fed.aggregator.example_counts
    site_reason = fed.site_errors.get(scenario.sender, "")
    average, counted = fed.close(scenario.round)
    total = sum(COUNTS[s] for s in HONEST)
    diffs = {s: honest_diff(s, scenario.round) for s in HONEST}
    want = {k: sum(COUNTS[s] * diffs[s][k].astype(np.float64) for s in HONEST) / total for k in SHAPES}
    error = max(float(np.abs(average[k] - want[k]).max()) for k in SHAPES) if average.keys() == want.keys() else np.inf
    return Outcome(
        name=scenario.name,
        rejected=rejected,
        where="site" if site_reason else "server",
        reason=site_reason or server_reason,
        server_reason=server_reason,
        aggregated=counted,
        aggregate_error=error,
        tolerance=fed.tolerance(scenario.round),
    )


def _bad_values(change: Callable[[dict], dict], **meta) -> Callable[[Federation, int], None]:
    """The bad site uploads ``change`` of its honest difference through its filters."""

    def send(fed: Federation, rnd: int) -> None:
        diff = change(honest_diff(BAD, rnd))
        fed.submit(BAD, fed.upload(BAD, train_result(diff, BAD, rnd, **meta), rnd), rnd)

    return send


def _set_first(value: float) -> Callable[[dict], dict]:
    def change(diff: dict) -> dict:
        diff[next(iter(diff))][0, 0] = value
        return diff

    return change


def _rename_first(diff: dict) -> dict:
    name = next(iter(diff))
    return {(k.replace("q_proj", "k_proj") if k == name else k): v for k, v in diff.items()}


def _extra_row(diff: dict) -> dict:
    name = next(iter(diff))
    diff[name] = np.concatenate([diff[name], diff[name][:1]])
    return diff


def _honest(fed: Federation, rnd: int) -> bytes:
    return fed.upload(BAD, train_result(honest_diff(BAD, rnd), BAD, rnd), rnd)


def _replay_last_round(cookie: str) -> Callable[[Federation, int], None]:
    """The bad site sends its previous round's upload again: with that round's cookie and task id (a late
    or replayed result, which FLARE hands over as the result of an unknown task), or under this round's."""

    def send(fed: Federation, rnd: int) -> None:
        old = fed.uploads[(BAD, rnd - 1)]
        if cookie == "old":
            fed.submit(BAD, old, rnd, task_id=fed.task_ids[(BAD, rnd - 1)], cookie_round=rnd - 1)
        else:
            fed.submit(BAD, old, rnd)

    return send


def _unsent_task(fed: Federation, rnd: int) -> None:
    fed.submit(BAD, _honest(fed, rnd), rnd, task_id=str(uuid.uuid4()))


def _task_of_another_site(fed: Federation, rnd: int) -> None:
    fed.submit(BAD, _honest(fed, rnd), rnd, task_id=fed.task_ids[(HONEST[0], rnd)])


def _stranger(fed: Federation, rnd: int) -> None:
    fed.submit("hospital-x", _honest(fed, rnd), rnd)


def _inflate_first_chunk(fed: Federation, rnd: int) -> None:
    """A valid upload with 4 MiB appended to its first chunk, digest recomputed: only its size is wrong (the
    allowance for this adapter's ciphertexts is far smaller)."""
    shareable = Shareable.from_bytes(_honest(fed, rnd))
    dxo = from_shareable(shareable)
    chunks = list(dxo.data[Data.CHUNKS])
    header, payload = unframe(chunks[0], CHUNK_MAGIC, "chunk 0", ValueError)
    payload += bytes(4 << 20)
    chunks[0] = frame(CHUNK_MAGIC, {**header, "sha256": hashlib.sha256(payload).hexdigest()}, payload)
    dxo.data[Data.CHUNKS] = chunks
    fed.submit(BAD, dxo.update_shareable(shareable).to_bytes(), rnd)


def _as_float64(diff: dict) -> dict:
    return {k: v.astype(np.float64) for k, v in diff.items()}


def _times_ten(diff: dict) -> dict:
    return {k: v * 10 for k, v in diff.items()}


NON_FINITE_AT_SITE = "hospital-c round 0: the adapter change has NaN or infinite values"
BIG_METRICS = {Meta.METRICS: {"x": "0" * (2 << 20)}}

SCENARIOS = [
    # plaintext job: the server sees values
    Scenario("nan", PLAIN, "non-finite values", _bad_values(_set_first(np.nan))),
    Scenario("inf", PLAIN, "non-finite values", _bad_values(_set_first(np.inf))),
    Scenario("wrong tensor names", PLAIN, "do not match the agreed adapter layout", _bad_values(_rename_first)),
    Scenario("wrong shapes", PLAIN, f"has shape ({_LORA.r + 1}, 256), the agreed layout says ({_LORA.r}, 256)", _bad_values(_extra_row)),
    Scenario("wrong round", PLAIN, "result is for round 0, the current round is 1", _replay_last_round("old"), 1),
    Scenario("task not sent", PLAIN, "which this server never sent to hospital-c", _unsent_task),
    Scenario("task sent to another site", PLAIN, "sent to hospital-a, not to hospital-c", _task_of_another_site),
    Scenario("site not in job", PLAIN, "hospital-x is not a site of this job", _stranger, sender="hospital-x"),
    Scenario("oversize", PLAIN, f"oversize: its tensors hold {8 * N_VALUES:,} bytes", _bad_values(_as_float64)),
    Scenario("oversize metadata", PLAIN, "oversize: its clear metadata", _bad_values(lambda d: d, **BIG_METRICS)),
    Scenario("norm above bound", PLAIN, "above the job's max_update_norm 30", _bad_values(_times_ten)),
    # encrypted job: the server sees structure and sizes; values are checked at the site before encryption
    Scenario("he: nan at site", HE, NON_FINITE_AT_SITE, _bad_values(_set_first(np.nan))),
    Scenario("he: inf at site", HE, NON_FINITE_AT_SITE, _bad_values(_set_first(np.inf))),
    Scenario("he: wrong tensor names", HE, "differs from the round's first contribution's", _bad_values(_rename_first)),
    Scenario("he: wrong shapes", HE, "differs from the layout of the log's round 0", _bad_values(_extra_row), 1),
    Scenario("he: wrong round", HE, "tagged 'round 0', expected 'round 1'", _replay_last_round("current"), 1),
    Scenario("he: task not sent", HE, "which this server never sent to hospital-c", _unsent_task),
    Scenario("he: oversize", HE, "oversize: ", _inflate_first_chunk),
]
