"""Every name that travels between a hospital and the server, defined once and imported by both sides.

DXO data kinds, metadata keys, metric keys, the round tag on ciphertexts and the error header of a failed
task. What each key holds and who may read it is in ``docs/architecture.md`` (the message table). Names
only, no code and no imports, so every module can use them.
"""

from __future__ import annotations


class EncryptedKind:
    """DXO data kinds of the encrypted job, beside FLARE's own (``WEIGHTS``, ``WEIGHT_DIFF``, ``METRICS``)."""

    DIFF = "PACKED_BFV_WEIGHT_DIFF"  # one hospital's encrypted adapter change
    SUM = "PACKED_BFV_WEIGHT_DIFF_SUM"  # the server's sum of one round's encrypted changes
    LOG = "PACKED_BFV_ADAPTER_LOG"  # entries of the encrypted round log, sent to the hospitals
    REFUSED = "PACKED_BFV_AGGREGATE_REFUSED"  # inside a site: what the decrypt filter hands on for a refused log


class Meta:
    """DXO metadata keys."""

    # FLARE's own aggregators read a contribution's weight from this key (``MetaKey.NUM_STEPS_CURRENT_ROUND``);
    # ours put the site's number of training examples there.
    EXAMPLE_COUNT = "NUM_STEPS_CURRENT_ROUND"
    METRICS = "metrics"  # one site's training metrics (``Metric``) for the round
    ADAPTER_CONFIG = "adapter_config"  # PEFT's adapter_config.json content, the same at every site
    LORA_RANK = "lora_rank"  # a site's own lower LoRA rank (plaintext jobs); absent: the job's rank
    # plaintext jobs: the mode a WEIGHTS / WEIGHT_DIFF payload is quantized to (``transport/``); absent: as trained
    QUANTIZATION = "quantization"

    # an encrypted contribution, in the clear
    WEIGHT_FACTOR = "weight_factor"  # min(example count, full_weight) / full_weight, applied before rounding
    LAYOUT = "layout"  # AdapterLayout manifest: tensor names, shapes, dtypes
    LAYOUT_FINGERPRINT = "layout_fingerprint"
    N_VALUES = "n_values"  # values in the flattened adapter

    # a round's aggregate (plaintext and encrypted), and each entry of the encrypted log
    ROUND = "round"
    N_SITES = "n_sites"  # contributions summed
    TOTAL_WEIGHT = "total_weight"  # sum of the contributors' weight factors: the sites divide by it
    WEIGHT_FACTORS = "weight_factors"  # site -> weight factor
    EXAMPLE_COUNTS = "example_counts"  # site -> number of training examples
    SITE_METRICS = "site_metrics"  # site -> its ``METRICS``
    JOB = "job"  # an encrypted log entry: the job (run) whose round it is; its aggregate MAC binds it

    # the encrypted log message
    LOG_ROUNDS = "log_rounds"  # entries the server's log holds
    FIRST_ROUND_SENT = "first_round_sent"

    # inside a site: the decrypt filter hands the executor the change since the seeded initial adapter
    RELATIVE_TO = "relative_to"
    APPLIED_ROUNDS = "applied_rounds"
    REFUSED = "refused"  # with ``EncryptedKind.REFUSED``: why the hospital refused the aggregate


INITIAL_ADAPTER = "initial_adapter"  # the value of ``Meta.RELATIVE_TO``


class Data:
    """Keys inside a DXO's data for the encrypted kinds."""

    CHUNKS = "chunks"  # list of serialized ciphertext chunks (``he.wire_format``)
    ENTRIES = "entries"  # list of encrypted log entries (``he.wire_format.LogEntry.to_dict``)


class Metric:
    """Keys of a site's metrics: ``train`` results carry the first seven, ``validate`` results the last three."""

    TRAIN_LOSS = "train_loss"
    VAL_LOSS_GLOBAL = "val_loss_global"  # validation loss of the global adapter the site received
    VAL_LOSS_LOCAL = "val_loss_local"  # validation loss after the site's local steps
    TRAIN_TOKENS = "train_tokens"
    TRAIN_SECONDS = "train_seconds"
    TASK_SECONDS = "task_seconds"  # the whole task at the site: set adapter, evaluate, train, evaluate, diff
    TRUNCATED_RECORDS = "truncated_records"  # train records longer than the job's max_seq_length, cut to fit
    VAL_LOSS = "val_loss"
    BASE_VAL_LOSS = "base_val_loss"
    VAL_EXAMPLES = "val_examples"


# A site that cannot do a task says why in this header of its error reply, so the server's log names the cause.
ERROR_HEADER = "hospital_fedlora_error"

# A hospital that refuses the server's aggregate (aggregate MAC, contributor floor) says why in this header of
# the task data its decrypt filter hands the executor, which answers the task with that error (ERROR_HEADER).
REFUSED_HEADER = "hospital_fedlora_aggregate_refused"

# How a round is written for people (logs, progress, the job report): 0-based as FLARE's workflows count,
# with the job's range, e.g. "round 0 of 0..2" is the first of three.
ROUND_TEXT = "round {round} of 0..{last}"

# The tag every ciphertext of a round carries in its chunk headers, checked at both ends: ROUND_TAG.format(round=r)
ROUND_TAG = "round {round}"

# The audit trail (``audit/``): the server's audit-log head ``{seq, hash}`` in every train task's headers, and
# the hospital's signed receipt of its result in the result's headers (``audit.receipts``).
AUDIT_HEAD_HEADER = "hospital_fedlora_audit_head"
RECEIPT_HEADER = "hospital_fedlora_receipt"
