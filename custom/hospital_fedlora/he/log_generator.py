"""Server shareable generator of the encrypted job: the global state is a log of encrypted round sums."""

from __future__ import annotations

from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnable
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator
from nvflare.app_common.app_constant import AppConstants

from ..protocol import Data, EncryptedKind, Meta
from .log_persistor import log_entries, make_log_learnable, with_chunks
from .wire_format import LogEntry, LogError, chunks_digest, first_round_needed


class EncryptedLogGenerator(ShareableGenerator):
    """Keeps the encrypted job's global state: the log of encrypted round sums, never a plaintext adapter.

    ``shareable_to_learnable`` appends the round's encrypted aggregate to the log (refusing to rewrite a
    logged round). ``learnable_to_shareable`` sends the entries some site may still lack: a site that
    contributed to round r had applied everything before r, so normally only the latest entry goes out; a
    site that missed rounds gets what it lacks (the decrypt filter skips what a site already has). Only
    rounds logged by this run count: in a resumed run the sites start from nothing, so its first round
    sends the whole log. Ciphertexts the persistor moved to disk are read back for sending.

    Args:
        whole_log: send every entry (the final evaluation uses such a generator, so any site can rebuild
            the final adapter from the seeded initial one).
    """

    def __init__(self, whole_log: bool = False):
        super().__init__()
        self.whole_log = whole_log
        self._first_round_of_run: int | None = None  # the first round this run appended to the log

    def learnable_to_shareable(self, model: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        entries = log_entries(model)
        if self.whole_log or not entries:
            first = entries[0][Meta.ROUND] if entries else 0
        else:
            engine = fl_ctx.get_engine()
            sites = [c.name for c in engine.get_clients()] if engine is not None else []
            since = self._first_round_of_run
            this_run = {e[Meta.ROUND]: e[Meta.EXAMPLE_COUNTS] for e in entries if since is not None and e[Meta.ROUND] >= since}
            first = first_round_needed(this_run, sites, first_logged=entries[0][Meta.ROUND])
        sent = [with_chunks(e) for e in entries if e[Meta.ROUND] >= first]  # copies: the log itself is never handed out
        if sent:
            self.log_info(
                fl_ctx,
                f"sending log rounds {sent[0][Meta.ROUND]}..{sent[-1][Meta.ROUND]} ({len(sent)} of {len(entries)} entries, "
                f"{sum(e['bytes'] for e in sent):,} bytes)",
            )
        meta = {Meta.LOG_ROUNDS: len(entries), Meta.FIRST_ROUND_SENT: first}
        return DXO(EncryptedKind.LOG, data={Data.ENTRIES: sent}, meta=meta).to_shareable()

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        dxo = from_shareable(shareable)
        if dxo.data_kind != EncryptedKind.SUM:
            raise LogError(f"expected the encrypted aggregate ({EncryptedKind.SUM}), got {dxo.data_kind}")
        chunks = dxo.data.get(Data.CHUNKS)
        rnd = dxo.get_meta_prop(Meta.ROUND, fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
        job = fl_ctx.get_job_id() or ""  # the hospitals bind it into the aggregate MAC
        names = (Meta.N_SITES, Meta.TOTAL_WEIGHT, Meta.N_VALUES, Meta.LAYOUT, Meta.EXAMPLE_COUNTS, Meta.WEIGHT_FACTORS)
        fields = {k: dxo.get_meta_prop(k) for k in names}
        entry = LogEntry.from_dict(
            {Meta.ROUND: rnd, Data.CHUNKS: chunks, "sha256": chunks_digest(chunks or []), **fields, Meta.JOB: job},
            source=f"round {rnd} aggregate",
        )
        entries = log_entries(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL))
        if entries and entry.round <= entries[-1][Meta.ROUND]:
            raise LogError(
                f"round {entry.round} aggregate: the log already ends at round {entries[-1][Meta.ROUND]}; it is append-only"
            )
        entries.append(entry.to_dict())
        if self._first_round_of_run is None:
            self._first_round_of_run = entry.round
        self.log_info(
            fl_ctx,
            f"round {entry.round}: appended the encrypted sum of {entry.n_sites} sites ({entry.nbytes:,} bytes, "
            f"sha256 {entry.sha256[:16]}...) to the log, now {len(entries)} entries",
        )
        return make_log_learnable(entries)

