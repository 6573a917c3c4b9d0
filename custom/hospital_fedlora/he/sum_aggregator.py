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
from .aggregate_mac import mac_slots
from .bfv_context import SERVER_CONTEXT_FILE, BFVContext
from .encoding import most_summable
from .kit_context import load_kit_context
from .log_generator import log_entries
from .packed_bfv import EncryptedSum
from .wire_format import ChunkInfo, check_ciphertext_count, read_chunk_info

# Upload size allowance, per ciphertext: a BFV ciphertext is 2 polynomials of N coefficients modulo q, so
# 2 * N * log2(q) / 8 bytes of information (73,728 at poly 4096, 72-bit q). SEAL writes each coefficient
# as 64-bit words and zstd-compresses them; TenSEAL adds its protobuf frame: measured 88,5xx bytes (1.20x,
# varying by about 100 bytes), fresh or summed. 1.5x plus 1 KiB leaves room for that variance and no
# room for a second payload. Per chunk, the clear header (about 400 bytes) gets 1 KiB.
CIPHERTEXT_BYTES_PER_INFO_BYTE = 1.5
CIPHERTEXT_SLACK_BYTES = 1024
CHUNK_HEADER_BYTES = 1024


def max_upload_bytes(info: ChunkInfo, n_ciphertexts: int, context: BFVContext) -> int:
    """The most bytes an honest site's chunks take for ``n_ciphertexts`` under ``context``."""
    information = 2 * context.poly_modulus_degree * context.data_modulus_bits // 8
    per_ciphertext = int(CIPHERTEXT_BYTES_PER_INFO_BYTE * information) + CIPHERTEXT_SLACK_BYTES
    return n_ciphertexts * per_ciphertext + info.chunks * CHUNK_HEADER_BYTES


class EncryptedSumAggregator(ContributionAggregator):
    """Sums the hospitals' encrypted adapter changes (``EncryptedKind.DIFF``) without being able to read them.

    Besides the checks of ``ContributionAggregator``: the weight factor; the adapter layout and value
    count against the layout of the log's last round (the round's first contribution before any round is
    logged); lanes that the plain modulus implies; as many ciphertexts as layout and lanes need, in no
    more bytes than those ciphertexts take (``max_upload_bytes``); a sum that the lanes and the noise
    budget can hold; the aggregate MAC's tag slots the hospitals will verify; and, in ``EncryptedSum``,
    the chunk framing and digests, the key id (a kit from another provisioning), the round tag, the lane
    plan and TenSEAL parsing. The server cannot see
    values: NaN and infinity are refused at the site, and the site's clip bounds every value. The aggregate is
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
        super().handle_event(event_type, fl_ctx)
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
        self._logged: tuple[AdapterLayout, str] | None = None  # the log's last layout, read once a round

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
        ref, source = self._reference(fl_ctx)
        if ref is not None and layout != ref:
            return (
                f"adapter layout {layout.fingerprint()} ({layout.n_values:,} values) differs from {source} "
                f"{ref.fingerprint()} ({ref.n_values:,}); all sites must use the same base model architecture and "
                "LoRA settings"
            )
        chunks = dxo.data.get(Data.CHUNKS)
        info = read_chunk_info(chunks, site)
        if info.values != layout.n_values:
            return f"its ciphertexts hold {info.values:,} values, its layout {layout.n_values:,}"
        if info.summed != 1:
            return f"its chunk headers say they sum {info.summed} contributions; a site sends exactly one"
        if info.mac_slots != mac_slots(self.context.plain_modulus):
            return (
                f"it carries {info.mac_slots} aggregate MAC slots, the hospitals verify {mac_slots(self.context.plain_modulus)} "
                "(is the site running this bundle's EncryptFilter?); every hospital would refuse the sum"
            )
        usable = self.context.plain_modulus.bit_length() - 1
        if info.lane_bits < 1 or info.lanes != usable // info.lane_bits:
            return f"its headers pack {info.lanes} lanes of {info.lane_bits} bits; the plain modulus holds {usable} bits per slot"
        check_ciphertext_count(info, self.context.poly_modulus_degree, site)
        most_bytes = max_upload_bytes(info, sum(info.ciphertexts), self.context)
        if info.nbytes > most_bytes:
            return (
                f"oversize: {info.nbytes:,} bytes in {info.chunks} chunks, at most {most_bytes:,} for the "
                f"{sum(info.ciphertexts)} ciphertexts that {layout.n_values:,} values in {info.lanes} lanes need"
            )
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

    def _reference(self, fl_ctx: FLContext) -> tuple[AdapterLayout | None, str]:
        """The layout every contribution must have: the log's last round's, else this round's first one's."""
        if self._logged is None:
            entries = log_entries(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL))
            if entries:
                source = f"the layout of the log's round {entries[-1][Meta.ROUND]}"
                self._logged = AdapterLayout.from_manifest(entries[-1][Meta.LAYOUT], source=source), source
        if self._logged is not None:
            return self._logged
        return self._layout, "the round's first contribution's"

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
