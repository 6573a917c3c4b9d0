"""Provisioning builder: one BFV key set per provisioning workspace, written into every participant's startup kit.

In ``provisioning/project.yml``, after ``CertBuilder`` and before ``SignatureBuilder``::

    - path: hospital_fedlora.bfv_builder.BFVContextBuilder
      args:
        poly_modulus_degree: 4096   # optional, 4096 or 8192
        plain_modulus_bits: 58      # optional, 20..60

What it writes (file names in ``hospital_fedlora.packed_bfv``):

* server: ``startup/server_bfv_context.tenseal``, the encryption parameters and the key id only. With
  symmetric BFV the server needs no key to add ciphertexts, so it gets none: no secret key, no public
  key, no evaluation keys. It cannot encrypt or decrypt.
* every client: ``startup/client_bfv_context.tenseal``, the same parameters with the one secret key all
  hospitals share (mode 0600).
* admin kits: nothing.

Key state. Like ``CertBuilder`` keeps the root CA in the provisioning workspace's ``state/`` folder, this
builder keeps the key set (secret key included, mode 0600) in ``<workspace>/<project>/state/bfv_context.tenseal``
and reuses it on every later provisioning into that workspace, so adding a hospital does not invalidate the
kits already handed out. The file's header records the parameters it was made with; if ``args`` no longer
match them, provisioning stops and says to either restore the args or rotate. Rotating the keys = deleting
that file and provisioning again (every hospital and the server then need their new kit).

Signing. NVFlare's ``SignatureBuilder`` signs a kit's ``startup/`` and ``local/`` folders only when it
finds one of *its* context names there (``server_context.tenseal`` / ``client_context.tenseal``, written
by NVFlare's CKKS ``HEBuilder``); it does not know ours. So ``finalize`` (which runs after every
builder's ``build``, SignatureBuilder's included) checks each kit we wrote to: if ``startup/signature.json``
is missing or does not cover our file, it signs ``startup/`` and ``local/`` exactly the way
SignatureBuilder signs HE kits (root CA key, ``signature.json``). With NVFlare's ``HEBuilder`` in the
same project (CKKS kept for comparison) SignatureBuilder has already covered our file and nothing is
re-signed. At run time FLARE's ``SecurityContentService`` verifies the file against ``rootCA.pem``.

Provisioning also refuses parameters that leave too little noise room for the number of clients in
``project.yml`` (jobs check their own ``max_sites`` again when they start, see ``packed_bfv.plan_lanes``).
"""

from __future__ import annotations

import json
import os

from nvflare.lighter.constants import CtxKey, ProvFileName
from nvflare.lighter.spec import Builder, Project, ProvisionContext
from nvflare.lighter.utils import sign_folders
from pydantic import ValidationError

from .packed_bfv import (
    CLIENT_CONTEXT_FILE,
    SERVER_CONTEXT_FILE,
    BFVContext,
    BFVParams,
    PackingSettings,
    batching_prime,
    load_context_file,
    make_context,
    plan_lanes,
    serialize_context,
)


STATE_FILE = "bfv_context.tenseal"


class BFVContextBuilder(Builder):
    def __init__(self, poly_modulus_degree: int = 4096, plain_modulus_bits: int = 58):
        try:
            self.params = BFVParams(poly_modulus_degree=poly_modulus_degree, plain_modulus_bits=plain_modulus_bits)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})" for e in err.errors())
            raise ValueError(
                f"project.yml, builder hospital_fedlora.bfv_builder.BFVContextBuilder, args: {problems}"
            ) from None
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
