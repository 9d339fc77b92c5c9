"""`python -m src.predict`: results, figures, checkpoint choice, bad input, and how `image=`
prepares a user's picture (checked on real handwritten digits)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from src.errors import UserError
from src.idx import load_split, prepare_files
from src.model import MNISTClassifier
from src.inference import CLASS_NAMES, load_model
from src.pictures import prepare_picture, read_image
from src.predict import predict
from src.train import train
from tests.conftest import (REAL_TRAIN, ROOT, compose_config, compose_train, make_digits, real_digits,
                            run_reporting_imports, write_dataset)

HIDDEN = 16  # not the default 512: predict must rebuild the model from the checkpoint alone


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """last.ckpt of one tiny training run (600 images, 3 epochs) on data kept for the whole module."""
    root = tmp_path_factory.mktemp("trained")
    data = write_dataset(root / "data")
    cfg = compose_train(f"data.data_dir={data}", "trainer.max_epochs=3", "trainer.accelerator=cpu",
                        f"model.hidden={HIDDEN}")
    train(cfg, root / "run")
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture
def workdir(tmp_path, monkeypatch, trained) -> Path:
    """A working directory whose outputs/ holds one training run, as after `python -m src.train`."""
    run = tmp_path / "outputs" / "2026-01-01" / "12-00-00" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(trained.read_bytes())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_predict(*overrides: str):
    return predict(compose_config("predict", *overrides), Path.cwd() / "predict_run")


def parse(out: str) -> list[dict]:
    """The printed results, one dict per image."""
    blocks = []
    for probabilities, predicted, label in re.findall(
            r"probabilities: \[([^\]]*)\]\n  predicted: (\d+).*\n(?:  true label: (\d+).*\n)?", out):
        blocks.append({"probabilities": [float(v) for v in probabilities.split(",")], "predicted": int(predicted),
                       "label": int(label) if label else None})
    return blocks


def test_idx_prints_probabilities_class_and_label_and_saves_a_figure(workdir, capsys):
    [result] = run_predict("idx=3")
    out = capsys.readouterr().out
    [printed] = parse(out)
    assert len(printed["probabilities"]) == 10
    assert abs(sum(printed["probabilities"]) - 1) < 1e-5
    assert printed["predicted"] == int(np.argmax(printed["probabilities"]))
    _, labels = make_digits(600, seed=1)  # the training images conftest wrote
    assert printed["label"] == labels[3]
    shown = float(re.search(r"^  predicted: \d+, probability (\d\.\d{4})$", out, re.M).group(1))
    assert abs(shown - max(printed["probabilities"])) <= 5e-5  # the predicted class's probability
    assert "outputs/2026-01-01/12-00-00/checkpoints/last.ckpt" in out and f"hidden={HIDDEN}" in out
    figure = Path(re.search(r"figure: (.*)", out).group(1))
    assert figure == Path("predict_run") / "prediction_train_3.png" and workdir / figure == result.figure
    with Image.open(figure) as image:
        image.verify()
        assert image.format == "PNG" and image.width > 200 and image.height > 100


FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_no_idx_predicts_train_3_and_names_fashion_mnists_classes(tmp_path, monkeypatch, capsys):
    """`python -m src.predict` alone, after `python -m src.train data=fashion_mnist`. The tiny IDX files stand in
    for Fashion-MNIST's: the dataset is read from the files in data.data_dir before Debian's copy is looked for."""
    data = write_dataset(tmp_path / "data")
    train(compose_train("data=fashion_mnist", f"data.data_dir={data}", "trainer.max_epochs=2", "trainer.accelerator=cpu",
                        f"model.hidden={HIDDEN}", "trainer.enable_progress_bar=false"),
          tmp_path / "outputs" / "2026-01-01" / "12-00-00")
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    [result] = run_predict()
    out = capsys.readouterr().out
    images, labels = make_digits(600, seed=1)  # the training images write_dataset wrote
    assert torch.equal(result.image, torch.from_numpy(images[3]).float() / 255)
    assert "trained on fashion_mnist)\nfashion_mnist train[3]:\n" in out
    assert f"\n  true label: {labels[3]} ({FASHION_NAMES[labels[3]]})\n" in out  # 9 (Ankle boot)
    predicted = int(re.search(r"^  predicted: (\d) ", out, re.M)[1])
    assert f"\n  predicted: {predicted} ({FASHION_NAMES[predicted]}), probability " in out
    assert predicted == labels[3]  # the bars are easy to learn


def test_same_input_and_probabilities_as_the_trained_model(workdir, trained):
    """Preprocessed exactly as in training, and rebuilt exactly: Lightning's own loader agrees."""
    [result] = run_predict("idx=5", "split=test")
    lightning_model = MNISTClassifier.load_from_checkpoint(trained, map_location="cpu", weights_only=True).eval()
    data = torch.load(trained, weights_only=True)["datamodule_hyper_parameters"]
    x, y = load_split(data["name"], str(prepare_files(data["name"], data["data_dir"])), train=False)
    assert torch.equal(result.image.reshape(784), x[5])
    with torch.no_grad():
        assert torch.allclose(result.probabilities, lightning_model(x[5:6]).softmax(dim=1)[0], atol=1e-6)
    assert result.label == int(y[5].argmax())


def test_several_indices_in_one_call(workdir, capsys):
    results = run_predict("idx=[3,4,5]")
    printed = parse(capsys.readouterr().out)
    _, labels = make_digits(600, seed=1)
    assert [p["label"] for p in printed] == [r.label for r in results] == labels[3:6].tolist()
    assert sorted(p.name for p in (workdir / "predict_run").glob("*.png")) == [
        "prediction_train_3.png", "prediction_train_4.png", "prediction_train_5.png"]


def test_a_wrong_answer_prints_the_true_label_beside_the_predicted_class(workdir, trained, capsys):
    checkpoint = torch.load(trained, weights_only=True)
    for key in ("net.2.weight", "net.2.bias"):  # output k's weights move to k + 1: every answer one class off
        checkpoint["state_dict"][key] = checkpoint["state_dict"][key].roll(1, dims=0)
    torch.save(checkpoint, workdir / "off_by_one.ckpt")
    results = run_predict("ckpt_path=off_by_one.ckpt", "idx=[3,4,5]")
    printed = parse(capsys.readouterr().out)
    _, labels = make_digits(600, seed=1)
    assert [p["label"] for p in printed] == [r.label for r in results] == labels[3:6].tolist()
    assert [p["predicted"] for p in printed] == [int(r.probabilities.argmax()) for r in results] == [
        (k + 1) % 10 for k in labels[3:6].tolist()]


def test_newest_of_two_runs_is_chosen(workdir, capsys):
    first = workdir / "outputs" / "2026-01-01" / "12-00-00" / "checkpoints" / "last.ckpt"
    second = workdir / "multirun" / "2025-06-01" / "09-00-00" / "0" / "checkpoints" / "last.ckpt"
    second.parent.mkdir(parents=True)
    second.write_bytes(first.read_bytes())
    for newer, older in ((second, first), (first, second)):  # both ways: neither name nor folder decides
        os.utime(older, (1_000_000, 1_000_000))
        os.utime(newer, (2_000_000, 2_000_000))
        run_predict("idx=0")
        checkpoint_line = capsys.readouterr().out.splitlines()[0]
        assert str(newer.relative_to(workdir)) in checkpoint_line and str(older.relative_to(workdir)) not in checkpoint_line


def test_ckpt_path_picks_one_explicitly(workdir, trained, capsys):
    run_predict(f"ckpt_path={trained}", "idx=0")
    assert capsys.readouterr().out.startswith(f"checkpoint: {trained} (ckpt_path")


def test_show_without_a_display_still_saves_the_figure(workdir, capsys):
    import matplotlib

    matplotlib.use("Agg")  # as on a machine without a display; never open a window from a test
    import matplotlib.pyplot as plt

    [result] = run_predict("idx=1", "show=true")
    assert "no display found" in capsys.readouterr().out
    assert result.figure.is_file() and plt.get_fignums() == []


def test_show_keeps_every_figure_open_for_the_window(workdir, monkeypatch, capsys):
    import matplotlib

    matplotlib.use("Agg")  # never open a window from a test: the windows' call is replaced below
    import matplotlib.pyplot as plt
    from src import plots

    shown = []

    def show():  # as with a display: the figures still open are shown, then closed by the user
        shown.append([fig.axes[1].get_title() for fig in map(plt.figure, plt.get_fignums())])
        plt.close("all")
        return True

    monkeypatch.setattr(plots, "show_open_figures", show)
    plt.close("all")  # only this run's figures count
    results = run_predict("idx=[1,2]", "show=true")
    assert shown == [["mnist train[1]", "mnist train[2]"]] and all(r.figure.is_file() for r in results)
    assert "no display found" not in capsys.readouterr().out


def draw_digit(size=(300, 220), ink="black", paper="white", mode="RGB", at=(40, 30), scale=1.0) -> Image.Image:
    """A '4'-like figure drawn with a thick pen."""
    image = Image.new(mode, size, paper)
    pen = ImageDraw.Draw(image)
    x, y = at
    s = lambda *points: [(x + scale * px, y + scale * py) for px, py in points]  # noqa: E731
    pen.line(s((60, 0), (0, 90), (90, 90)), fill=ink, width=int(12 * scale))
    pen.line(s((70, 30), (70, 150)), fill=ink, width=int(12 * scale))
    return image


def correlation(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1])


def test_own_image_is_made_like_an_mnist_digit(tmp_path):
    draw_digit().save(tmp_path / "dark_on_light.png")
    draw_digit((90, 120), ink=255, paper=0, mode="L", at=(10, 8), scale=0.6).save(tmp_path / "light_on_dark.png")
    a, b = read_image(tmp_path / "dark_on_light.png"), read_image(tmp_path / "light_on_dark.png")
    for digit in (a, b):
        assert digit.shape == (28, 28) and digit.dtype == torch.float32
        assert digit.max() == 1 and digit.min() == 0
        assert digit[0].max() == 0 and digit[:, 0].max() == 0 and digit[-1].max() == 0 and digit[:, -1].max() == 0
        rows, cols = digit.amax(dim=1).nonzero(), digit.amax(dim=0).nonzero()
        assert 20 <= max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 <= 22  # the 20-pixel box, + partial pixels
        ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
        assert abs(float((digit * ys).sum() / digit.sum()) - 14) < 0.2
        assert abs(float((digit * xs).sum() / digit.sum()) - 14) < 0.2
    assert correlation(a, b) > 0.95  # same figure, whatever its size, colours and place


def test_a_digit_already_at_mnists_scale_is_centred_on_its_mass():
    """A 28x28 picture whose digit is 20 pixels tall (an MNIST digit saved as a file): one source pixel per output
    pixel, where centring by pixel index instead of pixel centre would put the mass half a pixel off."""
    picture = np.zeros((28, 28), np.uint8)
    picture[3:23, 9:17] = 255
    picture[3:8, 17:21] = 255  # a bar and a flag: the mass is not at the box's middle
    digit = prepare_picture(picture)
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    assert abs(float((digit * ys).sum() / digit.sum()) - 14) < 0.2
    assert abs(float((digit * xs).sum() / digit.sum()) - 14) < 0.2


def test_transparent_drawing_counts_as_ink_on_paper(tmp_path):
    drawing = draw_digit(ink=(0, 0, 0, 255), paper=(0, 0, 0, 0), mode="RGBA")  # black strokes, transparent ground
    drawing.save(tmp_path / "drawing.png")
    draw_digit().save(tmp_path / "paper.png")
    assert correlation(read_image(tmp_path / "drawing.png"), read_image(tmp_path / "paper.png")) > 0.99


def test_a_photo_stored_rotated_is_read_upright(tmp_path):
    """Phones store a photo's pixels as the sensor saw them and say in its EXIF Orientation how to turn it."""
    upright = draw_digit()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: turn the stored pixels 90 degrees clockwise to view them
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "photo.png", exif=exif)  # stored turned anticlockwise
    upright.save(tmp_path / "upright.png")
    assert torch.equal(read_image(tmp_path / "photo.png"), read_image(tmp_path / "upright.png"))


def test_paper_texture_is_not_taken_for_ink(tmp_path):
    clean = draw_digit(mode="L")
    texture = np.random.default_rng(0).integers(-25, 25, (clean.height, clean.width))
    photo = np.clip(np.asarray(clean, dtype=np.int64) - 20 + texture, 0, 255).astype(np.uint8)  # grey, uneven paper
    clean.save(tmp_path / "clean.png")
    Image.fromarray(photo).save(tmp_path / "photo.png")
    assert correlation(read_image(tmp_path / "photo.png"), read_image(tmp_path / "clean.png")) > 0.95


def test_own_image_prints_and_saves_what_the_model_saw(workdir, capsys):
    draw_digit().save(workdir / "my digit.png")
    [result] = run_predict("image=my digit.png")
    out = capsys.readouterr().out
    [printed] = parse(out)
    assert "\nmy digit.png:\n  probabilities: [" in out and result.name == "my digit.png"  # named as the user named it
    assert printed["label"] is None and abs(sum(printed["probabilities"]) - 1) < 1e-5
    assert printed["predicted"] == int(np.argmax(printed["probabilities"])) == int(result.probabilities.argmax())
    assert torch.equal(result.image, read_image(workdir / "my digit.png"))
    assert result.figure == workdir / "predict_run" / "prediction_my digit.png" and result.figure.is_file()


def write_files(folder: Path) -> None:
    """The wrong files a user might pass."""
    torch.save([1, 2, 3], folder / "list.ckpt")
    torch.save({"state_dict": {"conv.weight": torch.zeros(3)}, "hyper_parameters": {"channels": 3}}, folder / "cnn.ckpt")
    torch.save({"state_dict": {"0.weight": torch.zeros(3)}}, folder / "weights.ckpt")  # a state dict, no hyperparameters
    trained = torch.load(folder / "outputs" / "2026-01-01" / "12-00-00" / "checkpoints" / "last.ckpt", weights_only=True)
    del trained["datamodule_hyper_parameters"]
    torch.save(trained, folder / "anonymous.ckpt")  # a model that does not say what it was trained on
    (folder / "text.ckpt").write_text("not a checkpoint\n")
    (folder / "notes.png").write_text("not an image\n")
    (folder / "empty.png").write_bytes(b"")
    Image.new("RGB", (64, 64), (230, 230, 230)).save(folder / "blank.png")


BAD_INPUTS = [
    (["idx=600"], "idx=600 is out of range: the train split of mnist has 600 images, so idx goes from 0 to 599"),
    (["idx=200", "split=test"], "idx goes from 0 to 199"),
    (["idx=[1,2,700]"], "idx=700 is out of range"),
    (["idx=abc"], "idx='abc' is not valid: expected an image index"),
    (["idx=-1"], "idx=-1 is not valid"),
    (["idx=2.5"], "idx=2.5 is not valid"),
    (["idx=true"], "idx=True is not valid: expected an image index"),  # a bool is an int to Python: image 1
    (["idx=[]"], "idx=[] is not valid"),
    (["split=foo"], "split='foo' is not valid: expected one of train, test"),
    (["ckpt_path=nothing.ckpt"], "ckpt_path='nothing.ckpt' is not valid: no such file"),
    (["ckpt_path=text.ckpt"], "ckpt_path='text.ckpt' is not a checkpoint: expected a file written by python -m src.train"),
    (["ckpt_path=notes.png"], "ckpt_path='notes.png' is not a checkpoint"),
    (["ckpt_path=list.ckpt"], "ckpt_path='list.ckpt' is not a checkpoint of this program"),
    (["ckpt_path=weights.ckpt"], "ckpt_path='weights.ckpt' is not a checkpoint of this program: expected a Lightning checkpoint"),
    (["ckpt_path=cnn.ckpt"], "ckpt_path='cnn.ckpt' holds a model of another architecture"),
    (["ckpt_path=anonymous.ckpt"], "ckpt_path='anonymous.ckpt' does not record the dataset it was trained on; "
                                   "classify your own picture with image=PATH"),
    (["image=nothing.png"], "image='nothing.png' is not valid: no such file"),
    (["image=outputs"], "image='outputs' is not valid: a folder, not a file"),
    (["image=notes.png"], "image='notes.png' is not an image"),
    (["image=empty.png"], "image='empty.png' is not valid: the file is empty"),
    (["image="], "image='' is not valid: expected the path of an image file"),
    (["image=blank.png"], "image='blank.png' shows no digit"),
    (["image=blank.png", "idx=3"], "idx and image were both given"),
    (["device=mps"], "device='mps' is not available on this machine"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_error(workdir, overrides, message):
    if overrides == ["device=mps"] and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    write_files(workdir)
    with pytest.raises(UserError) as error:
        run_predict(*overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_loaded_network_is_on_the_device_asked_for(trained):
    """What device=cuda gets, checked here with PyTorch's 'meta' device (tests/test_cuda.py runs it on CUDA)."""
    model = load_model(trained, "meta")
    assert {p.device.type for p in model.net.parameters()} == {"meta"} and not model.net.training
    assert model.summary == f"hidden={HIDDEN}, trained on mnist" and model.classes == CLASS_NAMES["mnist"]


def test_a_checkpoint_of_another_width_is_refused(workdir, trained):
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["hyper_parameters"]["hidden"] = HIDDEN * 2  # says one width, holds weights of another
    torch.save(checkpoint, workdir / "wider.ckpt")
    with pytest.raises(UserError, match="another architecture.*size mismatch for 0.weight"):
        run_predict("ckpt_path=wider.ckpt")


def test_data_dir_finds_the_images_of_a_checkpoint_trained_elsewhere(workdir, trained):
    checkpoint = torch.load(trained, weights_only=True)
    data_dir = checkpoint["datamodule_hyper_parameters"]["data_dir"]
    checkpoint["datamodule_hyper_parameters"]["data_dir"] = str(workdir / "gone")  # the folder it trained from
    torch.save(checkpoint, workdir / "elsewhere.ckpt")
    [result] = run_predict("ckpt_path=elsewhere.ckpt", f"data_dir={data_dir}", "idx=3")
    assert result.label == make_digits(600, seed=1)[1][3]


def test_no_checkpoint_says_how_to_train_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"no checkpoint found.*python -m src.train") as error:
        run_predict("idx=3")
    assert str(error.value) == (f"no checkpoint found: no last.ckpt under outputs/ or multirun/ in {tmp_path}; "
                                "train one with `python -m src.train`, or give ckpt_path=FILE")


@pytest.mark.slow
def test_command_line_run_and_bad_input_exit_codes(workdir):
    """Real processes: a result and a figure with exit status 0; bad input: one line, status 1, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    env.pop("HYDRA_FULL_ERROR", None)
    ok = subprocess.run([sys.executable, "-m", "src.predict", "idx=3"], cwd=workdir, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    [printed] = parse(ok.stdout)
    assert abs(sum(printed["probabilities"]) - 1) < 1e-5
    figure = Path(re.search(r"figure: (.*)", ok.stdout).group(1))
    assert (workdir / figure).is_file() and figure.parts[:2] == ("outputs", "predict")
    write_files(workdir)
    for overrides in (["idx=abc"], ["idx=600"], ["ckpt_path=text.ckpt"], ["image=notes.png"]):
        bad = subprocess.run([sys.executable, "-m", "src.predict", *overrides], cwd=workdir, env=env,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1, (overrides, bad.stderr)
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in bad.stderr, bad.stderr


# Real handwriting: MNIST's own digits (tests/conftest.py's), saved the way a user's picture arrives.

def as_users_picture(digit: np.ndarray, path: Path, k: int) -> Path:
    """Dark ink on white paper, enlarged to 200x200, off-centre on a larger page, in RGB."""
    enlarged = ImageOps.invert(Image.fromarray(digit)).resize((200, 200), Image.Resampling.BICUBIC).convert("RGB")
    page = Image.new("RGB", (290, 250), "white")
    page.paste(enlarged, (10 + 7 * k % 70, 40 - 5 * k % 40))
    page.save(path)
    return path


def centred_on_its_mass(digit: np.ndarray) -> np.ndarray:
    """MNIST puts a digit's centre of mass on pixel (14, 14) to the nearest whole pixel; this, exactly."""
    ys, xs = np.indices(digit.shape)
    cy, cx = (digit * ys).sum() / digit.sum(), (digit * xs).sum() / digit.sum()
    image = Image.fromarray(digit.astype(np.float32))  # mode "F"
    return np.asarray(image.transform((28, 28), Image.Transform.AFFINE, (1, 0, cx - 14, 0, 1, cy - 14),
                                      Image.Resampling.BILINEAR))


@pytest.mark.slow
def test_real_digits_come_back_from_a_users_picture(tmp_path):
    images, _ = real_digits()
    raw, centred = [], []
    for k, digit in enumerate(images[REAL_TRAIN:REAL_TRAIN + 200]):
        seen = read_image(as_users_picture(digit, tmp_path / f"{k}.png", k)).numpy()
        assert seen.shape == (28, 28) and seen.max() == 1 and np.median(seen) == 0  # light digit, dark ground
        raw.append(correlation(seen, digit))
        centred.append(correlation(seen, centred_on_its_mass(digit.astype(np.float32))))
    # Measured on the 1,000 held-out digits as five samples of 200 (this test's is the first): correlation median
    # 0.961, 0.965, 0.967, 0.964, 0.962, lowest 0.838, 0.879, 0.838, 0.799, 0.823; once centred exactly, lowest
    # 0.975, 0.979, 0.980, 0.968, 0.977, median 0.992 to 0.993. Each threshold: the worst less 0.01 for a median,
    # less 0.02 for a lowest. The only difference left once centred is MNIST's rounding of the centre to a pixel.
    assert min(centred) >= 0.948 and np.median(centred) >= 0.981, (np.argmin(centred), min(centred))
    assert np.median(raw) >= 0.951 and min(raw) >= 0.779, (np.median(raw), min(raw))


@pytest.mark.slow
def test_a_model_reads_users_pictures_about_as_well_as_the_originals(real_checkpoint, tmp_path, monkeypatch):
    images, labels = real_digits()
    model = load_model(real_checkpoint).net  # trained on the other 4,000
    held_out = images[REAL_TRAIN:REAL_TRAIN + 300]
    truth = torch.from_numpy(labels[REAL_TRAIN:REAL_TRAIN + 300].astype(np.int64))
    pictures = torch.stack([read_image(as_users_picture(d, tmp_path / f"{k}.png", k)) for k, d in enumerate(held_out)])
    originals = torch.from_numpy(held_out.astype(np.float32) / 255)
    with torch.no_grad():
        accuracy_originals = (model(originals.reshape(-1, 784)).argmax(1) == truth).float().mean().item()
        accuracy_pictures = (model(pictures.reshape(-1, 784)).argmax(1) == truth).float().mean().item()
    print(f"accuracy on 300 held-out digits: originals {accuracy_originals:.3f}, as users' pictures {accuracy_pictures:.3f}")
    # Measured with the training seeds 42 (the tests') and 0 to 4: originals 0.917, 0.930, 0.930, 0.913, 0.880,
    # 0.920; as pictures 0.917, 0.943, 0.930, 0.917, 0.880, 0.927, never below the originals. Each threshold:
    # the worst less 0.02.
    assert accuracy_originals >= 0.86  # the model learned
    assert accuracy_pictures >= 0.86 and accuracy_pictures >= accuracy_originals - 0.02

    monkeypatch.chdir(tmp_path)  # and the command's own path agrees with the batch above
    [result] = run_predict(f"ckpt_path={real_checkpoint}", "image=0.png")
    assert torch.equal(result.image, pictures[0])
    assert int(result.probabilities.argmax()) == int(model(pictures[:1].reshape(1, 784)).argmax())


@pytest.mark.slow
@pytest.mark.parametrize("args, imported", [(["idx=3"], "['torchvision']"), (["image=digit.png"], "[]")])
def test_predict_imports_no_lightning_and_for_a_picture_no_torchvision(workdir, args, imported):
    """One image needs PyTorch, not the training framework: Lightning's import alone takes seconds. A picture
    does not need torchvision either, which reads the dataset's files (its import takes about 1.8 s)."""
    draw_digit().save(workdir / "digit.png")
    result = run_reporting_imports("src.predict", *args, cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "probabilities:" in result.stdout and result.stdout.splitlines()[-1] == f"imported: {imported}"


def test_the_class_names_written_out_are_torchvisions():
    from src.idx import DATASET_CLASSES

    assert CLASS_NAMES == {name: [c.split(" - ")[0] for c in dataset.classes] for name, dataset in DATASET_CLASSES.items()}
