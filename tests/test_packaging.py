"""What a hospital installs: the wheel holds the FLARE components only, and nothing in them finds files
relative to where the package is installed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from nvflare.apis.dxo import MetaKey

from hospital_fedlora.protocol import Meta

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "custom" / "hospital_fedlora"


def test_the_wheel_holds_the_package_and_not_the_tools(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("hospital_fedlora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if not n.startswith("hospital_fedlora-")]
    assert code and all(n.startswith("hospital_fedlora/") for n in code), code
    for room in ("site", "server", "he", "deploy"):
        assert f"hospital_fedlora/{room}/__init__.py" in names
    assert not any("tools" in n or "synthetic_notes" in n or "base_model" in n for n in names)


def test_no_module_finds_files_relative_to_its_install_path():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "__file__" not in text and ".parents[" not in text, path


def test_the_example_count_travels_under_flares_own_weight_key():
    assert Meta.EXAMPLE_COUNT == MetaKey.NUM_STEPS_CURRENT_ROUND
