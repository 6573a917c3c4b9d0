"""One round of the encrypted job through its real components: which modules of the package it enters.

``docs/architecture.md`` walks this path; the test keeps the page true. A round here is the steady
state: the server sends the last round's encrypted sum, every hospital applies it, trains, encrypts its
change, the server adds the ciphertexts, appends the sum to its log, persists it and records the round.
"""

from __future__ import annotations

import linecache
import sys
from pathlib import Path

import numpy as np
import pytest
from kit_keys import TestCA
from nvflare.apis.dxo import from_shareable

from hospital_fedlora.he.bfv_context import (
    CLIENT_CONTEXT_FILE,
    SERVER_CONTEXT_FILE,
    BFVParams,
    make_context,
    serialize_context,
)

from deployment_helpers import write_site_configs
from job_in_process import REPO, JobInProcess

PACKAGE = Path(__import__("hospital_fedlora").__file__).resolve().parent
SITES = ["hospital-a", "hospital-b", "hospital-c"]

# docs/architecture.md walks the same path.
DATA_PATH = [
    "he/log_generator.py",  # server: the log entries the sites lack
    "he/decrypt_filter.py",  # site: verify, decrypt and apply them
    "he/wire_format.py",
    "adapter_layout.py",
    "he/packed_bfv.py",
    "he/aggregate_mac.py",  # site: the aggregate MAC, checked before anything is applied
    "he/encoding.py",
    "site/executor.py",  # site: train on its own data
    "site/trainer.py",
    "he/encrypt_filter.py",  # site: quantize, pack, encrypt the change
    "he/sum_aggregator.py",  # server: check and add the ciphertexts
    "server/contribution_aggregator.py",
    "he/log_persistor.py",  # server: the entries' ciphertexts read back from disk; the new round appended
]
# they read the aggregate's metadata after each round; the job report also who answered
OBSERVERS = ["server/round_metrics_log.py", "server/job_report.py"]
HOUSEKEEPING = ["memory.py"]  # the hospital gives the round's freed memory back
# The hospital scores the global adapter it received on its test split (greedy answers in the job's prompt
# format) and streams the numbers to the server.
EVALUATION = ["site/site_metrics.py", "site/generation.py", "site/test_metrics.py", "site/prompting.py", "site/metrics_sender.py"]
GATE = ["site/privacy_gate.py"]  # the hospital checks that the job's result filters encrypt the difference
# The audit trail: each hospital signs a receipt of what it sends; the server chains the round into its log.
AUDIT = ["audit/receipt_filter.py", "audit/receipts.py", "audit/digest.py", "audit/audit_log.py", "audit/chain.py"]


def trace_modules(run) -> set[str]:
    """Files of the package whose code ``run()`` executes.

    FLARE delivers every event to every component; a ``handle_event`` that only tests the event type and
    returns has ignored the event, so it does not count as entering its module.
    """
    entered: set[str] = set()

    def module(frame) -> str | None:
        path = Path(frame.f_code.co_filename)
        return path.relative_to(PACKAGE).as_posix() if path.is_relative_to(PACKAGE) else None

    def tracer(frame, event, arg):
        name = module(frame) if event == "call" else None
        if name is None:
            return None
        if frame.f_code.co_name != "handle_event":
            entered.add(name)
            return None
        executed: list[str] = []

        def lines(f, ev, a):
            if ev == "line":
                executed.append(linecache.getline(f.f_code.co_filename, f.f_lineno).strip())
            elif ev == "return" and any(not line.startswith(("if ", "elif ", "return")) for line in executed):
                entered.add(name)
            return lines

        return lines

    sys.settrace(tracer)
    try:
        run()
    finally:
        sys.settrace(None)
    return entered


@pytest.fixture(scope="module")
def federation(tmp_path_factory, base_model_dir, data_dir):
    root = tmp_path_factory.mktemp("round_path")
    ca = TestCA()  # every hospital's kit key, which signs its receipts
    for site in SITES:
        ca.write_kit(root / site / "startup", site)
    configs = write_site_configs(
        root / "site_configs", base_model_dir, data_dir, SITES, privacy={"require_encryption": True}
    )
    made = make_context(BFVParams(), n_threads=1)
    keys = {"client": serialize_context(made, secret=True), "server": serialize_context(made, secret=False)}
    recipe = {"lora_executor": {"recipe": {"local_steps": 2, "max_eval_examples": 4}}}
    files = {"client": {CLIENT_CONTEXT_FILE: keys["client"]}, "server": {SERVER_CONTEXT_FILE: keys["server"]}}
    fed = JobInProcess(REPO / "jobs" / "fedlora_he", root, SITES, files, site_configs=configs, client_args=recipe)
    fed.round(0)  # the first round applies an empty log: the steady state starts with round 1
    return fed


def test_one_round_enters_exactly_the_modules_of_the_data_path(federation):
    entered = trace_modules(lambda: federation.round(1))
    assert entered == set(DATA_PATH + OBSERVERS + AUDIT + HOUSEKEEPING + GATE + EVALUATION)
    assert len(DATA_PATH) <= 13


def test_every_site_holds_the_same_global_adapter_after_the_round(federation):
    task = federation.task_data(2)
    changes = [from_shareable(federation.receive(site, task, 2)).data for site in SITES]
    assert changes[0] and all(c.keys() == changes[0].keys() for c in changes)
    for name in changes[0]:
        for other in changes[1:]:
            np.testing.assert_array_equal(changes[0][name], other[name])
