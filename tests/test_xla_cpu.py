"""ddpm.xla_cpu: the XLA flag that importing ddpm sets, the restart with huge pages, and
when each stays out."""

import json
import os
import pathlib
import platform as platform_module
import subprocess
import sys
import textwrap

import pytest

from ddpm import xla_cpu

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def measured(monkeypatch):
    """This jaxlib counts as measured, JAX has not started, and the machine has no GPU or
    TPU."""
    version = xla_cpu.importlib.metadata.version("jaxlib")
    monkeypatch.setattr(xla_cpu, "MEASURED_JAXLIB", (version,))
    monkeypatch.setattr(xla_cpu, "_backends_started", lambda: False)
    monkeypatch.setattr(xla_cpu, "accelerator_present", lambda: False)


BOTH = [xla_cpu.CONVOLUTIONS, xla_cpu.LLVM_LEVEL]


def test_flags_are_added_to_the_users_flags(measured):
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_cpu.set_xla_flags(environ) == BOTH
    assert environ["XLA_FLAGS"] == " ".join(["--xla_force_host_platform_device_count=2", *BOTH])
    environ = {}
    assert xla_cpu.set_xla_flags(environ) == BOTH
    assert environ["XLA_FLAGS"] == " ".join(BOTH)


def test_a_gpu_or_tpu_machine_keeps_xlas_llvm_level(measured, monkeypatch):
    monkeypatch.setattr(xla_cpu, "accelerator_present", lambda: True)
    environ = {}
    assert xla_cpu.set_xla_flags(environ) == [xla_cpu.CONVOLUTIONS]
    assert environ["XLA_FLAGS"] == xla_cpu.CONVOLUTIONS


@pytest.mark.parametrize(
    "own", ["--xla_cpu_experimental_ynn_fusion_type=dot", "--xla_backend_optimization_level=0"]
)
def test_users_choice_of_a_flag_wins(measured, own):
    environ = {"XLA_FLAGS": own}
    other = [flag for flag in BOTH if flag.split("=")[0] not in own]
    assert xla_cpu.set_xla_flags(environ) == other and len(other) == 1
    assert environ == {"XLA_FLAGS": f"{own} {other[0]}"}
    assert xla_cpu.set_xla_flags(environ) == []  # both set now


def test_unmeasured_jaxlib_is_left_alone(measured, monkeypatch):
    monkeypatch.setattr(xla_cpu, "MEASURED_JAXLIB", ("0.0.",))
    environ = {}
    assert xla_cpu.set_xla_flags(environ) == []
    assert environ == {}

    def no_metadata(name):
        raise xla_cpu.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(xla_cpu.importlib.metadata, "version", no_metadata)
    assert xla_cpu.set_xla_flags(environ) == []
    assert environ == {}


def test_too_late_once_jax_has_started(measured, monkeypatch):
    monkeypatch.setattr(xla_cpu, "_backends_started", lambda: True)
    warnings = []
    monkeypatch.setattr(xla_cpu.logging, "warning", lambda *args: warnings.append(args))
    environ = {}
    assert xla_cpu.set_xla_flags(environ) == []
    assert environ == {} and "import ddpm first" in warnings[0][0]


CHECK = """
import os
{before}
import ddpm
import jax, jax.numpy as jnp
dims = ("NHWC", "HWIO", "NHWC")
conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dims)
x, k = jnp.ones((8, 32, 32, 128)), jnp.ones((3, 3, 128, 128))  # YNNPACK takes only larger convs
text = jax.jit(conv).lower(x, k).compile().as_text()
print(os.environ.get("XLA_FLAGS", ""))
print("ynn convolution" if "__ynn_fusion" in text else "xla convolution")
"""


@pytest.mark.parametrize("jax_first", [False, True])
def test_importing_ddpm_takes_convolutions_from_ynnpack(jax_first):
    """In a fresh process: XLA compiles a convolution without YNNPACK once ddpm is imported
    first; started before, JAX keeps YNNPACK's. (The flags are only set for measured
    jaxlibs, the LLVM level only without a GPU or TPU.)"""
    if not xla_cpu.importlib.metadata.version("jaxlib").startswith(xla_cpu.MEASURED_JAXLIB):
        pytest.skip("this jaxlib is not one that xla_cpu sets the flag for")
    before = "import jax; jax.devices()" if jax_first else ""
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHECK.format(before=before))],
        env=environ, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    if jax_first:
        assert out == ["", "ynn convolution"]
    else:
        flags = BOTH if not xla_cpu.accelerator_present() else [xla_cpu.CONVOLUTIONS]
        assert out == [" ".join(flags), "xla convolution"]


@pytest.fixture
def huge_pages_possible(monkeypatch):
    """A CPU-only machine with glibc 2.36 and transparent huge pages on request."""
    monkeypatch.setattr(xla_cpu, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(xla_cpu, "_huge_pages_possible", lambda: True)
    monkeypatch.setattr(xla_cpu, "nvidia_gpu_present", lambda: False)
    monkeypatch.setattr(xla_cpu, "tpu_present", lambda: False)


def test_huge_pages_join_the_users_tunables(huge_pages_possible):
    assert xla_cpu.huge_page_environ({"HOME": "/h"}) == {
        "HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"
    }  # fmt: skip
    own = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert xla_cpu.huge_page_environ(own) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    }
    assert own == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}  # a copy; this one unchanged


def test_huge_pages_left_alone(huge_pages_possible, monkeypatch):
    assert xla_cpu.huge_page_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    for name, value in [
        ("_glibc_version", (2, 34)),  # no hugetlb tunable before 2.35
        ("_glibc_version", ()),  # musl
        ("_huge_pages_possible", False),
        ("nvidia_gpu_present", True),
        ("tpu_present", True),
    ]:
        with monkeypatch.context() as m:
            m.setattr(xla_cpu, name, lambda value=value: value)
            assert xla_cpu.huge_page_environ({}) is None, name


def test_glibc_version_and_kernel_setting_are_read(tmp_path, monkeypatch):
    libc, version = platform_module.libc_ver()
    expected = tuple(int(part) for part in version.split(".")) if libc == "glibc" else ()
    assert xla_cpu._glibc_version() == expected
    setting = tmp_path / "enabled"
    monkeypatch.setattr(xla_cpu, "THP_SETTING", str(setting))
    assert not xla_cpu._huge_pages_possible()  # no such file: a kernel without THP
    for text, possible in [
        ("always [madvise] never\n", True),
        ("[always] madvise never\n", True),
        ("always madvise [never]\n", False),
    ]:
        setting.write_text(text)
        assert xla_cpu._huge_pages_possible() == possible


RESTART = """
import ctypes, json, os, sys
print("started", os.getpid(), flush=True)
sys.path.insert(0, sys.argv[1])
from ddpm import xla_cpu
xla_cpu.restart_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
block = libc.malloc(64 << 20)  # above glibc's mmap threshold: a mapping of its own
eligible = None
for line in open("/proc/self/smaps"):
    if "-" in line.split()[0] and ":" not in line.split()[0]:
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        inside = start <= block < end
    elif inside and line.startswith("THPeligible:"):
        eligible = int(line.split()[1])
print(json.dumps(dict(pid=os.getpid(), argv=sys.argv[2:], eligible=eligible,
                      tunables=os.environ.get("GLIBC_TUNABLES"))))
"""


@pytest.mark.parametrize("tunables", [None, "glibc.malloc.hugetlb=0"])
def test_restart_with_huge_pages(tunables):
    """In a fresh process: the restart keeps the pid and the arguments, and glibc then
    maps a large malloc block as eligible for huge pages; a user's hugetlb=0 keeps it out."""
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    environ.update({"GLIBC_TUNABLES": tunables} if tunables else {})
    out = subprocess.run(
        [sys.executable, "-c", RESTART, str(REPO), "--an=argument"],
        env=environ, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    result = json.loads(out[-1])
    restarts = xla_cpu.huge_page_environ(environ) is not None
    assert out[:-1] == [f"started {result['pid']}"] * (2 if restarts else 1)
    assert result["argv"] == ["--an=argument"]
    if restarts:
        assert result["tunables"] == xla_cpu.HUGE_PAGES and result["eligible"] == 1
    else:
        assert result["tunables"] == tunables
        always = "[always]" in pathlib.Path(xla_cpu.THP_SETTING).read_text()
        if tunables and not always:
            assert result["eligible"] == 0


def test_main_restarts_with_huge_pages():
    """main.py restarts before it does anything: its imports run twice (-X importtime)."""
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "main.py", "--helpshort"],
        cwd=REPO, env=environ, capture_output=True, text=True,
    )  # fmt: skip
    assert out.stdout.startswith("Entry point: python main.py")  # absl's help, exit code 1
    imports = [
        line for line in out.stderr.splitlines() if line.split("|")[-1].strip() == "ddpm.xla_cpu"
    ]
    assert len(imports) == (2 if xla_cpu.huge_page_environ(environ) is not None else 1)
