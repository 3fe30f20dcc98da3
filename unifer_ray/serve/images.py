"""Images from requests: base64 data URLs, or http(s) URLs under an allow-list. Nothing else is ever opened.

Every refusal is an `ImageRejected` whose message says what was wrong; the app answers it with a 400.
Limits are checked in order of cost: encoded length, decoded bytes, format and pixel count from the header,
and only then the full decode.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
from urllib.parse import unquote, urlsplit

import httpx
from PIL import Image

from unifer_ray.data.images import ImageError, load_image
from unifer_ray.serve.config import LimitsConfig

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what PIL may parse here; other decoders are never reached
_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL)


class ImageRejected(ValueError):
    """An image the server will not use; the message says why."""


def decode_base64(text: str, max_bytes: int) -> bytes:
    # Base64 holds 3 bytes per 4 characters: refuse an oversized payload before decoding it.
    if len(text) > 4 * (max_bytes // 3 + 1):
        raise ImageRejected(f"image is larger than the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageRejected(f"image is not valid base64: {exc}") from None
    if len(data) > max_bytes:
        raise ImageRejected(f"image is larger than the limit of {max_bytes} bytes")
    return data


def data_url_bytes(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL."""
    match = _DATA_URL.fullmatch(url)
    if match is None or match["params"].lower().split(";")[-1] != "base64":
        raise ImageRejected("image data URL must look like data:image/<type>;base64,<data>")
    if not match["mime"].lower().startswith("image/"):
        raise ImageRejected(f"data URL has media type {match['mime']!r}, not image/*")
    return decode_base64(match["data"], max_bytes)


def decode_image(data: bytes, limits: LimitsConfig, size: int | None = None) -> Image.Image:
    """An RGB image from encoded bytes, within the byte and pixel limits; resized to size×size when size is given."""
    if not data:
        raise ImageRejected("image is empty")
    if len(data) > limits.max_image_bytes:
        raise ImageRejected(f"image is larger than the limit of {limits.max_image_bytes} bytes")
    try:
        header = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError as exc:  # PIL's own guard, far above our pixel limit
        raise ImageRejected(f"image exceeds the limit of {limits.max_image_pixels} pixels: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - crafted files make PIL raise many types (struct.error, EOFError...)
        raise ImageRejected(f"not an image in a supported format ({', '.join(FORMATS)}): {exc}") from None
    width, height = header.size
    if width * height > limits.max_image_pixels:
        raise ImageRejected(f"image of {width}x{height} pixels exceeds the limit of {limits.max_image_pixels} pixels")
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise ImageRejected(f"image of {width}x{height} pixels is more elongated than 1:{limits.max_aspect_ratio:g}")
    try:
        return load_image(data, size)
    except ImageError as exc:
        raise ImageRejected(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - as above: any failure to decode these bytes is the image's fault
        raise ImageRejected(f"not a decodable image: {type(exc).__name__}: {exc}") from None


def check_allowed(url: str, prefixes: list[str]) -> None:
    """Refuse a URL unless it starts with an allowed prefix and cannot step out of it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ImageRejected(
            f"image_url scheme {parts.scheme or '(none)'!r} is not accepted: send the image as a base64 data URL "
            "(data:image/png;base64,...)"
        )
    segments = unquote(parts.path).split("/")
    escapes = ".." in segments or "." in segments or "\\" in unquote(url)
    if escapes or parts.username or parts.password or not any(url.startswith(p) for p in prefixes):
        raise ImageRejected(
            "image_url is not under an allowed URL prefix: send the image as a base64 data URL "
            "(data:image/png;base64,...)"
        )


async def fetch_bytes(url: str, limits: LimitsConfig) -> bytes:
    """GET an allowed URL: no redirects, no proxies from the environment, a size cap and an overall deadline."""
    check_allowed(url, limits.allowed_image_url_prefixes)
    try:
        return await asyncio.wait_for(_download(url, limits.max_image_bytes), limits.fetch_timeout_s)
    except asyncio.TimeoutError:
        raise ImageRejected(f"fetching image_url took longer than {limits.fetch_timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise ImageRejected(f"fetching image_url failed: {type(exc).__name__}") from None


async def _download(url: str, max_bytes: int) -> bytes:
    chunks, size = [], 0
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise ImageRejected(f"fetching image_url gave HTTP {response.status_code}")
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise ImageRejected(f"image is larger than the limit of {max_bytes} bytes")
                chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(url: str, limits: LimitsConfig) -> bytes:
    """The encoded bytes behind an `image_url`: a data URL, or an allowed http(s) URL."""
    if url[:5].lower() == "data:":
        return data_url_bytes(url, limits.max_image_bytes)
    return await fetch_bytes(url, limits)
