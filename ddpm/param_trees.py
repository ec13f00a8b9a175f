"""Flax params trees built from weights read out of a file, and checked against a model.

Both readers of foreign weights use these: `ddpm.convert` (diffusers UNet2DModel
checkpoints) and `ddpm.metrics.inception` (the TorchScript FID Inception file).
"""

from typing import Any

import jax

MAX_LISTED = 10  # names per kind of problem in an error message


def set_leaf(tree: dict[str, Any], path: list[str], value) -> None:
    """tree[path[0]][path[1]]...[path[-1]] = value, creating the dicts on the way."""
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def listed(names: list[str]) -> str:
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return f"{names[:MAX_LISTED]}{more}"


def check_fit(params, expected, *, source: str, model: str) -> None:
    """ValueError unless `params` has exactly the leaf names and shapes of `expected`.

    Args:
      params: the nested dict read from `source`.
      expected: the model's params, e.g. from `jax.eval_shape` of its init (no compute).
      source, model: names for the message, which lists missing, extra and misshapen leaves.
    """
    want, got = _shapes(expected), _shapes(params)
    problems = []
    if missing := sorted(set(want) - set(got)):
        problems.append(f"missing from the checkpoint: {listed(missing)}")
    if extra := sorted(set(got) - set(want)):
        problems.append(f"not in the {model}: {listed(extra)}")
    common = sorted(set(want) & set(got))
    if bad := [f"{k}: {got[k]} vs {want[k]}" for k in common if got[k] != want[k]]:
        problems.append(f"shape mismatches (checkpoint vs {model}): {listed(bad)}")
    if problems:
        raise ValueError(f"{source} does not fit the {model}; " + "; ".join(problems))
