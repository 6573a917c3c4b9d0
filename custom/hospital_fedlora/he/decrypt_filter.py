"""Task-data filter at the hospital: rebuilds the global adapter from the server's encrypted log."""

from __future__ import annotations

import math

import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from ..adapter_layout import AdapterLayout
from ..config import PrivacySettings
from ..protocol import INITIAL_ADAPTER, REFUSED_HEADER, ROUND_TAG, Data, EncryptedKind, Meta
from ..site.site_settings import site_privacy
from .aggregate_mac import AggregateRefused, MacKey, binding
from .encoding import contribution_weight, dequantize
from .packed_bfv import decrypt_ints
from .site_key import SiteKey, load_site_key
from .wire_format import CiphertextError, LogEntry, LogError


class DecryptFilter(DXOFilter):
    """Applies the encrypted log entries the server sends (``EncryptedKind.LOG``) to this site's adapter.

    Usually one entry arrives (the last round's sum); more when this site missed rounds; the whole log
    for the final evaluation. Each entry's SHA-256 is checked; entries this site applied are skipped; a
    gap is refused; the clear total weight must follow from the clear example counts. A round is applied
    only if it lists at least this hospital's ``privacy.min_contributors`` distinct contributors (its site
    config, not the job) and, once decrypted, passes the aggregate MAC check (``aggregate_mac``): it is the
    exact sum of the listed hospitals' contributions for this job and round, each counted once. Then it is
    unpacked, dequantized, divided by its total weight and added to the site's cumulative change. The executor receives that change as a ``WEIGHT_DIFF`` relative to the seeded initial adapter
    (identical at every site), so every site holds the same global adapter. A batch of entries is applied
    all or nothing; the state lives for one job in this process. A refused log (any of these checks) leaves
    the task data with ``protocol.REFUSED_HEADER`` naming the check and no adapter: the executor answers the
    task with that error, so the job stops with the hospital's reason.

    Args:
        encryption_id: id of the job's ``site_key.SiteEncryption`` component (key and settings).
        resume_from: job id(s) of earlier runs this job continues (``deploy/resume_job`` sets it): their
            logged rounds are accepted too; a round of any other job is refused.
    """

    def __init__(self, encryption_id: str = "site_encryption", resume_from: str | list[str] = ""):
        super().__init__(supported_data_kinds=[EncryptedKind.LOG], data_kinds_to_filter=[EncryptedKind.LOG])
        self.encryption_id = encryption_id
        self.resume_from = [resume_from] if isinstance(resume_from, str) else [str(j) for j in resume_from]
        self.key: SiteKey | None = None
        self.mac_key: MacKey | None = None
        self.privacy, self.privacy_source = PrivacySettings(), "defaults"
        self.job_id = ""
        self.setup_error = "the job has not started"
        self.reset()

    def reset(self) -> None:
        self.change: dict[str, torch.Tensor] = {}  # float64 sum of the applied rounds' averages
        self.applied: list[int] = []
        self.layout: AdapterLayout | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type in (EventType.START_RUN, EventType.END_RUN):
            self.reset()
        if event_type == EventType.START_RUN:
            self.key, self.setup_error = load_site_key(fl_ctx, self.encryption_id)
            self.mac_key = MacKey.from_context(self.key.context) if self.key is not None else None
            self.job_id = fl_ctx.get_job_id() or ""
            try:
                self.privacy, self.privacy_source = site_privacy(fl_ctx)
            except Exception as err:  # an invalid site config: nothing is applied until it is fixed
                self.key, self.setup_error = None, str(err)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """As ``DXOFilter.process``; a refused aggregate becomes task data that says why and holds nothing
        (raised, FLARE would answer the task with a bare TASK_DATA_FILTER_ERROR: the server would not see why)."""
        try:
            return super().process(shareable, fl_ctx)
        except (AggregateRefused, LogError, CiphertextError) as err:
            self.log_error(fl_ctx, f"refused the server's aggregate, applied nothing: {err}")
            refused = DXO(EncryptedKind.REFUSED, data={}, meta={Meta.REFUSED: str(err)}).to_shareable()
            refused.set_header(REFUSED_HEADER, str(err))
            return refused

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        site = fl_ctx.get_identity_name() or "this site"
        key = self.key
        if key is None:
            raise RuntimeError(f"encryption is not set up at this site: {self.setup_error}")
        raw = dxo.data.get(Data.ENTRIES)
        if not isinstance(raw, list):
            raise LogError(f"{site}: the server's log message has no list of '{Data.ENTRIES}'")
        entries = [LogEntry.from_dict(d, source=f"{site}: log entry {i} from the server") for i, d in enumerate(raw)]
        for e in entries:
            e.verify(f"{site}: log entry for round {e.round}")
        entries.sort(key=lambda e: e.round)
        rounds = [e.round for e in entries]
        if len(set(rounds)) != len(rounds):
            raise LogError(f"{site}: the server sent round(s) more than once: {rounds}")
        new = [e for e in entries if e.round not in self.applied]
        expected = self.applied[-1] + 1 if self.applied else 0
        lacking = sorted(set(range(expected, new[-1].round + 1)) - set(rounds)) if new else []
        if lacking or (new and new[0].round < expected):
            raise LogError(
                f"{site}: cannot apply the log: it has applied rounds {_span(self.applied)}, the server sent rounds "
                f"{_span(rounds)}, so rounds {lacking or [new[0].round]} are missing or out of order. The global "
                "adapter is the sum of every round: the server must send the log from the first round this site lacks"
            )
        change, layout = self._add(new, key, site, fl_ctx)
        self.change, self.layout = change, layout
        self.applied += [e.round for e in new]
        if new:
            self.log_info(
                fl_ctx,
                f"{site}: applied round(s) {[e.round for e in new]} of the encrypted log "
                f"({len(entries) - len(new)} received entries already applied); rounds applied: {_span(self.applied)}",
            )
        data = {k: v.to(torch.float32).numpy() for k, v in self.change.items()}
        meta = {Meta.RELATIVE_TO: INITIAL_ADAPTER, Meta.APPLIED_ROUNDS: list(self.applied)}
        return DXO(DataKind.WEIGHT_DIFF, data=data, meta=meta)

    def _add(self, entries: list[LogEntry], key: SiteKey, site: str, fl_ctx: FLContext):
        """The cumulative change with ``entries`` added; nothing is kept if any of them fails."""
        change = {k: v.clone() for k, v in self.change.items()}
        layout = self.layout
        s, plan = key.settings, key.plan
        mac_key = self.mac_key or MacKey.from_context(key.context)
        job = self.job_id or fl_ctx.get_job_id() or ""
        for e in entries:
            source = f"{site}: round {e.round} aggregate"
            this = AdapterLayout.from_manifest(list(e.layout), source=source)
            if layout is not None and this != layout:
                raise LogError(
                    f"{source}: its adapter layout {this.fingerprint()} differs from earlier rounds' {layout.fingerprint()}"
                )
            layout = this
            self._check_weights(e, s.full_weight, source)
            self._check_floor(e, source)
            verify = self._mac_check(e, key, mac_key, this, job, source)
            tag = ROUND_TAG.format(round=e.round)
            sums = decrypt_ints(key.context, list(e.chunks), plan, e.n_values, e.n_sites, tag, source, verify=verify)
            average = dequantize(layout.unflatten(sums, source=source), s.clip, plan.bits, e.total_weight)
            for k, v in average.items():
                change[k] = change[k] + v.double() if k in change else v.double()
        return change, layout

    def _check_floor(self, e: LogEntry, source: str) -> None:
        floor = self.privacy.min_contributors
        if len(e.example_counts) < floor:
            raise AggregateRefused(
                f"{source}: fails the contributor floor (privacy.min_contributors = {floor}, {self.privacy_source}): "
                f"it lists {len(e.example_counts)} contributing hospital(s) {e.sites}; nothing was applied"
            )

    def _mac_check(self, e: LogEntry, key: SiteKey, mac_key: MacKey, layout: AdapterLayout, job: str, source: str):
        """The aggregate MAC check of entry ``e``, for ``decrypt_ints``; refuses a round of another job at once."""
        allowed = [job, *(j for j in self.resume_from if j)]
        if e.job not in allowed:
            raise AggregateRefused(
                f"{source}: fails the aggregate MAC check (job binding): the server labels it a round of job "
                f"{e.job!r}, this hospital accepts rounds of {allowed} only (this job and the runs it resumes); "
                "nothing was applied"
            )
        bound = binding(key.context.key_id, layout.fingerprint(), e.n_values, key.plan.header_fields(), mac_key.n_slots)
        round_mac = mac_key.for_round(e.job, e.round, bound)

        def verify(slots, tags: list[int]) -> None:
            if len(tags) != round_mac.n_slots:
                raise AggregateRefused(
                    f"{source}: fails the aggregate MAC check: it carries {len(tags)} MAC slots, {round_mac.n_slots} "
                    "expected (the tags were stripped or the sender runs without them); nothing was applied"
                )
            round_mac.check(slots, tags, e.example_counts, source)

        return verify

    @staticmethod
    def _check_weights(e: LogEntry, full_weight: float, source: str) -> None:
        """The clear total weight must follow from the clear example counts: the server only adds them up."""
        if len(e.example_counts) != e.n_sites:
            raise LogError(f"{source}: sums {e.n_sites} contributions but lists {len(e.example_counts)} contributing sites")
        expected = math.fsum(contribution_weight(c, full_weight) for c in e.example_counts.values())
        if not math.isclose(e.total_weight, expected, rel_tol=1e-9):
            raise LogError(
                f"{source}: total weight {e.total_weight!r} does not follow from the sites' example counts "
                f"{e.example_counts} (expected {expected!r} with full_weight {full_weight:g}); refusing a mis-weighted average"
            )


def _span(rounds: list[int]) -> str:
    if not rounds:
        return "none"
    if rounds == list(range(rounds[0], rounds[-1] + 1)) and len(rounds) > 2:
        return f"{rounds[0]}..{rounds[-1]}"
    return str(rounds)
