"""Server persistor of the encrypted job: the append-only log of encrypted round sums on disk.

Only the index lines (summaries, a few hundred bytes a round) stay in the server's memory; a round's
ciphertexts are read back from its file when they are sent (``with_chunks``), so the server's memory
does not grow with the number of rounds. Reading checks every file against its recorded SHA-256.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor

from ..protocol import Data, Meta
from ..server.earlier_run import earlier_run_dir
from .wire_format import LogEntry, LogError, frame_chunks, unframe_chunks

LOG_DIR = "encrypted_log"
LOG_INDEX = "log.jsonl"
FILE = "file"  # in an entry held in memory: the absolute path of its round file, in place of its chunks


def round_file(rnd: int) -> str:
    return f"round_{rnd:03d}.bfv"


def read_log(folder: Path, with_chunks: bool = True) -> list[dict]:
    """Every entry of a stored log as a dict, each checked against its recorded SHA-256; without
    ``with_chunks`` an entry names its file instead of holding its ciphertexts."""
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
        path = folder / str(summary.get(FILE, round_file(int(summary.get(Meta.ROUND, -1)))))
        entry = _load(summary, path, source)
        entries.append(entry.to_dict() if with_chunks else {**entry.summary(), FILE: str(path)})
    rounds = [e[Meta.ROUND] for e in entries]
    if rounds and rounds != list(range(rounds[0], rounds[0] + len(rounds))):
        raise LogError(f"{index}: rounds {rounds} are not consecutive; the log is append-only, one line per round")
    return entries


def with_chunks(entry: dict) -> dict:
    """A copy of an in-memory entry that holds its ciphertexts (read back from its file if need be)."""
    if Data.CHUNKS in entry:
        return dict(entry)
    path = Path(entry[FILE])
    summary = {k: v for k, v in entry.items() if k != FILE}
    return _load(summary, path, f"log entry for round {entry.get(Meta.ROUND)}").to_dict()


def append_entry(folder: Path, e: LogEntry) -> Path:
    """Write round ``e`` (file first, then its index line, both synced) and return the round file's path."""
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
        f.write(json.dumps({**e.summary(), FILE: path.name}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def _load(summary: dict, path: Path, source: str) -> LogEntry:
    if not path.is_file():
        raise LogError(f"{source}: {path.name} is missing")
    entry = LogEntry.from_dict(summary, source=source, chunks=unframe_chunks(path.read_bytes(), str(path)))
    entry.verify(str(path))
    return entry


def log_entries(model: ModelLearnable | None) -> list[dict]:
    """The log's entry dicts held in ``model`` (empty before the first round)."""
    weights = (model or {}).get(ModelLearnableKey.WEIGHTS) or {}
    return list(weights.get(Data.ENTRIES, []))


def make_log_learnable(entries: list[dict]) -> ModelLearnable:
    return make_model_learnable({Data.ENTRIES: entries} if entries else {}, {})


class EncryptedLogPersistor(ModelPersistor):
    """Writes each round of the encrypted log once, in the job's run folder on the server::

        encrypted_log/round_000.bfv   the round's summed ciphertext chunks (length-prefixed); sha256sum checks it
        encrypted_log/log.jsonl       one line per round: round, file, sha256, bytes, n_sites, total_weight,
                                      example_counts, weight_factors, n_values, layout

    A later save appends new rounds and refuses to change a recorded one; once a round is on disk the
    log in memory keeps only its summary (``log_files.with_chunks`` reads the ciphertexts back to send
    them). There is no plaintext adapter on the server: each hospital writes the final adapter in its
    own run folder. ``load_model`` starts an empty log, or, with ``resume_from``, the log of an earlier run
    of this job (a server that crashed leaves its run folder on disk): its rounds are copied into this
    run's log, ``resumed_rounds`` says how many, and the workflow continues after them.

    Args:
        resume_from: job id of an earlier run whose log this run continues (``deploy/resume_job`` sets it).
    """

    def __init__(self, resume_from: str = ""):
        super().__init__()
        self.resume_from = resume_from
        self.resumed_rounds = 0
        self._written: dict[int, str] = {}  # round -> sha256 already on disk
        self._latest: ModelLearnable | None = None

    def _folder(self, fl_ctx: FLContext) -> Path:
        return self._run_dir(fl_ctx) / LOG_DIR

    def _run_dir(self, fl_ctx: FLContext) -> Path:
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT) or fl_ctx.get_engine().get_workspace()
        return Path(workspace.get_run_dir(fl_ctx.get_job_id()))

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        self._written, self._latest, self.resumed_rounds = {}, None, 0
        if not self.resume_from:
            return make_log_learnable([])
        earlier = earlier_run_dir(self._run_dir(fl_ctx), self.resume_from, LOG_DIR) / LOG_DIR
        entries = read_log(earlier, with_chunks=False)  # every round file checked against its digest
        if entries[0][Meta.ROUND] != 0:
            raise LogError(f"{earlier}: the log starts at round {entries[0][Meta.ROUND]}, not 0; cannot rebuild the adapter")
        model = make_log_learnable(entries)
        self.save_model(model, fl_ctx)  # this run's folder holds the whole log, as an uninterrupted run's would
        self.resumed_rounds = len(entries)
        self.log_info(
            fl_ctx,
            f"resuming job {self.resume_from}: its encrypted log holds rounds 0..{len(entries) - 1} ({earlier}); "
            f"continuing at round {len(entries)}",
        )
        return model

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
            e = LogEntry.from_dict(with_chunks(d), source=f"log entry for round {rnd}")
            e.verify()
            saved = append_entry(folder, e)
            self._written[e.round] = e.sha256
            # From now on the round lives on disk; memory keeps its summary only.
            d.pop(Data.CHUNKS, None)
            d[FILE] = str(saved)
            self.log_info(fl_ctx, f"round {e.round}: encrypted aggregate saved to {saved} ({e.nbytes:,} bytes)")
        self._latest = model

    def get_model_from_location(self, location: str, fl_ctx: FLContext) -> ModelLearnable:
        """The whole log, whatever the model's name (the encrypted job has one global model: its log)."""
        if self._latest is None:
            self._latest = make_log_learnable(read_log(self._folder(fl_ctx), with_chunks=False))
        return self._latest

