"""Crash-anywhere resume: faults aimed at each phase of training, damaged checkpoints."""

import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tiny
from absl import logging
from test_train import image_folder, restore

from ddpm import checkpointing, evaluation, factories, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8
# From an image folder, a log line every step, checkpoints every 2 steps and sample grids
# every 3 (at 3, 6 and 8), so the faults below land in every phase.
RUN = {
    "data.source": "folder",
    "training.num_train_steps": STEPS,
    "training.log_every": 1,
    "training.checkpoint_every": 2,
    "training.sample_every": 3,
}
# (phase, step, how the process ends): see tests/fault_main.py. Each run resumes from
# what the one before it left on disk.
FAULTS = [
    ("step", 3, -signal.SIGKILL),
    ("checkpoint", 4, -signal.SIGKILL),
    ("grid", 6, -signal.SIGKILL),
    ("sigint2", 6, 128 + signal.SIGINT),  # the second Ctrl-C exits at once
    ("sigterm", 7, 0),  # a preemption: saves step 7 and exits cleanly
]


def run_main(workdir, data, fault):
    """main.py (through tests/fault_main.py with a fault) on the tiny config; (rc, log)."""
    script = ROOT / ("tests/fault_main.py" if fault else "main.py")
    args = [
        sys.executable, str(script), "--config=" + str(ROOT / "configs/default.py"),
        f"--workdir={workdir}", *tiny.flags({**RUN, "data.path": data}),
    ]  # fmt: skip
    # Two devices: data parallel, with a quarter of the compile and checkpoint work of the
    # suite's eight. Every run after the first hits the session's compilation cache.
    env = {
        **os.environ,
        "XLA_FLAGS": tiny.device_flags(2),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
    }
    if fault:
        env["DDPM_FAULT"] = f"{fault[0]}:{fault[1]}"
    done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    return done.returncode, done.stderr


def test_killed_anywhere_a_restart_ends_bitwise_equal_to_a_run_that_never_stopped(tmp_path):
    data = image_folder(tmp_path / "images")
    workdir, straight = tmp_path / "faulty", tmp_path / "straight"
    rc, log = run_main(straight, data, None)  # first: it fills the compilation cache
    assert rc == 0, log[-3000:]
    for phase, step, expected_rc in FAULTS:
        grid = workdir / "samples" / f"step_{step:08d}.png"
        grid.unlink(missing_ok=True)  # an earlier run may have got that far
        rc, log = run_main(workdir, data, (phase, step))
        assert f"FAULT {phase} {step}" in log and rc == expected_rc, (phase, rc, log[-3000:])
        kept = checkpointing.Checkpointer(workdir).manager.all_steps()
        assert all(s < step or (phase == "sigterm" and s == step) for s in kept), (phase, kept)
        if phase in ("grid", "sigint2"):  # died while drawing the grid: no PNG of it
            assert not grid.exists(), phase
    rc, log = run_main(workdir, data, None)
    assert rc == 0 and f"Training from step 7 to {STEPS}" in log, log[-3000:]

    config = tiny.tiny_config({**RUN, "data.path": str(data)})
    a, b = restore(workdir, config), restore(straight, config)
    assert int(a.step) == int(b.step) == STEPS
    # Bitwise, params, EMA and optimiser state: same program, inputs and keys on CPU.
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def two_checkpoints(tmp_path):
    """A workdir with checkpoints at steps 2 and 4 (different params), and its config."""
    config = tiny.tiny_config({"training.num_grid_samples": 0, "training.num_train_steps": 2})
    model, tx = factories.create_model(config), factories.create_optimizer(config.optim)
    state = tiny.init_state(config, model, tx)
    checkpointer, states = checkpointing.Checkpointer(tmp_path), {}
    for step in (2, 4):
        params = jax.tree.map(lambda p, s=step: p + s, state.params)
        states[step] = state.replace(step=jnp.asarray(step, state.step.dtype), params=params)
        checkpointer.save(step, states[step], force=True)
    checkpointer.close()
    return tmp_path, config, states


def damage(checkpoint: pathlib.Path, how: str):
    # The largest file holds the arrays; the metadata file says what they are.
    files = sorted(
        (p for p in checkpoint.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    if how == "truncate":
        files[-1].write_bytes(files[-1].read_bytes()[: files[-1].stat().st_size // 2])
    else:
        (checkpoint / "default" / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(two_checkpoints, how, caplog):
    workdir, config, states = two_checkpoints
    damage(workdir / "checkpoints" / "4", how)
    logging.get_absl_handler()  # absl's warnings reach caplog through the root logger
    # A run of 2 steps: start-up restores and has nothing left to train.
    with tfds.testing.mock_data(num_examples=64):
        state = train.train_and_evaluate(config, str(workdir))
    warnings = [r.getMessage() for r in caplog.records if "Skipping unreadable" in r.getMessage()]
    assert len(warnings) == 1 and str(workdir / "checkpoints" / "4") in warnings[0], warnings
    assert (workdir / "damaged_checkpoints" / "4").is_dir()  # kept, out of the way
    assert checkpointing.Checkpointer(workdir).manager.all_steps() == [2]
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(states[2]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_no_readable_checkpoint_fails_naming_the_directory(two_checkpoints):
    workdir, config, _ = two_checkpoints
    for step in (2, 4):
        damage(workdir / "checkpoints" / str(step), "delete")
    with pytest.raises(RuntimeError, match=f"no checkpoint in {workdir / 'checkpoints'}"):
        restore(workdir, config)
    with tfds.testing.mock_data(num_examples=64), pytest.raises(RuntimeError, match="Move the"):
        train.train_and_evaluate(config, str(workdir))
    assert (workdir / "checkpoints" / "4").is_dir()  # a failed start deletes nothing


def test_keep_every_keeps_milestones_besides_the_newest(tmp_path):
    config = tiny.tiny_config()
    model, tx = factories.create_model(config), factories.create_optimizer(config.optim)
    state = tiny.init_state(config, model, tx)
    checkpointer = checkpointing.Checkpointer(tmp_path, keep=2, keep_every=3)
    for step in range(1, 9):
        checkpointer.save(step, state, force=True)
    checkpointer.close()
    assert checkpointing.Checkpointer(tmp_path).manager.all_steps() == [3, 6, 7, 8]
    with pytest.raises(ValueError, match="keep_every=3 must be 0 or a multiple"):
        train.train_and_evaluate(
            tiny.tiny_config({"training.keep_every": 3}), str(tmp_path / "new")
        )
    assert not (tmp_path / "new").exists()


def test_sampling_and_init_from_read_only_the_ema_params(tmp_path):
    """A run trained with gradient clipping (an optimiser state with one more entry) serves
    a config without it: sample/eval and init_from read the EMA params alone."""
    clipped = tiny.tiny_config({"optim.grad_clip": 1.0, "training.num_grid_samples": 0})
    tiny.write_random_checkpoint(clipped, tmp_path / "source", step=5)
    written, _ = tiny.restore_state(clipped, tmp_path / "source")
    plain = tiny.tiny_config({"optim.grad_clip": 0.0, "training.num_grid_samples": 0,
                              "training.num_train_steps": 0})  # fmt: skip
    plain.init_from = str(tmp_path / "source")
    with pytest.raises(RuntimeError):  # the whole state does not fit the other optimiser
        tiny.restore_state(plain, tmp_path / "source")
    _, params, step = evaluation.load_ema_params(plain, tmp_path / "source")
    with tfds.testing.mock_data(num_examples=64):
        started = train.train_and_evaluate(plain, str(tmp_path / "run"))
    assert step == 5 and int(started.step) == 0
    for got in (params, started.params, started.ema_params):
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(written.ema_params), strict=True):
            np.testing.assert_array_equal(x, y)
