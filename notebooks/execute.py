"""Run notebooks/walkthrough.ipynb top to bottom and save it with its outputs: `python notebooks/execute.py`.

The kernel is this Python's own (jupyter_client starts `python3` kernels with sys.executable), started
in notebooks/ as Jupyter would. nbclient executes; unlike `jupyter nbconvert --execute` it can merge a
cell's stream fragments after the cell has run, so the progress bar is stored as its final line per
epoch instead of hundreds of carriage-return updates, and it is told not to stamp cells with times.
The tests run the same function on tiny data.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "walkthrough.ipynb"


def execute(nb: nbformat.NotebookNode, timeout: int | None = None) -> nbformat.NotebookNode:
    """Run every cell in order, in place; a cell's error raises nbclient's CellExecutionError."""
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(HERE)}},
                            record_timing=False, coalesce_streams=True)
    return client.execute()


def main() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    execute(nb)
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK.relative_to(Path.cwd()) if NOTEBOOK.is_relative_to(Path.cwd()) else NOTEBOOK}")


if __name__ == "__main__":
    main()
