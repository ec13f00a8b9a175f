"""A small image classifier that scores class-conditional samples (e.g. "is this a 7?").

Trained once on the labelled images of a data set at the model's resolution, with every
`HOLD_OUT`-th example held out to measure its own accuracy, and cached as a Flax msgpack
file (no pickle). `accuracy` then compares its predictions on generated images with
the labels they were asked for, per class and overall.
"""

import json

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from ddpm import images

HOLD_OUT = 5  # examples with index % HOLD_OUT == 0 are held out (20%)


class Classifier(nn.Module):
    """Two (conv3x3, ReLU) x 2 + 2x2 max-pool stages, then Dense(128) and Dense(classes).

    x: float [B, H, W, C] in [-1, 1] -> logits [B, num_classes].
    """

    num_classes: int

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        for features in (32, 64):
            x = nn.relu(nn.Conv(features, (3, 3))(x))
            x = nn.relu(nn.Conv(features, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(0.3, deterministic=not train)(x)
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(self.num_classes)(x)


def _shifted(batch: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Each image moved by up to max_shift pixels in each direction (zero padding)."""
    b, h, w, _ = batch.shape
    padded = np.pad(batch, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, (2, b))
    return np.stack([p[y : y + h, x : x + w] for p, y, x in zip(padded, dy, dx, strict=True)])


def train_classifier(
    images_uint8: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    steps: int = 1500,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    seed: int = 0,
):
    """Params of a Classifier trained with Adam on uint8 images [N, H, W, C] and labels [N].

    Batches are drawn with replacement by a numpy RNG seeded with `seed`, each image shifted
    by up to 2 pixels (digits are not always centred in generated images either).
    """
    model = Classifier(num_classes)
    x0 = images.to_model_range(images_uint8[:1])
    params = model.init(jax.random.key(seed), x0)["params"]
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y, key):
        def loss_fn(p):
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed + 1)
    for i in range(steps):
        index = rng.integers(0, len(images_uint8), batch_size)
        x = images.to_model_range(_shifted(images_uint8[index], rng, 2))
        params, opt_state = step(params, opt_state, x, labels[index], jax.random.fold_in(key, i))
    return params


class Scorer:
    """A trained Classifier: uint8 images [N, H, W, C] -> predicted labels [N]."""

    def __init__(self, params, num_classes: int, held_out_accuracy: float | None = None):
        self.params, self.num_classes = params, num_classes
        self.held_out_accuracy = held_out_accuracy
        model = Classifier(num_classes)
        self._logits = jax.jit(lambda p, x: model.apply({"params": p}, images.to_model_range(x)))

    def predict(self, images_uint8: np.ndarray, batch_size: int = 500) -> np.ndarray:
        out = [
            np.argmax(self._logits(self.params, images_uint8[i : i + batch_size]), axis=-1)
            for i in range(0, len(images_uint8), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0,), np.int64)

    def save(self, path) -> None:
        path = epath.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(flax.serialization.to_bytes(self.params))
        meta = {"num_classes": self.num_classes, "held_out_accuracy": self.held_out_accuracy}
        path.with_suffix(".json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path, example_shape) -> "Scorer":
        """Reads a Scorer saved by `save` for images of shape example_shape (H, W, C)."""
        path = epath.Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        model = Classifier(meta["num_classes"])
        template = jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, *example_shape)))["params"]
        )
        params = flax.serialization.from_bytes(template, path.read_bytes())
        return cls(params, meta["num_classes"], meta["held_out_accuracy"])


def accuracy(predicted, requested, num_classes: int) -> tuple[float, list[float]]:
    """(overall accuracy, per-class accuracy [num_classes]; NaN for a class never requested)."""
    predicted, requested = np.asarray(predicted), np.asarray(requested)
    correct = predicted == requested
    per_class = [
        float(np.mean(correct[requested == c])) if np.any(requested == c) else float("nan")
        for c in range(num_classes)
    ]
    return float(np.mean(correct)), per_class


def fit_and_hold_out(images_uint8, labels, num_classes: int, **train_kwargs) -> Scorer:
    """Trains on the examples with index % HOLD_OUT != 0 and measures accuracy on the rest."""
    held_out = np.arange(len(labels)) % HOLD_OUT == 0
    params = train_classifier(
        images_uint8[~held_out], labels[~held_out], num_classes, **train_kwargs
    )
    scorer = Scorer(params, num_classes)
    scorer.held_out_accuracy, _ = accuracy(
        scorer.predict(images_uint8[held_out]), labels[held_out], num_classes
    )
    return scorer
