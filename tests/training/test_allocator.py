"""keep_freed_memory: large freed blocks are reused instead of faulted in again (glibc only)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from lorakit.training.config import TrainConfig

PROBE = """
import ctypes, resource, sys
from lorakit.training.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
faults = []
for _ in range(4):  # what a training step does with its activations: allocate, write, free, again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""


def probe(mode: str) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    kept, *faults = out.split()
    return kept, [int(f) for f in faults]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning exists for glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    pages = (64 << 20) // 4096
    _, plain = probe("plain")
    kept, tuned = probe("keep")
    assert kept == "True"
    assert min(plain[1:]) > pages // 2  # glibc's default: every 64 MiB block is a fresh mmap, faulted in again
    assert max(tuned[1:]) < pages // 20  # kept: the second and later blocks reuse the first one's pages


def test_the_trainer_setting_defaults_on_and_the_flag_turns_it_off():
    from lorakit.cli import build_parser

    assert TrainConfig(output="x").keep_freed_memory is True
    args = build_parser().parse_args(["train", "--no-keep-freed-memory", "--output", "x"])
    assert args.keep_freed_memory is False
    assert TrainConfig.from_sources(None, {"output": "x", "keep_freed_memory": False}).keep_freed_memory is False
