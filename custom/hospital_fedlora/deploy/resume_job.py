"""Resume a job whose server died: submit it again, continuing the earlier run's completed rounds.

FLARE 2.9 does not restart a job after its server process dies (the restarted server marks it
abnormally finished). The server's run folder of that job still holds every completed round (the
encrypted log, or the plaintext adapter of each round); this command submits the same job folder with
its persistor's ``resume_from`` set to the earlier job id, so the new run starts where the old one
stopped and the hospitals rebuild the global adapter from the log (the encrypted job's decrypt filter
gets the same ``resume_from``: the hospitals accept that run's logged rounds, verified, and no other job's). Run it as the project admin::

    python -m hospital_fedlora.deploy.resume_job --admin-kit <admin kit folder> --job jobs/fedlora_he \\
        --from <job id of the run that died>
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

PERSISTOR_ID = "persistor"
DECRYPT_FILTER = "hospital_fedlora.he.decrypt_filter.DecryptFilter"
UNFINISHED = ("RUNNING", "DISPATCHED", "SUBMITTED", "APPROVED")


def resumable_copy(job_dir: Path, earlier_job_id: str, dest: Path) -> Path:
    """A copy of ``job_dir`` in ``dest`` whose persistor continues ``earlier_job_id``."""
    config = job_dir / "app" / "config" / "config_fed_server.json"
    if not config.is_file():
        raise SystemExit(f"{job_dir}: not a job folder of this bundle (no app/config/config_fed_server.json)")
    server = json.loads(config.read_text())
    persistor = next((c for c in server.get("components", []) if c.get("id") == PERSISTOR_ID), None)
    if persistor is None:
        raise SystemExit(f"{config}: no component with id '{PERSISTOR_ID}'; only jobs with a persistor can resume")
    if persistor.get("args", {}).get("initial_adapter"):
        raise SystemExit(f"{config}: the persistor sets initial_adapter; a resumed run continues its own rounds instead")
    copy = dest / job_dir.name
    shutil.copytree(job_dir, copy, ignore=shutil.ignore_patterns(".__nvfl_*"))
    persistor.setdefault("args", {})["resume_from"] = earlier_job_id
    (copy / "app" / "config" / "config_fed_server.json").write_text(json.dumps(server, indent=2) + "\n")
    # The hospitals bind the job into every aggregate they verify: they accept the earlier run's rounds only
    # when their own job config (signed by the submitting admin, not the server's) names that run.
    client_file = copy / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_file.read_text())
    decrypt = [f for e in client.get("task_data_filters", []) for f in e.get("filters", []) if f.get("path") == DECRYPT_FILTER]
    for f in decrypt:
        f.setdefault("args", {})["resume_from"] = earlier_job_id
    if decrypt:
        client_file.write_text(json.dumps(client, indent=2) + "\n")
    return copy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--admin-kit", required=True, type=Path, help="the admin's startup kit folder (holds startup/)")
    ap.add_argument("--username", default="", help="admin name; default: the kit's folder name")
    ap.add_argument("--job", required=True, type=Path, help="the job folder that was submitted (e.g. jobs/fedlora_he)")
    ap.add_argument("--from", dest="earlier", required=True, help="job id of the run to continue")
    args = ap.parse_args(argv)

    from nvflare.fuel.flare_api.flare_api import new_secure_session

    session = new_secure_session(args.username or args.admin_kit.resolve().name, str(args.admin_kit.resolve()))
    try:
        status = str(session.get_job_meta(args.earlier).get("status", ""))
        if status in UNFINISHED:
            print(
                f"job {args.earlier} is {status} on the server: abort it first (abort_job {args.earlier}), or wait "
                "for a restarted server to mark it finished",
                file=sys.stderr,
            )
            return 2
        with tempfile.TemporaryDirectory(prefix="resume-") as tmp:
            job_id = session.submit_job(str(resumable_copy(args.job.resolve(), args.earlier, Path(tmp))))
        print(f"submitted {job_id}: continues job {args.earlier} ({status}) after its last completed round")
        return 0
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main())
