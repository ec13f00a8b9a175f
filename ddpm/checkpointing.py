"""Checkpoints with orbax: restore-or-initialise, periodic saves, and saves on SIGTERM.

Restore order on start: the workdir's newest readable checkpoint -> `config.init_from`
(EMA weights of another checkpoint, e.g. a converted release) -> a fresh initialisation.
Saves are asynchronous; `close()` waits for them, so nothing is lost on exit. A process
killed mid-save leaves only orbax's temporary directory (the step directory appears by an
atomic rename when the save is complete; in a gs:// workdir, where orbax writes the step
in place, its commit_success.txt appears last), so the previous checkpoint is still the
newest one; a checkpoint damaged afterwards (truncated or missing files) is skipped on
restore.

With several processes, states are saved and restored as global arrays replicated over
every device of every process (what orbax writes once, from process 0's copy), and
handed to the train step as each process's host-local copy.
"""

import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

CHECKPOINT_DIR = "checkpoints"
# Unreadable checkpoints that training moved out of the way (kept for inspection): a
# checkpoint left under its step would collide with the save of that step after resuming.
DAMAGED_DIR = "damaged_checkpoints"


def _replicated_everywhere() -> jax.sharding.NamedSharding:
    """Replicated over all devices of all processes: how a train state is kept."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def to_global(tree):
    """Each process's host-local replicated copy -> one global array (what orbax saves)."""
    if jax.process_count() == 1:
        return tree
    sharding = _replicated_everywhere()
    return multihost_utils.host_local_array_to_global_array(tree, sharding.mesh, sharding.spec)


def to_host_local(tree):
    """A global replicated array -> this process's copy (what the pmapped step takes)."""
    if jax.process_count() == 1:
        return tree
    sharding = _replicated_everywhere()
    return multihost_utils.global_array_to_host_local_array(tree, sharding.mesh, sharding.spec)


def _restore_args(abstract, partial: bool):
    """orbax restore arguments: every leaf replicated everywhere; `partial` restores just
    the subtree that `abstract` names (e.g. {'ema_params': ...}) of a larger checkpoint."""
    sharding = _replicated_everywhere()
    abstract = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract
    )
    if not partial:
        return ocp.args.StandardRestore(abstract)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    return ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)


def _check_gcs_client(directory) -> None:
    """orbax asks google-cloud-storage about a gs:// bucket but does not install it."""
    try:
        from google.cloud import storage  # noqa: F401
    except ImportError:
        raise ImportError(
            f"checkpoints in {directory} need google-cloud-storage, with which orbax lists "
            "the steps in a bucket: pip install google-cloud-storage"
        ) from None


class Checkpointer:
    """An orbax CheckpointManager over `workdir/checkpoints`: keeps the newest `keep`, and
    also every step that is a multiple of `keep_every` (when > 0)."""

    def __init__(self, workdir, *, keep: int = 3, keep_every: int = 0, create: bool = True):
        """`create=False` for readers (sample, eval): a wrong workdir is not created."""
        directory = epath.Path(workdir) / CHECKPOINT_DIR
        if not directory.is_absolute():  # a gs:// path counts as absolute: it stays as it is
            directory = directory.absolute()
        if str(directory).startswith("gs://"):
            _check_gcs_client(directory)
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every or None, create=create
        )
        self.manager = ocp.CheckpointManager(directory, options=options)

    def restore_newest(self, abstract_state, *, set_aside_damaged: bool = False,
                       partial: bool = False):  # fmt: skip
        """(state, step) of the newest checkpoint that reads back whole; None if there is none.

        A checkpoint that does not read is skipped with a one-line warning naming it, and
        the one before it is tried. `set_aside_damaged` (training) moves skipped ones to
        workdir/damaged_checkpoints/. Raises only when checkpoints exist and none reads.
        `partial`: abstract_state names a subtree of the saved one, and only it is read.
        """
        steps, skipped = sorted(self.manager.all_steps(), reverse=True), []
        for step in steps:
            try:
                state = self.manager.restore(step, args=_restore_args(abstract_state, partial))
            # orbax and tensorstore report missing or truncated files as FileNotFoundError,
            # ValueError, JSONDecodeError or a bare Exception, depending on the file.
            except Exception as error:  # noqa: BLE001
                reason = (str(error).strip().splitlines() or [""])[0][:200]
                logging.warning(
                    "Skipping unreadable checkpoint %s (%s: %s); trying the one before it.",
                    self.directory / str(step), type(error).__name__, reason,
                )  # fmt: skip
                skipped.append(step)
                continue
            if set_aside_damaged and skipped:
                self._set_aside(skipped)
            return to_host_local(state), step
        if steps:  # nothing is moved: a restart must not quietly begin from scratch
            raise RuntimeError(
                f"no checkpoint in {self.directory} can be read (steps {steps}; see the "
                "warnings above). Move the directory away to start from scratch."
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            for step in steps:
                target = self.directory.parent / DAMAGED_DIR / str(step)
                if target.exists():  # damaged twice at the same step: keep the newer
                    target.rmtree()
                target.parent.mkdir(parents=True, exist_ok=True)
                (self.directory / str(step)).rename(target)
                logging.warning("Moved the unreadable checkpoint to %s", target)
        if jax.process_count() > 1:  # every process must see the moves before reloading
            multihost_utils.sync_global_devices("set aside damaged checkpoints")
        self.manager.reload()

    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Starts an asynchronous save of `state` at `step`; returns whether it saved."""
        return self.manager.save(step, args=ocp.args.StandardSave(to_global(state)), force=force)

    def close(self) -> None:
        """Waits for every pending save to be on disk."""
        self.manager.wait_until_finished()
        self.manager.close()


def restore_newest_in(workdir, abstract_state, *, how_to_make_one: str, partial: bool = False):
    """(state, step) of the newest readable checkpoint of a run's workdir, for readers.

    Raises FileNotFoundError naming the workdir and `how_to_make_one` when it has none.
    `partial`: read only the subtree that abstract_state names (Checkpointer.restore_newest).
    """
    checkpointer = Checkpointer(workdir, create=False)
    try:
        restored = checkpointer.restore_newest(abstract_state, partial=partial)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}: {how_to_make_one}")
    return restored


def restore_ema_params(workdir, abstract_params, *, how_to_make_one: str):
    """(EMA params, step) of the newest readable checkpoint of `workdir`.

    Only the EMA params are read, so a run whose optimiser state has another structure
    (another optim config) still serves sampling, evaluation and init_from.
    """
    restored, step = restore_newest_in(
        workdir, {"ema_params": abstract_params}, how_to_make_one=how_to_make_one, partial=True
    )
    return restored["ema_params"], step


def initialize(
    init_fn: Callable[[], Any],
    *,
    init_from: str = "",
    from_params: Callable[[Any], Any] | None = None,
):
    """The start-up state when the workdir has no checkpoint: init_from, else scratch.

    Args:
      init_fn: () -> a freshly initialised state (also gives the structure to restore into).
      init_from: a checkpoint directory of another run (or of --mode=convert); its newest
        readable state's EMA params seed this run.
      from_params: params -> a state starting from those params.
    """
    if not init_from:
        return init_fn()
    params, step = restore_ema_params(
        init_from, jax.eval_shape(init_fn).ema_params,
        how_to_make_one=f"config.init_from={init_from!r} must name a run's workdir",
    )  # fmt: skip
    logging.info("Initialising from the EMA params of %s, step %d", init_from, step)
    return from_params(params)


def agreed(flag: bool) -> bool:
    """Whether `flag` is set on any process (every process gets the same answer).

    A signal reaches one process, but all must enter the collective save of the same
    step and stop together; one process stopping alone would leave the others waiting
    in the next step's collectives.
    """
    if jax.process_count() == 1:
        return flag
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


class PreemptionFlag:
    """Set by SIGTERM or SIGINT (Ctrl-C): the train loop saves and exits after this step.

    A second signal ends the process at once (exit status 128 + signal), even while the
    main thread is inside a compiled step or sample grid, where a Python signal handler
    would not run until the computation returns: the signals are read from Python's
    wakeup fd by a thread of their own. A save then in flight is left as orbax's temporary
    directory, never as a step, so the previous checkpoint stays the newest readable one.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._event = threading.Event()
        # The reader thread counts; the handler (run by the main thread between bytecodes)
        # sets the flag too, so a signal that the main thread sent is seen at its next check.
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        self._reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._writer = writer
        self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, daemon=True, name="preemption").start()

    def _watch(self):
        count = 0
        while data := self._reader.recv(64):
            for signum in data:
                if signum not in self.SIGNALS:
                    continue
                count += 1
                if count > 1:
                    logging.warning("Received signal %d again: exiting now.", signum)
                    logging.flush()
                    os._exit(128 + signum)
                logging.warning(
                    "Received signal %d: saving a checkpoint after this step and stopping; "
                    "send it again to exit at once (the previous checkpoint stays).",
                    signum,
                )
                self._event.set()

    def _handle(self, signum, frame):
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def restore_handlers(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._writer.close()  # the reader sees the end and its thread returns
