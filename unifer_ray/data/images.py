"""Decode, validate and resize images: the CPU stage in front of every model."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from unifer_ray import storage

# Larger images are refused rather than decoded: a decompression bomb must not take a worker down.
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


def load_image(source: str | bytes, size: int | None = None) -> Image.Image:
    """An RGB image from a path, s3:// URI or encoded bytes, resized to size×size when size is given."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        try:
            data = storage.read_bytes(source)
        except (FileNotFoundError, OSError) as exc:
            raise ImageError(f"cannot read {source}: {exc}") from None
    if not data:
        raise ImageError("empty image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"image of {image.width}x{image.height} pixels exceeds the limit of {MAX_PIXELS}")
            image.load()
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"not a decodable image: {exc}") from None
    return model_input(image, size)


def model_input(image: Image.Image, size: int | None = None) -> Image.Image:
    """`image` as every model sees it: RGB, resized to size×size (bicubic, as FERBench resizes) when size is given."""
    image = image.convert("RGB")
    if size is not None:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


def load_image_batch(batch: dict[str, np.ndarray], *, size: int, source_column: str = "image_uri"
                     ) -> dict[str, np.ndarray]:
    """Ray Data batch UDF: adds `image` (uint8 size×size×3) and fills `error` for rows whose image is unusable.

    Bad rows stay in the stream, with a zero image and their reason, so that nothing is lost downstream.
    """
    n = len(batch[source_column])
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    errors = np.array(batch["error"], dtype=object) if "error" in batch else np.full(n, "", dtype=object)
    for i, source in enumerate(batch[source_column]):
        if errors[i]:
            continue
        try:
            images[i] = np.asarray(load_image(source, size))
        except ImageError as exc:
            errors[i] = f"image: {exc}"
    return {**batch, "image": images, "error": errors}
