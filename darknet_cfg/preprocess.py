"""Darknet's image pre-processing, reproduced bit for bit (numpy only; cv2 only decodes files).

Images are float32 arrays of shape (C, H, W), planar RGB, values ``float32(byte / 255)``,
exactly like darknet's ``image`` struct. Every resize follows darknet's ``src/image.c``
arithmetic (float32, no FMA, separate products and adds), so the results equal darknet's
buffers, not just approximate them.

What darknet feeds the network:

* detector (``./darknet detector test``): ``letterbox_image`` when ``[net] letter_box=1``,
  otherwise a plain ``resize_image`` to the network size (``detector_input``);
* classifier (``./darknet classifier predict``): ``resize_min`` (short side to ``net_w``)
  then a centred ``crop_image`` (``classifier_input``).
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Union

import numpy as np

from .errors import DarknetError

__all__ = [
    "ImageDecodeError", "MAX_IMAGE_PIXELS", "decode_bgr", "load_image", "resize_image", "letterbox_image", "resize_min",
    "crop_image", "classifier_input", "detector_input",
]

PathLike = Union[str, "os.PathLike[str]"]

_ONE = np.float32(1.0)
# float32(byte / 255) for every byte value: darknet divides in double, then stores a float.
_BYTE_TO_FLOAT = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)


class ImageDecodeError(DarknetError, ValueError):
    """An image file that exists but cannot be decoded (or is larger than ``max_image_pixels``)."""


# Images with more pixels than this are refused before decoding (a 100-megapixel picture already
# takes 1.2 GB as Darknet's float32 RGB planes). Override with DARKNET_CFG_MAX_PIXELS.
MAX_IMAGE_PIXELS = 100_000_000


def max_image_pixels() -> int:
    try:
        return int(os.environ.get("DARKNET_CFG_MAX_PIXELS", MAX_IMAGE_PIXELS))
    except ValueError:
        return MAX_IMAGE_PIXELS


def declared_size(path: PathLike):
    """(width, height) from the file's header without decoding it (Pillow), or None when Pillow
    is missing or does not know the format (OpenCV then decides)."""
    try:
        from PIL import Image
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(os.fspath(path)) as im:  # reads the header only
                return im.size
        except Image.DecompressionBombError as e:  # beyond twice Pillow's own limit
            m = re.search(r"\((\d+) pixels\)", str(e))
            return (int(m.group(1)), 1) if m else (2 ** 62, 1)
        except Exception:  # noqa: BLE001 - unknown or broken header: let the decoder judge
            return None


def check_image_size(path: PathLike) -> None:
    """ImageDecodeError when the header declares more than ``max_image_pixels()`` pixels."""
    size = declared_size(path)
    limit = max_image_pixels()
    if size is not None and size[0] * size[1] > limit:
        what = f"{size[0]}x{size[1]} pixels" if size[1] > 1 else f"{size[0]} pixels"
        raise ImageDecodeError(f"{os.fspath(path)}: {what} is more than the limit of {limit} "
                               "(set DARKNET_CFG_MAX_PIXELS to raise it)")


def decode_bgr(path: PathLike, exif_orientation: bool = False) -> np.ndarray:
    """8-bit BGR (H, W, 3) pixels of an image file, as OpenCV decodes them; every failure
    (unknown format, damaged data, too many pixels, decoder error) is an ImageDecodeError.
    ``exif_orientation``: rotate as the EXIF tag says (OpenCV's imread, which Darknet's OpenCV
    training loader uses); off, pixels are as stored (stb_image, Darknet's test path)."""
    import cv2  # only needed for decoding files

    path_str = os.fspath(path)
    check_image_size(path_str)
    data = np.fromfile(path_str, dtype=np.uint8)  # raises FileNotFoundError for a missing file
    flags = cv2.IMREAD_COLOR
    if not exif_orientation:
        flags |= getattr(cv2, "IMREAD_IGNORE_ORIENTATION", 0)
    try:
        bgr = cv2.imdecode(data, flags) if data.size else None
    except cv2.error as e:  # e.g. OpenCV's own pixel limit, corrupt streams
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "decoder error"
        raise ImageDecodeError(f"{path_str}: cannot decode image ({msg})") from None
    except MemoryError:
        raise ImageDecodeError(f"{path_str}: not enough memory to decode the image") from None
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ImageDecodeError(f"{path_str}: cannot decode image")
    if bgr.dtype != np.uint8:  # 16-bit files: keep the high byte, like stb_image's 8-bit load
        bgr = (bgr >> 8).astype(np.uint8)
    return bgr


def _cdiv(a: int, b: int) -> int:
    """C integer division (truncates toward zero; Python's // floors)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _check_image(im: np.ndarray) -> np.ndarray:
    im = np.asarray(im)
    if im.ndim != 3:
        raise ValueError(f"expected an image of shape (C, H, W), got shape {im.shape}")
    if im.dtype != np.float32:
        im = im.astype(np.float32)
    return im


def load_image(path: PathLike) -> np.ndarray:
    """Decode an image file like darknet's ``load_image(path, 0, 0, 3)``.

    Returns float32 (3, H, W), RGB planar, ``float32(byte / 255)``. Grey images are
    replicated to three channels and alpha is dropped (stb_image with 3 channels does the same).
    EXIF orientation is ignored, as stb_image ignores it. JPEG decoders differ in their
    pixels, so only lossless formats (PNG) give darknet's exact values.
    """
    rgb = decode_bgr(path)[:, :, ::-1].transpose(2, 0, 1)
    return np.ascontiguousarray(_BYTE_TO_FLOAT[rgb])


def _bilinear_taps(n_out: int, n_in: int):
    """Source index, weight and scale of darknet's bilinear resize along one axis.

    ``scale = float(n_in-1)/(n_out-1)``, ``s = i*scale``, ``idx = (int)s``, ``frac = s - idx``,
    all float32. For ``n_out == 1`` darknet divides by zero (and then converts NaN to int);
    here the single output position reads source index 0.
    """
    pos = np.arange(n_out)
    if n_out > 1:
        scale = np.float32(n_in - 1) / np.float32(n_out - 1)
    else:
        scale = np.float32(0.0)
    s = pos.astype(np.float32) * scale
    idx = s.astype(np.int64)  # (int) truncation, s >= 0
    frac = s - idx.astype(np.float32)
    return idx, frac


def resize_image(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """Darknet's ``resize_image``: separable bilinear resize with corner alignment.

    Horizontal pass into a (C, H, w) buffer, then vertical pass, both in float32:
    ``val = (1-dx)*p[ix] + dx*p[ix+1]`` (two rounded products, one rounded add); the last
    column (or a 1-pixel-wide source) copies source column ``W-1``. The vertical pass computes
    ``(1-dy)*part[iy]`` and then adds ``dy*part[iy+1]`` except on the last output row.
    """
    im = _check_image(im)
    w, h = int(w), int(h)
    if w < 1 or h < 1:
        raise ValueError(f"resize_image: target size must be positive, got {w}x{h}")
    C, H, W = im.shape
    if (W, H) == (w, h):  # darknet returns copy_image() for an unchanged size
        return im.copy()

    # Horizontal pass: (C, H, W) -> (C, H, w).
    ix, dx = _bilinear_taps(w, W)
    ix1 = np.minimum(ix + 1, W - 1)
    part = (_ONE - dx) * im[:, :, ix] + dx * im[:, :, ix1]
    part[:, :, w - 1] = im[:, :, W - 1]  # last column copies the last source column
    if W == 1:
        part[:, :, :] = im[:, :, :1]

    # Vertical pass: (C, H, w) -> (C, h, w).
    iy, dy = _bilinear_taps(h, H)
    iy1 = np.minimum(iy + 1, H - 1)
    dy_col = dy[:, None]
    out = (_ONE - dy_col) * part[:, iy, :]
    add = dy_col * part[:, iy1, :]
    # Darknet quirk: the last row is NOT special-cased like the last column. It keeps only
    # (1-dy)*part[iy]; when float32(h-1)*h_scale rounds below H-1 this row becomes ~0.
    if H > 1:
        out[:, : h - 1, :] += add[:, : h - 1, :]
    return out


def letterbox_image(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """Darknet's ``letterbox_image``: keep the aspect ratio, pad with 0.5.

    If ``float(w)/W < float(h)/H`` then ``new_w = w, new_h = (H*w)/W`` else
    ``new_h = h, new_w = (W*h)/H`` (integer division); the resized image is pasted at
    ``((w-new_w)/2, (h-new_h)/2)`` into a (C, h, w) canvas filled with 0.5.
    """
    im = _check_image(im)
    w, h = int(w), int(h)
    C, H, W = im.shape
    new_w, new_h = letterbox_size(W, H, w, h)
    resized = resize_image(im, new_w, new_h)
    boxed = np.full((C, h, w), 0.5, dtype=np.float32)
    ox, oy = _cdiv(w - new_w, 2), _cdiv(h - new_h, 2)
    _paste(resized, boxed, ox, oy)
    return boxed


def letterbox_size(image_w: int, image_h: int, net_w: int, net_h: int):
    """``(new_w, new_h)`` of the image inside darknet's letterbox (also used by box correction)."""
    if np.float32(net_w) / np.float32(image_w) < np.float32(net_h) / np.float32(image_h):
        return int(net_w), _cdiv(image_h * net_w, image_w)
    return _cdiv(image_w * net_h, image_h), int(net_h)


def _paste(src: np.ndarray, dst: np.ndarray, ox: int, oy: int) -> None:
    """Darknet's ``embed_image``: copy src into dst at (ox, oy), dropping what falls outside."""
    _, sh, sw = src.shape
    _, dh, dw = dst.shape
    x0, y0 = max(ox, 0), max(oy, 0)
    x1, y1 = min(ox + sw, dw), min(oy + sh, dh)
    if x1 > x0 and y1 > y0:
        dst[:, y0:y1, x0:x1] = src[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]


def resize_min(im: np.ndarray, min_size: int) -> np.ndarray:
    """Darknet's ``resize_min``: short side to ``min_size``, long side ``(long*min)/short``.

    Returns the image itself (not a copy) when it already has that size, like darknet.
    """
    im = _check_image(im)
    _, H, W = im.shape
    min_size = int(min_size)
    if W < H:
        w, h = min_size, _cdiv(H * min_size, W)
    else:
        w, h = _cdiv(W * min_size, H), min_size
    if (w, h) == (W, H):
        return im
    return resize_image(im, w, h)


def crop_image(im: np.ndarray, dx: int, dy: int, w: int, h: int) -> np.ndarray:
    """Darknet's ``crop_image``: a (C, h, w) window at (dx, dy); outside taps clamp to the edge."""
    im = _check_image(im)
    _, H, W = im.shape
    rows = np.clip(np.arange(int(h)) + int(dy), 0, H - 1)
    cols = np.clip(np.arange(int(w)) + int(dx), 0, W - 1)
    return np.ascontiguousarray(im[:, rows[:, None], cols[None, :]])


def classifier_input(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """What ``classifier predict`` feeds the network: ``resize_min(im, w)`` + centred crop."""
    resized = resize_min(im, w)
    _, rh, rw = resized.shape
    return crop_image(resized, _cdiv(rw - int(w), 2), _cdiv(rh - int(h), 2), w, h)


def detector_input(im: np.ndarray, w: int, h: int, letter_box: bool) -> np.ndarray:
    """What ``detector test`` feeds the network: letterbox if ``[net] letter_box=1``, else resize."""
    if letter_box:
        return letterbox_image(im, w, h)
    return resize_image(im, w, h)
