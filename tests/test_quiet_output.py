"""Quiet, honest output: no command of ours tells a site to install something it does not need.

Each check runs a fresh interpreter, as a user's command or a FLARE job process would: bitsandbytes logs
its CPU-kernel advice once, at import time.
"""

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

KERNELS_ADVICE = "pip install kernels"


def run_python(*args: str, stdout_only: bool = False) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "custom")}
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout if stdout_only else done.stdout + done.stderr


def bitsandbytes_gives_the_advice() -> bool:
    """Whether this CPU makes bitsandbytes look for the optional fused kernel (AVX512-BF16)."""
    out = run_python("-c", "from bitsandbytes.functional import has_avx512bf16; print(bool(has_avx512bf16()))", stdout_only=True)
    return out.strip() == "True"


def test_peft_alone_gives_the_advice_on_this_cpu():
    """The control: without our package the advice shows, so the checks below can fail."""
    if not bitsandbytes_gives_the_advice():
        pytest.skip("this CPU has no AVX512-BF16; bitsandbytes does not look for the kernel here")
    assert KERNELS_ADVICE in run_python("-c", "import peft")


def test_model_loading_and_clis_do_not_advise_installing_kernels():
    assert KERNELS_ADVICE not in run_python("-c", "import hospital_fedlora.site.model_loading")
    assert KERNELS_ADVICE not in run_python("-m", "hospital_fedlora_tools.demo", "--help")
    assert KERNELS_ADVICE not in run_python("-m", "hospital_fedlora.deploy.kits", "--help")


def test_other_bitsandbytes_warnings_still_show():
    out = run_python(
        "-c",
        "import logging, hospital_fedlora.site.model_loading; "
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another bitsandbytes warning'); "
        "logging.getLogger('bitsandbytes.cextension').warning('a library warning')",
    )
    assert "another bitsandbytes warning" in out
    assert "a library warning" in out
    assert KERNELS_ADVICE not in out
