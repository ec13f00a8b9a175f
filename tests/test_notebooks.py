"""Every notebook in notebooks/ runs top to bottom, and is committed clean.

The kernel is this interpreter: a throwaway kernelspec in a temporary folder runs
`sys.executable -m ipykernel_launcher`, so no globally registered `python3` kernel
(another Python, another venv) can be picked up. Notebooks run with cwd notebooks/,
DDPM_NOTEBOOK_SMOKE=1 (notebooks may shrink their work but keep the code paths),
matplotlib's headless inline backend, and the repository root on PYTHONPATH so
`import ddpm` works, and one CPU device at LLVM -O3, as on a laptop (conftest.py's eight
fake devices would make every notebook ~40% slower, multi-device code is tested elsewhere;
its -O0 made train_mnist.ipynb 1.6x slower). The kernel inherits the rest of the environment.
"""

import os
import pathlib
import re
import sys
import time

import nbformat
import pytest
import tiny

nbclient = pytest.importorskip("nbclient")
ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
KERNEL_NAME = "python3"
# "takes about 20 s", "Runtime: 1 min", "30 seconds": a number with a unit of time.
RUNTIME_PATTERN = re.compile(r"\b\d+(\.\d+)?\s*(s|sec|secs|seconds?|min|mins|minutes?)\b", re.I)


def _ids(paths):
    return [p.name for p in paths]


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    """A KernelSpecManager that knows one kernel, 'python3', launched with sys.executable."""
    kernels_dir = tmp_path_factory.mktemp("kernels")
    ipykernel_kernelspec.write_kernel_spec(kernels_dir / KERNEL_NAME)
    manager = KernelSpecManager(kernel_dirs=[str(kernels_dir)])
    spec = manager.get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable, spec.argv
    return manager


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DDPM_NOTEBOOK_SMOKE"] = "1"
    env["XLA_FLAGS"] = tiny.device_flags(1, optimized=True)
    # Headless and Agg-based, but unlike plain Agg (where plt.show() does nothing) it draws
    # every figure, so an error in a plot shows up here.
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL_NAME
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them"
    first = nb.cells[0] if nb.cells else None
    assert first is not None and first.cell_type == "markdown", (
        f"{path.name}: the first cell must be markdown saying what it shows and how long it takes"
    )
    assert RUNTIME_PATTERN.search(first.source), (
        f"{path.name}: the first cell must say how long the notebook takes (e.g. 'about 20 s')"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes(path, kernel_spec_manager, record_property, capsys):
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME,
        # Plain tracebacks: the failing cell's traceback reads cleanly in pytest's report.
        extra_arguments=["--InteractiveShell.colors=nocolor"],
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    start = time.perf_counter()
    try:
        # CellExecutionError's message holds the failing cell's source and traceback.
        client.execute(cleanup_kc=True, cwd=str(NOTEBOOK_DIR), env=_kernel_env())
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    seconds = time.perf_counter() - start
    record_property("execution_seconds", round(seconds, 1))
    with capsys.disabled():
        print(f"\n{path.name}: executed in {seconds:.1f} s (kernel start-up included)")
