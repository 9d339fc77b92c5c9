"""Any picture of a digit made into an MNIST-style image: greyscale, light on dark, 28x28 in [0, 1].

What `python -m src.predict image=...` and the page do with a user's picture, in plain numpy and
Pillow (no torch model involved): open it safely (size checked before decoding, EXIF rotation
applied), then fit and centre the digit the way MNIST's digits were made.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from src.errors import UserError, one_line

if TYPE_CHECKING:  # torch itself is imported where it is used: bad input is refused before that (seconds)
    import torch

MIN_CONTRAST = 16  # grey levels (of 255) between ground and strokes below which a picture counts as blank
NOISE_FLOOR = 0.2  # ink fainter than this share of the strongest stroke is paper texture, dust or blur
# MNIST fits each digit into a 20x20 box and moves its centre of mass onto pixel (14, 14) of a 28x28 frame.
DIGIT_BOX, FRAME, CENTRE = 20, 28, 14
# Larger pictures are refused before they are decoded: a 10000x10000 scan would take gigabytes on the
# way to 28x28 pixels. Fifty million pixels still takes a 48-megapixel phone photo whole.
MAX_PIXELS = 50_000_000


def open_picture(path: str | Path, what: str | None = None):
    """A picture file as a Pillow image, EXIF rotation applied; one-line errors name it as `what`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    what = what or f"image={str(path)!r}"
    if not path.is_file():
        raise UserError(f"{what} is not valid: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    if path.stat().st_size == 0:
        raise UserError(f"{what} is not valid: the file is empty")
    try:
        with Image.open(path) as opened:  # reads the header only: the size is known before any decoding
            check_size(*opened.size, what)
            picture = ImageOps.exif_transpose(opened)  # a phone photo's pixels may be stored rotated
            picture.load()
    except Image.DecompressionBombError as error:  # Pillow's own limit, for sizes it finds while opening
        raise UserError(f"{what} is too large to classify ({one_line(error)[:160]}); "
                        f"scale it down to at most {MAX_PIXELS // 1_000_000} million pixels") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UserError(f"{what} is not an image Pillow can read ({one_line(str(error).splitlines()[0])[:160]})") from None
    return picture


def read_image(path: str | Path) -> torch.Tensor:
    """A picture file prepared the way MNIST's digits were: (28, 28) float in [0, 1]."""
    return prepare_picture(open_picture(path), f"image={str(path)!r}")


def prepare_picture(picture, what: str = "the picture") -> torch.Tensor:
    """A picture of a digit (a Pillow image, or a (H, W) or (H, W, 1|3|4) array) prepared the way
    MNIST's digits were: (28, 28) float in [0, 1].

    Any size, colour or grey, dark on light or light on dark: greyscale, light digit on a
    dark ground, the digit's bounding box fitted into 20x20 pixels (aspect kept, antialiased)
    and its centre of mass put on pixel (14, 14) of the 28x28 frame. A transparent ground
    counts as white paper. `what` names the picture in the one-line error for a blank one.
    """
    from PIL import Image

    if isinstance(picture, np.ndarray):  # checked before _as_uint8 copies it
        check_size(*(picture.shape[1::-1] if picture.ndim >= 2 else (picture.size, 1)), what)
        picture = Image.fromarray(_as_uint8(picture))
    else:
        check_size(*picture.size, what)
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
        raise UserError(f"{what} shows no digit: it is one flat shade "
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
    import torch

    digit = torch.from_numpy(np.asarray(frame, dtype=np.float32).copy()).clamp_(min=0)
    return digit / digit.max()


def check_size(width: int, height: int, what: str) -> None:
    if width * height > MAX_PIXELS:
        raise UserError(f"{what} is too large to classify: {width}x{height} pixels, more than "
                        f"{MAX_PIXELS // 1_000_000} million; scale it down (a digit needs far fewer)")


def _as_uint8(array: np.ndarray) -> np.ndarray:
    """An image array as Pillow takes it: uint8, (H, W) or (H, W, 3|4); floats in [0, 1] are scaled."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise UserError(f"a picture must be (H, W) or (H, W, 1|3|4) pixels, not an array of shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.asarray(array, dtype=np.float64)
        array = array * 255 if array.size and array.max() <= 1 else array
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return array
