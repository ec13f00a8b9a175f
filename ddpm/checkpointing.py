"""Checkpoints with orbax: restore-or-initialise, periodic saves, and saves on SIGTERM.

Restore order on start: the workdir's newest checkpoint -> `config.init_from` (EMA
weights of another checkpoint, e.g. a converted release) -> a fresh initialisation.
Saves are asynchronous; `close()` waits for them, so nothing is lost on exit.
"""

import pathlib
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
    """An orbax CheckpointManager over `workdir/checkpoints`, keeping the newest `keep`."""

    def __init__(self, workdir, *, keep: int = 3):
        directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
        self.manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state, step: int | None = None):
        """Restores `step` (default: the newest) into the structure of `abstract_state`."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Starts an asynchronous save of `state` at `step`; returns whether it saved."""
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def close(self) -> None:
        """Waits for every pending save to be on disk."""
        self.manager.wait_until_finished()
        self.manager.close()


def restore_or_initialize(
    checkpointer: Checkpointer,
    init_fn: Callable[[], Any],
    *,
    init_from: str = "",
    from_params: Callable[[Any], Any] | None = None,
):
    """The start-up state, in the order: workdir -> init_from -> scratch.

    Args:
      checkpointer: the run's own checkpoints.
      init_fn: () -> a freshly initialised state (also gives the structure to restore into).
      init_from: a checkpoint directory of another run (or of --mode=convert); its newest
        state's EMA params seed this run when the workdir holds no checkpoint.
      from_params: params -> a state starting from those params.
    """
    abstract = jax.eval_shape(init_fn)
    if checkpointer.latest_step() is not None:
        logging.info(
            "Resuming from %s, step %d", checkpointer.manager.directory, checkpointer.latest_step()
        )
        return checkpointer.restore(abstract)
    if init_from:
        source = Checkpointer(init_from)
        if source.latest_step() is None:
            raise FileNotFoundError(f"config.init_from={init_from!r} holds no checkpoint")
        logging.info("Initialising from the EMA params of %s", init_from)
        restored = source.restore(abstract)
        source.close()
        return from_params(restored.ema_params)
    return init_fn()


class PreemptionFlag:
    """Set by SIGTERM (or SIGINT): the train loop saves and exits at the next step."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
