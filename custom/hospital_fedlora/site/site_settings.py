"""This hospital's own settings for components other than the executor (the encrypted job's filters).

The executor reads the whole site config when the job starts; a filter that enforces a hospital-owned
setting reads it here, from the same file (``find_site_config``), so no job argument can change it.
"""

from __future__ import annotations

import os
from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from ..config import ConfigError, PrivacySettings, load_site_config

SITE_CONFIG_FILE = "site_config.yaml"
SITE_CONFIGS_ENV = "HOSPITAL_FEDLORA_SITE_CONFIGS"


def find_site_config(site_root: Path, site: str) -> Path:
    """The kit's own copy wins; the environment variable serves the simulator and POC."""
    candidates = [site_root / "local" / SITE_CONFIG_FILE]
    if os.environ.get(SITE_CONFIGS_ENV):
        candidates.append(Path(os.environ[SITE_CONFIGS_ENV]) / f"{site}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(
        f"no site config for {site!r} (looked in: {tried}); hospital IT places site_configs/{site}.yaml "
        f"in the kit as local/{SITE_CONFIG_FILE}"
    )


def site_privacy(fl_ctx: FLContext) -> tuple[PrivacySettings, str]:
    """This site's ``privacy`` settings and the file they came from; the defaults, said so, when this process
    has no site config (component tests; at a hospital the executor refuses every task without one)."""
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
