"""BFVContextBuilder through a real `nvflare provision`: who gets which key, that the files are signed, and
that the key set stays with the provisioning workspace (kept in its state folder) until rotated."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nvflare.fuel.sec.security_content_service import LoadResult, SecurityContentManager
from nvflare.lighter.ctx import ProvisionContext
from nvflare.lighter.provision import prepare_project

from hospital_fedlora.deploy.bfv_builder import STATE_FILE, BFVContextBuilder
from hospital_fedlora.he.bfv_context import (
    CLIENT_CONTEXT_FILE,
    SERVER_CONTEXT_FILE,
    MissingSecretKeyError,
    load_context_file,
)
from hospital_fedlora.he.encoding import PackingSettings, plan_lanes
from hospital_fedlora.he.packed_bfv import add_encrypted, decrypt_ints, encrypt_ints

NVFLARE = shutil.which("nvflare", path=str(Path(sys.executable).parent)) or shutil.which("nvflare")

PARTICIPANTS = """
participants:
  - name: localhost
    type: server
    org: consortium
    fed_learn_port: 8002
    admin_port: 8002
  - name: hospital-a
    type: client
    org: hospital_a
  - name: hospital-b
    type: client
    org: hospital_b
  - name: admin@consortium.org
    type: admin
    org: consortium
    role: project_admin
"""

HEAD = """
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
    args:
      template_file: master_template.yml
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args:
      config_folder: config
  - path: nvflare.lighter.impl.cert.CertBuilder
"""
OURS = """
  - path: hospital_fedlora.deploy.bfv_builder.BFVContextBuilder
    args:
      poly_modulus_degree: 4096
      plain_modulus_bits: 58
"""
CKKS = "\n  - path: nvflare.lighter.impl.he.HEBuilder\n"
SIGN = "\n  - path: nvflare.lighter.impl.signature.SignatureBuilder\n"


HOSPITAL_C = """
  - name: hospital-c
    type: client
    org: hospital_c
"""


def provision(tmp_path: Path, builders: str, participants: str = PARTICIPANTS) -> subprocess.CompletedProcess:
    (tmp_path / "project.yml").write_text(
        f"api_version: 3\nname: bfvtest\ndescription: test\n{participants}\nbuilders:{builders}"
    )
    return subprocess.run(
        # --force: provisioning again into an existing workspace, as admins do to add a hospital
        [NVFLARE, "provision", "-p", "project.yml", "-w", "ws", "--force"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def kits(tmp_path: Path, n: int = 0) -> Path:
    return tmp_path / "ws" / "bfvtest" / f"prod_{n:02d}"


def state_file(tmp_path: Path) -> Path:
    return tmp_path / "ws" / "bfvtest" / "state" / STATE_FILE


def client_context(prod: Path, site: str = "hospital-a"):
    return load_context_file(prod / site / "startup" / CLIENT_CONTEXT_FILE)


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    """The recommended order: ... CertBuilder, BFVContextBuilder, SignatureBuilder (no CKKS HEBuilder)."""
    tmp = tmp_path_factory.mktemp("prov")
    done = provision(tmp, HEAD + OURS + SIGN)
    assert done.returncode == 0, done.stdout + done.stderr
    return kits(tmp)


def test_server_kit_holds_no_secret_key_and_cannot_decrypt(provisioned):
    server = load_context_file(provisioned / "localhost" / "startup" / SERVER_CONTEXT_FILE)
    client = load_context_file(provisioned / "hospital-a" / "startup" / CLIENT_CONTEXT_FILE)
    assert not server.has_secret_key
    assert not (provisioned / "localhost" / "startup" / CLIENT_CONTEXT_FILE).exists()
    plan = plan_lanes(PackingSettings(bits=16, max_sites=2), server)
    chunks = encrypt_ints(client, torch.arange(-500, 500), plan)
    with pytest.raises(MissingSecretKeyError, match="cannot decrypt"):
        decrypt_ints(server, chunks, plan, 1000, 1)
    with pytest.raises(MissingSecretKeyError, match="cannot encrypt"):
        encrypt_ints(server, torch.arange(10), plan)


def test_clients_share_one_key_and_the_server_sums_their_ciphertexts(provisioned):
    server = load_context_file(provisioned / "localhost" / "startup" / SERVER_CONTEXT_FILE)
    a = load_context_file(provisioned / "hospital-a" / "startup" / CLIENT_CONTEXT_FILE)
    b = load_context_file(provisioned / "hospital-b" / "startup" / CLIENT_CONTEXT_FILE)
    assert a.has_secret_key and b.has_secret_key
    assert a.key_id == b.key_id == server.key_id
    plan = plan_lanes(PackingSettings(bits=8, max_sites=2), server)
    xa, xb = torch.arange(-127, 128), torch.arange(127, -128, -1) // 2
    agg = add_encrypted(server, [encrypt_ints(a, xa, plan), encrypt_ints(b, xb, plan)])
    assert torch.equal(decrypt_ints(b, agg, plan, 255, 2), xa + xb)
    assert oct((provisioned / "hospital-a" / "startup" / CLIENT_CONTEXT_FILE).stat().st_mode)[-3:] == "600"


def test_admin_kits_get_no_context(provisioned):
    assert not list((provisioned / "admin@consortium.org").rglob("*.tenseal"))


def test_context_files_are_signed_and_tampering_is_detected(provisioned):
    for site, name in [("localhost", SERVER_CONTEXT_FILE), ("hospital-a", CLIENT_CONTEXT_FILE)]:
        startup = provisioned / site / "startup"
        _, result = SecurityContentManager(str(startup)).load_content(name)
        assert result == LoadResult.OK, (site, result)
        assert (provisioned / site / "local" / "signature.json").is_file()
    startup = provisioned / "hospital-b" / "startup"
    path = startup / CLIENT_CONTEXT_FILE
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        _, result = SecurityContentManager(str(startup)).load_content(CLIENT_CONTEXT_FILE)
        assert result == LoadResult.INVALID_SIGNATURE
    finally:
        path.write_bytes(original)


def test_signed_next_to_nvflare_ckks_contexts_even_when_listed_after_signature_builder(tmp_path):
    """NVFlare's HEBuilder (CKKS, for comparison) and ours in one project, ours misplaced after signing."""
    done = provision(tmp_path, HEAD + CKKS + SIGN + OURS)
    assert done.returncode == 0, done.stdout + done.stderr
    startup = kits(tmp_path) / "hospital-a" / "startup"
    assert (startup / "client_context.tenseal").is_file() and (startup / CLIENT_CONTEXT_FILE).is_file()
    manager = SecurityContentManager(str(startup))
    for name in (CLIENT_CONTEXT_FILE, "client_context.tenseal"):
        assert manager.load_content(name)[1] == LoadResult.OK, name


def test_bad_builder_args_are_named_in_the_provision_output(tmp_path):
    done = provision(tmp_path, HEAD + OURS.replace("4096", "2048") + SIGN)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "BFVContextBuilder" in out and "poly_modulus_degree" in out
    assert not (kits(tmp_path) / "localhost").exists()


def test_noise_room_is_checked_against_the_projects_clients(tmp_path):
    project = prepare_project(
        {
            "api_version": 3,
            "name": "many",
            "description": "",
            "participants": [{"name": "localhost", "type": "server", "org": "o", "fed_learn_port": 8002}]
            + [{"name": f"site-{i}", "type": "client", "org": "o"} for i in range(33)],
        }
    )
    with pytest.raises(ValueError, match="BFVContextBuilder: max_sites=33 .*plain_modulus_bits <= 57"):
        BFVContextBuilder(plain_modulus_bits=58).initialize(project, ProvisionContext(str(tmp_path / "a"), project))
    BFVContextBuilder(plain_modulus_bits=57).initialize(project, ProvisionContext(str(tmp_path / "b"), project))


# ------------------------------------------------------------------------------ key state across runs
@pytest.fixture(scope="module")
def reprovisioned(tmp_path_factory):
    """One workspace provisioned twice: the second time with a third hospital added."""
    tmp = tmp_path_factory.mktemp("again")
    first = provision(tmp, HEAD + OURS + SIGN)
    assert first.returncode == 0, first.stdout + first.stderr
    second = provision(tmp, HEAD + OURS + SIGN, PARTICIPANTS + HOSPITAL_C)
    assert second.returncode == 0, second.stdout + second.stderr
    return tmp


def test_provisioning_again_in_the_same_workspace_keeps_the_key(reprovisioned):
    old, new = kits(reprovisioned, 0), kits(reprovisioned, 1)
    old_a, new_a, new_c = client_context(old), client_context(new), client_context(new, "hospital-c")
    server = load_context_file(new / "localhost" / "startup" / SERVER_CONTEXT_FILE)
    assert old_a.key_id == new_a.key_id == new_c.key_id == server.key_id
    assert load_context_file(state_file(reprovisioned)).key_id == old_a.key_id
    assert oct(state_file(reprovisioned).stat().st_mode)[-3:] == "600"
    # The new hospital's uploads, summed by the new server, open with a kit handed out the first time.
    plan = plan_lanes(PackingSettings(bits=16, max_sites=3), server)
    xa, xc = torch.arange(-1000, 1000), torch.arange(1000, -1000, -1) * 3
    agg = add_encrypted(server, [encrypt_ints(old_a, xa, plan), encrypt_ints(new_c, xc, plan)])
    assert torch.equal(decrypt_ints(old_a, agg, plan, 2000, 2), xa + xc)
    assert torch.equal(decrypt_ints(new_a, agg, plan, 2000, 2), xa + xc)


def test_another_workspace_gets_another_key(reprovisioned, provisioned):
    ours, theirs = client_context(kits(reprovisioned)), client_context(provisioned)
    assert ours.key_id != theirs.key_id
    plan = plan_lanes(PackingSettings(bits=8, max_sites=2), ours)
    with pytest.raises(ValueError, match="encrypted under key"):
        decrypt_ints(theirs, encrypt_ints(ours, torch.arange(10), plan), plan, 10, 1)


def test_changed_params_are_refused_until_the_keys_are_rotated(tmp_path):
    assert provision(tmp_path, HEAD + OURS + SIGN).returncode == 0
    state = state_file(tmp_path)
    kept = state.read_bytes()
    first = client_context(kits(tmp_path, 0))

    done = provision(tmp_path, HEAD + OURS.replace("4096", "8192") + SIGN)
    assert done.returncode != 0
    out = " ".join((done.stdout + done.stderr).split())
    assert "poly_modulus_degree: 8192, plain_modulus_bits: 58 differ" in out
    assert "set the args back to those values" in out and "poly_modulus_degree: 4096, plain_modulus_bits: 58" in out
    assert f"delete {state} and provision again" in out
    assert state.read_bytes() == kept

    state.unlink()  # rotation
    done = provision(tmp_path, HEAD + OURS.replace("4096", "8192") + SIGN)
    assert done.returncode == 0, done.stdout + done.stderr
    rotated = client_context(max((tmp_path / "ws" / "bfvtest").glob("prod_*")))
    assert rotated.key_id != first.key_id and rotated.poly_modulus_degree == 8192
    assert load_context_file(state).key_id == rotated.key_id
    plan = plan_lanes(PackingSettings(bits=8, max_sites=2), rotated)
    with pytest.raises(ValueError, match="encrypted under key"):
        decrypt_ints(first, encrypt_ints(rotated, torch.arange(10), plan), plan, 10, 1)
