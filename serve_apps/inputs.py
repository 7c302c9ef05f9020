"""Request parsing for the prediction routes, as pure functions (tested without Ray).

Three input styles are accepted on ``POST /v1/predict``:

* a raw image body (``Content-Type: image/*`` or ``application/octet-stream``);
* ``multipart/form-data`` with the image in a file field (``file`` or the first file);
* ``application/json`` ``{"image": "<base64>", "model": "...", "version": ...}``.

Each style may name the model-input size (``size``: ``320`` or ``320x320``; a query
parameter, a form field or a JSON field), checked against the card's ``input_sizes``
by the prediction step.

Every failure is an :class:`ApiError` carrying the HTTP status of the contract
(400 bad input, 404 unknown model, 413 too large, 415 unsupported media).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from visionfleet.imaging import (
    CorruptImage,
    EmptyImage,
    ImageError,
    ImageTooLarge,
    UnsupportedImageFormat,
)

__all__ = [
    "ApiError",
    "PredictInput",
    "read_body",
    "parse_predict",
    "parse_batch",
    "model_ref_from",
    "status_for_image_error",
    "request_id_from",
]

_RAW_TYPES = ("image/", "application/octet-stream")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class ApiError(Exception):
    """A client-facing error: HTTP status, message and optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class PredictInput:
    images: list[bytes]
    model: str | None = None
    version: str | None = None
    top_k: int | None = None
    size: str | None = None  # the model-input size asked for ("320" or "320x320"), checked against the card
    extra: dict[str, Any] = field(default_factory=dict)


def status_for_image_error(exc: ImageError) -> int:
    if isinstance(exc, ImageTooLarge):
        return 413
    if isinstance(exc, UnsupportedImageFormat):
        return 415
    if isinstance(exc, (EmptyImage, CorruptImage)):
        return 400
    return 400


def request_id_from(header: str | None, fallback: str) -> str:
    """A client-chosen ``X-Request-Id`` (for idempotent retries) or the fallback."""
    if header is None or header == "":
        return fallback
    if not _REQUEST_ID_RE.match(header):
        raise ApiError(400, "X-Request-Id must be 1-128 characters of [A-Za-z0-9_.:-]")
    return header


async def read_body(stream: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """Read a request body, refusing more than ``limit`` bytes (413) before buffering it."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise ApiError(400, "invalid Content-Length") from None
        if declared > limit:
            raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{what} must be a non-empty base64 string")
    if value.startswith("data:"):  # data URLs: data:image/png;base64,....
        _, _, value = value.partition(",")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what} is not valid base64") from None


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, absurd nesting
        raise ApiError(400, "invalid JSON body") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "JSON body must be an object")
    return doc


def _opt_str(doc: dict[str, Any], key: str) -> str | None:
    v = doc.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ApiError(400, f"'{key}' must be a string")
    return str(v)


def _opt_top_k(doc: dict[str, Any]) -> int | None:
    v = doc.get("top_k")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ApiError(400, "'top_k' must be a positive integer")
    return v


async def _multipart_files(content_type: str, body: bytes, max_files: int) -> tuple[list[bytes], dict[str, str]]:
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def _stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(
        Headers({"content-type": content_type}), _stream(), max_files=max_files, max_fields=32
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"invalid multipart body: {exc.message}") from None
    except Exception:  # noqa: BLE001 - the parser raises several types on malformed input
        raise ApiError(400, "invalid multipart body") from None
    files: list[bytes] = []
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.append(await value.read())
            await value.close()
        else:
            fields[key] = str(value)
    return files, fields


async def parse_predict(content_type: str | None, body: bytes) -> PredictInput:
    """Parse a ``/v1/predict`` body into one image and options."""
    inp = await _parse(content_type, body, max_files=1)
    if len(inp.images) != 1:
        raise ApiError(400, f"expected exactly one image, got {len(inp.images)}; use /v1/predict/batch for several")
    return inp


async def parse_batch(content_type: str | None, body: bytes, max_items: int) -> PredictInput:
    """Parse a ``/v1/predict/batch`` body: several files, or ``{"images": [b64, ...]}``."""
    inp = await _parse(content_type, body, max_files=max_items, batch=True)
    if not inp.images:
        raise ApiError(400, "no images in the request")
    if len(inp.images) > max_items:
        raise ApiError(413, f"{len(inp.images)} images in one request; the limit is {max_items}")
    return inp


async def _parse(content_type: str | None, body: bytes, *, max_files: int, batch: bool = False) -> PredictInput:
    media = _media_type(content_type)
    if not body:
        raise ApiError(400, "empty request body")
    if media.startswith(_RAW_TYPES):
        if batch:
            raise ApiError(415, "a batch needs multipart/form-data or application/json")
        return PredictInput(images=[body])
    if media == "multipart/form-data":
        files, fields = await _multipart_files(content_type or "", body, max_files)
        if not files:
            raise ApiError(400, "multipart body has no file field")
        return PredictInput(
            images=files,
            model=fields.get("model") or None,
            version=fields.get("version") or None,
            top_k=_int_field(fields.get("top_k")),
            size=fields.get("size") or None,
        )
    if media == "application/json":
        doc = _json_body(body)
        if batch:
            imgs = doc.get("images")
            if not isinstance(imgs, list):
                raise ApiError(400, "'images' must be a list of base64 strings")
            if len(imgs) > max_files:
                raise ApiError(413, f"{len(imgs)} images in one request; the limit is {max_files}")
            images = [_b64(v, f"images[{i}]") for i, v in enumerate(imgs)]
        else:
            if "image" not in doc:
                raise ApiError(400, "JSON body needs 'image' (base64)")
            images = [_b64(doc["image"], "'image'")]
        return PredictInput(
            images=images, model=_opt_str(doc, "model"), version=_opt_str(doc, "version"), top_k=_opt_top_k(doc),
            size=_opt_str(doc, "size"),
        )
    if not media:
        raise ApiError(415, "missing Content-Type; send image/*, multipart/form-data or application/json")
    raise ApiError(415, f"unsupported Content-Type {media!r}; send image/*, multipart/form-data or application/json")


def _int_field(v: str | None) -> int | None:
    if v is None or v == "":
        return None
    if not v.isdigit() or int(v) < 1:
        raise ApiError(400, "'top_k' must be a positive integer")
    return int(v)


def model_ref_from(model: str | None, version: str | None, default_model: str) -> str:
    """Combine the request's model and version into ``NAME[:VERSION|@ALIAS]``."""
    name = model or default_model
    if version is None or version == "":
        return name
    if any(c in name for c in ":@"):
        raise ApiError(400, "give the version either in 'model' (NAME:VERSION) or in 'version', not both")
    if version.isdigit():
        return f"{name}:{version}"
    return f"{name}@{version.lstrip('@')}"
