"""The notebook: it runs top to bottom on tiny data, its deterministic outputs are the committed ones,
and the committed copy shows a complete run."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT, needs_extra, write_dataset

pytestmark = pytest.mark.slow  # starts a kernel and trains: about 30 s

EDITION_LINE = 'EDITION = "dlwp1"'


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def text(cell) -> str:
    """What a code cell printed and returned, as text (figures excluded)."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type == "execute_result":
            parts.append(output.data.get("text/plain", ""))
    return "".join(parts)


def deterministic(nb) -> list[str]:
    """Outputs of the cells tagged deterministic: ndim, shapes, dtypes, broadcasting, the step count."""
    return [text(cell) for cell in code_cells(nb) if "deterministic" in cell.metadata.get("tags", [])]


NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"
# Where the documentation tells what the committed copy printed
DOCUMENTED = ROOT / "docs" / "notebook.md"


@pytest.fixture(scope="module")
def committed():
    needs_extra("notebook", "nbformat")
    import nbformat

    return nbformat.read(NOTEBOOK, as_version=4)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The notebook run now on the tiny IDX files, with the edition switched to the 3rd in its one cell."""
    needs_extra("notebook", "nbformat", "nbclient", "ipykernel")
    import nbformat

    from notebooks.execute import execute

    nb = nbformat.read(NOTEBOOK, as_version=4)
    [edition] = [cell for cell in code_cells(nb) if cell.source.startswith(EDITION_LINE)]
    edition.source = edition.source.replace(EDITION_LINE, 'EDITION = "dlwp3"', 1)
    data = write_dataset(tmp_path_factory.mktemp("notebook") / "data")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NOTEBOOK_DATA", str(data))  # the kernel inherits this process's environment
        return execute(nb, timeout=120)  # raises at the first cell that fails


def test_fresh_run_gives_the_committed_deterministic_outputs(fresh, committed):
    expected = deterministic(committed)
    assert len(expected) >= 8 and all(expected), "the committed copy lacks the deterministic cells' outputs"
    assert deterministic(fresh) == expected
    # What the study note's sections are about, written out here rather than taken from a run.
    joined = "\n".join(expected)
    assert "np.array([[1],[2],[3]]): 2 (3, 1) int64" in joined  # the note's "1-D" form has two axes
    assert "numpy np.array([1,2,3])      : 1 (3,) int64" in joined
    assert "[[ 2  3  4]\n [ 6  7  8]\n [10 11 12]]" in joined  # A + the column vector B
    assert "[[ 2  4  6]\n [ 5  7  9]\n [ 8 10 12]]" in joined  # A + a row vector: the note's result
    assert "468 full batches and one of 96, 469 steps per epoch" in joined
    assert "train_images[:128]: 3 (128, 28, 28) torch.uint8" in joined
    assert "407,050 parameters" in joined  # Keras's summary of Dense(512) + Dense(10)


def test_fresh_run_trains_the_edition_its_cell_chose(fresh):
    out = "\n".join(text(cell) for cell in code_cells(fresh))
    assert "data: the IDX files in the folder that NOTEBOOK_DATA names" in out
    assert "optimizer: Adam (" in out and "loss: cross-entropy against integer labels" in out
    assert "train_labels: (600,) torch.int64" in out
    assert re.search(r"^test_loss: \d\.\d{4} test_acc: \d\.\d{4}$", out, re.M)
    assert re.search(r"^predicted: \d, probability 0\.\d{4}; true label: \d$", out, re.M)


def test_committed_copy_is_one_complete_run(committed):
    cells = code_cells(committed)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), "not run top to bottom, once"
    assert not [o for cell in cells for o in cell.outputs if o.output_type == "error"]
    figures = [cell for cell in cells if any("image/png" in o.get("data", {}) for o in cell.outputs)]
    assert [("imshow" in cell.source, "plots.prediction" in cell.source) for cell in figures] == \
        [(True, False), (False, True)], "expected the figure of train_images[4] and the prediction figure"
    out = "\n".join(text(cell) for cell in cells)
    [line] = re.findall(r"^test_loss: \d+\.\d{4} test_acc: \d\.\d{4}$", out, re.M)
    # the figures the documentation gives for the committed copy are the ones it printed
    assert re.findall(r"printed `(test_loss: \d+\.\d{4} test_acc: \d\.\d{4})`", DOCUMENTED.read_text()) == [line]
    assert re.search(r"^data: (MNIST|MNIST's 10,000 test digits|the 5,000 MNIST digits)", out, re.M)
    assert EDITION_LINE in "".join(cell.source for cell in cells)


def test_committed_copy_holds_no_paths_or_dates_of_the_machine_it_ran_on(committed):
    raw = NOTEBOOK.read_text()
    for pattern in (r"/work/", r"/tmp", r"/home/", r"/root", r"/usr/", r"site-packages", r"[A-Z]:\\\\",
                    r"\b20\d\d-\d\d-\d\d\b", r"\.partial-"):
        assert not re.search(pattern, raw), f"{pattern} in the committed notebook"
    assert not any("execution" in cell.metadata for cell in code_cells(committed)), "timing stamps"


def data_cell(nb) -> str:
    [cell] = [cell for cell in code_cells(nb) if 'prepare_files("mnist", "data")' in cell.source]
    return cell.source


@pytest.mark.parametrize("online", [True, False])
def test_the_data_cell_downloads_mnist_first_and_falls_back_to_real_digits_offline(committed, tmp_path, monkeypatch,
                                                                                   online):
    """docs/notebook.md: the notebook reads MNIST, downloaded into data/; where it cannot be downloaded, real
    digits on the machine. Run the cell itself, with torchvision's download answering with the tiny IDX files
    (online) or refusing (as the machines of the tests do)."""
    import os

    import numpy as np
    import torchvision.datasets.mnist as tv_mnist

    from src import offline_digits
    from tests.conftest import make_digits

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NOTEBOOK_DATA", raising=False)
    asked, fell_back = [], []

    def download(url, download_root, filename, md5):
        asked.append(filename)
        if not online:
            raise RuntimeError("network disabled in tests")
        images, labels = make_digits(20, seed=1)
        offline_digits.write_idx(os.path.join(download_root, filename.removesuffix(".gz")),
                                 images if "images" in filename else labels)

    def real_digits(folder, t10k=None):
        fell_back.append(folder)
        os.makedirs(folder, exist_ok=True)
        for prefix in ("train", "t10k"):
            images, labels = make_digits(20, seed=2)
            offline_digits.write_idx(f"{folder}/{prefix}-images-idx3-ubyte", images)
            offline_digits.write_idx(f"{folder}/{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
        return "real digits"

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", download)
    monkeypatch.setattr(offline_digits, "write_real_digits", real_digits)
    namespace = {"os": os}
    exec(compile(data_cell(committed), "walkthrough.ipynb", "exec"), namespace)
    assert asked and asked[0] == "train-images-idx3-ubyte.gz", "the cell did not try MNIST's download first"
    if online:
        assert (namespace["DATA_DIR"], fell_back) == ("data", [])
        assert namespace["DATA_ABOUT"] == "MNIST (torchvision's files in data/)"
    else:
        assert (namespace["DATA_DIR"], fell_back) == ("data/offline-digits", ["data/offline-digits"])
