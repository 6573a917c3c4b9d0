"""BFVContextBuilder through a real `nvflare provision`: who gets which key, and that the files are signed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nvflare.fuel.sec.security_content_service import LoadResult, SecurityContentManager
from nvflare.lighter.provision import prepare_project

from hospital_fedlora.bfv_builder import BFVContextBuilder
from hospital_fedlora.packed_bfv import (
    CLIENT_CONTEXT_FILE,
    SERVER_CONTEXT_FILE,
    MissingSecretKeyError,
    PackingSettings,
    add_encrypted,
    decrypt_ints,
    encrypt_ints,
    load_context_file,
    plan_lanes,
)

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
  - path: hospital_fedlora.bfv_builder.BFVContextBuilder
    args:
      poly_modulus_degree: 4096
      plain_modulus_bits: 58
"""
CKKS = "\n  - path: nvflare.lighter.impl.he.HEBuilder\n"
SIGN = "\n  - path: nvflare.lighter.impl.signature.SignatureBuilder\n"


def provision(tmp_path: Path, builders: str) -> subprocess.CompletedProcess:
    (tmp_path / "project.yml").write_text(
        f"api_version: 3\nname: bfvtest\ndescription: test\n{PARTICIPANTS}\nbuilders:{builders}"
    )
    return subprocess.run(
        [NVFLARE, "provision", "-p", "project.yml", "-w", "ws"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def kits(tmp_path: Path) -> Path:
    return tmp_path / "ws" / "bfvtest" / "prod_00"


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


def test_noise_room_is_checked_against_the_projects_clients():
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
        BFVContextBuilder(plain_modulus_bits=58).initialize(project, None)
    BFVContextBuilder(plain_modulus_bits=57).initialize(project, None)
