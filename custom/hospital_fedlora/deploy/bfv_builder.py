"""Provisioning builder: one BFV key set per provisioning workspace, written into every participant's kit."""

from __future__ import annotations

import json
import os

from nvflare.lighter.constants import CtxKey, ProvFileName
from nvflare.lighter.spec import Builder, Project, ProvisionContext
from nvflare.lighter.utils import sign_folders

from ..config import validate
from ..he.bfv_context import (
    CLIENT_CONTEXT_FILE,
    SERVER_CONTEXT_FILE,
    BFVContext,
    BFVParams,
    batching_prime,
    load_context_file,
    make_context,
    serialize_context,
)
from ..he.encoding import PackingSettings, plan_lanes

STATE_FILE = "bfv_context.tenseal"
BUILDER = "hospital_fedlora.deploy.bfv_builder.BFVContextBuilder"


class BFVContextBuilder(Builder):
    """Writes the BFV key files into the kits; in ``provisioning/project.yml`` after ``CertBuilder`` and
    before ``SignatureBuilder``.

    The server gets ``startup/server_bfv_context.tenseal`` (parameters and key id only: it can add
    ciphertexts, not encrypt or decrypt); every client gets ``startup/client_bfv_context.tenseal`` with the
    secret key all hospitals share (mode 0600); admin kits get nothing. The key set is kept in the
    provisioning workspace (``<workspace>/<project>/state/bfv_context.tenseal``, mode 0600) and reused by
    every later provisioning there, so adding a hospital leaves the kits already handed out valid;
    changed args are refused; deleting that file rotates the keys. Files we write are signed with the
    root CA as ``SignatureBuilder`` signs HE kits. Parameters that cannot sum every client of the project
    are refused. Details: ``docs/admin.md`` and ``docs/he.md``.

    Args:
        poly_modulus_degree: 4096 (default, smallest ciphertexts) or 8192.
        plain_modulus_bits: size of the batching prime, 20..60 (default 58).
    """

    def __init__(self, poly_modulus_degree: int = 4096, plain_modulus_bits: int = 58):
        raw = {"poly_modulus_degree": poly_modulus_degree, "plain_modulus_bits": plain_modulus_bits}
        self.params = validate(BFVParams, raw, f"project.yml, builder {BUILDER}, args", "docs/admin.md")
        self._context: BFVContext | None = None
        self._new_state: str | None = None  # state file to write in finalize, when the keys are new
        self._written: list[tuple[object, str]] = []

    def initialize(self, project: Project, ctx: ProvisionContext):
        n_clients = max(1, len(project.get_clients()))
        state = os.path.join(ctx.get_state_dir(), STATE_FILE)
        if os.path.exists(state):
            self._context = self._load_state(state)
            self._new_state = None
        else:
            self._context = make_context(self.params)
            self._new_state = state
        try:
            # The noise room must at least cover every client of this project contributing once.
            plan_lanes(PackingSettings(bits=8, max_sites=n_clients), self._context)
        except ValueError as err:
            raise ValueError(f"project.yml, BFVContextBuilder: {err}") from None
        self._written = []

    def _load_state(self, state: str) -> BFVContext:
        context = load_context_file(state)
        if not context.has_secret_key:
            raise ValueError(f"{state}: holds no secret key; it is damaged. Restore it from a backup, or rotate the BFV keys")
        stored = (context.poly_modulus_degree, context.plain_modulus.bit_length())
        wanted = (self.params.poly_modulus_degree, self.params.plain_modulus_bits)
        if (context.poly_modulus_degree, context.plain_modulus) != (wanted[0], batching_prime(wanted[1], wanted[0])):
            raise ValueError(
                f"project.yml, BFVContextBuilder args poly_modulus_degree: {wanted[0]}, plain_modulus_bits: {wanted[1]} "
                f"differ from the BFV keys this workspace already handed out ({state}: poly_modulus_degree: "
                f"{stored[0]}, plain_modulus_bits: {stored[1]}). Either set the args back to those values to keep "
                f"the existing kits valid, or rotate the keys: delete {state} and provision again, then hand every "
                "hospital and the server its new kit"
            )
        return context

    def build(self, project: Project, ctx: ProvisionContext):
        assert self._context is not None, "initialize() runs before build()"
        server = project.get_server()
        if server:
            self._write(ctx, server, SERVER_CONTEXT_FILE, serialize_context(self._context, secret=False), 0o644)
        client_bytes = serialize_context(self._context, secret=True)
        for client in project.get_clients():
            self._write(ctx, client, CLIENT_CONTEXT_FILE, client_bytes, 0o600)
        origin = "new, kept in the workspace state" if self._new_state else "reused from the workspace state"
        ctx.info(
            f"BFVContextBuilder: key {self._context.key_id} ({origin}; poly_modulus_degree {self.params.poly_modulus_degree}, "
            f"plain modulus {self._context.plain_modulus}) written to {len(self._written)} kits"
        )

    def _write(self, ctx: ProvisionContext, participant, name: str, data: bytes, mode: int) -> None:
        _write_file(os.path.join(ctx.get_kit_dir(participant), name), data, mode)
        self._written.append((participant, name))

    def finalize(self, project: Project, ctx: ProvisionContext):
        root_key = ctx.get(CtxKey.ROOT_PRI_KEY)
        for participant, name in self._written:
            kit_dir = ctx.get_kit_dir(participant)
            if _signed(kit_dir, name):
                continue
            if not root_key:
                raise RuntimeError(
                    f"BFVContextBuilder: cannot sign {name} for {participant.name}: no root CA key "
                    "(put nvflare.lighter.impl.cert.CertBuilder before this builder in project.yml)"
                )
            sign_folders(kit_dir, root_key, signature_file=ProvFileName.SIGNATURE_JSON)
            sign_folders(ctx.get_local_dir(participant), root_key, signature_file=ProvFileName.SIGNATURE_JSON)
        if self._new_state:
            # Written last, so a failed provisioning leaves no key set that no kit holds.
            _write_private(self._new_state, serialize_context(self._context, secret=True))
        self._context = None  # the secret key lives on in the client kits and the workspace state only


def _write_file(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # O_CREAT's mode does not apply to a file that already exists
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_private(path: str, data: bytes) -> None:
    # Via a temporary name: an interrupted write must not leave a truncated key set to be reused.
    tmp = f"{path}.tmp"
    _write_file(tmp, data, 0o600)
    os.replace(tmp, path)


def _signed(kit_dir: str, name: str) -> bool:
    sig = os.path.join(kit_dir, ProvFileName.SIGNATURE_JSON)
    if not os.path.isfile(sig):
        return False
    with open(sig) as f:
        return name in json.load(f)
