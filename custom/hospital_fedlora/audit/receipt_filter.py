"""Task-result filter at the hospital: a signed receipt of exactly what leaves the site, kept at the site.

It runs last, after the encrypt or quantize filter, so it digests what goes on the wire: the ciphertext
chunks in the encrypted job; in a plaintext job with quantized transport, the values the quantized upload
restores to, which is what the server's audit log digests after its dequantize filter. The receipt is
signed with the kit's private key (``startup/client.key``), appended to ``<site run
folder>/audit/receipts.jsonl`` before the result is sent, and sent along in a header so the server's
audit log carries the hospital's signature, which the server cannot forge.
"""

from __future__ import annotations

import os
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from ..protocol import AUDIT_HEAD_HEADER, RECEIPT_HEADER, Meta
from .chain import AUDIT_DIR, RECEIPTS_FILE, AuditError, canonical, utc_now
from .digest import contribution_digest
from .receipts import KitSigner


class ReceiptFilter(Filter):
    """Signs a receipt of each result: job, site, round, task, data kind, digest, example count, time, and
    the server's audit-log head the task carried.

    Without a kit key (the simulator) results leave unsigned, with a warning at job start; in secure mode
    (a provisioned kit) a missing or foreign key stops every result instead. No arguments.
    """

    def __init__(self):
        super().__init__()
        self.signer: KitSigner | None = None
        self.setup_error: str | None = "the job has not started"
        self._task_headers: dict = {}

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.signer, self.setup_error = self._load_signer(fl_ctx)
        elif event_type == EventType.BEFORE_TASK_EXECUTION:
            # The result carries neither the round nor the server's log head; the task it answers does.
            task = fl_ctx.get_prop(FLContextKey.TASK_DATA)
            if isinstance(task, Shareable):
                self._task_headers = {k: task.get_header(k) for k in (AppConstants.CURRENT_ROUND, AUDIT_HEAD_HEADER)}

    def _load_signer(self, fl_ctx: FLContext) -> tuple[KitSigner | None, str | None]:
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT) or fl_ctx.get_engine().get_workspace()
        site = fl_ctx.get_identity_name()
        try:
            signer = KitSigner.from_kit(Path(workspace.get_startup_kit_dir()))
        except FileNotFoundError as err:
            if fl_ctx.get_prop(FLContextKey.SECURE_MODE, False):
                return None, f"{site}: {err}"
            self.log_warning(fl_ctx, f"{site}: {err}; not a provisioned kit, so results leave without a signed receipt")
            return None, None
        except AuditError as err:
            return None, f"{site}: {err}"
        if signer.name != site:
            return None, f"{site}: the kit's certificate is for {signer.name!r}; this site must run on its own kit"
        self.log_info(fl_ctx, f"{site}: results are signed with the kit's key; receipts go to {self._path(fl_ctx)}")
        return signer, None

    def _path(self, fl_ctx: FLContext) -> Path:
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT) or fl_ctx.get_engine().get_workspace()
        return Path(workspace.get_run_dir(fl_ctx.get_job_id())) / AUDIT_DIR / RECEIPTS_FILE

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable  # an error reply carries no contribution
        if self.setup_error:
            raise RuntimeError(f"cannot sign the result's receipt: {self.setup_error}")
        if self.signer is None:
            return shareable
        dxo = from_shareable(shareable)
        data = dxo.data
        if dxo.get_meta_prop(Meta.QUANTIZATION):
            # A quantized upload (plaintext jobs, transport/) is signed as the values it restores to: what the
            # server's dequantize filter hands its audit log and its average. Restoring is a deterministic
            # function of what travels, so this digest still binds exactly what left the site.
            from ..transport.quantization import dequantize_tensors

            data = dequantize_tensors(data)
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND, self._task_headers.get(AppConstants.CURRENT_ROUND))
        receipt = {
            "job_id": fl_ctx.get_job_id(),
            "site": fl_ctx.get_identity_name(),
            "round": rnd,
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME),
            "data_kind": dxo.data_kind,
            "digest": contribution_digest(data),
            "example_count": dxo.get_meta_prop(Meta.EXAMPLE_COUNT),
            "signed_at": utc_now(),
            "log_head": self._task_headers.get(AUDIT_HEAD_HEADER),
        }
        signed = self.signer.sign(receipt)
        path = self._path(fl_ctx)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:  # kept before the result leaves: the hospital's proof of what it sent
            f.write(canonical(signed) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        shareable.set_header(RECEIPT_HEADER, signed)
        self.log_info(fl_ctx, f"{receipt['site']} round {rnd}: signed receipt for digest {receipt['digest'][:16]}... kept in {path}")
        return shareable
