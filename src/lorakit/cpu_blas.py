"""Pick MKL's faster matrix-product path on AMD CPUs, once, at ``import lorakit``.

A LoRA step runs six rank-r products per adapted layer next to each frozen GEMM: ``A xᵀ`` ``(r, N)``, the
rank-r update of the output, and four more in backward (see :mod:`lorakit.tuners.lora.fused`). On AMD CPUs the MKL
that PyTorch's CPU wheels link takes a slow route for these skinny shapes (r = 8 rows or columns against
hundreds of tokens). Measured on this project's 2-core AMD EPYC machines in eight pairs of fresh processes
(``python benchmarks/bench_blas.py --steps 0 --repeats 8``), summed over one SmolLM2-135M decoder layer at 512
tokens, with MKL's conditional-numerical-reproducibility mode set to ``AUTO`` (``MKL_CBWR=AUTO``) against MKL as
it comes: the 42 rank-8 products 0.72x as long (3.8 ms against 5.3 ms), the full-size GEMMs 1.01x, generation's
32-row GEMMs 0.83x and 1-row GEMMs 0.94x. Whole training steps (three pairs, noisy): lorakit 0.94x, PEFT 0.98x.

``AUTO`` asks MKL for the best code path of the CPU it runs on that also gives the same bits on every run with
the same number of threads; no accuracy is traded (it is the same arithmetic, in a fixed order).

MKL reads the setting once, at its first call in the process, so it is set here, at ``import lorakit``, and
only where it helps and nobody chose otherwise:

* PyTorch is built with MKL, the CPU is AMD's (``AuthenticAMD``: the only vendor it was measured on);
* ``MKL_CBWR`` is not already in the environment (yours wins);
* ``LORAKIT_MKL_CBWR`` is not ``0``/``off``/``false``/``no`` (the switch to leave MKL as it comes).

If a matrix product ran before ``import lorakit`` the setting cannot take effect any more;
:func:`mkl_branch` then reports MKL's own choice. ``lorakit train`` logs which one is in force. The variable
stays in ``os.environ``, so processes started from this one inherit it.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

#: MKL's conditional-reproducibility branch lorakit asks for on AMD CPUs.
BRANCH = "AUTO"
OPT_OUT = "LORAKIT_MKL_CBWR"
_OFF = {"0", "off", "false", "no"}
_MKL_CBWR_BRANCH = 1  # mkl_cbwr.h: query the branch
_BRANCH_NAMES = {0: "off", 1: "off", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 9: "AVX", 10: "AVX2", 11: "AVX512"}

#: What :func:`apply` decided at import (a short sentence, for logs).
decision = "not applied yet"


def cpu_vendor() -> str:
    """The ``vendor_id`` of the first CPU in ``/proc/cpuinfo`` (``"AuthenticAMD"``, ``"GenuineIntel"``), or ""."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def decide(env: dict[str, str], vendor: str, has_mkl: bool) -> tuple[str | None, str]:
    """``(value to set for MKL_CBWR or None, why)`` for an environment, a CPU vendor and an MKL build."""
    if env.get(OPT_OUT, "").strip().lower() in _OFF:
        return None, f"MKL left as it comes ({OPT_OUT}={env[OPT_OUT]})"
    if "MKL_CBWR" in env:
        return None, f"MKL_CBWR={env['MKL_CBWR']} kept (set in the environment)"
    if not has_mkl:
        return None, "PyTorch is not built with MKL: nothing to set"
    if vendor != "AuthenticAMD":
        return None, f"MKL left as it comes on a {vendor or 'unknown'} CPU (the faster path was measured on AMD)"
    return BRANCH, f"MKL_CBWR={BRANCH}: MKL's faster path for LoRA's rank-r products on this AMD CPU"


def apply() -> str:
    """Set ``MKL_CBWR`` per :func:`decide` for this process; returns (and stores in ``decision``) why."""
    global decision
    value, decision = decide(dict(os.environ), cpu_vendor(), torch.backends.mkl.is_available())
    if value is not None:
        os.environ["MKL_CBWR"] = value
    return decision


def mkl_branch() -> str | None:
    """The reproducibility branch MKL is using (``"AUTO"``, ``"off"``...), or None where it cannot be read.

    Reads MKL's service function from PyTorch's CPU library; asking does not initialise anything else.
    """
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        get = ctypes.CDLL(str(lib)).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
    code = get(_MKL_CBWR_BRANCH)
    return _BRANCH_NAMES.get(code, str(code))
