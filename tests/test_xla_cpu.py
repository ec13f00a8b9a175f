"""ddpm.xla_cpu: the XLA flag that importing ddpm sets, and when it stays out."""

import os
import subprocess
import sys
import textwrap

import pytest

from ddpm import xla_cpu


@pytest.fixture
def measured(monkeypatch):
    """This jaxlib counts as measured, and JAX has not started."""
    version = xla_cpu.importlib.metadata.version("jaxlib")
    monkeypatch.setattr(xla_cpu, "MEASURED_JAXLIB", (version,))
    monkeypatch.setattr(xla_cpu, "_backends_started", lambda: False)


def test_flag_is_added_to_the_users_flags(measured):
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_cpu.prefer_xla_convolutions(environ)
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {xla_cpu.FLAG}"
    environ = {}
    assert xla_cpu.prefer_xla_convolutions(environ)
    assert environ["XLA_FLAGS"] == xla_cpu.FLAG


def test_users_choice_of_fusion_types_wins(measured):
    own = "--xla_cpu_experimental_ynn_fusion_type=dot"
    environ = {"XLA_FLAGS": own}
    assert not xla_cpu.prefer_xla_convolutions(environ)
    assert environ == {"XLA_FLAGS": own}


def test_unmeasured_jaxlib_is_left_alone(measured, monkeypatch):
    monkeypatch.setattr(xla_cpu, "MEASURED_JAXLIB", ("0.0.",))
    environ = {}
    assert not xla_cpu.prefer_xla_convolutions(environ)
    assert environ == {}

    def no_metadata(name):
        raise xla_cpu.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(xla_cpu.importlib.metadata, "version", no_metadata)
    assert not xla_cpu.prefer_xla_convolutions(environ)
    assert environ == {}


def test_too_late_once_jax_has_started(measured, monkeypatch):
    monkeypatch.setattr(xla_cpu, "_backends_started", lambda: True)
    warnings = []
    monkeypatch.setattr(xla_cpu.logging, "warning", lambda *args: warnings.append(args))
    environ = {}
    assert not xla_cpu.prefer_xla_convolutions(environ)
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
    first; started before, JAX keeps YNNPACK's. (The flag is only set for measured jaxlibs.)"""
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
        assert out == [xla_cpu.FLAG, "xla convolution"]
