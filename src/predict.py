"""Classify images with a trained model: `python -m src.predict [idx=3 | idx=[3,4,5] | image=PATH] [key=value ...]`.

As the original program ends: each image's 10 softmax probabilities, the predicted class
and the true label are printed, and a figure of the probabilities beside the 28x28 image
is saved into the run's folder, outputs/predict/DATE/TIME/. No Trainer is started.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from src.config import PredictConfig, UserError, exit_on_user_error, run_hydra, validated

RUN_FOLDERS = ("outputs", "multirun")  # where src.train's runs write, relative to the working directory
ORIGINAL_IDX = 3  # the original program classifies train_images[3]
MIN_CONTRAST = 16  # grey levels (of 255) between ground and strokes below which a picture counts as blank
NOISE_FLOOR = 0.2  # ink fainter than this share of the strongest stroke is paper texture, dust or blur
# MNIST fits each digit into a 20x20 box and moves its centre of mass onto pixel (14, 14) of a 28x28 frame.
DIGIT_BOX, FRAME, CENTRE = 20, 28, 14


@dataclass
class Prediction:
    name: str  # "train[3]" or the image file's name
    image: torch.Tensor  # (28, 28) in [0, 1], light on dark: what the model saw
    probabilities: torch.Tensor  # (num_classes,), summing to 1
    label: int | None  # the true class of a dataset image
    figure: Path | None = None


def newest_checkpoint(folders: tuple[str, ...] = RUN_FOLDERS) -> Path:
    """The most recently written last.ckpt of any training run under `folders`."""
    found = [path for folder in folders for path in Path(folder).rglob("last.ckpt") if path.is_file()]
    if not found:
        raise UserError(f"no checkpoint found: no last.ckpt under {' or '.join(f + '/' for f in folders)} in "
                        f"{Path.cwd()}; train one with `python -m src.train`, or give ckpt_path=FILE")
    return max(found, key=lambda path: path.stat().st_mtime)


def load_model(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict, dict]:
    """The network rebuilt from the checkpoint's own hyperparameters, those hyperparameters, and
    its data module's. Plain PyTorch: no Lightning to import for one image."""
    from src.checkpoint import load_checkpoint
    from src.network import build_mlp

    checkpoint = load_checkpoint(path)
    hparams = dict(checkpoint["hyper_parameters"])
    try:
        net = build_mlp(hparams["input_size"], hparams["hidden"], hparams["num_classes"])
        # The LightningModule keeps the network as `net`; its metrics hold no weights.
        net.load_state_dict({k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items()
                             if k.startswith("net.")})
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        reason = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        reason = reason if len(reason) <= 300 else reason[:300] + "…"
        raise UserError(f"ckpt_path={str(path)!r} holds a model of another architecture than this program's "
                        f"784 -> hidden -> 10 network ({reason})") from None
    return net.eval().to(device), hparams, dict(checkpoint.get("datamodule_hyper_parameters") or {})


def read_image(path: str | Path) -> torch.Tensor:
    """A picture of a digit prepared the way MNIST's digits were: (28, 28) float in [0, 1].

    Any size, colour or grey, dark on light or light on dark: greyscale, light digit on a
    dark ground, the digit's bounding box fitted into 20x20 pixels (aspect kept, antialiased)
    and its centre of mass put on pixel (14, 14) of the 28x28 frame.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image={str(path)!r} is not valid: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    if path.stat().st_size == 0:
        raise UserError(f"image={str(path)!r} is not valid: the file is empty")
    try:
        with Image.open(path) as opened:
            picture = ImageOps.exif_transpose(opened)  # a phone photo's pixels may be stored rotated
            picture.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"image={str(path)!r} is not an image Pillow can read ({str(error).splitlines()[0][:160]})") from None
    if picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info:
        # A drawing on a transparent canvas: its ground is taken to be white paper.
        picture = Image.alpha_composite(Image.new("RGBA", picture.size, "white"), picture.convert("RGBA"))
    grey = np.asarray(picture.convert("L"), dtype=np.float32)

    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    ground = float(np.median(border))
    if ground > 127:  # dark on light: MNIST's digits are light on dark
        grey, ground = 255 - grey, 255 - ground
    ink = np.clip(grey - ground, 0, None)
    if ink.max() < MIN_CONTRAST:
        raise UserError(f"image={str(path)!r} shows no digit: it is one flat shade "
                        f"(less than {MIN_CONTRAST} grey levels between ground and strokes)")
    ink /= ink.max()
    ink[ink < NOISE_FLOOR] = 0
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]

    # One antialiased resample does the fitting and the (sub-pixel) centring: Pillow's resize
    # reads a float box of the source, placed so that the centre of mass lands on pixel CENTRE.
    scale = max(ink.shape) / DIGIT_BOX  # source pixels per output pixel
    ys, xs = np.indices(ink.shape)
    centre_y = (ink * ys).sum() / ink.sum() + 0.5  # + 0.5: from pixel index to pixel centre
    centre_x = (ink * xs).sum() / ink.sum() + 0.5
    pad = int(np.ceil(FRAME * scale))  # room for the box to reach past the digit's edges
    padded = Image.fromarray(np.pad(ink, pad))  # float32: Pillow mode "F"
    # Output pixel j covers source [left + j * scale, left + (j + 1) * scale); pixel CENTRE's middle is CENTRE + 0.5.
    left, top = centre_x + pad - (CENTRE + 0.5) * scale, centre_y + pad - (CENTRE + 0.5) * scale
    frame = padded.resize((FRAME, FRAME), Image.Resampling.HAMMING,  # antialiased, no ringing beyond the box
                          box=(left, top, left + FRAME * scale, top + FRAME * scale))
    digit = torch.from_numpy(np.asarray(frame, dtype=np.float32).copy()).clamp_(min=0)
    return digit / digit.max()


def _check_device(device: str) -> None:
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[device]:
        raise UserError(f"device={device!r} is not available on this machine; use device=cpu")


def _class_names(dataset: str | None, num_classes: int) -> list[str]:
    from src.idx import DATASET_CLASSES

    if dataset not in DATASET_CLASSES:
        return [str(k) for k in range(num_classes)]
    return [name.split(" - ")[0] for name in DATASET_CLASSES[dataset].classes]  # MNIST's "3 - three" -> "3"


def _describe(k: int, classes: list[str]) -> str:
    return str(k) if classes[k] == str(k) else f"{k} ({classes[k]})"


def predict(cfg: DictConfig, run_dir: str | Path) -> list[Prediction]:
    """Classify the configured images, print the results and save one figure per image."""
    config: PredictConfig = validated(cfg)
    _check_device(config.device)
    own_image = read_image(config.image) if config.image is not None else None
    if config.ckpt_path is not None:
        ckpt_path, source = Path(config.ckpt_path), "ckpt_path"
    else:
        ckpt_path, source = newest_checkpoint(), f"the newest last.ckpt under {', '.join(f + '/' for f in RUN_FOLDERS)}"
    model, hparams, data = load_model(ckpt_path, config.device)
    dataset = data.get("name")
    classes = _class_names(dataset, hparams["num_classes"])

    if own_image is not None:
        images, labels = own_image[None], [None]
        names, titles = [Path(config.image).name], [f"{Path(config.image).name} as the model saw it"]
        stems = [Path(config.image).stem]
    else:
        indices = config.idx if isinstance(config.idx, list) else [ORIGINAL_IDX if config.idx is None else config.idx]
        images, labels = _dataset_images(ckpt_path, data, config, indices)
        names = titles = [f"{dataset} {config.split}[{i}]" for i in indices]
        stems = [f"{config.split}_{i}" for i in indices]
    print(f"checkpoint: {ckpt_path} ({source}; hidden={hparams['hidden']}, trained on {dataset or 'unknown data'})")

    with torch.inference_mode():
        probabilities = model(images.reshape(len(images), -1).to(config.device)).softmax(dim=1).cpu()

    from src import plots

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    predictions = []
    for name, title, stem, image, p, label in zip(names, titles, stems, images, probabilities, labels):
        predicted = int(p.argmax())
        print(f"{name}:")
        print(f"  probabilities: [{', '.join(f'{v:.8f}' for v in p.tolist())}]")
        print(f"  predicted: {_describe(predicted, classes)}, probability {float(p[predicted]):.4f}")
        if label is not None:
            print(f"  true label: {_describe(label, classes)}")
        figure = plots.prediction(p, classes, image, run_dir / f"prediction_{stem}.png", title=title, label=label,
                                  keep_open=config.show)
        print(f"  figure: {figure.relative_to(Path.cwd()) if figure.is_relative_to(Path.cwd()) else figure}")
        predictions.append(Prediction(name, image, p, label, figure))
    if config.show and not plots.show_open_figures():
        print("show=true: no display found, so no window was opened; the figures are saved as above")
    return predictions


def _dataset_images(ckpt_path: Path, data: dict, config: PredictConfig, indices: list[int]):
    """The split's images at `indices` as (n, 28, 28), preprocessed exactly as for training, and their labels."""
    from src.idx import DATASET_CLASSES, load_split, prepare_files

    name = data.get("name")
    if name not in DATASET_CLASSES:
        raise UserError(f"ckpt_path={str(ckpt_path)!r} does not record the dataset it was trained on; "
                        "classify your own picture with image=PATH")
    raw = prepare_files(name, config.data_dir or data.get("data_dir") or "data")
    x, y = load_split(name, str(raw), train=config.split == "train")
    out_of_range = [i for i in indices if i >= len(x)]
    if out_of_range:
        raise UserError(f"idx={out_of_range[0]} is out of range: the {config.split} split of {name} has {len(x)} "
                        f"images, so idx goes from 0 to {len(x) - 1}")
    index = torch.tensor(indices)
    return x[index].reshape(len(indices), 28, 28), y[index].argmax(dim=1).tolist()


@hydra.main(config_path="../conf", config_name="predict", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    predict(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    run_hydra(main)
