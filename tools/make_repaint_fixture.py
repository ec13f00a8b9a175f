"""Saves time lists of RePaint's official scheduler: the oracle for tests/test_inpainting.py.

Needs the official code's guided_diffusion/scheduler.py (andreas128/RePaint; pure
Python, not committed here). From the repository root:

    git -C RePaint show HEAD:guided_diffusion/scheduler.py > /tmp/scheduler.py
    .venv/bin/python tools/make_repaint_fixture.py /tmp/scheduler.py

Writes tests/fixtures/repaint_times.json: {"T,j,r": get_schedule_jump(t_T=T, n_sample=1,
jump_length=j, jump_n_sample=r)} for the paper's setting (250, 10, 10) and small cases.
"""

import argparse
import importlib.util
import json
import os

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "repaint_times.json")
CASES = [(250, 10, 10), (100, 5, 3), (20, 3, 4), (10, 10, 5), (7, 2, 2)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("scheduler", help="RePaint's guided_diffusion/scheduler.py")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("repaint_scheduler", args.scheduler)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    times = {
        f"{t_T},{j},{r}": module.get_schedule_jump(
            t_T=t_T, n_sample=1, jump_length=j, jump_n_sample=r
        )
        for t_T, j, r in CASES
    }
    with open(OUT, "w") as f:
        json.dump(times, f)
    print({k: len(v) for k, v in times.items()})


if __name__ == "__main__":
    main()
