"""This hospital's own settings for components other than the executor (the encrypted job's filters).

The executor reads the whole site config when the job starts; a filter that enforces a hospital-owned
setting reads it here, from the same file (``executor.find_site_config``), so no job argument can change it.
"""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from ..config import ConfigError, PrivacySettings, load_site_config


def site_privacy(fl_ctx: FLContext) -> tuple[PrivacySettings, str]:
    """This site's ``privacy`` settings and the file they came from; the defaults, said so, when this process
    has no site config (component tests; at a hospital the executor refuses every task without one)."""
    from .executor import find_site_config  # the executor's lookup, imported late: it pulls in the trainer

    site = fl_ctx.get_identity_name() or ""
    workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
    if workspace is None and fl_ctx.get_engine() is not None:
        workspace = fl_ctx.get_engine().get_workspace()
    root = Path(workspace.get_root_dir()) if workspace is not None else Path("/nonexistent")
    try:
        path = find_site_config(root, site)
    except ConfigError:
        return PrivacySettings(), "defaults: no site config found"
    return load_site_config(path, expected_site=site).privacy, str(path)
