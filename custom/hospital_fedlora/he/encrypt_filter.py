"""Task-result filter at the hospital: the adapter change leaves the site only as packed BFV ciphertexts."""

from __future__ import annotations

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from ..adapter_layout import AdapterLayout
from ..protocol import ROUND_TAG, Data, EncryptedKind, Meta
from .aggregate_mac import MacKey, binding
from .encoding import contribution_weight, quantize, rounding_generator
from .packed_bfv import encrypt_ints
from .site_key import SiteKey, load_site_key

# Executor metadata the server may see; everything else the executor attached stays at the site.
PASSED_THROUGH_META = (Meta.METRICS, Meta.ADAPTER_CONFIG)


class EncryptFilter(DXOFilter):
    """Encrypts a ``train`` result's adapter change (``WEIGHT_DIFF``) with the hospital's key.

    Refuses a change with NaN or infinite values (the server could not tell), clips every value to the
    job's bound (so the change's L2 norm is at most ``clip * sqrt(values)``), scales it by the site's
    weight factor, rounds it stochastically to int8/int16 on the scale all sites share, packs several
    integers per slot, appends the aggregate MAC's tag slots (``aggregate_mac``: bound to the job, round,
    this site and its example count), encrypts them and tags them with the round. The DXO becomes ``EncryptedKind.DIFF``
    with data ``{chunks: [bytes, ...]}``; in the clear stay the example count and weight factor, the
    adapter layout, the value count, the site's training metrics and the adapter config (what the server
    checks and logs).

    Args:
        encryption_id: id of the job's ``site_key.SiteEncryption`` component (key and settings).
    """

    def __init__(self, encryption_id: str = "site_encryption"):
        super().__init__(supported_data_kinds=[DataKind.WEIGHT_DIFF], data_kinds_to_filter=[DataKind.WEIGHT_DIFF])
        self.encryption_id = encryption_id
        self.key: SiteKey | None = None
        self.mac_key: MacKey | None = None
        self.job_id = ""
        self.setup_error = "the job has not started"
        self._task_round: int | None = None
        self.clipped = 0  # values clipped in the last result; logged here, never sent (it hints at magnitudes)

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.key, self.setup_error = load_site_key(fl_ctx, self.encryption_id)
            self.mac_key = MacKey.from_context(self.key.context) if self.key is not None else None
            self.job_id = fl_ctx.get_job_id() or ""
        elif event_type == EventType.BEFORE_TASK_EXECUTION:
            # The result carries no round; the task it answers does (the ciphertexts are tagged with it).
            task = fl_ctx.get_prop(FLContextKey.TASK_DATA)
            self._task_round = task.get_header(AppConstants.CURRENT_ROUND) if isinstance(task, Shareable) else None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        site = fl_ctx.get_identity_name() or "this site"
        key = self.key
        if key is None:
            raise RuntimeError(f"encryption is not set up at this site: {self.setup_error}")
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND, self._task_round)
        if not isinstance(rnd, int):
            raise ValueError(f"{site}: cannot tell which round this result is for (no {AppConstants.CURRENT_ROUND})")
        count = dxo.get_meta_prop(Meta.EXAMPLE_COUNT)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(
                f"{site}: the result's example count (meta '{Meta.EXAMPLE_COUNT}') must be a "
                f"non-negative integer, got {count!r}"
            )
        s = key.settings
        weight = contribution_weight(count, s.full_weight)
        if count > s.full_weight:
            self.log_warning(
                fl_ctx,
                f"{site}: {count} examples exceed full_weight {s.full_weight:g}; this site counts as {s.full_weight:g} "
                "in the average (raise full_weight in the job to give it its full share)",
            )
        tensors = {k: _as_tensor(v) for k, v in dxo.data.items()}
        # The server cannot see values under encryption, so this is the only place a NaN or infinity can be
        # stopped; raising makes FLARE answer the task with TASK_RESULT_FILTER_ERROR, and nothing is sent.
        bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(
                f"{site} round {rnd}: the adapter change has NaN or infinite values in {len(bad)} tensors "
                f"({', '.join(bad[:3])}); nothing was encrypted or sent. The local training diverged: check this "
                "site's data and lower the job's learning_rate"
            )
        layout = AdapterLayout.from_tensors(tensors)
        plan = key.plan
        q = quantize(tensors, s.clip, plan.bits, rounding_generator(s.rounding_seed, site, rnd), weight=weight)
        mac = self.mac_key or MacKey.from_context(key.context)
        bound = binding(key.context.key_id, layout.fingerprint(), layout.n_values, plan.header_fields(), mac.n_slots)
        round_mac = mac.for_round(self.job_id or fl_ctx.get_job_id() or "", rnd, bound)
        tagger = (round_mac.n_slots, lambda slots: round_mac.tags(slots, site, count))
        chunks = encrypt_ints(key.context, layout.flatten(q.ints), plan, tag=ROUND_TAG.format(round=rnd), mac=tagger)
        self.clipped = q.n_clipped
        meta = {
            Meta.EXAMPLE_COUNT: count,
            Meta.WEIGHT_FACTOR: weight,
            Meta.LAYOUT: layout.to_manifest(),
            Meta.LAYOUT_FINGERPRINT: layout.fingerprint(),
            Meta.N_VALUES: layout.n_values,
        }
        meta.update({k: dxo.get_meta_prop(k) for k in PASSED_THROUGH_META if dxo.get_meta_prop(k) is not None})
        nbytes = sum(len(c) for c in chunks)
        self.log_info(
            fl_ctx,
            f"{site} round {rnd}: encrypted {layout.n_values:,} values as int{plan.bits} into {len(chunks)} chunks "
            f"({nbytes:,} bytes), weight {weight:.4f} ({count} examples), {q.n_clipped:,} clipped",
        )
        if q.n_clipped:
            self.log_warning(
                fl_ctx,
                f"{site} round {rnd}: {q.n_clipped:,} of {q.n_values:,} values ({q.n_clipped / q.n_values:.2%}) exceeded "
                f"the clip bound {s.clip} and were clipped; if this is more than a few, raise 'clip' in the job",
            )
        return DXO(EncryptedKind.DIFF, data={Data.CHUNKS: chunks}, meta=meta)


def _as_tensor(v) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
