"""main.py with one fault aimed at a phase of training: what the crash-resume test runs.

DDPM_FAULT=<phase>:<step> picks the fault; the library has no hook for it, this script
patches the library before handing over to main.py. Phases:
  step        SIGKILL while the step's computation is in flight (dispatched, not done)
  checkpoint  SIGKILL inside the step's checkpoint write: every array written, the
              temporary directory not yet renamed into place
  grid        SIGKILL in the step's sample grid: drawn, not yet written
  sigint2     Ctrl-C twice at the step, the second in its sample grid (as for grid)
  sigterm     SIGTERM at the step (a preemption: save and exit)
Each fault prints 'FAULT <phase> <step>' to stderr just before it fires. With several
processes, DDPM_FAULT_PROCESS=<k> aims the fault at process k alone.
"""

import os
import signal
import sys
import time

import jax
from absl import app
from orbax.checkpoint._src.path import atomicity

import main
from ddpm import sampling, train, updates

PHASE, STEP = os.environ["DDPM_FAULT"].split(":")
STEP = int(STEP)
PROCESS = os.environ.get("DDPM_FAULT_PROCESS")


def fire(sig, phase=PHASE):
    if PROCESS is not None and jax.process_index() != int(PROCESS):
        return
    print(f"FAULT {phase} {STEP}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), sig)


def patch_step():
    make = updates.make_train_step

    def make_faulty(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def faulty(state, batch, rng, frozen=None):
            step = int(state.step) + 1
            out = step_fn(state, batch, rng, frozen)  # dispatched asynchronously
            if step == STEP and PHASE == "step":
                fire(signal.SIGKILL)
            if step == STEP and PHASE in ("sigterm", "sigint2"):
                fire(signal.SIGTERM if PHASE == "sigterm" else signal.SIGINT)
            return out

        return faulty

    updates.make_train_step = make_faulty


def patch_grid():
    make = sampling.make_sampler

    def make_faulty(*args, **kwargs):
        sampler = make(*args, **kwargs)

        def faulty(params, keys, *rest, **kw):
            samples = sampler(params, keys, *rest, **kw)
            if PHASE in ("grid", "sigint2") and getattr(faulty, "step", None) == STEP:
                # The grid is drawn and not yet written: nothing may be left half-done.
                fire(signal.SIGKILL if PHASE == "grid" else signal.SIGINT)
                time.sleep(30)  # as a long grid would: the second Ctrl-C must not wait
            return samples

        return faulty

    write = train.write_sample_grid

    def write_faulty(config, sampler, state, rng, step, *rest):
        sampler.step = step
        return write(config, sampler, state, rng, step, *rest)

    sampling.make_sampler = make_faulty
    train.write_sample_grid = write_faulty


def patch_checkpoint():
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def faulty(self, *args, **kwargs):
        if f"/{STEP}.orbax-checkpoint-tmp" in str(self.get()):
            fire(signal.SIGKILL)
        return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = faulty


patch_step()
patch_grid()
if PHASE == "checkpoint":
    patch_checkpoint()

if __name__ == "__main__":
    app.run(main.main)
