"""The audit trail: the hash chain, signed receipts, the verifier and its command, and the job's real
components writing a log and receipts that the command verifies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from kit_keys import TestCA

from hospital_fedlora.audit.chain import (
    AUDIT_DIR,
    AUDIT_FILE,
    RECEIPTS_FILE,
    AuditChain,
    AuditError,
    canonical,
    entry_hash,
    read_chain,
    utc_now,
)
from hospital_fedlora.audit.digest import contribution_digest
from hospital_fedlora.audit.receipts import KitSigner, check_signed_receipt
from hospital_fedlora.audit.verify import verify
from hospital_fedlora.he.wire_format import chunks_digest
from hospital_fedlora.protocol import RECEIPT_HEADER, Data, Meta

SITES = ["hospital-a", "hospital-b"]


@pytest.fixture(scope="module")
def ca():
    return TestCA()


@pytest.fixture(scope="module")
def signers(ca, tmp_path_factory):
    root = tmp_path_factory.mktemp("kits")
    return {s: KitSigner.from_kit(ca.write_kit(root / s / "startup", s)) for s in SITES}


def rewrite(path: Path, entries: list[dict], rehash: bool = False) -> None:
    """Write ``entries`` back; with ``rehash`` rebuild the whole chain, as a forger with the file would."""
    if rehash:
        prev = "0" * 64
        for seq, e in enumerate(entries):
            e.update(seq=seq, prev=prev)
            e["hash"] = prev = entry_hash(e)
    path.write_bytes(b"".join(canonical(e) + b"\n" for e in entries))


def lines(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


def simulated_job(folder: Path, signers: dict[str, KitSigner], rounds: int = 2) -> tuple[Path, dict[str, Path]]:
    """A server run folder and each site's receipts, written as the job's components write them."""
    chain = AuditChain(folder / "server" / AUDIT_DIR / AUDIT_FILE)
    chain.append("run_started", job_id="job-1", server="server", sites=SITES)
    receipts = {s: folder / s / AUDIT_DIR / RECEIPTS_FILE for s in SITES}
    for rnd in range(rounds):
        chain.append("round_started", round=rnd)
        head = chain.head_ref()
        counts = {}
        for i, site in enumerate(SITES):
            digest = contribution_digest({"w": np.full(4, rnd + i, dtype=np.float32)})
            receipt = {"job_id": "job-1", "site": site, "round": rnd, "task": "train", "data_kind": "WEIGHT_DIFF",
                       "digest": digest, "example_count": 10 + i, "signed_at": utc_now(), "log_head": head}  # fmt: skip
            signed = signers[site].sign(receipt)
            receipts[site].parent.mkdir(parents=True, exist_ok=True)
            with open(receipts[site], "ab") as f:
                f.write(canonical(signed) + b"\n")
            chain.append("contribution", round=rnd, site=site, data_kind="WEIGHT_DIFF", digest=digest,
                         example_count=10 + i, signed_receipt=signed, accepted=True, reason=None)  # fmt: skip
            counts[site] = 10 + i
        chain.append("aggregate", round=rnd, participants=sorted(counts), example_counts=counts,
                     data_kind="WEIGHT_DIFF", digest="ab" * 32)  # fmt: skip
    chain.append("run_ended")
    return chain.path, receipts


# ------------------------------------------------------------------------------------------------ chain
def test_a_chain_reads_back_and_continues_after_a_restart(tmp_path):
    chain = AuditChain(tmp_path / "a.jsonl")
    first = chain.append("run_started", job_id="j")
    chain.append("round_started", round=0)
    resumed = AuditChain(tmp_path / "a.jsonl")  # a resumed job appends to the same chain
    resumed.append("round_started", round=1)
    entries = read_chain(tmp_path / "a.jsonl")
    assert [e["seq"] for e in entries] == [0, 1, 2]
    assert entries[0] == first and entries[0]["prev"] == "0" * 64
    assert all(e["prev"] == p["hash"] for p, e in zip(entries, entries[1:]))


@pytest.fixture
def three_rounds(tmp_path):
    chain = AuditChain(tmp_path / "audit.jsonl")
    chain.append("run_started", job_id="j")
    for rnd in range(3):
        chain.append("round_started", round=rnd)
    return chain.path, lines(chain.path)


def test_an_edited_entry_is_named(three_rounds):
    path, entries = three_rounds
    entries[2]["round"] = 7
    rewrite(path, entries)
    with pytest.raises(AuditError, match=r"audit.jsonl, line 3: entry 2 \(round_started, round 7\) does not match its hash; the entry was edited"):
        read_chain(path)


def test_an_edited_and_rehashed_entry_is_named_by_the_next(three_rounds):
    path, entries = three_rounds
    entries[1]["round"] = 9
    entries[1]["hash"] = entry_hash(entries[1])
    rewrite(path, entries)
    with pytest.raises(AuditError, match=r"line 3: entry 2 .* does not follow entry 1 \(line 2\).*entry 1 was edited and re-hashed"):
        read_chain(path)


def test_a_removed_entry_is_named(three_rounds):
    path, entries = three_rounds
    rewrite(path, entries[:2] + entries[3:])
    with pytest.raises(AuditError, match=r"line 3: entry 3 \(round_started, round 2\) follows entry 1; entry 2 is missing \(removed\)"):
        read_chain(path)


def test_reordered_entries_are_named(three_rounds):
    path, entries = three_rounds
    entries[2], entries[3] = entries[3], entries[2]
    rewrite(path, entries)
    with pytest.raises(AuditError, match=r"line 3: entry 3 .* appears where entry 2 belongs \(entry 2 is at line 4\); entries were reordered"):
        read_chain(path)


def test_a_garbled_line_is_named(three_rounds):
    path, _ = three_rounds
    path.write_text(path.read_text().replace('"round_started"', '"round_started', 1))
    with pytest.raises(AuditError, match=r"audit.jsonl, line 2: not JSON"):
        read_chain(path)


# ---------------------------------------------------------------------------------------------- digest
def test_the_digest_is_the_same_for_numpy_and_torch_and_follows_every_byte_name_and_dtype():
    data = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(3, dtype=np.float32)}
    d = contribution_digest(data)
    assert contribution_digest({k: torch.from_numpy(v) for k, v in reversed(data.items())}) == d
    changed = dict(data, a=np.array([1, 1, np.nextafter(np.float32(1), np.float32(2))], dtype=np.float32))
    assert contribution_digest(changed) != d
    assert contribution_digest({"c": data["b"], "a": data["a"]}) != d
    assert contribution_digest(dict(data, a=data["a"].astype(np.float64))) != d
    assert contribution_digest(dict(data, b=data["b"].reshape(3, 2))) != d


def test_the_digest_of_ciphertext_chunks_is_the_encrypted_logs():
    chunks = [b"one chunk", b"another"]
    assert contribution_digest({Data.CHUNKS: chunks}) == chunks_digest(chunks)


# --------------------------------------------------------------------------------------------- receipts
def receipt(site: str = "hospital-a", **changes) -> dict:
    r = {"job_id": "job-1", "site": site, "round": 0, "task": "train", "data_kind": "WEIGHT_DIFF",
         "digest": "cd" * 32, "example_count": 10, "signed_at": utc_now(), "log_head": None}  # fmt: skip
    return {**r, **changes}


def test_a_signed_receipt_checks_out_against_the_kits_root_ca(signers, ca):
    signed = signers["hospital-a"].sign(receipt())
    assert check_signed_receipt(signed, "x", ca.cert) == receipt() | {"signed_at": signed["receipt"]["signed_at"]}


def test_an_altered_receipt_a_borrowed_certificate_and_a_foreign_ca_are_refused(signers, ca):
    signed = signers["hospital-a"].sign(receipt())
    altered = json.loads(json.dumps(signed))
    altered["receipt"]["digest"] = "ef" * 32
    with pytest.raises(AuditError, match="hospital-a's signature does not match the receipt; the receipt was altered"):
        check_signed_receipt(altered, "x")
    impostor = signers["hospital-b"].sign(receipt("hospital-a"))  # b signs a receipt in a's name
    with pytest.raises(AuditError, match="for site 'hospital-a' but is signed with 'hospital-b'"):
        check_signed_receipt(impostor, "x")
    with pytest.raises(AuditError, match="not issued by the given root CA"):
        check_signed_receipt(signed, "x", TestCA("another-project").cert)


# --------------------------------------------------------------------------------------------- verifier
def test_a_whole_job_verifies_with_its_receipts(tmp_path, signers, ca):
    log, receipts = simulated_job(tmp_path, signers)
    report = verify(log.parent.parent, tuple(receipts.values()), root_ca=ca.cert)
    assert report.job_id == "job-1" and not report.notes
    assert "10 entries, chain intact; job job-1, 2 rounds, 4 contributions accepted, 0 rejected, 4 hospital signatures valid" in report.checked[0]


def test_a_receipt_whose_digest_the_log_does_not_hold_is_named(tmp_path, signers):
    log, receipts = simulated_job(tmp_path, signers)
    entries = lines(log)
    entry = next(e for e in entries if e["event"] == "contribution" and e["round"] == 1 and e["site"] == "hospital-b")
    entry["digest"] = "00" * 32  # the server logs something else, and drops the hospital's signature with it
    entry["signed_receipt"] = None
    rewrite(log, entries, rehash=True)
    with pytest.raises(AuditError, match=rf"{receipts['hospital-b']}, line 2 against entry {entry['seq']} .*: the log records digest 0000"):
        verify(log, (receipts["hospital-b"],), allow_unsigned=True)


def test_a_receipt_for_a_round_the_log_lacks_is_named(tmp_path, signers):
    log, receipts = simulated_job(tmp_path, signers)
    entries = lines(log)
    rewrite(log, [e for e in entries if e.get("round") != 1], rehash=True)  # round 1 left out, chain rebuilt
    verify(log)  # alone the rebuilt chain checks out: only a hospital's receipt shows the gap
    with pytest.raises(AuditError, match=rf"{receipts['hospital-a']}, line 2: hospital-a sent its round 1 result, but the log lacks round 1"):
        verify(log, (receipts["hospital-a"],))


def test_a_rewritten_history_is_caught_by_the_log_head_a_receipt_signed(tmp_path, signers):
    log, receipts = simulated_job(tmp_path, signers)
    entries = lines(log)
    entries[0]["sites"] = ["hospital-a"]  # history changed before the receipts were signed
    rewrite(log, entries, rehash=True)
    with pytest.raises(AuditError, match=r"line 3: entry 2 \(contribution, round 0, hospital-a\): the hospital saw entry 1 of the log with hash .* the log was rewritten up to entry 1"):
        verify(log)


def test_an_unsigned_accepted_contribution_fails_unless_allowed(tmp_path, signers):
    log, _ = simulated_job(tmp_path, signers)
    entries = lines(log)
    entries[7]["signed_receipt"] = None  # the last contribution: no later receipt anchors the rebuilt chain
    rewrite(log, entries, rehash=True)
    with pytest.raises(AuditError, match=r"line 8: entry 7 \(contribution, round 1, hospital-b\): an accepted contribution without the hospital's signature"):
        verify(log)
    assert verify(log, allow_unsigned=True).job_id == "job-1"


def test_an_aggregate_that_lists_a_site_without_an_accepted_contribution_is_named(tmp_path, signers):
    log, _ = simulated_job(tmp_path, signers, rounds=1)
    entries = lines(log)
    entries[3].update(accepted=False, reason="example count must be a positive integer")
    rewrite(log, entries, rehash=True)
    with pytest.raises(AuditError, match=r"line 5: entry 4 \(aggregate, round 0\): the aggregate lists \['hospital-a', 'hospital-b'\], the accepted contributions of round 0 are from \['hospital-a'\]"):
        verify(log)


def test_the_server_logs_a_sites_error_reply_and_a_silent_site_when_the_round_closes(tmp_path):
    from types import SimpleNamespace

    from nvflare.apis.event_type import EventType
    from nvflare.app_common.app_event_type import AppEventType

    from hospital_fedlora.audit.audit_log import AuditLog

    from flare_harness import Engine, fl_ctx, kit_workspace

    # RoundsWorkflow hands an error reply straight to the aggregator, which records why in ``rejected``.
    aggregator = SimpleNamespace(rejected={"hospital-b": "site reported EXECUTION_EXCEPTION: CUDA out of memory"})
    audit = AuditLog()
    engine = Engine({"aggregator": aggregator, "audit_log": audit}, ["hospital-a", "hospital-b", "hospital-c"],
                    kit_workspace(tmp_path / "server", "server"))  # fmt: skip
    for event in (EventType.START_RUN, AppEventType.ROUND_STARTED, AppEventType.BEFORE_AGGREGATION, EventType.END_RUN):
        audit.handle_event(event, fl_ctx("server", 0, engine, "job-2"))
    entries = read_chain(tmp_path / "server" / "job-2" / AUDIT_DIR / AUDIT_FILE)
    assert [e["event"] for e in entries] == ["run_started", "round_started", "contribution", "gathered", "run_ended"]
    assert entries[2]["site"] == "hospital-b" and not entries[2]["accepted"] and "CUDA out of memory" in entries[2]["reason"]
    assert entries[3]["answered"] == ["hospital-b"] and entries[3]["silent"] == ["hospital-a", "hospital-c"]
    report = verify(tmp_path / "server" / "job-2")
    assert report.notes == [f"{report.log}, line 3: entry 2 (contribution, round 0, hospital-b): rejected: site reported EXECUTION_EXCEPTION: CUDA out of memory"]


def test_a_hospital_without_its_own_kit_key_sends_nothing_in_secure_mode_and_unsigned_in_the_simulator(tmp_path, ca):
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_constant import FLContextKey

    from hospital_fedlora.audit.receipt_filter import ReceiptFilter

    from flare_harness import Engine, fl_ctx, kit_workspace

    def started(site: str, secure: bool) -> tuple[ReceiptFilter, object]:
        f = ReceiptFilter()
        ctx = fl_ctx(site, 0, Engine({}, [site], kit_workspace(tmp_path / site, site)), "job-3")
        ctx.set_prop(FLContextKey.SECURE_MODE, secure, private=True, sticky=False)
        f.handle_event(EventType.START_RUN, ctx)
        return f, ctx

    result = DXO(DataKind.WEIGHT_DIFF, data={"w": np.zeros(2, dtype=np.float32)}, meta={Meta.EXAMPLE_COUNT: 3})
    keyless, ctx = started("hospital-a", secure=True)
    with pytest.raises(RuntimeError, match=r"cannot sign the result's receipt: hospital-a: .*startup/client.key not found"):
        keyless.process(result.to_shareable(), ctx)
    simulator, ctx = started("hospital-b", secure=False)
    assert simulator.process(result.to_shareable(), ctx).get_header(RECEIPT_HEADER) is None
    ca.write_kit(tmp_path / "hospital-c" / "startup", "hospital-a")  # hospital-a's kit at hospital-c
    borrowed, ctx = started("hospital-c", secure=True)
    with pytest.raises(RuntimeError, match="hospital-c: the kit's certificate is for 'hospital-a'; this site must run on its own kit"):
        borrowed.process(result.to_shareable(), ctx)


# ---------------------------------------------------------------------------------------------- command
def audit_command(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "custom"))
    return subprocess.run([sys.executable, "-m", "hospital_fedlora.audit", "verify", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=120)  # fmt: skip


def test_the_command_exits_0_when_all_checks_out_and_1_naming_the_entry_otherwise(tmp_path, signers, ca):
    log, receipts = simulated_job(tmp_path, signers)
    root_ca = tmp_path / "rootCA.pem"
    root_ca.write_bytes(ca.pem)
    ok = audit_command(log.parent.parent, *(p.parent.parent for p in receipts.values()), "--root-ca", root_ca)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1] == "verified: job job-1"
    assert f"ok: {receipts['hospital-b']}: 2 receipts of hospital-b, each signed and matching the log (entries 3, 7)" in ok.stdout
    entries = lines(log)
    entries[7]["example_count"] = 99
    rewrite(log, entries)
    failed = audit_command(log.parent.parent)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr == f"FAILED: {log}, line 8: entry 7 (contribution, round 1, hospital-b) does not match its hash; the entry was edited after it was written\n"
    missing = audit_command(tmp_path / "nowhere")
    assert missing.returncode == 1 and "no audit log here" in missing.stderr


# -------------------------------------------------------------------------------- the job's components
@pytest.fixture(scope="module")
def encrypted_round(tmp_path_factory, base_model_dir, data_dir, ca):
    """One round of ``jobs/fedlora_he`` through its real components; every hospital on its own kit key."""
    from hospital_fedlora.he.bfv_context import (
        CLIENT_CONTEXT_FILE,
        SERVER_CONTEXT_FILE,
        BFVParams,
        make_context,
        serialize_context,
    )

    from deployment_helpers import write_site_configs
    from job_in_process import REPO, JobInProcess

    sites = ["hospital-a", "hospital-b", "hospital-c"]
    root = tmp_path_factory.mktemp("audit_job")
    for site in sites:
        ca.write_kit(root / site / "startup", site)
    configs = write_site_configs(
        root / "site_configs", base_model_dir, data_dir, sites, privacy={"require_encryption": True}
    )
    made = make_context(BFVParams(), n_threads=1)
    files = {"client": {CLIENT_CONTEXT_FILE: serialize_context(made, secret=True)},
             "server": {SERVER_CONTEXT_FILE: serialize_context(made, secret=False)}}  # fmt: skip
    recipe = {"lora_executor": {"recipe": {"local_steps": 1, "max_eval_examples": 2}}}
    fed = JobInProcess(REPO / "jobs" / "fedlora_he", root, sites, files, site_configs=configs, client_args=recipe)

    def uploads(rnd: int, who: list[str]) -> dict[str, bytes]:
        task = fed.task_data(rnd)
        return {s: fed.send(s, fed.train(s, fed.receive(s, task, rnd), rnd), rnd) for s in who}

    first = uploads(0, sites)
    fed.aggregate(0, first)
    replayed = uploads(1, sites[:2]) | {"hospital-c": first["hospital-c"]}  # its round-0 upload sent again
    with pytest.raises(AssertionError, match="hospital-c rejected"):
        fed.aggregate(1, replayed)
    fed.end()
    run = lambda name: Path(fed.sites[name].engine.workspace.get_run_dir("job-in-process")) if name in fed.sites else None  # noqa: E731
    server_run = Path(fed.server_engine.workspace.get_run_dir("job-in-process"))
    return {"server": server_run, "sites": {s: run(s) for s in sites}, "root_ca": root / "hospital-a" / "startup" / "rootCA.pem"}


def test_a_round_of_the_encrypted_job_leaves_a_log_and_receipts_that_verify(encrypted_round):
    server, sites = encrypted_round["server"], encrypted_round["sites"]
    entries = read_chain(server / AUDIT_DIR / AUDIT_FILE)
    round_0 = ["round_started"] + ["contribution"] * 3 + ["gathered", "aggregate"]
    round_1 = ["round_started"] + ["contribution"] * 3  # the replay is rejected: the harness stops the round
    assert [e["event"] for e in entries] == ["run_started", *round_0, *round_1, "run_ended"]
    replay = entries[-2]
    assert (replay["site"], replay["round"], replay["accepted"]) == ("hospital-c", 1, False) and replay["reason"]
    assert replay["digest"] == entries[2 + [e.get("site") for e in entries[2:5]].index("hospital-c")]["digest"]
    index = [json.loads(l) for l in (server / "encrypted_log" / "log.jsonl").read_text().splitlines()]
    assert entries[5]["answered"] == sorted(sites) and entries[5]["silent"] == []
    assert entries[6]["digest"] == index[0]["sha256"]  # the aggregate is the round the encrypted log holds
    assert all(e["signed_receipt"]["receipt"]["log_head"] == {"seq": 1, "hash": entries[1]["hash"]} for e in entries[2:5])
    done = audit_command(server, *sites.values(), "--root-ca", encrypted_round["root_ca"])
    assert done.returncode == 0, done.stderr
    assert "12 entries, chain intact; job job-in-process, 2 rounds, 5 contributions accepted, 1 rejected, 5 hospital signatures valid (each certificate issued by the given root CA)" in done.stdout
    assert f"entry 10 (contribution, round 1, hospital-c): rejected: {replay['reason']}" in done.stdout
    assert "entry 10 (contribution, round 1, hospital-c): the hospital signed round 0, the log has 1 (it was rejected" in done.stdout
    assert "round 0: aggregate of hospital-a, hospital-b, hospital-c, digest" in done.stdout and "the same as the encrypted log's" in done.stdout


def test_a_server_that_drops_a_hospitals_contribution_from_the_log_is_caught_by_its_receipts(encrypted_round, tmp_path):
    import shutil

    server = tmp_path / "server"
    shutil.copytree(encrypted_round["server"], server)
    log = server / AUDIT_DIR / AUDIT_FILE
    entries = lines(log)
    # drop hospital-c's round-0 contribution and cut the log after that round, then rebuild the chain
    end = next(e["seq"] for e in entries if e["event"] == "aggregate")
    kept = [e for e in entries[: end + 1] if e.get("site") != "hospital-c"]
    aggregate = kept[-1]
    aggregate["participants"] = ["hospital-a", "hospital-b"]
    aggregate["example_counts"].pop("hospital-c")
    rewrite(log, kept, rehash=True)
    receipts = encrypted_round["sites"]["hospital-c"] / AUDIT_DIR / RECEIPTS_FILE
    done = audit_command(server, encrypted_round["sites"]["hospital-c"])
    assert done.returncode == 1
    assert done.stderr.startswith(f"FAILED: {receipts}, line 1: hospital-c sent its round 0 result, but the log lacks a contribution from hospital-c in round 0")
