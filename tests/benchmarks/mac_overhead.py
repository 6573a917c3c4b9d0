"""What the aggregate MAC adds to the packed mode: bytes and CPU with and without it, side by side.

The jobs always tag and verify (a hospital cannot turn verification off), so the packed mode without the
MAC exists only in the numeric core: both variants here run ``packed_bfv.encrypt_ints`` /
``EncryptedSum`` / ``decrypt_ints`` on the same quantized integers, interleaved in every repeat. The
filters add quantizing and FOBS work to both sides, so these ratios bound the whole path's from above.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from hospital_fedlora.he.aggregate_mac import MacKey, binding
from hospital_fedlora.he.encoding import PackingSettings, contribution_weight, plan_lanes, quantize, rounding_generator
from hospital_fedlora.he.packed_bfv import EncryptedSum, decrypt_ints, encrypt_ints

FIELDS = ("up_bytes_per_site", "client_encrypt_cpu_s", "client_decrypt_cpu_s", "server_cpu_s")
MAC_FIELDS = ("tag_cpu_s", "verify_cpu_s")  # the MAC's own work inside the with-MAC variant, timed alone


def _cpu(fn):
    gc.collect()
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def one_round(context, server_context, layout, diffs, counts, sites, clip, full_weight, bits, with_mac: bool) -> dict:
    plan = plan_lanes(PackingSettings(bits=bits, max_sites=8), context)
    ints = {}
    for site, diff, count in zip(sites, diffs, counts):
        tensors = {k: torch.from_numpy(v) for k, v in diff.items()}
        q = quantize(tensors, clip, bits, rounding_generator(0, site, 0), weight=contribution_weight(count, full_weight))
        ints[site] = layout.flatten(q.ints)
    mac_key = MacKey.from_context(context)  # once per job at each site, like loading the key
    bound = binding(context.key_id, layout.fingerprint(), layout.n_values, plan.header_fields(), mac_key.n_slots)

    mac_s = {"tag_cpu_s": [], "verify_cpu_s": []}

    def timed(field, fn):
        def run(*a):  # no gc.collect() here: it would run inside the variant's own timing
            start = time.process_time()
            out = fn(*a)
            mac_s[field].append(time.process_time() - start)
            return out

        return run

    def upload(site, count):
        mac = None
        if with_mac:  # every site derives the round's alpha itself (inside the timed tagger)
            mac = (mac_key.n_slots, timed("tag_cpu_s", lambda slots: mac_key.for_round("job", 0, bound).tags(slots, site, count)))
        return encrypt_ints(context, ints[site], plan, tag="round 0", mac=mac)

    uploads, up_s = {}, []
    for site, count in zip(sites, counts):
        uploads[site], t = _cpu(lambda: upload(site, count))
        up_s.append(t)

    def server():
        total = EncryptedSum(server_context, expected_tag="round 0")
        for site in sites:
            total.add(uploads[site], site)
        return total.result()

    summed, server_s = _cpu(server)

    def download():
        verify = None
        if with_mac:
            example_counts = dict(zip(sites, counts))
            verify = timed("verify_cpu_s", lambda slots, tags: mac_key.for_round("job", 0, bound).check(slots, tags, example_counts, "aggregate"))
        return decrypt_ints(context, summed, plan, layout.n_values, len(sites), "round 0", verify=verify)

    got, down_s = _cpu(download)
    assert torch.equal(got, sum(i.to(torch.int64) for i in ints.values())), "the packed sum is not exact"
    return {
        "up_bytes_per_site": statistics.mean(sum(len(c) for c in u) for u in uploads.values()),
        "client_encrypt_cpu_s": statistics.mean(up_s),
        "client_decrypt_cpu_s": down_s,
        "server_cpu_s": server_s,
        **({k: statistics.mean(v) for k, v in mac_s.items()} if with_mac else {}),
    }


def measure(context, server_context, layout, diffs, counts, sites, clip, full_weight, repeats: int) -> dict:
    """Per packing (int16, int8): both variants in every repeat, and their ratios per repeat."""
    out = {}
    for bits in (16, 8):
        args = (context, server_context, layout, diffs, counts, sites, clip, full_weight, bits)
        one_round(*args, with_mac=True)  # warm-up, untimed: first-touch allocations would count against one side
        runs = []
        for i in range(repeats):
            order = (False, True) if i % 2 == 0 else (True, False)  # alternate which variant runs first
            run = {("with" if m else "without"): one_round(*args, with_mac=m) for m in order}
            runs.append(run)
        spread = lambda v: {"median": statistics.median(v), "min": min(v), "max": max(v)}  # noqa: E731
        out[f"packed_bfv_int{bits}"] = {
            "without_mac": {f: spread([r["without"][f] for r in runs]) for f in FIELDS},
            "with_mac": {f: spread([r["with"][f] for r in runs]) for f in FIELDS},
            "with_over_without": {f: spread([r["with"][f] / r["without"][f] for r in runs]) for f in FIELDS},
            "mac_cpu_s": {f: spread([r["with"][f] for r in runs]) for f in MAC_FIELDS},
            # the MAC's own CPU over the same repeat's variant without it: less exposed to a busy machine
            "mac_cpu_over_without": {
                "client_encrypt_cpu_s": spread([r["with"]["tag_cpu_s"] / r["without"]["client_encrypt_cpu_s"] for r in runs]),
                "client_decrypt_cpu_s": spread([r["with"]["verify_cpu_s"] / r["without"]["client_decrypt_cpu_s"] for r in runs]),
            },
            "raw_repeats": runs,
        }
    return out


def markdown(section: dict, mac_slots: int, plain_modulus_bits: int, generated: str) -> str:
    repeats = len(next(iter(section.values()))["raw_repeats"])
    def cell(s, fmt="{:.3f}"):
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"

    rows, own = [], []
    for mode, v in section.items():
        r, w, wo = v["with_over_without"], v["with_mac"], v["without_mac"]
        rows.append(
            f"| `{mode}` | {wo['up_bytes_per_site']['median'] / 1e6:.3f} -> {w['up_bytes_per_site']['median'] / 1e6:.3f} MB "
            f"| {cell(r['up_bytes_per_site'], '{:.4f}')} | {cell(r['client_encrypt_cpu_s'])} | {cell(r['client_decrypt_cpu_s'])} "
            f"| {cell(r['server_cpu_s'])} |"
        )
        m, o = v["mac_cpu_s"], v["mac_cpu_over_without"]
        own.append(
            f"| `{mode}` | {cell(m['tag_cpu_s'])} | {cell(o['client_encrypt_cpu_s'])} | {cell(m['verify_cpu_s'])} "
            f"| {cell(o['client_decrypt_cpu_s'])} |"
        )
    return f"""## The aggregate MAC's cost

Measured {generated}, on the adapter above. The tables above come from the run that wrote them (its
date above; the packed rows of a run before the MAC existed do not include it); `--mac-only` refreshes
only this section.
Every hospital appends {mac_slots} tag slot(s) (plain modulus of {plain_modulus_bits} bits: forgery
probability at most 2^-{plain_modulus_bits - 1} per slot, target 2^-40) and verifies every aggregate it
applies (`he/aggregate_mac.py`, [`../security.md`](../security.md)). Ratios with the MAC over without it, on
the numeric core (`packed_bfv`: pack, tag, encrypt / add / decrypt, verify, unpack; the same integers,
both variants in every repeat, alternating which runs first, after one warm-up round; fitted settings),
median (min-max) over {repeats} repeats. The filters add
quantizing and serialization to both sides, so the whole path's ratios are smaller. Target: at most
1.02x upload bytes and 1.10x client CPU.

| packing | upload / site | upload bytes | client encrypt + tag CPU | client decrypt + verify CPU | server CPU |
|---|---|---|---|---|---|
{chr(10).join(rows)}

The server does the same work in both variants (the tag slot sits in the last ciphertext's padding), so
its ratio shows how much a busy machine moves these ratios. The MAC's own CPU, timed alone inside the
with-MAC variant (deriving the round's `alpha` and the tag at each site; deriving it again and checking
at each hospital), in seconds and over the same repeat's variant without the MAC:

| packing | tag CPU s | tag / encrypt without MAC | verify CPU s | verify / decrypt without MAC |
|---|---|---|---|---|
{chr(10).join(own)}
"""
