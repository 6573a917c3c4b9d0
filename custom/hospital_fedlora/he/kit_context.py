"""Load a participant's BFV context from its startup kit, with FLARE's signature check.

In a FLARE job process the kit's ``startup/`` is FLARE's signed content folder, so the file is read
through ``SecurityContentService``: in secure mode an unsigned or altered file is refused, as FLARE does
for its own HE contexts. An explicit path is read as it is, unchecked: only the server's key-less context
takes one (``EncryptedSumAggregator``'s ``context_file``); a hospital's secret key is always the kit's
(``site_key.SiteEncryption`` refuses a job that names a file).
"""

from __future__ import annotations

import os
from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.fuel.sec.security_content_service import LoadResult, SecurityContentService

from .bfv_context import BFVContext, load_context, load_context_file


def startup_dir(fl_ctx: FLContext) -> Path:
    workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
    if workspace is None:
        engine = fl_ctx.get_engine()
        if engine is None:
            raise RuntimeError("no FLARE workspace in this context; pass the context file path explicitly")
        workspace = engine.get_workspace()
    return Path(workspace.get_startup_kit_dir())


def load_kit_context(fl_ctx: FLContext, file_name: str, path: str = "") -> tuple[BFVContext, str]:
    """The BFV context in ``startup/<file_name>`` (or at ``path``), and how its origin was checked (for the
    log). Errors name the participant and the file."""
    who = fl_ctx.get_identity_name() or "this participant"
    if path:
        try:
            return load_context_file(path), f"{path}, given explicitly (no kit signature check)"
        except (OSError, ValueError) as err:
            raise ValueError(f"{who}: {err}") from None
    folder = startup_dir(fl_ctx)
    full = folder / file_name
    if not full.is_file():
        raise FileNotFoundError(
            f"{who}: {full} not found. The BFV key file is written into startup/ by provisioning with "
            "hospital_fedlora.deploy.bfv_builder.BFVContextBuilder in project.yml: re-provision and redistribute the kits"
        )
    data, rc = None, LoadResult.NOT_MANAGED
    manager = SecurityContentService.security_content_manager
    if manager is not None and os.path.realpath(manager.content_folder) == os.path.realpath(folder):
        data, rc = SecurityContentService.load_content(file_name)
    secure = fl_ctx.get_prop(FLContextKey.SECURE_MODE, False)
    if rc == LoadResult.INVALID_SIGNATURE or (secure and rc == LoadResult.NOT_SIGNED):
        raise ValueError(
            f"{who}: {full} fails the kit's signature check ({rc.value}); the file was replaced or altered "
            "after provisioning: restore it from the original startup kit"
        )
    checked = "kit signature verified" if rc == LoadResult.OK else f"kit signature not checked ({rc.value})"
    if data is None:
        data = full.read_bytes()
    return load_context(data, source=f"{who}: {full}"), f"{full}, {checked}"
