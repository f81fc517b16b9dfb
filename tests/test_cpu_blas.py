"""``import lorakit`` picks MKL's ``AUTO`` branch on AMD CPUs, and only where nobody chose otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lorakit import cpu_blas

AMD, INTEL = "AuthenticAMD", "GenuineIntel"


@pytest.mark.parametrize("off", ["0", "off", "OFF", " false ", "no"])
def test_opt_out_wins(off):
    value, why = cpu_blas.decide({cpu_blas.OPT_OUT: off}, AMD, True)
    assert value is None and cpu_blas.OPT_OUT in why


def test_a_value_in_the_environment_is_kept():
    value, why = cpu_blas.decide({"MKL_CBWR": "COMPATIBLE"}, AMD, True)
    assert value is None and "MKL_CBWR=COMPATIBLE kept" in why


def test_only_amd_with_mkl_gets_auto():
    assert cpu_blas.decide({}, AMD, True)[0] == "AUTO"
    assert cpu_blas.decide({cpu_blas.OPT_OUT: "1"}, AMD, True)[0] == "AUTO"  # only the off words opt out
    value, why = cpu_blas.decide({}, INTEL, True)
    assert value is None and INTEL in why
    value, why = cpu_blas.decide({}, "", True)
    assert value is None and "unknown" in why
    value, why = cpu_blas.decide({}, AMD, False)
    assert value is None and "not built with MKL" in why


def _fresh(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (MKL reads its setting once per process); it prints one JSON line."""
    full = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", cpu_blas.OPT_OUT)} | env
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = """
import json, os
{before}
import torch
import lorakit
from lorakit import cpu_blas
torch.mm(torch.ones(8, 8), torch.ones(8, 8))
print(json.dumps({{"env": os.environ.get("MKL_CBWR"), "branch": cpu_blas.mkl_branch(), "why": cpu_blas.decision}}))
"""


def test_import_sets_what_decide_says_for_this_machine():
    expected, _ = cpu_blas.decide({}, cpu_blas.cpu_vendor(), torch.backends.mkl.is_available())
    got = _fresh(PROBE.format(before=""))
    assert got["env"] == expected
    if expected == "AUTO" and got["branch"] is not None:
        assert got["branch"] == "AUTO"  # MKL really runs the branch, not just the variable being set


def test_opt_out_and_own_value_reach_mkl():
    got = _fresh(PROBE.format(before=""), **{cpu_blas.OPT_OUT: "0"})
    assert got["env"] is None and cpu_blas.OPT_OUT in got["why"]
    if got["branch"] is not None:
        assert got["branch"] == "off"
    got = _fresh(PROBE.format(before=""), MKL_CBWR="AVX2")
    assert got["env"] == "AVX2" and "kept" in got["why"]


def test_too_late_after_a_product_and_mkl_branch_says_so():
    if cpu_blas.decide({}, cpu_blas.cpu_vendor(), torch.backends.mkl.is_available())[0] is None:
        pytest.skip("lorakit sets nothing on this machine")
    before = "import torch\ntorch.mm(torch.ones(8, 8), torch.ones(8, 8))"
    got = _fresh(PROBE.format(before=before))
    if got["branch"] is None:
        pytest.skip("MKL's branch cannot be read from this PyTorch build")
    assert got["env"] == "AUTO" and got["branch"] == "off"  # MKL had already chosen: the log shows the truth
