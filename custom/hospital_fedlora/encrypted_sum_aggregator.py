"""Server aggregator of the encrypted job: adds packed BFV ciphertexts, holds no secret key.

Each contribution is checked before it touches the round's sum: the site's result code, the round it
answers, one contribution per site, the data kind, its weight factor and example count, its adapter
layout, value count and LoRA config against the first contribution of the round, and then, through
``packed_bfv.EncryptedSum``, the chunk framing and digests, the key id (a kit from another provisioning),
the round tag, the lane plan, chunk and ciphertext counts and TenSEAL parsing. A contribution that would
let the lanes overflow (more contributions than the packing has room for) is refused as well. Rejections
are logged with the site and reason; a round with fewer accepted contributions than required ends the job
rather than quietly averaging fewer hospitals (as the plaintext ``FedAvgAdapterAggregator`` does).

The aggregate is the encrypted sum with, in the clear, what the hospitals need to turn it into the
average (number of contributions, total weight, layout) and what the round log records (example counts
and each site's training metrics).
"""

from __future__ import annotations

import math

from nvflare.apis.dxo import DXO, MetaKey
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.app_constant import AppConstants

from .adapter_layout import AdapterLayout
from .contribution_checks import check_contribution
from .encrypted_log import PACKED_BFV_WEIGHT_DIFF, PACKED_BFV_WEIGHT_DIFF_SUM, round_tag
from .kit_context import load_kit_context
from .packed_bfv import (
    NOISE_RESERVE_BITS,
    SERVER_CONTEXT_FILE,
    BFVContext,
    CiphertextError,
    ChunkInfo,
    EncryptedSum,
    read_chunk_info,
)
from .quantize import qmax


class EncryptedSumAggregator(Aggregator):
    def __init__(self, min_contributions: int = 0, context_file: str = ""):
        """``min_contributions``: accepted sites needed per round, 0 = every site in the job.
        ``context_file``: the server's key-less BFV context, default ``<kit>/startup/server_bfv_context.tenseal``."""
        super().__init__()
        self.min_contributions = min_contributions
        self.context_file = context_file
        self.context: BFVContext | None = None
        self.reset(None)

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            try:
                self.load_context(fl_ctx)
            except Exception as err:
                self.log_error(fl_ctx, f"cannot aggregate encrypted contributions: {err}")
                self.system_panic(f"EncryptedSumAggregator: {err}", fl_ctx)

    def load_context(self, fl_ctx: FLContext) -> None:
        context, origin = load_kit_context(fl_ctx, SERVER_CONTEXT_FILE, self.context_file)
        if context.has_secret_key:
            raise ValueError(
                "the server's BFV context holds a secret key; the server must never have one (it could decrypt "
                "every hospital's update). Use the server kit's startup/server_bfv_context.tenseal"
            )
        self.context = context
        self.log_info(
            fl_ctx,
            f"BFV key {context.key_id} from {origin} (no secret key: this server can add ciphertexts, not read them)",
        )

    def reset(self, fl_ctx: FLContext | None) -> None:
        self._sum: EncryptedSum | None = None
        self._counts: dict[str, int] = {}
        self._factors: dict[str, float] = {}
        self._site_metrics: dict[str, dict] = {}
        self._adapter_config: dict | None = None
        self._layout: AdapterLayout | None = None
        self._rejected: dict[str, str] = {}

    # ---------------------------------------------------------------------------------------- accepting
    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "unknown site")
        try:
            reason = self._check_and_add(site, shareable, fl_ctx)
        except CiphertextError as err:
            reason = str(err)
        if reason:
            self._rejected[site] = reason
            self.log_error(fl_ctx, f"rejected contribution from {site}: {reason}")
            return False
        self.log_info(
            fl_ctx, f"accepted contribution from {site} (weight {self._factors[site]:.4f}, {self._counts[site]} examples)"
        )
        return True

    def _check_and_add(self, site: str, shareable: Shareable, fl_ctx: FLContext) -> str | None:
        if self.context is None:
            return "the server has no BFV context (see the error at job start)"
        reason, dxo = check_contribution(
            site, shareable, fl_ctx, self._counts, PACKED_BFV_WEIGHT_DIFF, " (is the site's EncryptFilter configured?)"
        )
        if reason:
            return reason
        factor = dxo.get_meta_prop("weight")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (0 < factor <= 1):
            return f"weight factor (meta 'weight') must be in (0, 1], got {factor!r}"
        count = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            return f"example count (meta '{MetaKey.NUM_STEPS_CURRENT_ROUND}') must be a non-negative integer, got {count!r}"
        try:
            layout = AdapterLayout.from_manifest(dxo.get_meta_prop("layout"), source="meta 'layout'")
        except ValueError as err:
            return str(err)
        if dxo.get_meta_prop("layout_fingerprint") != layout.fingerprint():
            return "meta 'layout_fingerprint' does not match its own 'layout'"
        if dxo.get_meta_prop("n_values") != layout.n_values:
            return f"meta 'n_values' is {dxo.get_meta_prop('n_values')!r}, its layout holds {layout.n_values}"
        if self._layout is not None and layout != self._layout:
            return (
                f"adapter layout {layout.fingerprint()} ({layout.n_values:,} values) differs from the round's first "
                f"contribution's {self._layout.fingerprint()} ({self._layout.n_values:,}); all sites must use the same "
                "base model architecture and LoRA settings"
            )
        config = dxo.get_meta_prop("adapter_config")
        if self._adapter_config and config and config != self._adapter_config:
            return "its LoRA configuration differs from the other sites'"
        chunks = dxo.data.get("chunks")
        info = read_chunk_info(chunks, site)
        if info.values != layout.n_values:
            return f"its ciphertexts hold {info.values:,} values, its layout {layout.n_values:,}"
        most = self._most_summable(info)
        if self._sum is not None and self._sum.count + 1 > most:
            return f"a sum of more than {most} contributions could overflow the int{info.bits} lanes of {info.lane_bits} bits"
        if self._sum is None:
            current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            self._sum = EncryptedSum(self.context, expected_tag=round_tag(current) if current is not None else None)
        self._sum.add(chunks, site)  # CiphertextError names the site; the sum is untouched then
        self._counts[site] = count
        self._factors[site] = float(factor)
        self._site_metrics[site] = dict(dxo.get_meta_prop("metrics") or {})
        self._adapter_config = self._adapter_config or config
        self._layout = layout
        return None

    def _most_summable(self, info: ChunkInfo) -> int:
        """Contributions these lanes and this key's noise budget can sum without wrapping (see packed_bfv)."""
        lanes = ((1 << info.lane_bits) - 1) // (2 * qmax(info.bits))
        room = self.context.data_modulus_bits - self.context.plain_modulus.bit_length() - NOISE_RESERVE_BITS
        return min(lanes, 2**room) if room >= 0 else 0

    # ---------------------------------------------------------------------------------------- aggregating
    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        required = self.min_contributions or len(fl_ctx.get_engine().get_clients())
        if len(self._counts) < required or self._sum is None:
            rejected = "; ".join(f"{s}: {r}" for s, r in self._rejected.items()) or "none rejected, too few arrived"
            reason = f"round {rnd}: {len(self._counts)} accepted contributions, {required} required ({rejected})"
            self.system_panic(reason, fl_ctx)
            raise RuntimeError(reason)
        chunks = self._sum.result()
        meta = {
            "round": rnd,
            "n_sites": self._sum.count,
            "total_weight": math.fsum(self._factors.values()),
            "weight_factors": dict(self._factors),
            "site_weights": dict(self._counts),
            "site_metrics": dict(self._site_metrics),
            "adapter_config": self._adapter_config,
            "layout": self._layout.to_manifest(),
            "layout_fingerprint": self._layout.fingerprint(),
            "n_values": self._layout.n_values,
        }
        self.log_info(
            fl_ctx,
            f"round {rnd}: summed {self._sum.count} encrypted contributions ({sum(len(c) for c in chunks):,} bytes), "
            f"example counts {self._counts}",
        )
        return DXO(PACKED_BFV_WEIGHT_DIFF_SUM, data={"chunks": chunks}, meta=meta).to_shareable()
