"""The figures say what their numbers are: each is read back from the matplotlib figure that was saved
(every figure goes through plots.save_figure, which puts the file in place whole)."""

from __future__ import annotations

import pytest
import torch

from src import plots


@pytest.fixture
def saved(monkeypatch) -> list:
    """The (figure, path) of every figure saved, in order, the file still written by save_figure."""
    figures = []
    original = plots.save_figure

    def record(fig, out, **kwargs):
        figures.append((fig, out))
        return original(fig, out, **kwargs)

    monkeypatch.setattr(plots, "save_figure", record)
    return figures


def test_training_curves_count_epochs_from_one_with_a_line_per_stage(tmp_path, saved):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/loss,train/acc,val/loss,val/acc,test/loss,test/acc\n"
                       "0,9,0.9,0.6,,,,\n0,9,,,0.8,0.65,,\n1,19,0.5,0.8,,,,\n1,19,,,0.45,0.82,,\n"
                       "2,29,0.3,0.9,,,,\n2,29,,,0.35,0.85,,\n2,29,,,,,0.4,0.84\n")
    assert plots.training_curves(metrics, tmp_path / "curves.png") == tmp_path / "curves.png"
    [(fig, out)] = saved
    assert out == tmp_path / "curves.png" and out.is_file()
    loss, acc = fig.axes[:2]
    assert (loss.get_title(), acc.get_title()) == ("loss", "acc")
    lines = {(ax.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
             for ax in (loss, acc) for line in ax.get_lines()}
    assert lines == {("loss", "train"): ([1, 2, 3], [0.9, 0.5, 0.3]), ("loss", "val"): ([1, 2, 3], [0.8, 0.45, 0.35]),
                     ("acc", "train"): ([1, 2, 3], [0.6, 0.8, 0.9]), ("acc", "val"): ([1, 2, 3], [0.65, 0.82, 0.85])}


def test_no_training_curves_without_a_logged_epoch(tmp_path, saved):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,test/loss,test/acc\n0,0,0.4,0.84\n")  # fast_dev_run: only a test row
    assert plots.training_curves(metrics, tmp_path / "curves.png") is None
    assert saved == [] and not (tmp_path / "curves.png").exists()


def test_the_confusion_matrix_has_true_classes_as_rows_with_their_accuracy(tmp_path, saved):
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [4, 0, 0]])  # class 2: never right; class 1: predicted 3 times
    plots.confusion_matrix(confusion, ["a", "b", "c"], tmp_path / "confusion.png", split="val")
    [(fig, out)] = saved
    [ax] = fig.axes
    assert out.is_file() and ax.get_title() == "val confusion matrix"
    assert ax.get_images()[0].get_array().tolist() == confusion.tolist()  # row i: the images of class i
    # Each cell's printed count sits on its own cell: the text at (column j, row i) is confusion[i, j].
    assert {t.get_position(): t.get_text() for t in ax.texts} == {
        (j, i): str(int(confusion[i, j])) for i in range(3) for j in range(3)}
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a (75.0%)", "b (100.0%)", "c (0.0%)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]


def test_the_gallery_titles_name_true_and_predicted_and_never_round_up_to_certainty(tmp_path, saved):
    images = torch.rand(2, 784, generator=torch.Generator().manual_seed(0))
    out = plots.mistakes(images, ["test[7]", "test[9]"], [1, 2], [2, 0], [0.99996, 0.5], ["zero", "one", "two"],
                         tmp_path / "mistakes.png", "the 2 most confidently wrong")
    [(fig, written)] = saved
    assert out == written == tmp_path / "mistakes.png" and out.is_file()
    assert fig.get_suptitle() == "the 2 most confidently wrong"
    shown = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in shown] == ["test[7]\ntrue: one\npredicted: two\n99.99%",
                                                "test[9]\ntrue: two\npredicted: zero\n50.00%"]
    for ax, image in zip(shown, images):  # each image upright, row by row, as the model saw it
        assert ax.get_images()[0].get_array().tolist() == image.reshape(28, 28).tolist()


@pytest.mark.parametrize("label, outcome", [(None, ""), (3, " (right)"), (1, " (wrong: it is 1)")])
def test_the_prediction_figure_says_whether_it_is_right(tmp_path, saved, label, outcome):
    from matplotlib.colors import to_hex

    probabilities = torch.full((10,), 0.02)
    probabilities[3] = 0.82
    image = torch.rand(28, 28, generator=torch.Generator().manual_seed(0))
    plots.prediction(probabilities, [str(k) for k in range(10)], image, tmp_path / "p.png", "train[3]", label=label)
    [(fig, out)] = saved
    bars, picture = fig.axes
    assert out.is_file() and bars.get_title() == f"predicted 3: 82.0%{outcome}"
    assert [round(bar.get_height(), 6) for bar in bars.patches] == [round(p, 6) for p in probabilities.tolist()]
    # The predicted class orange, the true label green (a right answer: one green bar), the rest blue.
    colours = ["tab:blue"] * 10
    colours[3] = "tab:orange"
    if label is not None:
        colours[label] = "tab:green"
    assert [to_hex(bar.get_facecolor()) for bar in bars.patches] == [to_hex(c) for c in colours]
    assert picture.get_title() == "train[3]" and picture.get_images()[0].get_array().tolist() == image.tolist()
