"""Server shareable generator of the encrypted job: the global state is a log of encrypted round sums.

``shareable_to_learnable`` appends the round's encrypted aggregate to the log held in the global
``ModelLearnable`` (``{"entries": [entry dicts]}``, see ``encrypted_log.LogEntry``); the entry records
which sites contributed. ``learnable_to_shareable`` sends the entries some site may still need: from the
earliest round any known site has not applied. Contributors of round r had applied everything before r,
so normally that is only the latest entry; a site that missed rounds gets the entries it lacks and
catches up (the decrypt filter skips what a site already has). With ``whole_log`` it sends every entry:
the final evaluation uses such a generator, so any site can rebuild the final adapter from scratch.
"""

from __future__ import annotations

from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator
from nvflare.app_common.app_constant import AppConstants

from .encrypted_log import (
    PACKED_BFV_ADAPTER_LOG,
    PACKED_BFV_WEIGHT_DIFF_SUM,
    LogEntry,
    LogError,
    chunks_digest,
    first_round_needed,
)

ENTRIES = "entries"


def log_entries(model: ModelLearnable | None) -> list[dict]:
    """The log's entry dicts held in ``model`` (empty before the first round)."""
    weights = (model or {}).get(ModelLearnableKey.WEIGHTS) or {}
    return list(weights.get(ENTRIES, []))


def make_log_learnable(entries: list[dict]) -> ModelLearnable:
    return make_model_learnable({ENTRIES: entries} if entries else {}, {})


class EncryptedLogGenerator(ShareableGenerator):
    def __init__(self, whole_log: bool = False):
        super().__init__()
        self.whole_log = whole_log

    def learnable_to_shareable(self, model: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        entries = log_entries(model)
        if self.whole_log or not entries:
            first = entries[0]["round"] if entries else 0
        else:
            engine = fl_ctx.get_engine()
            sites = [c.name for c in engine.get_clients()] if engine is not None else []
            first = first_round_needed({e["round"]: e["site_weights"] for e in entries}, sites)
        sent = [dict(e) for e in entries if e["round"] >= first]  # copies: the log itself is never handed out
        if sent:
            self.log_info(
                fl_ctx,
                f"sending log rounds {sent[0]['round']}..{sent[-1]['round']} ({len(sent)} of {len(entries)} entries, "
                f"{sum(e['bytes'] for e in sent):,} bytes)",
            )
        meta = {"log_rounds": len(entries), "first_round_sent": first}
        return DXO(PACKED_BFV_ADAPTER_LOG, data={ENTRIES: sent}, meta=meta).to_shareable()

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        dxo = from_shareable(shareable)
        if dxo.data_kind != PACKED_BFV_WEIGHT_DIFF_SUM:
            raise LogError(f"expected the encrypted aggregate ({PACKED_BFV_WEIGHT_DIFF_SUM}), got {dxo.data_kind}")
        chunks = dxo.data.get("chunks")
        rnd = dxo.get_meta_prop("round", fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
        names = ("n_sites", "total_weight", "n_values", "layout", "site_weights", "weight_factors")
        fields = {k: dxo.get_meta_prop(k) for k in names}
        entry = LogEntry.from_dict(
            {"round": rnd, "chunks": chunks, "sha256": chunks_digest(chunks or []), **fields},
            source=f"round {rnd} aggregate",
        )
        entries = log_entries(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL))
        if entries and entry.round <= entries[-1]["round"]:
            raise LogError(
                f"round {entry.round} aggregate: the log already ends at round {entries[-1]['round']}; it is append-only"
            )
        entries.append(entry.to_dict())
        self.log_info(
            fl_ctx,
            f"round {entry.round}: appended the encrypted sum of {entry.n_sites} sites ({entry.nbytes:,} bytes, "
            f"sha256 {entry.sha256[:16]}...) to the log, now {len(entries)} entries",
        )
        return make_log_learnable(entries)

