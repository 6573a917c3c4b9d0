"""Following a job: rounds from successive readings of its report in the job meta, printed 0-based."""

from __future__ import annotations

from hospital_fedlora.server.job_report import REPORT_META_KEY
from hospital_fedlora_tools.job_progress import Progress, ReportFollower, print_progress


def reading(rnd, done) -> dict:
    return {"status": "RUNNING", REPORT_META_KEY: {"round": rnd, "num_rounds": 3, "losses_round": done}}


def test_rounds_follow_the_report_even_when_readings_skip_a_round():
    follow = ReportFollower()
    assert follow.rounds({"status": "DISPATCHED"}) == []
    assert follow.rounds(reading(0, None)) == [(0, "started")]
    assert follow.rounds(reading(0, None)) == []
    assert follow.rounds(reading(2, 1)) == [(0, "finished"), (1, "started"), (1, "finished"), (2, "started")]
    assert follow.rounds(reading(2, 2)) == [(2, "finished")]


def test_rounds_print_0_based_with_the_jobs_range(capsys):
    print_progress(Progress("6152166f-aaaa", "round_started", "RUNNING", 11.2, 0, 3))
    print_progress(Progress("6152166f-aaaa", "round_finished", "RUNNING", 17.3, 2, 3, 6.1))
    assert capsys.readouterr().out.splitlines() == [
        "[   11.2 s] 6152166f  round 0 of 0..2 started",
        "[   17.3 s] 6152166f  round 2 of 0..2 finished in 6.1 s",
    ]
