"""platform.keep_freed_memory: glibc malloc kept to one arena that never unmaps or trims.

Each check runs in a fresh interpreter, with and without the settings, and reads glibc's
own accounts (mallinfo2, malloc_info): a 256 MiB block comes from the heap, not mmap, and
stays there when freed; threads that start allocating get no arenas of their own.
"""

import ctypes
import json
import os
import pathlib
import subprocess
import sys

import pytest

from ddpm import platform, xla_cpu

REPO = pathlib.Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33"
)

PROBE = r"""
import ctypes, json, os, sys, tempfile, threading
sys.path.insert(0, sys.argv[1])
from ddpm import platform

applied = platform.keep_freed_memory() if sys.argv[2] == "1" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


libc.mallinfo2.restype = Mallinfo2


def arenas():
    path = os.path.join(tempfile.mkdtemp(), "info.xml")
    stream = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    return open(path).read().count("<heap nr=")


big = 256 << 20
mmapped_before = libc.mallinfo2().hblkhd
block = libc.malloc(big)
mmapped = libc.mallinfo2().hblkhd - mmapped_before
libc.free(block)
heap_after_free = libc.mallinfo2().arena

before = arenas()
blocks, ready, done = [], threading.Barrier(5), threading.Event()


def allocate():
    blocks.append(libc.malloc(1 << 20))
    ready.wait()
    done.wait()


threads = [threading.Thread(target=allocate) for _ in range(4)]
for thread in threads:
    thread.start()
ready.wait()
after = arenas()
done.set()
for thread in threads:
    thread.join()
print(json.dumps(dict(applied=applied, mmapped=mmapped, heap_after_free=heap_after_free,
                      new_arenas=after - before, big=big)))
"""


def probe(apply: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO), "1" if apply else "0"],
        env=env, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
@pytest.mark.skipif(xla_cpu.accelerator_present(), reason="left alone on accelerators")
def test_one_arena_that_neither_unmaps_nor_trims():
    default, kept = probe(False), probe(True)
    # glibc's defaults, which the settings change: a big block is mmap'd (and unmapped
    # when freed), and each new allocating thread gets an arena of its own.
    assert default["mmapped"] >= default["big"] and default["new_arenas"] >= 1
    assert default["heap_after_free"] < default["big"]
    assert kept["applied"]
    assert kept["mmapped"] == 0  # from the heap,
    assert kept["heap_after_free"] >= kept["big"]  # kept there once freed,
    assert kept["new_arenas"] == 0  # and shared by the new threads


def test_user_settings_and_accelerators_are_left_alone(monkeypatch):
    # Both return before calling mallopt, so this process's malloc is not touched.
    assert not platform.keep_freed_memory({"MALLOC_ARENA_MAX": "4"})
    monkeypatch.setattr(xla_cpu, "nvidia_gpu_present", lambda: True)
    assert not platform.keep_freed_memory({})
