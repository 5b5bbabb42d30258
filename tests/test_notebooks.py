"""The notebooks run top to bottom, at toy sizes, as in CI.

Each notebook reads ``SMALL`` from the environment and then runs every cell at
toy sizes. The test executes an in-memory copy with ``SMALL=1`` in a kernel
started from this interpreter, in a temporary working directory; the committed
files (which carry the outputs of a full-size run) are never rewritten.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
REPO_URL = re.compile(r'^REPO_URL = "(https://github\.com/[^"]+)"$', re.MULTILINE)
BADGE = re.compile(r"https://colab\.research\.google\.com/github/([^)\s]+)\)")


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def test_all_five_notebooks_are_there():
    assert [n[:3] for n in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_"], NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_colab_ready_and_carries_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    first = nb.cells[0]
    # The Open-in-Colab badge points at this very notebook in the repository
    # that the install cell installs from.
    badge = BADGE.search(first.source)
    assert first.cell_type == "markdown" and badge, "first cell lacks the badge"
    code = [c for c in nb.cells if c.cell_type == "code"]
    install = REPO_URL.search(code[0].source)
    assert install and "google.colab" in code[0].source, "first code cell installs"
    repo = install.group(1).removeprefix("https://github.com/")
    assert badge.group(1).startswith(f"{repo}/blob/"), (badge.group(1), repo)
    assert badge.group(1).endswith(f"/notebooks/{name}")
    assert "SMALL" in code[1].source
    # Outputs of a full run (not SMALL), without errors.
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert "SMALL = False" in "".join(o.get("text", "") for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plots"
    assert all(c.execution_count for c in code[1:]), "not every cell was run"
    assert (NOTEBOOK_DIR / name).stat().st_size < 2_500_000


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_small(name, tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SMALL", "1")
    # A notebook trains the same programs more than once (e.g. 05's fine-tuning
    # from scratch and from the backbone): the kernel keeps them in a persistent
    # compilation cache, one per test worker (its notebooks run one at a time;
    # the committed outputs were made without one).
    cache = tmp_path_factory.getbasetemp() / "notebook_jax_cache"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(cache))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    # The kernel inherits the environment. 03 adds the 8 simulated CPU devices to
    # XLA_FLAGS itself. On a loaded machine a device thread of the simulated CPU
    # can fall behind its collective by more than XLA's 40 s, which aborts the
    # process: allow 10 minutes (this jaxlib knows the flag; Colab's may not, so
    # the notebook does not set it).
    monkeypatch.setenv(
        "XLA_FLAGS", "--xla_cpu_collective_call_terminate_timeout_seconds=600"
    )
    nb = _read(name)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "SMALL = True" in text
