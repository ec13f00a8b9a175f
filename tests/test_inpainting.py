"""Inpainting: RePaint's schedule against the official code, the chain against a float64
loop written from the official code's logic, and --mode=inpaint on a tiny model."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from oracle import Oracle
from PIL import Image

from ddpm import diffusion as D
from ddpm import inpaint_job, inpainting, masks, samplers
from ddpm.schedules import get_beta_schedule

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "repaint_times.json"
T, S = 40, 20  # the full chain and the respaced one the tests walk
BETAS = get_beta_schedule("linear", num_timesteps=T, beta_start=1e-3, beta_end=0.2)
STEPS = D.space_timesteps(T, [S])


def test_time_lists_equal_the_official_scheduler():
    official = json.loads(FIXTURE.read_text())  # tools/make_repaint_fixture.py
    for case, times in official.items():
        num_steps, j, r = map(int, case.split(","))
        assert inpainting.repaint_times(num_steps, j, r) == times, case
    # The paper's setting: 250 reverse steps plus 24 jump points x 9 extra passes x 10 steps,
    # each pass 10 undo and 10 reverse steps.
    paper = np.asarray(official["250,10,10"])
    assert len(paper) - 1 == 250 + 2 * 24 * 9 * 10
    assert np.sum(np.diff(paper) < 0) == 250 + 24 * 9 * 10


def test_a_small_time_list_written_out_by_hand():
    # 7 steps, j = 2, r = 2: the jump points are t = 0, 2, 4 (range(0, 7 - 2, 2)), each
    # passed twice: reaching 4 the chain goes back up to 6, reaching 2 up to 4, at 0 up to 2.
    assert inpainting.repaint_times(7, 2, 2) == [
        6, 5, 4, 5, 6, 5, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1,
    ]  # fmt: skip
    assert inpainting.inpaint_times("replace", 5, 10, 10) == [4, 3, 2, 1, 0, -1]
    plan = inpainting.plan(inpainting.repaint_times(7, 2, 2), 7)
    np.testing.assert_array_equal(plan.t, [6, 5, 4, 5, 6, 5, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0])
    np.testing.assert_array_equal(plan.undo, np.diff(inpainting.repaint_times(7, 2, 2)) > 0)
    # How often each reverse step's t was reverse-stepped from before (0 at undo steps):
    # the second passes 6->5->4, 4->3->2 and 2->1->0 are visits 1; 0 -> -1 is the first.
    np.testing.assert_array_equal(
        plan.visit, [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0]
    )


@pytest.mark.parametrize(
    "args, message",
    [((0, 1, 1), "num_steps must be >= 1"), ((10, 0, 2), "jump_length"), ((10, 2, 0), "jump_n")],
)
def test_bad_schedule_settings_raise(args, message):
    with pytest.raises(ValueError, match=message):
        inpainting.repaint_times(*args)
    with pytest.raises(ValueError, match="inpaint.method"):
        inpainting.inpaint_times("paint", 10, 2, 2)


def _respaced():
    d = D.create_diffusion(BETAS, mean_type="eps", var_type="fixedlarge", use_timesteps=STEPS)
    ab = Oracle(BETAS).alpha_bar[STEPS]
    return d, Oracle(1 - ab / np.append(1.0, ab[:-1]))  # the respaced chain in float64


def test_undo_and_known_region_steps_match_float64_formulas():
    d, oracle = _respaced()
    rng = np.random.default_rng(0)
    x, x0, z = (rng.standard_normal((S - 1, 4, 4, 1)) for _ in range(3))
    t = np.arange(S - 1)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    beta = oracle.at(oracle.betas, t + 1, x)  # the respaced chain's beta of step t + 1
    expected = np.sqrt(1 - beta) * x + np.sqrt(beta) * z
    got = inpainting.undo_step(d, f32(x), jnp.asarray(t), f32(z))
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    # The known region at t: a standard deviation sqrt(1 - ab_t) times the noise.
    got = D.q_sample(d, f32(x0), jnp.asarray(t), f32(z))
    np.testing.assert_allclose(got, oracle.q_sample(x0, t, z), rtol=0, atol=2e-6)


def _eps_model(x, t):
    """An analytic denoiser, written for jnp and np alike, that depends on t."""
    lib = jnp if isinstance(x, jax.Array) else np
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return 0.3 * x + 0.2 * lib.sin(3 * x) * (1 + t / S)


def _noise(keys, shape):
    """The documented noise rule, re-derived: x_T, a first visit's step noise at t, and
    the extra streams fold_in(fold_in(key, S + s), k) at loop position k."""

    def stream(s):
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, S + s)

    def draw(k, data):
        return np.asarray(samplers.normal_per_example(k, shape, data), np.float64)

    return (
        draw(keys, S),
        lambda t: draw(keys, t),
        lambda k: draw(stream(1), k),
        lambda k: draw(stream(2), k),
    )


def test_repaint_chain_equals_a_float64_loop_over_the_official_time_pairs():
    d, oracle = _respaced()
    times = inpainting.repaint_times(S, 3, 3)
    keys = jax.random.split(jax.random.key(0), 3)
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (3, 4, 4, 1))
    mask = (rng.uniform(size=(3, 4, 4, 1)) < 0.5).astype(np.float64)
    step = samplers.reverse_step(d, _eps_model, "ddpm", clip_denoised=True)
    got = jax.jit(lambda k, a, m: inpainting.inpaint(d, step, k, a, m, times))(
        keys, jnp.asarray(x0, jnp.float32), jnp.asarray(mask, jnp.float32)
    )
    # The official p_sample_loop with schedule_jump_params, in float64.
    start, first_visit, known_noise, resample_noise = _noise(keys, (4, 4, 1))
    x, visited = start, set()
    for k, (t_last, t_cur) in enumerate(zip(times[:-1], times[1:], strict=True)):
        t = np.full(3, t_last)
        if t_cur < t_last:  # reverse: the known region from q_sample at t, then p_sample
            x = mask * oracle.q_sample(x0, t, known_noise(k)) + (1 - mask) * x
            model_t = np.asarray(STEPS)[t]  # the network sees the original step
            mean, _, log_var, _ = oracle.p_mean_variance(
                _eps_model(x, model_t), x, t, "eps", "fixedlarge", clip=True
            )
            z = resample_noise(k) if t_last in visited else first_visit(t_last)
            x = mean + (t_last > 0) * np.exp(0.5 * log_var) * z
            visited.add(t_last)
        else:  # undo: the forward step with the beta of step t_last + 1
            beta = oracle.betas[t_last + 1]
            x = np.sqrt(1 - beta) * x + np.sqrt(beta) * resample_noise(k)
    expected = mask * x0 + (1 - mask) * x
    err = np.max(np.abs(np.asarray(got) - expected))
    print(f"RePaint chain ({len(times) - 1} positions) vs float64: max abs error {err:.1e}")
    assert err < 1e-4
    np.testing.assert_array_equal(np.asarray(got)[mask == 1], x0.astype(np.float32)[mask == 1])


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_replace_with_nothing_known_is_the_plain_sampler(method):
    d = D.create_diffusion(BETAS, mean_type="eps", var_type="fixedlarge", use_timesteps=STEPS)
    keys = jax.random.split(jax.random.key(2), 4)
    shape = (4, 4, 1)
    x0 = jnp.ones((4, *shape))
    step = samplers.reverse_step(d, _eps_model, method, eta=0.5)
    times = inpainting.inpaint_times("replace", S, 10, 10)
    got = inpainting.inpaint(d, step, keys, x0, jnp.zeros_like(x0), times)
    if method == "ddpm":
        plain = samplers.ddpm_sample(d, _eps_model, keys, shape)
    else:
        plain = samplers.ddim_sample(d, _eps_model, keys, shape, eta=0.5)
    np.testing.assert_allclose(got, plain, rtol=0, atol=1e-6)


def test_undo_steps_do_not_call_the_model():
    d = D.create_diffusion(BETAS, mean_type="eps", var_type="fixedlarge", use_timesteps=STEPS)
    calls = []

    def counted(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return _eps_model(x, t)

    times = inpainting.repaint_times(S, 3, 3)
    x0 = jnp.zeros((2, 4, 4, 1))
    mask = x0.at[:, :2].set(1.0)
    keys = jax.random.split(jax.random.key(3), 2)
    step = samplers.reverse_step(d, counted, "ddpm")
    jax.block_until_ready(inpainting.inpaint(d, step, keys, x0, mask, times))
    jax.effects_barrier()
    assert len(calls) == np.sum(np.diff(times) < 0) < len(times) - 1


def test_generated_masks():
    size = 8
    bottom = masks.make_masks("bottom_half", [0, 1], size)[0, ..., 0]
    assert bottom[:4].all() and not bottom[4:].any()
    center = masks.make_masks("center", [0], size)[0, ..., 0]
    assert not center[2:6, 2:6].any() and center.sum() == size * size - 16
    lines = masks.make_masks("lines", [0], size)[0, ..., 0]
    assert lines[::2].all() and not lines[1::2].any()
    strokes = masks.make_masks("strokes", np.arange(20), 16, seed=0)
    again = masks.make_masks("strokes", np.arange(5, 10), 16, seed=0)
    np.testing.assert_array_equal(strokes[5:10], again)  # a function of (seed, index)
    assert len({m.tobytes() for m in strokes}) == 20
    assert 0.15 < 1 - strokes.mean() < 0.6
    with pytest.raises(ValueError, match="must be one of"):
        masks.make_masks("circle", [0], size)


def _write_pngs(folder, arrays):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return str(folder)


def test_mask_folders_white_is_known_and_bad_masks_are_clear_errors(tmp_path):
    ramp = np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))  # 0 .. 224 by columns
    found = masks.make_masks(_write_pngs(tmp_path / "ok", [ramp, 255 - ramp]), [0, 1, 2], 8)
    np.testing.assert_array_equal(found[0, 0, :, 0], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(found[2], found[0])  # fewer masks than images: cycled
    small = _write_pngs(tmp_path / "small", [np.zeros((4, 4), np.uint8)])
    with pytest.raises(ValueError, match=r"is 4x4, but the images are 8x8"):
        masks.make_masks(small, [0], 8)
    black = _write_pngs(tmp_path / "black", [np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match="has no known pixel"):
        masks.make_masks(black, [0], 8)
    white = _write_pngs(tmp_path / "white", [np.full((8, 8), 255, np.uint8)])
    with pytest.raises(ValueError, match="has no pixel to fill"):
        masks.make_masks(white, [0], 8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny random model's checkpoint and a folder of 10 real-looking 8x8 images."""
    root = tmp_path_factory.mktemp("inpaint")
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(10)]
    config = _config(root, _write_pngs(root / "images", pictures))
    tiny.write_random_checkpoint(config, root / "workdir")
    return root


def _config(root, source=None):
    return tiny.tiny_config({
        "inpaint.source": source or str(root / "images"), "inpaint.num_images": 10,
        "inpaint.num_steps": 10, "inpaint.jump_length": 2, "inpaint.jump_n_sample": 2,
        "sampling.batch_size": 8,
    })  # fmt: skip


def test_inpaint_mode_keeps_known_pixels_writes_npz_and_grid_and_resumes(run):
    config = _config(run)
    out = inpaint_job.inpaint(config, run / "workdir")
    known = out["masks"][..., 0] == 1
    np.testing.assert_array_equal(out["results"][known], out["originals"][known])
    assert np.mean(out["results"][~known] != out["originals"][~known]) > 0.9
    (folder,) = (run / "workdir").glob("inpaint_step7_repaint10_center_*")
    saved = np.load(folder / "inpainted.npz")
    for name in ("originals", "masks", "results", "positions", "labels"):
        np.testing.assert_array_equal(saved[name], out[name])
    np.testing.assert_array_equal(saved["positions"], np.arange(10))
    grid = np.asarray(Image.open(folder / "grid.png"))
    assert grid.shape == (3 * 10 + 2, 12 * 10 + 2, 3)  # 10 images: 4 per row of 3 columns
    np.testing.assert_array_equal(grid[2:10, 2:10], out["originals"][0])
    np.testing.assert_array_equal(grid[2:10, 22:30], out["results"][0])
    # A rerun finds both chunks: nothing is computed again.
    chunks = sorted((folder / "chunks").glob("chunk_*.npz"))
    assert len(chunks) == 2
    stamp = [c.stat().st_mtime_ns for c in chunks]
    np.testing.assert_array_equal(
        inpaint_job.inpaint(config, run / "workdir")["results"], out["results"]
    )
    assert [c.stat().st_mtime_ns for c in chunks] == stamp
    # Another setting that changes the result gets its own folder.
    config.inpaint.jump_n_sample = 1
    assert inpaint_job.output_dir(config, run / "workdir", 7) != folder


def test_inpainting_does_not_depend_on_the_device_count(run):
    config = _config(run)
    model, params, _ = inpaint_job.evaluation.load_ema_params(config, run / "workdir")
    _, originals, _ = inpaint_job.source_images(config)
    mask = masks.make_masks("strokes", np.arange(10), 8)
    keys = samplers.sample_keys(jax.random.key(0), np.arange(10))
    times = inpaint_job.check_config(config)
    one = inpaint_job.make_inpainter(config, model, times, jax.devices()[:1])
    eight = inpaint_job.make_inpainter(config, model, times, jax.devices())
    a, b = (f(params, keys, originals, mask) for f in (one, eight))
    assert np.max(np.abs(a.astype(int) - b.astype(int))) <= 1
    assert np.mean(a == b) > 0.99


@pytest.mark.parametrize(
    "method, num_steps, chain_length",
    [("ddim", 3, len(range(0, 10, 10 // 3))), ("ddim", 0, 10), ("ddpm", 0, 10), ("ddpm", 5, 5)],
)
def test_the_plan_walks_the_chain_the_sampler_makes(run, method, num_steps, chain_length):
    # DDIM's uniform stride 10 // 3 makes 4 steps of T = 10, not 3; 0 means all T.
    config = _config(run)
    config.sampling.method, config.inpaint.num_steps = method, num_steps
    times = inpaint_job.check_config(config)
    assert times[0] == chain_length - 1 and times[-1] == -1
    assert times == inpainting.repaint_times(chain_length, 2, 2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"inpaint.method": "paint"}, "inpaint.method must be one of"),
        ({"inpaint.num_steps": 11}, r"inpaint.num_steps must be in \[1, 10\]"),
        ({"inpaint.num_images": 0}, "inpaint.num_images must be >= 1"),
        ({"inpaint.mask": "circle"}, "inpaint.mask='circle' must be one of"),
        ({"inpaint.source": "/no/such/folder"}, "is not a folder of images"),
        ({"sampling.method": "euler"}, "sampling.method must be"),
    ],
)
def test_bad_inpaint_settings_fail_before_anything_loads(run, overrides, message):
    config = _config(run)
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    with pytest.raises(ValueError, match=message):
        inpaint_job.inpaint(config, run / "no_workdir")
