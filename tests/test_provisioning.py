"""`nvflare provision` with our project.yml, kit preparation, and the security the kits must give.

The e2e tests start a real server from the kits (its own start.sh) and knock on it with kits from
another provisioning, i.e. another root CA.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
from pathlib import Path

import pytest
import tenseal as ts
import yaml
from nvflare.lighter.utils import verify_folder_signature

from hospital_fedlora.config import load_site_config
from hospital_fedlora.deploy import kits as kits_module
from hospital_fedlora.deploy.kit_identity import KitIdentityError, kit_name
from hospital_fedlora.deploy.kits import COMM_CONFIG, COMPLETE_MARKER, PACKAGE_ALLOW_PREFIX, KitError, find_kits
from hospital_fedlora.deploy.kits import latest_prod_dir
from hospital_fedlora.deploy.kits import main as kits_main
from hospital_fedlora.he.bfv_context import load_context_file
from hospital_fedlora_tools.local_federation import LocalFederation

from deployment_helpers import REPO, SITES, free_port, project_with_port, provision_into, wait_until

ADMIN = "admin@consortium.org"


@pytest.fixture(scope="module")
def port():
    return free_port()


@pytest.fixture(scope="module")
def kits(tmp_path_factory, port):
    return provision_into(tmp_path_factory.mktemp("prov_a"), port, REPO / "site_configs")


@pytest.fixture(scope="module")
def foreign_kits(tmp_path_factory, port):
    """The same project provisioned again elsewhere: same names and port, a different root CA."""
    return provision_into(tmp_path_factory.mktemp("prov_b"), port, REPO / "site_configs")


# ------------------------------------------------------------------------------------------ kit files
def test_every_participant_gets_a_kit(kits):
    assert kits.server.name == "localhost"
    assert sorted(kits.clients) == list(SITES)
    assert sorted(kits.admins) == [ADMIN] + [f"admin@{s}.org" for s in SITES]
    roles = {name: json.loads((k / "startup" / "fed_admin.json").read_text())["admin"]["username"]
             for name, k in kits.admins.items()}  # fmt: skip
    assert roles == {name: name for name in kits.admins}


def test_storage_stays_inside_the_kit(kits):
    text = (kits.server / "local" / "resources.json").read_text()
    assert "/tmp/nvflare" not in text
    resources = json.loads(text)
    job_manager = next(c for c in resources["components"] if c["id"] == "job_manager")
    snapshot_root = resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"]
    for path in (job_manager["args"]["uri_root"], snapshot_root):
        assert Path(path).is_absolute() and Path(path).is_relative_to(kits.server / "storage"), path
    for kit in [*kits.clients.values(), *kits.admins.values()]:
        assert "/tmp/nvflare" not in (kit / "local" / "resources.json").read_text()


def test_hospital_kits_log_waiting_for_the_server_as_progress(kits):
    for kit in kits.clients.values():
        config = json.loads((kit / "local" / "log_config.json").read_text())
        assert any("ServerWaitFilter" in str(f.get("()")) for f in config["filters"].values()), kit
    assert not (kits.server / "local" / "log_config.json").exists()


def test_our_components_are_allowed_at_server_and_hospitals(kits):
    for kit in [kits.server, *kits.clients.values()]:
        allow = json.loads((kit / "local" / "resources.json").read_text())["class_allow_list"]
        assert PACKAGE_ALLOW_PREFIX in allow, kit.name
        assert "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather" in allow


def test_every_kit_releases_memory_and_the_server_marks_jobs_a_crash_left_running(kits):
    def ids(kit):
        return {c["id"]: c["path"] for c in json.loads((kit / "local" / "resources.json").read_text())["components"]}

    assert ids(kits.server)["memory_keeper"] == "hospital_fedlora.deploy.memory_keeper.MemoryKeeper"
    assert ids(kits.server)["interrupted_jobs"] == "hospital_fedlora.deploy.interrupted_jobs.InterruptedJobs"
    for kit in kits.clients.values():
        assert "memory_keeper" in ids(kit) and "interrupted_jobs" not in ids(kit)
        assert ids(kit)["no_remote_shell"] == "hospital_fedlora.deploy.no_remote_shell.NoRemoteShell"
    assert "no_remote_shell" not in ids(kits.server)


def test_a_hospital_refuses_shell_commands_even_when_the_request_skips_authorization():
    """FLARE's client checks its policy only if the server's request asks; this processor answers none."""
    from types import SimpleNamespace

    from nvflare.apis.event_type import EventType
    from nvflare.private.admin_defs import Message
    from nvflare.private.defs import SysCommandTopic
    from nvflare.private.fed.client.shell_cmd import ShellCommandProcessor

    from hospital_fedlora.deploy.no_remote_shell import REFUSAL, NoRemoteShell
    from flare_harness import Engine, fl_ctx

    engine = Engine()
    engine.admin_agent = SimpleNamespace(processors={SysCommandTopic.SHELL: ShellCommandProcessor()})
    NoRemoteShell().handle_event(EventType.SYSTEM_START, fl_ctx("hospital-a", engine=engine))
    processor = engine.admin_agent.processors[SysCommandTopic.SHELL]
    reply = processor.process(Message(topic=SysCommandTopic.SHELL, body="cat startup/client.key"), None)
    assert reply.body == REFUSAL


def test_comm_config_sized_for_large_messages(kits):
    for kit in [kits.server, *kits.clients.values()]:
        config = json.loads((kit / "local" / "comm_config.json").read_text())
        for key, value in COMM_CONFIG.items():
            assert config[key] == value, (kit.name, key)
        assert config["streaming_max_blob_size"] >= 8 * 1024**3
        assert config["streaming_read_timeout"] >= 600


def test_site_config_placed_with_absolute_paths(kits):
    for site, kit in kits.clients.items():
        placed = kit / "local" / "site_config.yaml"
        raw = yaml.safe_load(placed.read_text())
        for path in (raw["base_model_path"], raw["data"]["train"], raw["data"]["validation"]):
            assert Path(path).is_absolute(), (site, path)
        assert load_site_config(placed, expected_site=site) == load_site_config(REPO / "site_configs" / f"{site}.yaml")
    assert not (kits.server / "local" / "site_config.yaml").exists()


def test_committed_site_configs_and_the_kits_made_from_them_require_encryption(kits):
    for site, kit in kits.clients.items():
        assert load_site_config(REPO / "site_configs" / f"{site}.yaml").privacy.require_encryption, site
        assert load_site_config(kit / "local" / "site_config.yaml").privacy.require_encryption, site


def test_the_plaintext_demo_opts_out_explicitly_saying_why(kits, tmp_path):
    unpacked = shutil.copytree(kits.clients["hospital-a"], tmp_path / "hospital-a")
    config = str(REPO / "site_configs" / "hospital-a.yaml")
    with pytest.raises(SystemExit):  # nothing to opt out without a site config
        kits_main(["--kit", str(unpacked), "--plaintext-demo"])
    assert kits_main(["--kit", str(unpacked), "--site-config", config, "--plaintext-demo"]) == 0
    placed = (unpacked / "local" / "site_config.yaml").read_text()
    assert not load_site_config(unpacked / "local" / "site_config.yaml").privacy.require_encryption
    assert "written by --plaintext-demo for the one-machine plaintext demo" in placed


def test_hospital_kits_deny_shell_commands_and_custom_code_to_every_role(kits):
    """FLARE's default lets the project admin (and each hospital's lead and org admin) `cat` files in the
    site's workspace, startup/ and its key files included, and run jobs with their own code."""
    from nvflare.fuel.sec.authz import AuthzContext, Person
    from nvflare.security.security import COMMAND_CATEGORIES, FLAuthorizer

    shell = [cmd for cmd, category in COMMAND_CATEGORIES.items() if category == "shell_commands"]
    for site, kit in kits.clients.items():
        default = json.loads((kit / "local" / "authorization.json.default").read_text())
        policy = json.loads((kit / "local" / "authorization.json").read_text())
        assert set(policy["permissions"]) == set(default["permissions"]) == {"project_admin", "org_admin", "lead", "member"}
        for role, rights in policy["permissions"].items():
            assert rights["shell_commands"] == "none" and rights["byoc"] == "none", (site, role)
        authorizer = FLAuthorizer(site.replace("-", "_"), policy)
        for role in policy["permissions"]:
            user = Person("someone@x.org", site.replace("-", "_"), role)
            for right in [*shell, "byoc"]:
                assert not authorizer.authorize(AuthzContext(right=right, user=user, submitter=user))[0], (site, role, right)
        admin = Person(ADMIN, "consortium", "project_admin")
        for right in ("check_status", "abort_job", "shutdown", "submit_job", "download_job"):
            assert authorizer.authorize(AuthzContext(right=right, user=admin, submitter=admin))[0], right
    for kit in [kits.server, *kits.admins.values()]:
        assert not (kit / "local" / "authorization.json").exists()


def test_startup_folders_still_verify_against_their_root_ca(kits):
    for kit in [kits.server, *kits.clients.values(), *kits.admins.values()]:
        startup = kit / "startup"
        if kit in kits.admins.values():
            assert not (startup / "signature.json").exists()  # FLARE signs server and client kits only
            continue
        assert verify_folder_signature(
            str(startup), str(startup / "rootCA.pem"), single_signer=True, signature_file="signature.json"
        ), kit.name


def _has_secret_key(path: Path) -> bool:
    if path.name.endswith("_bfv_context.tenseal"):
        return load_context_file(path).has_secret_key  # ours: a small header around a TenSEAL context
    return ts.context_from(path.read_bytes()).is_private()  # NVFlare HEBuilder's CKKS context


def test_server_kit_holds_no_secret_key_and_hospitals_do(kits):
    server_contexts = sorted(kits.server.rglob("*.tenseal"))
    assert {p.name for p in server_contexts} == {"server_bfv_context.tenseal", "server_context.tenseal"}
    for path in server_contexts:
        assert not _has_secret_key(path), path
    assert not list(kits.server.rglob("client*context*"))
    for site, kit in kits.clients.items():
        contexts = sorted(kit.rglob("*.tenseal"))
        assert {p.name for p in contexts} == {"client_bfv_context.tenseal", "client_context.tenseal"}, site
        assert all(_has_secret_key(p) for p in contexts), site
    for kit in kits.admins.values():
        assert not list(kit.rglob("*.tenseal"))


def test_fourth_hospital_is_one_project_entry_and_one_site_config(tmp_path):
    configs = tmp_path / "site_configs"
    shutil.copytree(REPO / "site_configs", configs)
    # Without its site config, hospital-d's kit is made all the same: its IT adds the config at the site.
    kits = provision_into(tmp_path / "without", free_port(), configs, extra_clients=("hospital-d",))
    assert not (kits.clients["hospital-d"] / "local" / "site_config.yaml").exists()
    assert (kits.clients["hospital-a"] / "local" / "site_config.yaml").is_file()
    raw = yaml.safe_load((configs / "hospital-a.yaml").read_text())
    (configs / "hospital-d.yaml").write_text(yaml.safe_dump({**raw, "site": "hospital-d"}))
    kits = provision_into(tmp_path / "with", free_port(), configs, extra_clients=("hospital-d",))
    assert sorted(kits.clients) == [*SITES, "hospital-d"]
    assert load_site_config(kits.clients["hospital-d"] / "local" / "site_config.yaml").site == "hospital-d"


def test_site_config_for_the_wrong_site_is_refused(tmp_path, capsys):
    configs = tmp_path / "site_configs"
    shutil.copytree(REPO / "site_configs", configs)
    shutil.copy(configs / "hospital-a.yaml", configs / "hospital-b.yaml")
    project = tmp_path / "project.yml"
    shutil.copy(REPO / "provisioning" / "project.yml", project)
    rc = kits_main(["--project", str(project), "--workspace", str(tmp_path / "ws"), "--site-configs", str(configs)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "hospital-b.yaml" in err and "field 'site' is 'hospital-a' but this client is 'hospital-b'" in err
    assert not (tmp_path / "ws").exists()  # refused before provisioning: no kits, no CA


def test_a_hospital_prepares_its_unpacked_kit_with_its_own_site_config(kits, tmp_path):
    unpacked = tmp_path / "elsewhere" / "hospital-b"
    shutil.copytree(kits.clients["hospital-b"], unpacked)
    for name in ("resources.json", "comm_config.json", "site_config.yaml"):
        (unpacked / "local" / name).unlink()
    own = tmp_path / "our_site.yaml"
    raw = yaml.safe_load((REPO / "site_configs" / "hospital-b.yaml").read_text())
    raw.update(base_model_path="models/llama", micro_batch_size=2)
    own.write_text(yaml.safe_dump(raw))

    assert kits_main(["--kit", str(unpacked), "--site-config", str(own)]) == 0
    placed = load_site_config(unpacked / "local" / "site_config.yaml", expected_site="hospital-b")
    assert placed.base_model_path == tmp_path / "models" / "llama" and placed.micro_batch_size == 2
    assert json.loads((unpacked / "local" / "comm_config.json").read_text())["streaming_read_timeout"] >= 600
    assert (unpacked / "local" / "resources.json").is_file()


def test_kit_preparation_refuses_a_site_config_for_another_site_or_role(kits, tmp_path, capsys):
    hospital_a = str(REPO / "site_configs" / "hospital-a.yaml")
    assert kits_main(["--kit", str(kits.clients["hospital-c"]), "--site-config", hospital_a]) == 1
    assert "field 'site' is 'hospital-a' but this client is 'hospital-c'" in capsys.readouterr().err
    assert kits_main(["--kit", str(kits.server), "--site-config", hospital_a]) == 1
    assert "only a hospital's kit takes a site config" in capsys.readouterr().err


def test_a_moved_server_kit_keeps_its_storage_inside_itself(kits, tmp_path):
    moved = tmp_path / "srv" / "localhost"
    shutil.copytree(kits.server, moved)
    assert kits_main(["--kit", str(moved)]) == 0
    resources = json.loads((moved / "local" / "resources.json").read_text())
    job_manager = next(c for c in resources["components"] if c["id"] == "job_manager")
    assert Path(job_manager["args"]["uri_root"]).is_relative_to(moved / "storage")


# ---------------------------------------------------------------------------- kits without traps
def test_a_kit_is_who_its_certificate_says_whatever_its_folder_is_called(kits, tmp_path, capsys):
    unpacked = tmp_path / "fl-client"
    shutil.copytree(kits.clients["hospital-b"], unpacked)
    (unpacked / "local" / "site_config.yaml").unlink()
    assert kit_name(unpacked) == "hospital-b"

    hospital_b = str(REPO / "site_configs" / "hospital-b.yaml")
    assert kits_main(["--kit", str(unpacked), "--site-config", hospital_b]) == 0
    assert load_site_config(unpacked / "local" / "site_config.yaml", expected_site="hospital-b").site == "hospital-b"
    assert kits_main(["--kit", str(unpacked), "--site-config", str(REPO / "site_configs" / "hospital-a.yaml")]) == 1
    err = capsys.readouterr().err
    assert "hospital-a.yaml: field 'site' is 'hospital-a' but this client is 'hospital-b'" in err
    assert str(unpacked / "startup" / "client.crt") in err

    renamed = tmp_path / "prod"
    shutil.copytree(kits.prod_dir, renamed)
    (renamed / "hospital-c").rename(renamed / "fl-client")
    assert find_kits(renamed).clients["hospital-c"] == renamed / "fl-client"

    (unpacked / "startup" / "client.crt").write_text("not a certificate")
    with pytest.raises(KitIdentityError, match=r"fl-client/startup/client\.crt: cannot read the kit's certificate"):
        kit_name(unpacked)
    (unpacked / "startup" / "client.crt").unlink()
    assert kits_main(["--kit", str(unpacked), "--site-config", hospital_b]) == 1
    assert "fl-client/startup/client.crt: not found" in capsys.readouterr().err


def _project_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    project = folder / "project.yml"
    project.write_text(yaml.safe_dump(project_with_port(free_port()), sort_keys=False))
    return project


def test_the_admin_provisions_without_any_hospital_data_paths(tmp_path, capsys):
    project = _project_file(tmp_path)
    assert kits_main(["--project", str(project), "--workspace", str(tmp_path / "ws")]) == 0
    out = capsys.readouterr().out
    for site in SITES:
        assert (f"(no site config yet; hospital IT adds it: python -m hospital_fedlora.deploy.kits "
                f"--kit <the unpacked {site} kit> --site-config <{site}'s site config>)") in out  # fmt: skip
    prod = latest_prod_dir(tmp_path / "ws")
    assert not list(prod.glob("*/local/site_config.yaml"))


def test_a_failed_kits_run_leaves_the_previous_set_current(tmp_path, monkeypatch, capsys):
    project, ws = _project_file(tmp_path), tmp_path / "ws"
    configs = tmp_path / "site_configs"
    shutil.copytree(REPO / "site_configs", configs)
    make_kits = ["--project", str(project), "--workspace", str(ws), "--site-configs", str(configs)]
    assert kits_main(make_kits) == 0
    previous = latest_prod_dir(ws)
    assert previous.name == "prod_00" and (previous / COMPLETE_MARKER).is_file()
    capsys.readouterr()

    # A site config that cannot work is refused before provisioning, naming the file and the field.
    raw = yaml.safe_load((configs / "hospital-b.yaml").read_text())
    (configs / "hospital-b.yaml").write_text(yaml.safe_dump({**raw, "micro_batch_size": "many"}))
    assert kits_main(make_kits) == 1
    err = capsys.readouterr().err
    assert "hospital-b.yaml" in err and "micro_batch_size" in err
    assert sorted(p.name for p in previous.parent.glob("prod_*")) == ["prod_00"]
    (configs / "hospital-b.yaml").write_text(yaml.safe_dump(raw))

    # A failure after `nvflare provision` (here: preparing hospital-b's kit) removes the new prod_NN.
    real_prepare = kits_module.prepare_kit

    def failing_prepare(kit, site_config=None, plaintext_demo=False):
        if Path(kit).name == "hospital-b":
            raise KitError(f"{kit}/local/resources.json.default: injected failure")
        real_prepare(kit, site_config, plaintext_demo)

    monkeypatch.setattr(kits_module, "prepare_kit", failing_prepare)
    assert kits_main(make_kits) == 1
    assert "injected failure" in capsys.readouterr().err
    assert sorted(p.name for p in previous.parent.glob("prod_*")) == ["prod_00"]
    assert latest_prod_dir(ws) == previous

    # A run killed before it finished (no marker written) is never taken for the current set.
    half_built = previous.parent / "prod_01"
    shutil.copytree(previous, half_built)
    (half_built / COMPLETE_MARKER).unlink()
    assert latest_prod_dir(ws) == previous
    with pytest.raises(KitError, match=rf"prod_01: no {COMPLETE_MARKER}, so the run that wrote it did not finish"):
        find_kits(half_built)


@pytest.mark.e2e
def test_job_history_is_carried_into_a_new_server_kit(tmp_path, capsys):
    port = free_port()
    old = provision_into(tmp_path, port, None)
    with LocalFederation(old, clients=[], echo=lambda s: None) as fed:
        job_id = fed.submit(REPO / "jobs" / "fedlora_plain")  # no hospital connected: it waits, then is aborted
        fed.session.abort_job(job_id)
        wait_until(lambda: fed.session.get_job_meta(job_id)["status"] == "FINISHED:ABORTED", 30, "the abort")
    new = provision_into(tmp_path, port, None)  # re-provisioned into the same workspace
    assert new.prod_dir != old.prod_dir and not list((new.server / "storage").rglob("meta"))

    (old.server / "daemon_pid.fl").write_text(f"{os.getpid()}\n")  # a live pid: the old server looks running
    assert kits_main(["--kit", str(new.server), "--storage-from", str(old.server)]) == 1
    assert "daemon_pid.fl: the server of" in capsys.readouterr().err
    (old.server / "daemon_pid.fl").unlink()
    assert kits_main(["--kit", str(new.server), "--storage-from", str(old.server)]) == 0
    assert not (old.server / "storage").exists()  # moved, not copied
    for meta in (new.server / "storage").rglob("meta"):
        assert str(old.server) not in meta.read_text(errors="replace"), meta  # nothing points at the old kit

    with LocalFederation(new, clients=[], echo=lambda s: None) as fed:
        jobs = {j["job_id"]: j["status"] for j in fed.session.list_jobs()}
    assert jobs == {job_id: "FINISHED:ABORTED"}
    # Its storage now holds jobs: another carry-over into it is refused rather than mixed in.
    other = provision_into(tmp_path / "other", free_port(), None)
    (other.server / "storage" / "jobs-storage" / "x").mkdir(parents=True)
    (other.server / "storage" / "jobs-storage" / "x" / "meta").write_text("{}")
    assert kits_main(["--kit", str(new.server), "--storage-from", str(other.server)]) == 1
    assert "already holds jobs of the new server" in capsys.readouterr().err


# ----------------------------------------------------------------------- security on a running server
@pytest.fixture(scope="module")
def server_with_one_hospital(kits):
    with LocalFederation(kits, clients=["hospital-b"], echo=lambda s: None) as fed:
        yield fed
    assert not fed.processes()


def _tls_hello(cert_kit: Path, trust_kit: Path, port: int) -> bytes:
    """Open mutual TLS to the server with ``cert_kit``'s certificate; return the server's first bytes."""
    ctx = ssl.create_default_context(cafile=str(trust_kit / "startup" / "rootCA.pem"))
    ctx.load_cert_chain(str(cert_kit / "startup" / "client.crt"), str(cert_kit / "startup" / "client.key"))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("localhost", port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # gRPC is HTTP/2: the server answers with SETTINGS
            try:
                return tls.recv(64)
            except (ssl.SSLError, ConnectionError):
                return b""


@pytest.mark.e2e
def test_server_refuses_certificates_of_another_root_ca(server_with_one_hospital, kits, foreign_kits, port):
    # Even a client that trusts our server (it has our rootCA.pem) is refused with a foreign certificate.
    assert _tls_hello(kits.clients["hospital-a"], kits.server, port) != b""
    assert _tls_hello(foreign_kits.clients["hospital-a"], kits.server, port) == b""
    assert _tls_hello(foreign_kits.admins[ADMIN], kits.server, port) == b""


@pytest.mark.e2e
def test_client_kit_from_another_provisioning_cannot_join(server_with_one_hospital, foreign_kits):
    fed = server_with_one_hospital
    intruder = foreign_kits.clients["hospital-a"]
    fed.start_kit(intruder)  # its own start.sh, pointed at our server (same name and port)
    wait_until(
        lambda: "CERTIFICATE_VERIFY_FAILED" in (intruder / "console.txt").read_text(errors="replace"),
        timeout=60,
        what="the foreign hospital-a to fail its TLS handshake",
    )
    assert fed.connected_clients() == {"hospital-b"}
    status = fed.session.check_status("client")
    assert [c["client_name"] for c in status["client_status"]] == ["hospital-b"]
    server_log = (fed.kits.server / "log.txt").read_text()
    assert "SSL hospital-b]" in server_log and "SSL hospital-a]" not in server_log
    # Never connected, `shutdown all` cannot reach it: the fixture's stop would wait out its whole timeout.
    assert fed.kill_kit(intruder)


@pytest.mark.e2e
def test_admin_without_a_valid_kit_cannot_connect(server_with_one_hospital, kits, foreign_kits, tmp_path):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    def refused(username: str, kit: Path) -> bool:
        try:
            session = new_secure_session(username, str(kit), timeout=5)
        except Exception:
            return True
        session.close()
        return False

    assert not refused(ADMIN, kits.admins[ADMIN])  # the genuine kit works
    assert refused(ADMIN, foreign_kits.admins[ADMIN])  # another root CA
    assert refused(ADMIN, kits.admins["admin@hospital-a.org"])  # someone else's certificate
    keyless = tmp_path / "keyless"
    shutil.copytree(kits.admins[ADMIN], keyless)
    (keyless / "startup" / "client.key").unlink()
    assert refused(ADMIN, keyless)  # a kit without its private key
