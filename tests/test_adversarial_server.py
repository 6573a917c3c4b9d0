"""A malicious server against the hospitals' aggregate MAC and contributor floor, on the job's real components.

Three hospitals run the committed encrypted job in one process (``JobInProcess``: real filters, executors,
aggregator, log generator and persistor, real keys and model). After two honest rounds the server holds
the round-1 log entry and every hospital's round-1 upload; instead of the honest entry it sends a forgery
made with its key-less context only (BFV is malleable) and rewrites every clear header, digest and log
field to match. Every hospital must refuse it before applying anything, answer the task with an error
naming the check, and keep its adapter; then the honest entry still applies exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import tenseal as ts
import torch
from kit_keys import TestCA
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from hospital_fedlora.site.trainer import get_adapter_state
from hospital_fedlora.he.bfv_context import (
    CLIENT_CONTEXT_FILE,
    SERVER_CONTEXT_FILE,
    BFVParams,
    load_context,
    make_context,
    serialize_context,
)
from hospital_fedlora.he.encoding import contribution_weight
from hospital_fedlora.he.encrypt_filter import EncryptFilter
from hospital_fedlora.he.log_persistor import log_entries, with_chunks
from hospital_fedlora.he.packed_bfv import EncryptedSum
from hospital_fedlora.he.site_key import SiteEncryption
from hospital_fedlora.he.wire_format import CHUNK_MAGIC, chunk_header, chunks_digest, frame, parse_chunks
from hospital_fedlora.protocol import ERROR_HEADER, REFUSED_HEADER, ROUND_TAG, Data, EncryptedKind, Meta

from deployment_helpers import write_site_configs
from flare_harness import Engine, fl_ctx, kit_workspace, start_run
from job_in_process import JOB_ID, REPO, JobInProcess, job_config

SITES = ["hospital-a", "hospital-b", "hospital-c"]
MAC_CHECK = "fails the aggregate MAC check"
FLOOR_CHECK = "fails the contributor floor (privacy.min_contributors"


@pytest.fixture(scope="module")
def fed(tmp_path_factory, base_model_dir, data_dir):
    """Rounds 0 and 1 run honestly; the hospitals have applied round 0, the server holds round 1 unsent."""
    root = tmp_path_factory.mktemp("adversarial")
    ca = TestCA()
    for site in SITES:
        ca.write_kit(root / site / "startup", site)
    configs = write_site_configs(root / "site_configs", base_model_dir, data_dir, SITES, privacy={"require_encryption": True})
    # hospital-c asks for every hospital of the job in each round it applies (the stricter setting)
    write_site_configs(configs, base_model_dir, data_dir, ["hospital-c"], privacy={"require_encryption": True, "min_contributors": 3})
    made = make_context(BFVParams(), n_threads=1)
    keys = {"client": serialize_context(made, secret=True), "server": serialize_context(made, secret=False)}
    (root / "client.tenseal").write_bytes(keys["client"])
    recipe = {"lora_executor": {"recipe": {"local_steps": 1, "max_eval_examples": 2}}}
    files = {"client": {CLIENT_CONTEXT_FILE: keys["client"]}, "server": {SERVER_CONTEXT_FILE: keys["server"]}}
    f = JobInProcess(REPO / "jobs" / "fedlora_he", root, SITES, files, site_configs=configs, client_args=recipe)
    f.round(0)
    task = f.task_data(1)
    f.uploads = {}  # round 1's uploads, as the server received them
    for site in SITES:
        f.uploads[site] = f.send(site, f.train(site, f.receive(site, task, 1), 1), 1)
    f.aggregate(1, f.uploads)
    f.server_context = load_context(keys["server"])
    f.client_key_file = root / "client.tenseal"
    return f


# --------------------------------------------------------------------------- the server's forgeries
def vectors(chunks, context):
    """The ciphertexts in ``chunks``, loaded with the server's key-less context."""
    info, payloads = parse_chunks(chunks, "forgery")
    return info, [ts.bfv_vector_from(context.ts_context, p) for p in payloads]


def rechunk(info, vecs, summed: int, rnd: int) -> list[bytes]:
    """Chunks with fresh, self-consistent headers and digests, as a server rewrites them."""
    fields = {"bits": info.bits, "lane_bits": info.lane_bits, "lanes": info.lanes, "mac_slots": info.mac_slots}
    out = []
    for c, v in enumerate(vecs):
        payload = v.serialize()
        header = chunk_header(info.key_id, c, len(vecs), len(v.ciphertext()), info.values, fields, ROUND_TAG.format(round=rnd), summed, payload)
        out.append(frame(CHUNK_MAGIC, header, payload))
    return out


def entry(fed, chunks, rnd: int, counts: dict[str, int], job: str = JOB_ID) -> dict:
    """A log entry whose every clear field agrees with ``chunks`` and ``counts``: only the MAC can tell."""
    full = job_config(REPO / "jobs" / "fedlora_he", "client")["components"][0]["args"]["full_weight"]
    honest = with_chunks(log_entries(fed.global_model)[-1])
    factors = {s: contribution_weight(c, full) for s, c in counts.items()}
    return {
        **honest,
        Meta.ROUND: rnd,
        Data.CHUNKS: chunks,
        "sha256": chunks_digest(chunks),
        "bytes": sum(len(c) for c in chunks),
        Meta.N_SITES: len(counts),
        Meta.EXAMPLE_COUNTS: dict(counts),
        Meta.WEIGHT_FACTORS: factors,
        Meta.TOTAL_WEIGHT: math.fsum(factors.values()),
        Meta.JOB: job,
    }


def upload_chunks(fed, site):
    return from_shareable(Shareable.from_bytes(fed.uploads[site])).data[Data.CHUNKS]


def counts_of(fed) -> dict[str, int]:
    return dict(log_entries(fed.global_model)[-1][Meta.EXAMPLE_COUNTS])


def add_plaintext(fed):
    honest = with_chunks(log_entries(fed.global_model)[-1])
    info, vecs = vectors(honest[Data.CHUNKS], fed.server_context)
    vecs[0].add_([5] + [0] * (vecs[0].size() - 1))  # +5 in the first slot's lowest lane
    return entry(fed, rechunk(info, vecs, 3, 1), 1, counts_of(fed))


def scale(fed):
    honest = with_chunks(log_entries(fed.global_model)[-1])
    info, vecs = vectors(honest[Data.CHUNKS], fed.server_context)
    for v in vecs:
        v.mul_(2)
    return entry(fed, rechunk(info, vecs, 3, 1), 1, counts_of(fed))


def relabel_one_as_a_sum(fed):
    """hospital-a's upload passed off as the sum of all three: +2*qmax in every lane makes the biases fit."""
    info, vecs = vectors(upload_chunks(fed, "hospital-a"), fed.server_context)
    qmax = 2 ** (info.bits - 1) - 1
    per_slot = sum((2 * qmax) << (lane * info.lane_bits) for lane in range(info.lanes))
    for v in vecs:
        v.add_([per_slot] * v.size())
    return entry(fed, rechunk(info, vecs, 3, 1), 1, counts_of(fed))


def server_sum(fed, parts: list[list[bytes]]) -> list[bytes]:
    total = EncryptedSum(fed.server_context)
    for i, chunks in enumerate(parts):
        total.add(chunks, f"part {i}")
    return total.result()


def duplicate(fed):
    a, b = upload_chunks(fed, "hospital-a"), upload_chunks(fed, "hospital-b")
    return entry(fed, server_sum(fed, [a, a, b]), 1, counts_of(fed))


def drop_and_relabel(fed):
    parts = [upload_chunks(fed, s) for s in ("hospital-a", "hospital-b")]
    info, vecs = vectors(server_sum(fed, parts), fed.server_context)
    return entry(fed, rechunk(info, vecs, 3, 1), 1, counts_of(fed))  # hospital-c still listed, headers say 3


def replay_previous_round(fed):
    old = with_chunks(log_entries(fed.global_model)[0])
    info, vecs = vectors(old[Data.CHUNKS], fed.server_context)
    return entry(fed, rechunk(info, vecs, 3, 1), 1, dict(old[Meta.EXAMPLE_COUNTS]))


def earlier_job(fed, label: str = JOB_ID):
    """Round 1 of an earlier job under the same key (the hospitals' own filters, that job's id), labelled
    as a round of ``label`` (this job, or the earlier job as it was)."""
    args = job_config(REPO / "jobs" / "fedlora_he", "client")["components"][0]["args"]
    parts, counts = [], counts_of(fed)
    kit = fed.client_key_file.parent / "earlier_job_kit"  # a hospital's key always comes from its kit
    for site in SITES:
        workspace = kit_workspace(kit, site)
        (kit / "startup" / CLIENT_CONTEXT_FILE).write_bytes(fed.client_key_file.read_bytes())
        enc = SiteEncryption(**args)
        encrypt = EncryptFilter()
        engine = Engine({"site_encryption": enc}, workspace=workspace)
        start_run([enc, encrypt], fl_ctx(site, engine=engine, job_id="an-earlier-job"))
        state = {k: np.full(v.shape, 1e-3, np.float32) for k, v in get_adapter_state(fed.sites[site].executor.trainer.model).items()}
        result = DXO(DataKind.WEIGHT_DIFF, data=state, meta={Meta.EXAMPLE_COUNT: counts[site]}).to_shareable()
        result.set_header(AppConstants.CURRENT_ROUND, 1)
        parts.append(from_shareable(encrypt.process(result, fl_ctx(site, job_id="an-earlier-job"))).data[Data.CHUNKS])
    return entry(fed, server_sum(fed, parts), 1, counts, job=label)


ATTACKS = {
    "add a plaintext": add_plaintext,
    "scale by 2": scale,
    "relabel one contribution as a 3-site sum": relabel_one_as_a_sum,
    "duplicate a contribution": duplicate,
    "drop a site and relabel": drop_and_relabel,
    "replay the previous round": replay_previous_round,
    "inject an earlier job's aggregate": earlier_job,
    "inject an earlier job's aggregate under its job id": lambda fed: earlier_job(fed, "an-earlier-job"),
}


def send(fed, entries: list[dict], rnd: int = 2) -> bytes:
    task = DXO(EncryptedKind.LOG, data={Data.ENTRIES: entries}, meta={}).to_shareable()
    task.set_header(AppConstants.CURRENT_ROUND, rnd)
    return task.to_bytes()


def snapshot(fed, site):
    s = fed.sites[site]
    decrypt = s.data_filters[0]
    adapter = {k: torch.as_tensor(np.array(v)) for k, v in get_adapter_state(s.executor.trainer.model).items()}
    return adapter, list(decrypt.applied), {k: v.clone() for k, v in decrypt.change.items()}


def unchanged(before, after) -> bool:
    (a0, r0, c0), (a1, r1, c1) = before, after
    same = lambda x, y: x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)  # noqa: E731
    return same(a0, a1) and r0 == r1 and same(c0, c1)


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_forged_aggregate_is_refused_at_every_hospital_before_anything_is_applied(fed, attack):
    task = send(fed, [ATTACKS[attack](fed)])
    for site in SITES:
        before = snapshot(fed, site)
        received = fed.receive(site, task, 2)
        reason = received.get_header(REFUSED_HEADER)
        assert reason and MAC_CHECK in reason and "nothing was applied" in reason, (site, reason)
        reply = fed.sites[site].executor.execute("train", received, fed.sites[site].ctx(2), Signal())
        assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
        assert MAC_CHECK in reply.get_header(ERROR_HEADER)  # what the server logs and the job report names
        assert unchanged(before, snapshot(fed, site)), site


def test_a_stripped_mac_is_refused(fed):
    honest = with_chunks(log_entries(fed.global_model)[-1])
    info, vecs = vectors(honest[Data.CHUNKS], fed.server_context)
    stripped = rechunk(dataclasses.replace(info, mac_slots=0), vecs, 3, 1)
    # the ciphertext count no longer matches what the header implies, or the MAC slots are missing: either way refused
    reason = fed.receive("hospital-a", send(fed, [entry(fed, stripped, 1, counts_of(fed))]), 2).get_header(REFUSED_HEADER)
    assert reason and ("MAC slots" in reason or "ciphertexts for" in reason), reason


def test_a_round_below_a_hospitals_floor_is_refused_there_and_the_honest_round_still_applies_exactly(fed):
    # hospital-c's site config sets min_contributors: 3; the server closes round 1 with a and b only (honestly)
    parts = [upload_chunks(fed, s) for s in ("hospital-a", "hospital-b")]
    two = {s: n for s, n in counts_of(fed).items() if s != "hospital-c"}
    before = snapshot(fed, "hospital-c")
    received = fed.receive("hospital-c", send(fed, [entry(fed, server_sum(fed, parts), 1, two)]), 2)
    assert FLOOR_CHECK in received.get_header(REFUSED_HEADER) and "lists 2 contributing hospital(s)" in received.get_header(REFUSED_HEADER)
    assert unchanged(before, snapshot(fed, "hospital-c"))
    # the honest entry: every hospital applies it, all alike
    task = fed.task_data(2)
    changes = [from_shareable(fed.receive(site, task, 2)).data for site in SITES]
    assert [fed.sites[s].data_filters[0].applied for s in SITES] == [[0, 1]] * 3
    for name in changes[0]:
        for other in changes[1:]:
            np.testing.assert_array_equal(changes[0][name], other[name])


def test_the_forgeries_keep_every_clear_field_consistent(fed):
    """The forgeries pass every check a hospital can make without the MAC: only the MAC catches them."""
    from hospital_fedlora.he.wire_format import LogEntry

    for attack, make in ATTACKS.items():
        e = LogEntry.from_dict(copy.deepcopy(make(fed)), source=attack)
        e.verify(attack)
        assert e.n_sites == len(e.example_counts) == 3, attack
