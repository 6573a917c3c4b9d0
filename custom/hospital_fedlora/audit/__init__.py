"""The audit trail. A core free of FLARE (``chain``: the hash-chained JSONL log; ``digest``: the one
contribution digest both sides compute; ``receipts``: signing with the kit's key; ``verify``: checking a
log and hospitals' receipts), then thin FLARE parts: the server's ``audit_log`` and the hospital's
``receipt_filter``. ``python -m hospital_fedlora.audit verify`` runs the check."""
