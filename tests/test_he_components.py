"""The encrypted job's FLARE components with real TenSEAL keys and real FLContext/Shareable objects.

Encrypt filter -> aggregator -> log generator -> persistor -> decrypt filter, without processes: exact
integer sums, a server that cannot decrypt, every bad contribution refused with the site named, catch-up
from the log, and the append-only files.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.fuel.utils import fobs

from hospital_fedlora.adapter_layout import AdapterLayout
from hospital_fedlora.config import ConfigError
from hospital_fedlora.he.bfv_context import (
    CLIENT_CONTEXT_FILE,
    BFVParams,
    MissingSecretKeyError,
    make_context,
    serialize_context,
)
from hospital_fedlora.he.decrypt_filter import DecryptFilter
from hospital_fedlora.he.encoding import contribution_weight, quantize, rounding_generator, step_size
from hospital_fedlora.he.encrypt_filter import EncryptFilter
from hospital_fedlora.he.log_generator import EncryptedLogGenerator
from hospital_fedlora.he.log_persistor import (
    FILE,
    LOG_DIR,
    LOG_INDEX,
    EncryptedLogPersistor,
    log_entries,
    make_log_learnable,
    read_log,
)
from hospital_fedlora.he.packed_bfv import decrypt_ints
from hospital_fedlora.he.site_key import SiteEncryption, SiteKey
from hospital_fedlora.he.sum_aggregator import EncryptedSumAggregator
from hospital_fedlora.he.wire_format import (
    LogEntry,
    LogError,
    first_round_needed,
)
from hospital_fedlora.protocol import INITIAL_ADAPTER, REFUSED_HEADER, Data, EncryptedKind, Meta
from hospital_fedlora.server.adapter_locator import AdapterLocator

from flare_harness import Engine, fl_ctx, kit_workspace, start_run

SITES = ("hospital-a", "hospital-b", "hospital-c")
COUNTS = {"hospital-a": 240, "hospital-b": 160, "hospital-c": 120}
CLIP = 0.05
FULL_WEIGHT = 256
# One ciphertext per chunk so a ~30k-value adapter travels as several chunks.
PACKING = {"bits": 16, "max_sites": 8, "ciphertexts_per_chunk": 1}
SHAPES = {
    "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": (8, 1024),
    "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": (1024, 8),
    "base_model.model.layers.0.self_attn.v_proj.lora_A.weight": (8, 1024),
    "base_model.model.layers.0.self_attn.v_proj.lora_B.weight": (1024, 9),  # odd size: a short last ciphertext
}


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def key_files(tmp_path_factory):
    """Kit files of one provisioning (client with the secret key, server without) and a foreign client key."""
    folder = tmp_path_factory.mktemp("keys")
    made = make_context(BFVParams(), n_threads=1)
    files = {"client": folder / "client.tenseal", "server": folder / "server.tenseal", "foreign": folder / "foreign.tenseal"}
    files["client"].write_bytes(serialize_context(made, secret=True))
    files["server"].write_bytes(serialize_context(made, secret=False))
    files["foreign"].write_bytes(serialize_context(make_context(BFVParams(), n_threads=1), secret=True))
    return files


def refusal(task: Shareable) -> str:
    """Why the decrypt filter refused the log it was given: the task data then holds no adapter."""
    reason = task.get_header(REFUSED_HEADER)
    assert reason and from_shareable(task).data_kind == EncryptedKind.REFUSED, "the log was not refused"
    return reason


def site_ctx(site: str, rnd: int | None = None, engine: Engine | None = None) -> FLContext:
    return fl_ctx(site, rnd, engine)


def server_ctx(rnd: int, global_model=None, workspace=None, job_id="job_he") -> FLContext:
    ctx = site_ctx("server", rnd)
    if global_model is not None:
        ctx.set_prop(AppConstants.GLOBAL_MODEL, global_model, private=True, sticky=False)
    if workspace is not None:
        ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, kit_workspace(workspace, "server"), private=True, sticky=False)
        ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=False, sticky=False)
    return ctx


def make_encryption(**overrides) -> SiteEncryption:
    args = {"clip": CLIP, "full_weight": FULL_WEIGHT, "packing": PACKING, "rounding_seed": 11}
    return SiteEncryption(**{**args, **overrides})


def kit_of(key_file: Path, site: str = "hospital-a") -> Engine:
    """An engine whose workspace is a kit with ``key_file`` in startup/, where a hospital's key always comes from."""
    root = key_file.parent / f"kit_{key_file.stem}"
    workspace = kit_workspace(root, site)
    (root / "startup" / CLIENT_CONTEXT_FILE).write_bytes(key_file.read_bytes())
    return Engine(workspace=workspace)


def make_filters(key_files, site="hospital-a", **overrides):
    """The site's key component and both filters, started as FLARE starts a job; returns the key they hold."""
    enc = make_encryption(**overrides)
    encrypt, decrypt = EncryptFilter(), DecryptFilter()
    engine = kit_of(key_files["client"], site)
    engine.components["site_encryption"] = enc
    start_run([encrypt, decrypt, enc], site_ctx(site, engine=engine))
    return encrypt.key, encrypt, decrypt


def diff_for(site: str, rnd: int, shapes=SHAPES) -> dict[str, np.ndarray]:
    g = np.random.default_rng(zlib.crc32(f"{site}:{rnd}".encode()))
    return {k: (g.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}


def train_result(diff: dict, count: int, rnd: int, **meta) -> Shareable:
    meta = {Meta.EXAMPLE_COUNT: count, Meta.METRICS: {"train_loss": 1.5}, Meta.ADAPTER_CONFIG: {"r": 8}, **meta}
    s = DXO(DataKind.WEIGHT_DIFF, data=diff, meta=meta).to_shareable()
    s.set_header(AppConstants.CURRENT_ROUND, rnd)
    return s


def as_received(result: Shareable, site: str, rnd: int) -> Shareable:
    """What the server's aggregator sees: the site's identity and the round cookie FLARE attaches."""
    result.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    result.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd)
    return result


def encrypted(encrypt: EncryptFilter, site: str, diff: dict, rnd: int, count: int | None = None) -> Shareable:
    out = encrypt.process(train_result(diff, COUNTS[site] if count is None else count, rnd), site_ctx(site))
    return as_received(out, site, rnd)


def expected_ints(key: SiteKey, site: str, diff: dict, rnd: int) -> torch.Tensor:
    tensors = {k: torch.from_numpy(v) for k, v in diff.items()}
    weight = contribution_weight(COUNTS[site], FULL_WEIGHT)
    q = quantize(tensors, CLIP, 16, rounding_generator(key.settings.rounding_seed, site, rnd), weight=weight)
    return AdapterLayout.from_tensors(tensors).flatten(q.ints).to(torch.int64)


@pytest.fixture(scope="module")
def filters(key_files):
    return make_filters(key_files)


@pytest.fixture
def aggregator(key_files):
    agg = EncryptedSumAggregator(min_contributions=3, context_file=str(key_files["server"]))
    agg.load_context(server_ctx(0))
    return agg


# ------------------------------------------------------------------------------------ encrypt filter
def test_only_ciphertexts_and_clear_metadata_leave_the_site(filters):
    enc, encrypt, _ = filters
    diff = diff_for("hospital-a", 0)
    out = encrypt.process(train_result(diff, 240, 0, private_note="not for the server"), site_ctx("hospital-a"))
    dxo = from_shareable(out)
    assert dxo.data_kind == EncryptedKind.DIFF
    assert set(dxo.data) == {Data.CHUNKS} and len(dxo.data[Data.CHUNKS]) == 3  # 30,729 values, 12,288 per ciphertext
    layout = AdapterLayout.from_tensors({k: torch.from_numpy(v) for k, v in diff.items()})
    assert dxo.meta[Meta.N_VALUES] == layout.n_values and dxo.meta[Meta.LAYOUT_FINGERPRINT] == layout.fingerprint()
    assert dxo.meta[Meta.WEIGHT_FACTOR] == pytest.approx(240 / 256) and dxo.meta[Meta.EXAMPLE_COUNT] == 240
    assert dxo.meta[Meta.METRICS] == {"train_loss": 1.5} and dxo.meta[Meta.ADAPTER_CONFIG] == {"r": 8}
    assert "private_note" not in dxo.meta
    wire = fobs.dumps(out)
    for v in diff.values():  # no tensor's float bytes appear anywhere in the serialized message
        assert v.tobytes()[:64] not in wire


def test_clipped_values_are_counted(filters):
    _, encrypt, _ = filters
    diff = diff_for("hospital-a", 0)
    first = next(iter(diff))
    diff[first][0, :5] = 1.0  # 20x the clip bound
    dxo = from_shareable(encrypt.process(train_result(diff, 240, 0), site_ctx("hospital-a")))
    assert encrypt.clipped == 5
    assert "clipped" not in dxo.meta  # the server learns counts, not magnitudes


# ------------------------------------------------------------------------------------ exact integer sums
def test_aggregate_decrypts_to_the_exact_sum_of_weighted_quantized_inputs(filters, aggregator, key_files):
    enc, encrypt, _ = filters
    diffs = {s: diff_for(s, 0) for s in SITES}
    for s in SITES:
        assert aggregator.accept(encrypted(encrypt, s, diffs[s], 0), server_ctx(0))
    agg = from_shareable(aggregator.aggregate(server_ctx(0)))
    m = agg.meta
    assert m[Meta.N_SITES] == 3 and m[Meta.EXAMPLE_COUNTS] == COUNTS
    assert m[Meta.TOTAL_WEIGHT] == pytest.approx(sum(COUNTS.values()) / FULL_WEIGHT)
    assert set(m[Meta.SITE_METRICS]) == set(SITES) and m[Meta.ADAPTER_CONFIG] == {"r": 8}
    got = decrypt_ints(enc.context, agg.data[Data.CHUNKS], enc.plan, m[Meta.N_VALUES], 3)
    want = sum(expected_ints(enc, s, diffs[s], 0) for s in SITES)
    assert torch.equal(got, want)


def test_int8_mode_sums_exactly_and_averages_within_its_bound(key_files):
    enc, encrypt, decrypt = make_filters(key_files, packing={**PACKING, "bits": 8})
    assert (enc.plan.bits, enc.plan.lanes_per_slot) == (8, 5)
    agg = EncryptedSumAggregator(min_contributions=3, context_file=str(key_files["server"]))
    agg.load_context(server_ctx(0))
    diffs = {s: diff_for(s, 0) for s in SITES}
    for s in SITES:
        assert agg.accept(encrypted(encrypt, s, diffs[s], 0), server_ctx(0)), agg.rejected
    summed = agg.aggregate(server_ctx(0))
    m = from_shareable(summed).meta
    got = decrypt_ints(enc.context, from_shareable(summed).data[Data.CHUNKS], enc.plan, m[Meta.N_VALUES], 3)
    want = 0
    for s in SITES:
        tensors = {k: torch.from_numpy(v) for k, v in diffs[s].items()}
        q = quantize(tensors, CLIP, 8, rounding_generator(enc.settings.rounding_seed, s, 0), weight=contribution_weight(COUNTS[s], FULL_WEIGHT))
        want = want + AdapterLayout.from_tensors(tensors).flatten(q.ints).to(torch.int64)
    assert torch.equal(got, want)
    log = EncryptedLogGenerator().shareable_to_learnable(summed, server_ctx(0, make_log_learnable([])))
    out = from_shareable(decrypt.process(EncryptedLogGenerator().learnable_to_shareable(log, server_ctx(1)), site_ctx("a")))
    total = sum(COUNTS.values())
    bound = step_size(CLIP, 8) * 3 / (total / FULL_WEIGHT)
    for k in SHAPES:
        average = sum(COUNTS[s] * diffs[s][k].astype(np.float64) for s in SITES) / total
        assert np.abs(out.data[k] - average).max() < bound, k


def test_a_log_encrypted_under_another_key_is_refused_at_the_site(filters, aggregator, key_files):
    _, encrypt, _ = filters
    for s in SITES:
        assert aggregator.accept(encrypted(encrypt, s, diff_for(s, 0), 0), server_ctx(0))
    log = EncryptedLogGenerator().shareable_to_learnable(aggregator.aggregate(server_ctx(0)), server_ctx(0, make_log_learnable([])))
    task = EncryptedLogGenerator().learnable_to_shareable(log, server_ctx(1))
    foreign = make_filters({"client": key_files["foreign"]}, "hospital-x")[2]
    assert re.search(r"hospital-x: round 0 aggregate: encrypted under key \w+, this kit holds key \w+", refusal(foreign.process(task, site_ctx("hospital-x"))))


def test_decrypt_filter_yields_the_example_weighted_average(filters, aggregator, key_files):
    diffs = {s: diff_for(s, 0) for s in SITES}
    for s in SITES:
        assert aggregator.accept(encrypted(filters[1], s, diffs[s], 0), server_ctx(0))
    log = EncryptedLogGenerator().shareable_to_learnable(aggregator.aggregate(server_ctx(0)), server_ctx(0, make_log_learnable([])))
    task = EncryptedLogGenerator().learnable_to_shareable(log, server_ctx(1))
    _, _, decrypt = make_filters(key_files, "hospital-b")
    out = from_shareable(decrypt.process(task, site_ctx("hospital-b")))
    assert out.data_kind == DataKind.WEIGHT_DIFF
    assert out.meta[Meta.RELATIVE_TO] == INITIAL_ADAPTER and out.meta[Meta.APPLIED_ROUNDS] == [0]
    total = sum(COUNTS.values())
    for k in SHAPES:
        average = sum(COUNTS[s] * diffs[s][k].astype(np.float64) for s in SITES) / total
        # per value: less than one quantization step per site, over the total weight factor
        bound = step_size(CLIP, 16) * 3 / (total / FULL_WEIGHT)
        assert np.abs(out.data[k] - average).max() < bound, k
        assert out.data[k].dtype == np.float32


# ------------------------------------------------------------------------------------ server has no key
def test_the_server_context_cannot_decrypt_or_encrypt(filters, aggregator, key_files):
    enc, encrypt, _ = filters
    assert not aggregator.context.has_secret_key
    contribution = from_shareable(encrypted(encrypt, "hospital-a", diff_for("hospital-a", 0), 0))
    with pytest.raises(MissingSecretKeyError, match="no secret key"):
        decrypt_ints(aggregator.context, contribution.data[Data.CHUNKS], enc.plan, contribution.meta[Meta.N_VALUES], 1)
    server_as_site = make_encryption()
    with pytest.raises(ValueError, match="holds no secret key"):
        server_as_site.key(site_ctx("hospital-a", engine=kit_of(key_files["server"])))


def test_aggregator_refuses_a_context_with_a_secret_key(key_files):
    agg = EncryptedSumAggregator(context_file=str(key_files["client"]))
    with pytest.raises(ValueError, match="server must never have one"):
        agg.load_context(server_ctx(0))


# ------------------------------------------------------------------------------------ bad contributions
def _tamper(s: Shareable, how: str) -> Shareable:
    dxo = from_shareable(s)
    chunks = list(dxo.data[Data.CHUNKS])
    if how == "flip":
        b = bytearray(chunks[1])
        b[-100] ^= 0x01
        chunks[1] = bytes(b)
    elif how == "truncate":
        chunks[2] = chunks[2][: len(chunks[2]) // 2]
    elif how == "drop_chunk":
        chunks = chunks[:2]
    dxo.data[Data.CHUNKS] = chunks
    return dxo.update_shareable(s)


@pytest.mark.parametrize(
    "how, reason",
    [
        ("flip", r"hospital-b, chunk 1: payload does not match its SHA-256.*altered"),
        ("truncate", r"hospital-b, chunk 2: payload does not match its SHA-256.*truncated"),
        ("drop_chunk", r"hospital-b: 2 chunks received, the headers announce 3"),
    ],
)
def test_corrupted_contribution_is_rejected_and_not_summed(filters, aggregator, how, reason):
    enc, encrypt, _ = filters
    diffs = {s: diff_for(s, 0) for s in SITES}
    assert aggregator.accept(encrypted(encrypt, "hospital-a", diffs["hospital-a"], 0), server_ctx(0))
    assert not aggregator.accept(_tamper(encrypted(encrypt, "hospital-b", diffs["hospital-b"], 0), how), server_ctx(0))
    assert aggregator.rejected["hospital-b"] and re.search(reason, aggregator.rejected["hospital-b"])
    assert aggregator.accept(encrypted(encrypt, "hospital-c", diffs["hospital-c"], 0), server_ctx(0))
    with pytest.raises(RuntimeError, match=r"round 0: 2 accepted contributions, 3 required \(hospital-b: "):
        aggregator.aggregate(server_ctx(0))
    # with two required, the round sums exactly the two good contributions
    aggregator.min_contributions = 2
    agg = from_shareable(aggregator.aggregate(server_ctx(0)))
    got = decrypt_ints(enc.context, agg.data[Data.CHUNKS], enc.plan, agg.meta[Meta.N_VALUES], 2)
    assert torch.equal(got, sum(expected_ints(enc, s, diffs[s], 0) for s in ("hospital-a", "hospital-c")))
    assert agg.meta[Meta.EXAMPLE_COUNTS] == {"hospital-a": 240, "hospital-c": 120}


def test_contribution_encrypted_under_another_provisioning_is_rejected_naming_the_site(filters, aggregator, key_files):
    _, encrypt, _ = filters
    _, foreign_encrypt, _ = make_filters({"client": key_files["foreign"]}, "hospital-c")
    assert aggregator.accept(encrypted(encrypt, "hospital-a", diff_for("hospital-a", 0), 0), server_ctx(0))
    assert not aggregator.accept(encrypted(foreign_encrypt, "hospital-c", diff_for("hospital-c", 0), 0), server_ctx(0))
    assert aggregator.rejected["hospital-c"].startswith("hospital-c: encrypted under key ")
    assert "another provisioning" in aggregator.rejected["hospital-c"]


def test_foreign_contribution_first_is_rejected_too(filters, aggregator, key_files):
    # Nothing to compare with yet: the key id in the chunk headers still gives it away.
    _, foreign_encrypt, _ = make_filters({"client": key_files["foreign"]}, "hospital-c")
    assert not aggregator.accept(encrypted(foreign_encrypt, "hospital-c", diff_for("hospital-c", 0), 0), server_ctx(0))
    assert "another provisioning" in aggregator.rejected["hospital-c"]


def test_wrong_layout_round_kind_and_duplicates_are_rejected(filters, aggregator):
    _, encrypt, _ = filters
    assert aggregator.accept(encrypted(encrypt, "hospital-a", diff_for("hospital-a", 0), 0), server_ctx(0))
    other_shapes = {**SHAPES, "base_model.model.layers.0.self_attn.v_proj.lora_B.weight": (1024, 8)}
    cases = {
        "hospital-b": (encrypted(encrypt, "hospital-b", diff_for("hospital-b", 0, other_shapes), 0), "adapter layout"),
        "hospital-c": (encrypted(encrypt, "hospital-c", diff_for("hospital-c", 1), 1), "for round 1, the current round is 0"),
        "hospital-d": (as_received(train_result(diff_for("d", 0), 10, 0), "hospital-d", 0), "EncryptFilter configured"),
        "hospital-a": (encrypted(encrypt, "hospital-a", diff_for("hospital-a", 0), 0), "second contribution"),
    }
    for site, (contribution, reason) in cases.items():
        assert not aggregator.accept(contribution, server_ctx(0)), site
        assert reason in aggregator.rejected[site], (site, aggregator.rejected[site])


def test_stale_ciphertext_under_a_current_cookie_is_rejected_by_its_tag(filters, aggregator):
    _, encrypt, _ = filters
    stale = encrypted(encrypt, "hospital-b", diff_for("hospital-b", 0), 0)  # tagged round 0
    stale.add_cookie(AppConstants.CONTRIBUTION_ROUND, 1)
    assert not aggregator.accept(stale, server_ctx(1))
    assert "tagged 'round 0', expected 'round 1'" in aggregator.rejected["hospital-b"]


# ------------------------------------------------------------------------------------ keys and settings
def test_missing_key_file_in_the_kit_is_named(tmp_path, key_files):
    enc = make_encryption()
    # its kit was provisioned without our builder
    engine = Engine({"site_encryption": enc}, workspace=kit_workspace(tmp_path, "hospital-a"))
    ctx = site_ctx("hospital-a", engine=engine)
    with pytest.raises(FileNotFoundError, match=rf"hospital-a: .*startup/{CLIENT_CONTEXT_FILE} not found.*BFVContextBuilder"):
        enc.key(ctx)
    encrypt = EncryptFilter()
    start_run([enc, encrypt], ctx)  # the cause is kept, and raised with every task
    with pytest.raises(RuntimeError, match="encryption is not set up at this site: .*not found"):
        encrypt.process(train_result(diff_for("hospital-a", 0), 240, 0), ctx)
    agg = EncryptedSumAggregator(context_file=str(tmp_path / "nowhere.tenseal"))
    with pytest.raises(ValueError, match="server: .*nowhere.tenseal: BFV context file not found"):
        agg.load_context(server_ctx(0))


def test_key_file_found_in_the_kit_startup_folder(tmp_path, key_files):
    workspace = kit_workspace(tmp_path, "hospital-a")
    (tmp_path / "startup" / CLIENT_CONTEXT_FILE).write_bytes(key_files["client"].read_bytes())
    enc = make_encryption()
    assert enc.key(site_ctx("hospital-a", engine=Engine(workspace=workspace))).context.has_secret_key


def test_settings_are_checked_at_construction_and_against_the_key(key_files):
    with pytest.raises(ConfigError, match=r"SiteEncryption: invalid configuration\n  field 'packing.bits'.*\(got 12\)"):
        make_encryption(packing={"bits": 12})
    with pytest.raises(ConfigError, match=r"field 'clip'"):
        make_encryption(clip=-1.0)
    with pytest.raises(ConfigError, match=r"field 'full_weight'"):
        make_encryption(full_weight=0)
    overflowing = make_encryption(packing={"bits": 16, "max_sites": 64})
    with pytest.raises(ConfigError, match=r"args 'packing': .*max_sites=64"):
        overflowing.key(site_ctx("hospital-a", engine=kit_of(key_files["client"])))


def test_a_job_cannot_name_the_hospitals_key_file(key_files, caplog):
    """The key is the kit's, signature checked: a file the job names (one its submitter holds) is never read.
    (A site that requires encryption also refuses such a job: test_site_privacy, test_privacy_gate_e2e.)"""
    enc = make_encryption(context_file=str(key_files["foreign"]))
    kit_key = make_filters(key_files)[0]
    key = enc.key(site_ctx("hospital-a", engine=kit_of(key_files["client"])))
    assert key.context.key_id == kit_key.context.key_id
    assert key.context.key_id != make_filters({"client": key_files["foreign"]})[0].context.key_id
    assert "args 'context_file' (" in caplog.text and "foreign.tenseal) ignored" in caplog.text


# ------------------------------------------------------------------------------------ the log, catch-up
def run_round(rnd, log, contributors, encrypt, key_files, generator) -> object:
    """One server round: aggregate the contributors' encrypted diffs, append to the log."""
    agg = EncryptedSumAggregator(min_contributions=len(contributors), context_file=str(key_files["server"]))
    agg.load_context(server_ctx(rnd))
    for s in contributors:
        assert agg.accept(encrypted(encrypt, s, diff_for(s, rnd), rnd), server_ctx(rnd)), agg.rejected
    return generator.shareable_to_learnable(agg.aggregate(server_ctx(rnd)), server_ctx(rnd, log))


def test_a_site_that_missed_a_round_catches_up_from_the_log(filters, key_files):
    _, encrypt, _ = filters
    gen, final = EncryptedLogGenerator(), EncryptedLogGenerator(whole_log=True)
    steady = make_filters(key_files, "hospital-a")[2]
    late = make_filters(key_files, "hospital-c")[2]
    log = make_log_learnable([])

    first = gen.learnable_to_shareable(log, server_ctx(0))
    assert from_shareable(first).data == {Data.ENTRIES: []}
    for f, s in ((steady, "hospital-a"), (late, "hospital-c")):
        out = from_shareable(f.process(first, site_ctx(s)))
        assert out.data == {} and out.meta[Meta.RELATIVE_TO] == INITIAL_ADAPTER and out.meta[Meta.APPLIED_ROUNDS] == []

    log = run_round(0, log, SITES, encrypt, key_files, gen)
    task = gen.learnable_to_shareable(log, server_ctx(1))
    assert [e[Meta.ROUND] for e in from_shareable(task).data[Data.ENTRIES]] == [0]
    steady.process(task, site_ctx("hospital-a"))  # hospital-c misses round 1

    log = run_round(1, log, ("hospital-a", "hospital-b"), encrypt, key_files, gen)
    task = gen.learnable_to_shareable(log, server_ctx(2))
    assert [e[Meta.ROUND] for e in from_shareable(task).data[Data.ENTRIES]] == [0, 1]  # hospital-c lacks both
    a = from_shareable(steady.process(task, site_ctx("hospital-a")))
    c = from_shareable(late.process(task, site_ctx("hospital-c")))
    assert a.meta[Meta.APPLIED_ROUNDS] == c.meta[Meta.APPLIED_ROUNDS] == [0, 1]
    for k in SHAPES:
        np.testing.assert_array_equal(a.data[k], c.data[k])

    log = run_round(2, log, SITES, encrypt, key_files, gen)
    assert [e[Meta.ROUND] for e in from_shareable(gen.learnable_to_shareable(log, server_ctx(3))).data[Data.ENTRIES]] == [2]
    whole = final.learnable_to_shareable(log, server_ctx(3))
    assert [e[Meta.ROUND] for e in from_shareable(whole).data[Data.ENTRIES]] == [0, 1, 2]
    fresh = make_filters(key_files, "hospital-b")[2]
    outs = [from_shareable(f.process(whole, site_ctx(s))) for f, s in ((steady, "a"), (late, "c"), (fresh, "b"))]
    for k in SHAPES:
        np.testing.assert_array_equal(outs[0].data[k], outs[1].data[k])
        np.testing.assert_array_equal(outs[0].data[k], outs[2].data[k])
    assert all(o.meta[Meta.APPLIED_ROUNDS] == [0, 1, 2] for o in outs)


def test_a_gap_in_the_log_is_refused_and_nothing_is_applied(filters, key_files):
    _, encrypt, _ = filters
    gen = EncryptedLogGenerator()
    log = run_round(0, make_log_learnable([]), SITES, encrypt, key_files, gen)
    log = run_round(1, log, SITES, encrypt, key_files, gen)
    only_latest = gen.learnable_to_shareable(log, server_ctx(2))
    assert [e[Meta.ROUND] for e in from_shareable(only_latest).data[Data.ENTRIES]] == [1]
    newcomer = make_filters(key_files, "hospital-d")[2]
    assert re.search(r"hospital-d: cannot apply the log: it has applied rounds none, the server sent "
                     r"rounds \[1\], so rounds \[0\] are missing", refusal(newcomer.process(only_latest, site_ctx("hospital-d"))))  # fmt: skip
    assert newcomer.applied == [] and newcomer.change == {}


def test_a_tampered_log_entry_is_refused(filters, key_files):
    _, encrypt, _ = filters
    gen = EncryptedLogGenerator()
    log = run_round(0, make_log_learnable([]), SITES, encrypt, key_files, gen)
    task = gen.learnable_to_shareable(log, server_ctx(1))
    dxo = from_shareable(task)
    entry = dxo.data[Data.ENTRIES][0]
    entry[Data.CHUNKS] = [entry[Data.CHUNKS][0][:-10], *entry[Data.CHUNKS][1:]]
    dxo.update_shareable(task)
    site = make_filters(key_files, "hospital-a")[2]
    assert re.search("hospital-a: log entry for round 0: .*do not match the recorded SHA-256", refusal(site.process(task, site_ctx("hospital-a"))))
    # forged clear metadata passes the digest (it covers the chunks) but not the site's own checks
    dxo.data[Data.ENTRIES] = from_shareable(gen.learnable_to_shareable(log, server_ctx(1))).data[Data.ENTRIES]
    dxo.data[Data.ENTRIES][0][Meta.N_SITES] = 2
    dxo.update_shareable(task)
    assert "sums 2 contributions but lists 3 contributing sites" in refusal(site.process(task, site_ctx("hospital-a")))
    dxo.data[Data.ENTRIES][0].update({Meta.EXAMPLE_COUNTS: {"hospital-a": 240, "hospital-b": 160}, Meta.TOTAL_WEIGHT: 400 / FULL_WEIGHT})
    dxo.update_shareable(task)
    assert "sums 3 contributions, the metadata says 2" in refusal(site.process(task, site_ctx("hospital-a")))
    dxo.data[Data.ENTRIES] = from_shareable(gen.learnable_to_shareable(log, server_ctx(1))).data[Data.ENTRIES]
    dxo.data[Data.ENTRIES][0][Meta.TOTAL_WEIGHT] *= 2
    dxo.update_shareable(task)
    assert re.search("total weight .* does not follow from the sites' example counts", refusal(site.process(task, site_ctx("hospital-a"))))
    assert site.applied == []


def test_generator_refuses_to_rewrite_a_logged_round(filters, key_files):
    _, encrypt, _ = filters
    gen = EncryptedLogGenerator()
    log = run_round(0, make_log_learnable([]), SITES, encrypt, key_files, gen)
    with pytest.raises(LogError, match="append-only"):
        run_round(0, log, SITES, encrypt, key_files, gen)


def test_first_round_needed():
    assert first_round_needed({}, ["a"]) == 0
    rounds = {0: ["a", "b", "c"], 1: ["a", "b"], 2: ["a", "b"]}
    assert first_round_needed(rounds, []) == 0  # c contributed to 0 only: it has not applied 0 yet
    assert first_round_needed({0: ["a", "b"], 1: ["a", "b"]}, ["a", "b"]) == 1
    assert first_round_needed({0: ["a", "b"], 1: ["a", "b"]}, ["a", "b", "newcomer"]) == 0


# ------------------------------------------------------------------------------------ persistence
def test_persistor_appends_round_files_and_never_rewrites(filters, key_files, tmp_path):
    _, encrypt, _ = filters
    gen, persistor = EncryptedLogGenerator(), EncryptedLogPersistor()
    log = persistor.load_model(server_ctx(0, workspace=tmp_path))
    assert log.is_empty()
    for rnd in range(2):
        log = run_round(rnd, log, SITES, encrypt, key_files, gen)
        persistor.save_model(log, server_ctx(rnd, workspace=tmp_path))
    folder = tmp_path / "job_he" / LOG_DIR
    assert sorted(p.name for p in folder.iterdir()) == [LOG_INDEX, "round_000.bfv", "round_001.bfv"]
    lines = [json.loads(l) for l in (folder / LOG_INDEX).read_text().splitlines()]
    assert [l[Meta.ROUND] for l in lines] == [0, 1]
    for line in lines:
        data = (folder / line["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == line["sha256"] and len(data) > line["bytes"]
        assert line[Meta.EXAMPLE_COUNTS] == COUNTS and line[Meta.N_SITES] == 3
        assert line[Meta.TOTAL_WEIGHT] == pytest.approx(sum(COUNTS.values()) / FULL_WEIGHT)
    first_file = (folder / "round_000.bfv").stat()
    persistor.save_model(log, server_ctx(1, workspace=tmp_path))  # saving again changes nothing
    assert (folder / "round_000.bfv").stat().st_mtime_ns == first_file.st_mtime_ns
    assert len((folder / LOG_INDEX).read_text().splitlines()) == 2

    # Saved rounds live on disk: memory keeps their summaries, and the generator reads the ciphertexts back.
    assert all(Data.CHUNKS not in e and Path(e[FILE]).is_file() for e in log_entries(log))
    sent = from_shareable(EncryptedLogGenerator(whole_log=True).learnable_to_shareable(log, server_ctx(2))).data[Data.ENTRIES]
    assert [LogEntry.from_dict(e).sha256 for e in sent] == [l["sha256"] for l in lines]

    forged = log_entries(log)
    forged[0] = {**forged[0], "sha256": forged[1]["sha256"]}
    with pytest.raises(LogError, match="round 0: the log in memory differs.*never rewritten"):
        persistor.save_model(make_log_learnable(forged), server_ctx(1, workspace=tmp_path))

    # a fresh persistor (e.g. after a server restart) serves the log from disk to the final evaluation
    again = EncryptedLogPersistor().get_model_from_location("global_adapter", server_ctx(2, workspace=tmp_path))
    assert [(e[Meta.ROUND], e["sha256"]) for e in log_entries(again)] == [(l[Meta.ROUND], l["sha256"]) for l in lines]


def test_a_resumed_run_continues_the_earlier_runs_log_and_sends_it_whole(filters, key_files, tmp_path):
    _, encrypt, _ = filters
    gen, persistor = EncryptedLogGenerator(), EncryptedLogPersistor()
    log = persistor.load_model(server_ctx(0, workspace=tmp_path, job_id="crashed"))
    for rnd in range(2):
        log = run_round(rnd, log, SITES, encrypt, key_files, gen)
        persistor.save_model(log, server_ctx(rnd, workspace=tmp_path, job_id="crashed"))

    resumed = EncryptedLogPersistor(resume_from="crashed")
    log = resumed.load_model(server_ctx(0, workspace=tmp_path, job_id="resumed"))
    assert resumed.resumed_rounds == 2
    earlier = (tmp_path / "crashed" / LOG_DIR / LOG_INDEX).read_text().splitlines()
    assert (tmp_path / "resumed" / LOG_DIR / LOG_INDEX).read_text().splitlines() == earlier
    # The sites of a resumed run start from the seeded adapter: its first round sends rounds 0 and 1 ...
    gen = EncryptedLogGenerator()
    first = from_shareable(gen.learnable_to_shareable(log, server_ctx(2))).data[Data.ENTRIES]
    assert [e[Meta.ROUND] for e in first] == [0, 1]
    # ... and once round 2 is logged by this run, only what its contributors lack.
    log = run_round(2, log, SITES, encrypt, key_files, gen)
    resumed.save_model(log, server_ctx(2, workspace=tmp_path, job_id="resumed"))
    assert [e[Meta.ROUND] for e in from_shareable(gen.learnable_to_shareable(log, server_ctx(3))).data[Data.ENTRIES]] == [2]

    with pytest.raises(FileNotFoundError, match="job nowhere left no encrypted_log"):
        EncryptedLogPersistor(resume_from="nowhere").load_model(server_ctx(0, workspace=tmp_path, job_id="x"))
    with pytest.raises(ValueError, match="resume_from: '../crashed' is not a job id"):
        EncryptedLogPersistor(resume_from="../crashed").load_model(server_ctx(0, workspace=tmp_path, job_id="x"))


def test_stored_log_with_a_damaged_file_is_refused(filters, key_files, tmp_path):
    _, encrypt, _ = filters
    gen, persistor = EncryptedLogGenerator(), EncryptedLogPersistor()
    log = run_round(0, make_log_learnable([]), SITES, encrypt, key_files, gen)
    persistor.save_model(log, server_ctx(0, workspace=tmp_path))
    path = tmp_path / "job_he" / LOG_DIR / "round_000.bfv"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LogError, match="round_000.bfv: its 3 chunks .* do not match the recorded SHA-256"):
        read_log(path.parent)
    path.write_bytes(bytes(data[:-50]))
    with pytest.raises(LogError, match="truncated"):
        read_log(path.parent)


def test_locator_sends_the_whole_log_for_the_final_evaluation(filters, key_files, tmp_path):
    _, encrypt, _ = filters
    gen, persistor = EncryptedLogGenerator(), EncryptedLogPersistor()
    log = make_log_learnable([])
    for rnd in range(2):
        log = run_round(rnd, log, SITES, encrypt, key_files, gen)
        persistor.save_model(log, server_ctx(rnd, workspace=tmp_path))
    locator = AdapterLocator(persistor_id="persistor", shareable_generator_id="final_log")
    locator.persistor, locator.generator = persistor, EncryptedLogGenerator(whole_log=True)
    dxo = locator.locate_model(locator.get_model_names(server_ctx(2))[0], server_ctx(2))
    assert dxo.data_kind == EncryptedKind.LOG
    assert [e[Meta.ROUND] for e in dxo.data[Data.ENTRIES]] == [0, 1]
