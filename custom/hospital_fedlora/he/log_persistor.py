"""Server persistor of the encrypted job: the append-only log of encrypted round sums on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor

from ..protocol import Meta
from .log_generator import log_entries, make_log_learnable
from .wire_format import LogEntry, LogError, frame_chunks, unframe_chunks

LOG_DIR = "encrypted_log"
LOG_INDEX = "log.jsonl"


def round_file(rnd: int) -> str:
    return f"round_{rnd:03d}.bfv"


def read_log(folder: Path) -> list[LogEntry]:
    """Every entry of a stored log, each checked against its recorded SHA-256."""
    index = folder / LOG_INDEX
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no encrypted log here (the job has not finished a round)")
    entries = []
    for n, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        source = f"{index}, line {n}"
        try:
            summary = json.loads(line)
        except json.JSONDecodeError as err:
            raise LogError(f"{source}: not JSON ({err})") from None
        path = folder / str(summary.get("file", round_file(int(summary.get(Meta.ROUND, -1)))))
        if not path.is_file():
            raise LogError(f"{source}: {path.name} is missing")
        entry = LogEntry.from_dict(summary, source=source, chunks=unframe_chunks(path.read_bytes(), str(path)))
        entry.verify(str(path))
        entries.append(entry)
    return entries


class EncryptedLogPersistor(ModelPersistor):
    """Writes each round of the encrypted log once, in the job's run folder on the server::

        encrypted_log/round_000.bfv   the round's summed ciphertext chunks (length-prefixed); sha256sum checks it
        encrypted_log/log.jsonl       one line per round: round, file, sha256, bytes, n_sites, total_weight,
                                      example_counts, weight_factors, n_values, layout

    A later save appends new rounds and refuses to change a recorded one. There is no plaintext adapter on
    the server: each hospital writes the final adapter in its own run folder. ``load_model`` starts an
    empty log (the job runs ``ScatterAndGather`` with ``allow_empty_global_weights``);
    ``get_model_from_location`` reads the whole log back for the final evaluation. No arguments.
    """

    def __init__(self):
        super().__init__()
        self._written: dict[int, str] = {}  # round -> sha256 already on disk
        self._latest: ModelLearnable | None = None

    def _folder(self, fl_ctx: FLContext) -> Path:
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT) or fl_ctx.get_engine().get_workspace()
        return Path(workspace.get_run_dir(fl_ctx.get_job_id())) / LOG_DIR

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        self._written, self._latest = {}, None
        return make_log_learnable([])

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext) -> None:
        folder = self._folder(fl_ctx)
        folder.mkdir(parents=True, exist_ok=True)
        for d in log_entries(model):
            rnd, recorded = d.get(Meta.ROUND), self._written.get(d.get(Meta.ROUND))
            if recorded is not None:  # on disk already: only its digest is compared, nothing is parsed again
                if recorded != d.get("sha256"):
                    raise LogError(
                        f"round {rnd}: the log in memory differs from {folder / round_file(rnd)} "
                        f"(sha256 {str(d.get('sha256'))[:16]}... vs {recorded[:16]}...); recorded rounds are never rewritten"
                    )
                continue
            e = LogEntry.from_dict(d, source=f"log entry for round {rnd}")
            e.verify()
            self._append(folder, e)
            self._written[e.round] = e.sha256
            saved = folder / round_file(e.round)
            self.log_info(fl_ctx, f"round {e.round}: encrypted aggregate saved to {saved} ({e.nbytes:,} bytes)")
        self._latest = model

    def _append(self, folder: Path, e: LogEntry) -> None:
        path = folder / round_file(e.round)
        if path.exists():
            raise LogError(f"{path} already exists; the encrypted log is append-only and this round was recorded before")
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(frame_chunks(e.chunks))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # The round's file is complete before its index line exists: a reader never sees a line without data.
        with open(folder / LOG_INDEX, "a") as f:
            f.write(json.dumps({**e.summary(), "file": path.name}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def get_model_from_location(self, location: str, fl_ctx: FLContext) -> ModelLearnable:
        """The whole log, whatever the model's name (the encrypted job has one global model: its log)."""
        if self._latest is None:
            self._latest = make_log_learnable([e.to_dict() for e in read_log(self._folder(fl_ctx))])
        return self._latest
