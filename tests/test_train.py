"""Training end to end on 8 fake CPU devices: outputs, data parallelism, errors (resume after
crashes and damaged checkpoints: test_resume.py)."""

import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tiny
from PIL import Image

from configs import default
from ddpm import checkpointing, factories, train, updates


def image_folder(path, n=40, size=12):
    rng = np.random.default_rng(0)
    for i in range(n):
        (path / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(
            path / str(i % 2) / f"{i}.png"
        )
    return path


def restore(workdir, config):
    return tiny.restore_state(config, workdir)[0]


def test_one_run_writes_checkpoint_events_and_samples(tmp_path):
    assert jax.local_device_count() == 8
    config = tiny.tiny_config()
    with tfds.testing.mock_data(num_examples=64):
        state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_00000004.png"))
    assert grid.shape == (2 * (8 + 2) + 2, 2 * (8 + 2) + 2, 3)  # 4 samples of 8x8, 2x2 grid
    scalars = {}
    for event_file in tmp_path.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(event.step)
    for tag in ("loss", "grad_norm", "param_norm", "learning_rate"):
        assert scalars[tag] == [2, 4], (tag, scalars)
    assert scalars["steps_per_sec"] == [4] and scalars["samples"] == [4]
    assert (tmp_path / "config.json").exists()
    restored = restore(tmp_path, config)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dropout", [0.3, 0.0])
def test_same_update_on_one_and_eight_devices(dropout):
    """The same global batch and seed give the same parameters on 1 and 8 devices. With
    dropout on, each example's dropout masks, like its t and noise, come from its global
    index (its dropout key), not from the device that holds it or its batch neighbours.

    SGD makes the comparison sharp: Adam's first steps are ~lr * sign(g), which turns a
    rounding-level difference in a near-zero gradient into a full step. With SGD the
    only difference is the float32 order of the batch reduction (one mean of 16 against
    a mean of 8 means of 2), a few ulps of the gradient.
    """
    config = tiny.tiny_config({"model.dropout": dropout})
    model, diffusion = factories.create_model(config), factories.create_diffusion(config)
    tx = optax.sgd(0.5)
    state = tiny.init_state(config, model, tx)
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.integers(0, 256, (16, 8, 8, 3), np.uint8),
            "label": np.zeros(16, np.int32),
        }
        for _ in range(3)
    ]
    results = {}
    for n in (1, 8):
        step_fn = updates.make_train_step(config, model, diffusion, tx, devices=jax.devices()[:n])
        s = updates.replicated(state, jax.devices()[:n])
        for batch in batches:
            split = {k: v.reshape(n, -1, *v.shape[1:]) for k, v in batch.items()}
            s, metrics = step_fn(s, split, jax.random.key(1))
        results[n] = (s, metrics)
    (s1, m1), (s8, m8) = results[1], results[8]
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s8.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the steps did change the parameters
    if dropout == 0.0:
        return
    # Dropout is on: the same steps without it land elsewhere.
    plain_model = factories.create_model(tiny.tiny_config())
    plain = updates.make_train_step(config, plain_model, diffusion, tx, devices=jax.devices()[:1])
    p = updates.replicated(state, jax.devices()[:1])
    for batch in batches:
        p, _ = plain(p, {k: v[None] for k, v in batch.items()}, jax.random.key(1))
    gap = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p.params, s1.params)
    assert max(jax.tree.leaves(gap)) > 1e-3


def test_steps_per_dispatch_scans_the_updates_of_single_steps():
    """make_train_step(steps=2) on stacked batches: the states of two single calls (SGD,
    as above, so rounding is not amplified), and the second step's metrics."""
    config = tiny.tiny_config()
    model, diffusion = factories.create_model(config), factories.create_diffusion(config)
    tx = optax.sgd(0.5)
    state = tiny.init_state(config, model, tx)
    devices = jax.devices()[:2]
    rng = np.random.default_rng(0)
    batches = [
        {"image": rng.integers(0, 256, (2, 8, 8, 8, 3), np.uint8),
         "label": np.zeros((2, 8), np.int32)}
        for _ in range(4)
    ]  # fmt: skip
    single, s = updates.make_train_step(config, model, diffusion, tx, devices), None
    s = updates.replicated(state, devices)
    for batch in batches:
        s, metrics = single(s, batch, jax.random.key(1))
    paired = updates.make_train_step(config, model, diffusion, tx, devices, steps=2)
    p = updates.replicated(state, devices)
    for first in (0, 2):
        p, paired_metrics = paired(p, updates.stack_steps(batches[first : first + 2]),
                                   jax.random.key(1))  # fmt: skip
    assert int(p.step) == 4
    np.testing.assert_allclose(paired_metrics["loss"], metrics["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(p), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_steps_per_dispatch_keeps_the_loops_data_order_and_saves(tmp_path, monkeypatch):
    """Two steps per call with saves every 3 steps, resumed at step 3 and ending at 7
    (single steps lead up to the saves and the end): bitwise the states of one step per
    call, from the same batches in the same order, saved at the same steps. A stand-in
    step folds each batch into the params exactly (integer sums, one rounding), so any
    reordering shows."""

    def stand_in(state, batch, rng, frozen=None, **unused_kwargs):
        pixels = jax.lax.psum(jnp.sum(batch["image"].astype(jnp.int32)), "batch")
        mix = (pixels * (state.step + 1)).astype(jnp.float32)
        params = jax.tree.map(lambda p: 0.5 * p + mix, state.params)
        return state.replace(step=state.step + 1, params=params), {"loss": mix}

    monkeypatch.setattr(updates, "train_step", stand_in)
    overrides = {"training.num_grid_samples": 0, "training.num_train_steps": 7,
                 "training.checkpoint_every": 3}  # fmt: skip
    calls = []
    make = updates.make_train_step

    def counting(*args, steps=1, **kwargs):
        step_fn = make(*args, steps=steps, **kwargs)
        return lambda *a: (calls.append(steps), step_fn(*a))[1]

    monkeypatch.setattr(updates, "make_train_step", counting)
    with tfds.testing.mock_data(num_examples=64):
        single = train.train_and_evaluate(tiny.tiny_config(overrides), str(tmp_path / "single"))
        calls.clear()
        paired = tiny.tiny_config({**overrides, "training.steps_per_dispatch": 2})
        paired.training.num_train_steps = 3  # stopped at step 3, then resumed to 7
        train.train_and_evaluate(paired, str(tmp_path / "paired"))
        paired.training.num_train_steps = 7
        state = train.train_and_evaluate(paired, str(tmp_path / "paired"))
    assert int(state.step) == 7
    saved = checkpointing.Checkpointer(tmp_path / "paired").manager.all_steps()
    assert sorted(saved) == [3, 6, 7]
    # Logs every 2, saves every 3: 0-2 | 2-3 (save) | resumed: 3-4 | 4-6 | 6-7 (the end).
    assert calls == [2, 1, 1, 2, 1]
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_call_takes_steps_per_dispatch_steps_unless_an_event_falls_inside():
    # Logs every 10 of 25 steps, 4 per call: 0-4-8, singles to 10, 10-14-18, singles to
    # 20, 20-24, a single to 25.
    calls, step = [], 0
    while step < 25:
        calls.append(train.steps_in_next_call(step, 4, (10, 0), 25))
        step += calls[-1]
    assert calls == [4, 4, 1, 1, 4, 4, 1, 1, 4, 1]


def test_the_update_and_the_sampler_import_no_tensorflow():
    """benchmarks/gpu.sh times them where TensorFlow is not installed."""
    code = "import sys, ddpm.factories, ddpm.sampling, ddpm.updates; "
    code += "sys.exit('tensorflow' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])


def test_a_signal_on_a_checkpoint_step_saves_it_once_and_stops(tmp_path, monkeypatch):
    # Every step is a checkpoint step here, and the flag is up from the start. The loop's
    # saving is under test, not the step: a stand-in step only counts, so nothing compiles.
    monkeypatch.setattr(checkpointing.PreemptionFlag, "is_set", lambda self: True)

    def counting_step(*unused_args, **unused_kwargs):
        return lambda state, batch, rng, frozen=None: (state.replace(step=state.step + 1), {})

    monkeypatch.setattr(updates, "make_train_step", counting_step)
    config = tiny.tiny_config({"training.checkpoint_every": 1, "training.num_grid_samples": 0})
    with tfds.testing.mock_data(num_examples=64):
        state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 1
    assert checkpointing.Checkpointer(tmp_path).manager.all_steps() == [1]


@pytest.mark.parametrize(
    "update,error,message",
    [
        ({"training.batch_size": 12}, ValueError, "multiple of"),
        ({"data.source": "folder", "data.path": "/nonexistent/images"}, FileNotFoundError,
         "/nonexistent/images"),
        ({"data.image_size": 9}, ValueError, "not divisible by 2"),
        ({"model.dtype": "float16"}, ValueError, "model.dtype"),
        ({"diffusion.var_type": "wide"}, ValueError, "unknown var_type 'wide'"),
        ({"diffusion.schedule": "cosin"}, ValueError, "unknown beta schedule 'cosin'"),
        ({"training.steps_per_dispatch": 0}, ValueError, "steps_per_dispatch=0 must be >= 1"),
    ],
)  # fmt: skip
def test_bad_configuration_fails_fast_with_one_message(tmp_path, update, error, message):
    config = tiny.tiny_config(update)
    start = time.time()
    with tfds.testing.mock_data(num_examples=64), pytest.raises(error, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert time.time() - start < 30  # before any training step compiles
    assert not (tmp_path / "run").exists()  # a failed start leaves no empty workdir


def test_nan_fails_fast_naming_the_step_range():
    train.check_finite({"loss": 0.5}, 10, 5)
    with pytest.raises(FloatingPointError, match="between steps 5 and 10"):
        train.check_finite({"loss": float("nan"), "grad_norm": 1.0}, 10, 5)


def test_learning_rate_warms_up_linearly_from_zero():
    config = default.get_config()
    schedule = factories.learning_rate_schedule(config.optim)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(2500)), 1e-4, rtol=1e-6)
    assert float(schedule(5000)) == float(schedule(800_000)) == pytest.approx(2e-4)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_its_decay_schedule(warmup):
    """EMA after each step = decay_n * EMA + (1 - decay_n) * params, with decay_n the
    config's decay, or with warm-up min(decay, (1 + n) / (10 + n)) for update n = 0, 1, ..."""
    config = tiny.tiny_config({"training.ema_decay": 0.5, "training.ema_warmup": warmup})
    model, diffusion = factories.create_model(config), factories.create_diffusion(config)
    tx = optax.sgd(0.5)
    state = tiny.init_state(config, model, tx)
    state = updates.replicated(state, jax.devices()[:1])
    step_fn = updates.make_train_step(config, model, diffusion, tx, devices=jax.devices()[:1])
    ema = jax.tree.map(lambda p: np.asarray(p, np.float64), state.params)
    rng = np.random.default_rng(0)
    for n in range(4):
        batch = {"image": rng.integers(0, 256, (1, 4, 8, 8, 3), np.uint8),
                 "label": np.zeros((1, 4), np.int32)}  # fmt: skip
        state, _ = step_fn(state, batch, jax.random.key(1))
        decay = min(0.5, (1 + n) / (10 + n)) if warmup else 0.5
        ema = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * np.asarray(p), ema, state.params)
    for got, want in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(ema), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The EMA lags the params (warm-up decays: 0.1, 0.18, 0.25, 0.31): the check has teeth.
    gap = jax.tree.map(lambda e, p: float(np.max(np.abs(e - np.asarray(p)))), ema, state.params)
    assert max(jax.tree.leaves(gap)) > 1e-3
