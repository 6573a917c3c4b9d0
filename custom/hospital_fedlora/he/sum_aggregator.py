"""Server aggregator of the encrypted job: adds packed BFV ciphertexts, holds no secret key."""

from __future__ import annotations

import math

from nvflare.apis.dxo import DXO
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants

from ..adapter_layout import AdapterLayout
from ..protocol import ROUND_TAG, Data, EncryptedKind, Meta
from ..server.contribution_aggregator import ContributionAggregator
from .bfv_context import SERVER_CONTEXT_FILE, BFVContext
from .encoding import most_summable
from .kit_context import load_kit_context
from .packed_bfv import EncryptedSum
from .wire_format import read_chunk_info


class EncryptedSumAggregator(ContributionAggregator):
    """Sums the hospitals' encrypted adapter changes (``EncryptedKind.DIFF``) without being able to read them.

    Besides the checks of ``ContributionAggregator``: the weight factor, the adapter layout and value
    count against the round's first contribution, a sum that the lanes and the noise budget can hold,
    and, in ``EncryptedSum``, the chunk framing and digests, the key id (a kit from another provisioning),
    the round tag, the lane plan, the chunk and ciphertext counts and TenSEAL parsing. The aggregate is
    the encrypted sum (``EncryptedKind.SUM``) with, in the clear, what the hospitals need to turn it into
    the average: number of contributions, total weight, weight factors, layout.

    Args:
        min_contributions: accepted contributions needed per round; 0 means every site in the job.
        context_file: the server's key-less BFV context; default ``<kit>/startup/server_bfv_context.tenseal``.
    """

    expected_kind = EncryptedKind.DIFF
    kind_hint = " (is the site's EncryptFilter configured?)"

    def __init__(self, min_contributions: int = 0, context_file: str = ""):
        self.context_file = context_file
        self.context: BFVContext | None = None
        super().__init__(min_contributions)

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
                f"every hospital's update). Use the server kit's startup/{SERVER_CONTEXT_FILE}"
            )
        self.context = context
        self.log_info(
            fl_ctx,
            f"BFV key {context.key_id} from {origin} (no secret key: this server can add ciphertexts, not read them)",
        )

    def reset(self, fl_ctx: FLContext | None) -> None:
        super().reset(fl_ctx)
        self._sum: EncryptedSum | None = None
        self._factors: dict[str, float] = {}
        self._layout: AdapterLayout | None = None

    def add(self, site: str, dxo: DXO, fl_ctx: FLContext) -> str | None:
        if self.context is None:
            return "the server has no BFV context (see the error at job start)"
        factor = dxo.get_meta_prop(Meta.WEIGHT_FACTOR)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (0 < factor <= 1):
            return f"weight factor (meta '{Meta.WEIGHT_FACTOR}') must be in (0, 1], got {factor!r}"
        try:
            layout = AdapterLayout.from_manifest(dxo.get_meta_prop(Meta.LAYOUT), source=f"meta '{Meta.LAYOUT}'")
        except ValueError as err:
            return str(err)
        if dxo.get_meta_prop(Meta.LAYOUT_FINGERPRINT) != layout.fingerprint():
            return f"meta '{Meta.LAYOUT_FINGERPRINT}' does not match its own '{Meta.LAYOUT}'"
        if dxo.get_meta_prop(Meta.N_VALUES) != layout.n_values:
            return f"meta '{Meta.N_VALUES}' is {dxo.get_meta_prop(Meta.N_VALUES)!r}, its layout holds {layout.n_values}"
        if self._layout is not None and layout != self._layout:
            return (
                f"adapter layout {layout.fingerprint()} ({layout.n_values:,} values) differs from the round's first "
                f"contribution's {self._layout.fingerprint()} ({self._layout.n_values:,}); all sites must use the same "
                "base model architecture and LoRA settings"
            )
        chunks = dxo.data.get(Data.CHUNKS)
        info = read_chunk_info(chunks, site)
        if info.values != layout.n_values:
            return f"its ciphertexts hold {info.values:,} values, its layout {layout.n_values:,}"
        if info.summed != 1:
            return f"its chunk headers say they sum {info.summed} contributions; a site sends exactly one"
        most = most_summable(info.bits, info.lane_bits, self.context)
        if self._sum is not None and self._sum.count + 1 > most:
            return f"a sum of more than {most} contributions could overflow the int{info.bits} lanes of {info.lane_bits} bits"
        if self._sum is None:
            current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            self._sum = EncryptedSum(self.context, expected_tag=ROUND_TAG.format(round=current) if current is not None else None)
        self._sum.add(chunks, site)  # a CiphertextError names the site; the sum is untouched then
        self._factors[site] = float(factor)
        self._layout = layout
        return None

    def result(self, fl_ctx: FLContext) -> DXO:
        chunks = self._sum.result()
        meta = {
            Meta.N_SITES: self._sum.count,
            Meta.TOTAL_WEIGHT: math.fsum(self._factors.values()),
            Meta.WEIGHT_FACTORS: dict(self._factors),
            Meta.LAYOUT: self._layout.to_manifest(),
            Meta.LAYOUT_FINGERPRINT: self._layout.fingerprint(),
            Meta.N_VALUES: self._layout.n_values,
        }
        self.log_info(
            fl_ctx,
            f"summed {self._sum.count} encrypted contributions ({sum(len(c) for c in chunks):,} bytes), "
            f"example counts {self.example_counts}",
        )
        return DXO(EncryptedKind.SUM, data={Data.CHUNKS: chunks}, meta=meta)
