"""The digit classifier that scores class-conditional samples: training, accuracy, caching."""

import numpy as np

from ddpm.metrics import classifier


def striped(n, seed=0):
    """3 classes of 8x8 images with noise: a horizontal bar, a vertical bar, or both."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    x = rng.integers(0, 60, (n, 8, 8, 1))
    for i, label in enumerate(labels):
        if label != 1:
            x[i, 3:5, 1:7] = 240
        if label != 0:
            x[i, 1:7, 3:5] = 240
    return x.astype(np.uint8), labels.astype(np.int32)


def test_accuracy_overall_and_per_class():
    overall, per_class = classifier.accuracy([0, 1, 1, 2, 0], [0, 1, 2, 2, 1], 4)
    assert overall == 3 / 5
    np.testing.assert_allclose(per_class[:3], [1.0, 0.5, 0.5])
    assert np.isnan(per_class[3])  # never requested


def test_learns_a_separable_task_and_survives_a_save_and_load(tmp_path):
    x, y = striped(300)
    scorer = classifier.fit_and_hold_out(x, y, 3, steps=60, batch_size=32)
    assert scorer.held_out_accuracy == 1.0
    test_x, test_y = striped(60, seed=1)
    assert classifier.accuracy(scorer.predict(test_x), test_y, 3)[0] == 1.0
    scorer.save(tmp_path / "c.msgpack")
    loaded = classifier.Scorer.load(tmp_path / "c.msgpack", (8, 8, 1))
    assert loaded.held_out_accuracy == 1.0
    np.testing.assert_array_equal(loaded.predict(test_x), scorer.predict(test_x))
