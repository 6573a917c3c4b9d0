"""Packed BFV with real TenSEAL: exact sums, error bounds, key separation, and every bad input named."""

import hashlib
import json

import pytest
import tenseal as ts
import torch

from hospital_fedlora.adapter_layout import AdapterLayout
from hospital_fedlora.he.bfv_context import (
    BFVParams,
    MissingSecretKeyError,
    _is_prime,
    batching_prime,
    load_context,
    make_context,
    serialize_context,
)
from hospital_fedlora.he.encoding import (
    PackingSettings,
    contribution_weight,
    dequantize,
    pack_lanes,
    plan_lanes,
    quantize,
    step_size,
    unpack_lanes,
)
from hospital_fedlora.he.packed_bfv import EncryptedSum, add_encrypted, decrypt_ints, encrypt_ints
from hospital_fedlora.he.wire_format import CiphertextError, read_chunk_info

INT16 = PackingSettings(bits=16, max_sites=8, ciphertexts_per_chunk=4)
INT8 = PackingSettings(bits=8, max_sites=8, ciphertexts_per_chunk=4)


@pytest.fixture(scope="module")
def keys():
    """(client context with secret key, server context without), both loaded back from kit bytes."""
    made = make_context(BFVParams(), n_threads=1)
    client = load_context(serialize_context(made, secret=True), "client kit")
    server = load_context(serialize_context(made, secret=False), "server kit")
    return client, server


@pytest.fixture(scope="module")
def other_client():
    return make_context(BFVParams(), n_threads=1)


def rand_ints(n, q, seed):
    return torch.randint(-q, q + 1, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- params
@pytest.mark.parametrize("bits,n", [(40, 4096), (57, 4096), (60, 8192)])
def test_batching_prime(bits, n):
    p = batching_prime(bits, n)
    assert _is_prime(p) and p % (2 * n) == 1 and p.bit_length() == bits


def test_contexts_carry_params_and_only_the_client_has_the_secret_key(keys):
    client, server = keys
    assert client.has_secret_key and not server.has_secret_key
    assert client.key_id == server.key_id
    assert server.poly_modulus_degree == 4096 and server.data_modulus_bits == 72
    assert server.plain_modulus == batching_prime(58, 4096)
    assert len(serialize_context(server, secret=False)) < 1000  # parameters only
    with pytest.raises(MissingSecretKeyError):
        serialize_context(server, secret=True)


def test_plan_for_default_packing(keys):
    p16 = plan_lanes(INT16, keys[1])
    assert (p16.lane_bits, p16.lanes_per_slot) == (16 + 3, 3)
    p8 = plan_lanes(INT8, keys[1])
    assert (p8.lane_bits, p8.lanes_per_slot) == (8 + 3, 5)
    assert p8.values_per_ciphertext == 5 * 4096


def test_overflow_prone_settings_stop_with_the_setting_named(keys):
    with pytest.raises(ValueError, match=r"int16 with max_sites=32 and guard_bits=0 needs 21 bits per lane.*"
                       r"57 usable bits.*3 lanes of at most 19 bits.*lower max_sites"):
        plan_lanes(PackingSettings(bits=16, max_sites=32, min_lanes_per_slot=3), keys[1])
    # without the guard it packs two lanes per slot: legal, 1.5x the upload
    assert plan_lanes(PackingSettings(bits=16, max_sites=32), keys[1]).lanes_per_slot == 2
    with pytest.raises(ValueError, match=r"needs 33 bits per lane.*57 usable bits.*2 lanes of at most 28"):
        plan_lanes(PackingSettings(bits=16, max_sites=8, guard_bits=14, min_lanes_per_slot=2), keys[1])
    with pytest.raises(ValueError, match=r"max_sites=64 .*\(at most 32\).*plain_modulus_bits <= 57"):
        plan_lanes(PackingSettings(bits=8, max_sites=64), keys[1])


# ------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("settings", [INT16, INT8], ids=["int16", "int8"])
def test_pack_unpack_roundtrip_without_encryption(keys, settings):
    plan = plan_lanes(settings, keys[1])
    xs = [rand_ints(10_001, plan.qmax, s) for s in range(settings.max_sites)]
    slots = sum(pack_lanes(x, plan) for x in xs)
    assert int(slots.max()) < plan.plain_modulus
    got = unpack_lanes(slots, plan, 10_001, len(xs))
    assert torch.equal(got, sum(xs))


def test_pack_refuses_out_of_range(keys):
    plan = plan_lanes(INT8, keys[1])
    with pytest.raises(ValueError, match="exceed the int8 range"):
        pack_lanes(torch.tensor([128]), plan)
    with pytest.raises(TypeError, match="1-D integer"):
        pack_lanes(torch.tensor([1.0]), plan)


# ------------------------------------------------------------------------------------- exact sums
@pytest.mark.parametrize("settings", [INT16, INT8], ids=["int16", "int8"])
def test_aggregate_decrypts_to_the_exact_sum(keys, settings):
    client, server = keys
    plan = plan_lanes(settings, server)
    n = 3 * plan.values_per_ciphertext * settings.ciphertexts_per_chunk + 17  # 4 chunks, last one short
    xs = [rand_ints(n, plan.qmax, 10 + s) for s in range(3)]
    uploads = [encrypt_ints(client, x, plan, tag="round 4") for x in xs]
    assert len(uploads[0]) == plan.n_chunks(n) == 4
    agg = add_encrypted(server, uploads, expected_tag="round 4")
    info = read_chunk_info(agg)
    assert info.summed == 3 and info.values == n and info.tag == "round 4"
    got = decrypt_ints(client, agg, plan, n, 3, expected_tag="round 4")
    assert got.dtype == torch.int64
    assert torch.equal(got, sum(x.to(torch.int64) for x in xs))


@pytest.mark.parametrize("settings", [INT16, INT8], ids=["int16", "int8"])
@pytest.mark.parametrize("sign", [1, -1])
def test_extreme_values_at_max_sites_do_not_overflow(keys, settings, sign):
    client, server = keys
    plan = plan_lanes(settings, server)
    n = plan.values_per_ciphertext
    total = EncryptedSum(server)
    for _ in range(settings.max_sites):
        total.add(encrypt_ints(client, torch.full((n,), sign * plan.qmax), plan), "site")
    got = decrypt_ints(client, total.result(), plan, n, settings.max_sites)
    assert bool((got == sign * plan.qmax * settings.max_sites).all())


def test_noise_room_holds_at_the_largest_provisionable_site_count(keys):
    """32 sites is the most plain_modulus_bits=58 allows at n=4096: the sum is still exact."""
    client, server = keys
    plan = plan_lanes(PackingSettings(bits=8, max_sites=32), server)
    xs = [rand_ints(plan.values_per_ciphertext, plan.qmax, 50 + s) for s in range(32)]
    agg = add_encrypted(server, [encrypt_ints(client, x, plan) for x in xs])
    assert torch.equal(decrypt_ints(client, agg, plan, plan.values_per_ciphertext, 32), sum(xs))


@pytest.mark.parametrize("settings,bound", [(INT16, 1e-4), (INT8, 5e-2)], ids=["int16", "int8"])
def test_quantized_encrypted_weighted_average_is_within_the_documented_bound(keys, settings, bound):
    """Adapter-shaped diffs (std 1e-3, clip 6 sigma), weights from example counts: max error below the
    documented bound step * n / sum(a), and relative to max |average| below ``bound``."""
    client, server = keys
    plan = plan_lanes(settings, server)
    clip = 6e-3
    shapes = {"l0.q.lora_A": (8, 512), "l0.q.lora_B": (512, 8), "l0.v.lora_A": (8, 512), "l0.v.lora_B": (512, 8)}
    sites = []
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        sites.append({k: torch.randn(shape, generator=g) * 1e-3 for k, shape in shapes.items()})
    counts = [1200, 800, 1600]
    weights = [contribution_weight(c, full_weight=1600) for c in counts]
    layout = AdapterLayout.from_tensors(sites[0])
    uploads = []
    for s, (d, w) in enumerate(zip(sites, weights)):
        q = quantize(d, clip, settings.bits, torch.Generator().manual_seed(100 + s), weight=w)
        uploads.append(encrypt_ints(client, layout.flatten(q.ints), plan))
    agg = add_encrypted(server, uploads)
    summed = decrypt_ints(client, agg, plan, layout.n_values, 3)
    avg = layout.flatten(dequantize(layout.unflatten(summed), clip, settings.bits, sum(weights)))
    true = sum(c * layout.flatten(d).double() for c, d in zip(counts, sites)) / sum(counts)
    err = (avg.double() - true).abs().max().item()
    assert err < step_size(clip, settings.bits) * 3 / sum(weights)
    assert err / true.abs().max().item() < bound


# --------------------------------------------------------------------------------- key separation
def test_server_context_cannot_decrypt_or_encrypt(keys):
    client, server = keys
    plan = plan_lanes(INT8, server)
    chunks = encrypt_ints(client, rand_ints(100, 127, 1), plan)
    with pytest.raises(MissingSecretKeyError, match="no secret key"):
        decrypt_ints(server, chunks, plan, 100, 1)
    with pytest.raises(MissingSecretKeyError, match="cannot encrypt"):
        encrypt_ints(server, rand_ints(100, 127, 1), plan)
    # and TenSEAL itself refuses, whatever wrapper is used
    payload = chunks[0][chunks[0].index(b"}") + 1 :]
    vec = ts.bfv_vector_from(server.ts_context, payload)
    with pytest.raises(ValueError, match="secret_key"):
        vec.decrypt()


def test_contribution_from_another_provisioning_is_refused(keys, other_client):
    client, server = keys
    plan = plan_lanes(INT8, server)
    foreign = encrypt_ints(other_client, rand_ints(100, 127, 1), plan)
    total = EncryptedSum(server)
    with pytest.raises(CiphertextError, match="hospital-c: encrypted under key .* another provisioning"):
        total.add(foreign, "hospital-c")
    ours = encrypt_ints(client, rand_ints(100, 127, 1), plan)
    with pytest.raises(CiphertextError, match="another key|different provisionings"):
        decrypt_ints(other_client, ours, plan, 100, 1)


def test_decoding_with_the_wrong_site_count_is_refused(keys):
    client, server = keys
    plan = plan_lanes(INT8, server)
    agg = add_encrypted(server, [encrypt_ints(client, torch.full((50,), 127), plan) for _ in range(2)])
    with pytest.raises(CiphertextError, match="sums 2 contributions, the metadata says 1"):
        decrypt_ints(client, agg, plan, 50, 1)
    with pytest.raises(ValueError, match="outside 1..max_sites=8"):
        decrypt_ints(client, agg, plan, 50, 9)
    # a header that lies about the count is caught by the lane bound
    forged = [_reheader(c, summed=1) for c in agg]
    with pytest.raises(CiphertextError, match="largest sum of 1 contributions"):
        decrypt_ints(client, forged, plan, 50, 1)


# ----------------------------------------------------------------------------------- bad chunks
@pytest.fixture(scope="module")
def upload(keys):
    client, server = keys
    plan = plan_lanes(INT16, server)
    n = 2 * plan.values_per_ciphertext * INT16.ciphertexts_per_chunk  # 2 full chunks
    return plan, n, encrypt_ints(client, rand_ints(n, plan.qmax, 3), plan, tag="r1")


def _reheader(chunk: bytes, **changes) -> bytes:
    n = int.from_bytes(chunk[8:12], "big")
    header = json.loads(chunk[12 : 12 + n])
    header.update(changes)
    head = json.dumps(header).encode()
    return chunk[:8] + len(head).to_bytes(4, "big") + head + chunk[12 + n :]


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda c: [c[0][:-1000], c[1]], "truncated or altered"),
        (lambda c: [c[0][:10], c[1]], "truncated or foreign"),
        (lambda c: [c[0][:-5000] + bytes(5000), c[1]], "SHA-256"),
        (lambda c: [c[0]], "1 chunks received, the headers announce 2"),
        (lambda c: [c[1], c[0]], "missing or reordered"),
        (lambda c: [b"garbage" * 10, c[1]], "not hospital_fedlora encrypted data"),
        (lambda c: [], "non-empty list"),
        (lambda c: [_reheader(c[0], values=5), c[1]], "disagrees with chunk 0 on values"),
        (lambda c: [_reheader(c[0], ciphertexts=2), c[1]], r"ciphertexts is \(2, 4\) but earlier .* \(4, 4\)"),
    ],
    ids=["truncated", "cut-header", "zeroed-tail", "missing", "reordered", "garbage", "empty", "mixed", "count"],
)
def test_damaged_contribution_is_refused_and_leaves_the_sum_alone(keys, upload, corrupt, match):
    client, server = keys
    plan, n, chunks = upload
    total = EncryptedSum(server, expected_tag="r1")
    total.add(chunks, "hospital-a")
    with pytest.raises(CiphertextError, match=match) as err:
        total.add(corrupt(list(chunks)), "hospital-b")
    assert "hospital-b" in str(err.value)
    total.add(chunks, "hospital-c")
    got = decrypt_ints(client, total.result(), plan, n, 2, expected_tag="r1")
    expected = decrypt_ints(client, chunks, plan, n, 1) * 2
    assert torch.equal(got, expected)


def test_ciphertext_counts_must_match_headers(keys, upload):
    _, server = keys
    plan, n, chunks = upload
    with pytest.raises(CiphertextError, match="hospital-b: 6 ciphertexts for .* expected 8"):
        EncryptedSum(server).add([_reheader(chunks[0], ciphertexts=2), chunks[1]], "hospital-b")
    shifted = [_reheader(chunks[0], ciphertexts=3), _reheader(chunks[1], ciphertexts=5)]
    with pytest.raises(CiphertextError, match="hospital-b: chunk 0 holds 4 ciphertexts .* header says 3"):
        EncryptedSum(server).add(shifted, "hospital-b")


def test_payload_tampered_with_a_matching_digest_fails_parsing(keys, upload):
    """Someone who rewrites the digest too still cannot slip in a non-ciphertext."""
    _, server = keys
    plan, n, chunks = upload
    c = chunks[0]
    hn = int.from_bytes(c[8:12], "big")
    payload = bytearray(c[12 + hn :])
    payload[: len(payload) // 2] = bytes(len(payload) // 2)
    forged = _reheader(c, sha256=hashlib.sha256(bytes(payload)).hexdigest())
    forged = forged[: 12 + len(forged[12:]) - len(c[12 + hn :])] + bytes(payload)
    with pytest.raises(CiphertextError, match="not a valid BFV ciphertext"):
        EncryptedSum(server).add([forged, chunks[1]], "hospital-b")


def test_mismatched_settings_between_sites_are_refused(keys, upload):
    client, server = keys
    plan, n, chunks = upload
    total = EncryptedSum(server)
    total.add(chunks, "hospital-a")
    plan8 = plan_lanes(INT8, server)
    with pytest.raises(CiphertextError, match="hospital-b: .* all sites must run the same job settings"):
        total.add(encrypt_ints(client, rand_ints(n, 127, 1), plan8, tag="r1"), "hospital-b")
    with pytest.raises(CiphertextError, match="hospital-b: tagged 'r0', expected 'r1'"):
        EncryptedSum(server, expected_tag="r1").add(encrypt_ints(client, rand_ints(10, 127, 1), plan8, tag="r0"), "hospital-b")
    with pytest.raises(CiphertextError, match="expected 10 values"):
        decrypt_ints(client, chunks, plan, 10, 1)


# ------------------------------------------------------------------------------------------ contexts
def test_foreign_or_damaged_context_files_are_refused(keys):
    client, _ = keys
    ckks = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40])
    with pytest.raises(ValueError, match="startup/x.tenseal: not a hospital_fedlora BFV context.*HEBuilder"):
        load_context(ckks.serialize(), "startup/x.tenseal")
    data = serialize_context(client, secret=True)
    with pytest.raises(ValueError, match="kit.tenseal: .*truncated|kit.tenseal: TenSEAL cannot parse"):
        load_context(data[: len(data) // 2], "kit.tenseal")
    with pytest.raises(ValueError, match="header disagrees"):
        load_context(_reheader(data, plain_modulus=65537), "kit.tenseal")
    with pytest.raises(ValueError, match="header disagrees"):
        load_context(_reheader(data, secret_key=False), "kit.tenseal")


# -------------------------------------------------------------------------------------------- layout
def test_layout_flattens_in_name_order_and_back():
    a = {"b.w": torch.arange(6.0).view(2, 3), "a.w": torch.tensor([9.0, 8.0])}
    b = {"a.w": a["a.w"], "b.w": a["b.w"]}
    la, lb = AdapterLayout.from_tensors(a), AdapterLayout.from_tensors(b)
    assert la == lb and la.fingerprint() == lb.fingerprint()
    flat = la.flatten(a)
    assert flat.tolist() == [9, 8, 0, 1, 2, 3, 4, 5]
    back = la.unflatten(flat.to(torch.int64))
    assert back["b.w"].shape == (2, 3) and back["b.w"].dtype == torch.int64
    assert AdapterLayout.from_manifest(json.loads(json.dumps(la.to_manifest()))) == la


def test_layout_mismatch_is_named():
    layout = AdapterLayout.from_tensors({"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="hospital-b: tensor 'a' has shape \\(3, 2\\)"):
        layout.flatten({"a": torch.zeros(3, 2)}, "hospital-b")
    with pytest.raises(ValueError, match="missing \\['a'\\], unexpected \\['b'\\]"):
        layout.flatten({"b": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="expected a 1-D vector of 6"):
        layout.unflatten(torch.zeros(5))
    with pytest.raises(ValueError, match="not a layout manifest"):
        AdapterLayout.from_manifest([{"name": "a"}])
