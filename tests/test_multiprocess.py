"""Two processes of four devices train as one process of eight: main.py with
--config.distributed=True on localhost (jax.distributed, CPU collectives through gloo)."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny
from test_train import image_folder, restore

from ddpm import platform, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6
# Dropout on: each example's masks must come from its global index, not its device.
RUN = {
    "data.source": "folder",
    "model.dropout": 0.1,
    "training.num_train_steps": STEPS,
    "training.checkpoint_every": 2,
    "training.sample_every": STEPS,
}


def launch(workdir, data, *, processes: int, devices: int, fault=None):
    """main.py as `processes` processes of `devices` CPU devices each; [(rc, log)]."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = [
        sys.executable, str(ROOT / ("tests/fault_main.py" if fault else "main.py")),
        "--config=" + str(ROOT / "configs/default.py"), f"--workdir={workdir}",
        *tiny.flags({**RUN, "data.path": data}), f"--config.distributed={processes > 1}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "XLA_FLAGS": tiny.device_flags(devices),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": str(processes),
    }
    if fault:
        env["DDPM_FAULT"], env["DDPM_FAULT_PROCESS"] = fault
    running = [
        subprocess.Popen(
            args,
            env={**env, "JAX_PROCESS_ID": str(k)},
            cwd=ROOT,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for k in range(processes)
    ]
    return [(p.wait(timeout=600), p.stderr.read()) for p in running]


def test_two_processes_of_four_devices_train_as_one_of_eight_and_stop_together(tmp_path):
    data = image_folder(tmp_path / "images")
    two = tmp_path / "two_by_four"
    # A SIGTERM to process 1 alone, at step 3: both save step 3 and exit cleanly.
    ended = launch(two, data, processes=2, devices=4, fault=("sigterm:3", "1"))
    for k, (rc, log) in enumerate(ended):
        assert rc == 0 and "Stopped at step 3 after a signal" in log, (k, rc, log[-3000:])
    assert "FAULT sigterm 3" in ended[1][1] and "FAULT" not in ended[0][1]
    assert sorted(int(p.name) for p in (two / "checkpoints").iterdir()) == [2, 3]
    # Both resume from it and finish.
    for k, (rc, log) in enumerate(launch(two, data, processes=2, devices=4)):
        assert rc == 0 and f"Resuming from {two / 'checkpoints'}, step 3" in log, (k, log[-3000:])
    assert (two / "samples" / f"step_{STEPS:08d}.png").exists()  # written by process 0 only

    # The same run as one process of this test session's eight devices.
    config = tiny.tiny_config({**RUN, "data.path": str(data)})
    a, b = train.train_and_evaluate(config, tmp_path / "one_by_eight"), restore(two, config)
    assert int(a.step) == int(b.step) == STEPS
    # Not bitwise: 2 x 4 devices reduce the gradient in another float32 order than 1 x 8.
    pairs = zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True)
    gaps = [float(np.max(np.abs(x - y))) for x, y in pairs]
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(a.params))
    print(
        f"max |2x4 - 1x8| of the params after {STEPS} steps: {max(gaps):.3g} (largest {scale:.3g})"
    )
    assert max(gaps) < 1e-5 * scale, (max(gaps), scale)


def test_the_cluster_comes_from_the_environment_or_from_jax(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    env = {"JAX_COORDINATOR_ADDRESS": "host:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    platform.initialize_distributed(env)
    platform.initialize_distributed({})  # SLURM, TPU pods, ...: JAX detects the cluster
    assert calls == [dict(coordinator_address="host:1234", num_processes=2, process_id=1), {}]
    with pytest.raises(ValueError, match="missing \\['JAX_PROCESS_ID'\\]"):
        platform.initialize_distributed({k: v for k, v in env.items() if k != "JAX_PROCESS_ID"})


def test_the_first_log_line_names_the_platform_and_warns_of_an_unused_gpu(monkeypatch):
    said = []
    for level in ("info", "warning"):

        def record(msg, *args, level=level):
            said.append((level, msg % args))

        monkeypatch.setattr(platform.logging, level, record)
    for gpu in (False, True):
        monkeypatch.setattr(platform, "nvidia_gpu_present", lambda gpu=gpu: gpu)
        platform.log_devices()
    line = f"JAX {jax.__version__}, process 0/1, platform cpu, 8 local devices (cpu), 8 in all"
    assert said[:2] == [("info", line), ("info", line)]
    assert len(said) == 3 and said[2][0] == "warning"
    assert "NVIDIA GPU but JAX runs on the CPU: install the CUDA build" in said[2][1]
