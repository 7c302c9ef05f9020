"""Open Inference Protocol v2 (KServe / Triton REST) request and response codecs, pure.

JSON tensors and the binary tensor data extension: when the request carries an
``Inference-Header-Content-Length`` header, the body is that many bytes of JSON
followed by the raw tensors in input order (each input's
``parameters.binary_data_size`` says how many bytes it takes). BYTES elements in a
binary buffer are each prefixed by a 4-byte little-endian length; in JSON they are
strings (base64 for binary content such as encoded images).
https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from serve_apps.inputs import ApiError

__all__ = ["DTYPES", "Tensor", "InferRequest", "parse_infer_request", "encode_infer_response", "np_to_v2"]

DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": object,
}
_MAX_ELEMENTS = 64 * 1024 * 1024


def np_to_v2(dtype: np.dtype) -> str:
    for name, t in DTYPES.items():
        if t is not object and np.dtype(t) == dtype:
            return name
    return "BYTES"


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray  # numeric array, or a 1-D object array of bytes for BYTES


@dataclass
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: list[str] | None  # requested output names (None: all)
    binary_outputs: set[str] = field(default_factory=set)
    binary_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def _shape(raw: Any, where: str) -> list[int]:
    if not isinstance(raw, list) or not raw or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise ApiError(400, f"{where}.shape must be a non-empty list of non-negative integers")
    n = int(np.prod(raw))
    if n > _MAX_ELEMENTS:
        raise ApiError(413, f"{where} has {n} elements; the limit is {_MAX_ELEMENTS}")
    return raw


def _flatten(data: Any) -> list:
    out: list = []
    stack = [data]
    while stack:  # iterative: a deeply nested list must not blow the recursion limit
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _bytes_elements(buf: bytes, count: int, where: str) -> np.ndarray:
    items, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(buf):
            raise ApiError(400, f"{where}: BYTES buffer ends inside an element length")
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise ApiError(400, f"{where}: BYTES element of {n} bytes runs past the buffer")
        items.append(bytes(buf[pos : pos + n]))
        pos += n
    if pos != len(buf):
        raise ApiError(400, f"{where}: {len(buf) - pos} bytes left over after {count} BYTES elements")
    arr = np.empty(count, dtype=object)
    arr[:] = items
    return arr


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON + binary tensors).

    Raises:
        ApiError: 400 for malformed JSON, shapes, datatypes or binary sizes.
    """
    if header_length is not None:
        try:
            hlen = int(header_length)
        except ValueError:
            raise ApiError(400, "Inference-Header-Content-Length must be an integer") from None
        if not 0 < hlen <= len(body):
            raise ApiError(400, f"Inference-Header-Content-Length {hlen} does not fit a body of {len(body)} bytes")
        head, binary = body[:hlen], memoryview(body)[hlen:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = json.loads(head)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, absurd nesting
        raise ApiError(400, "invalid JSON inference header") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "the inference request must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ApiError(400, "'inputs' must be a non-empty list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(400, "'parameters' must be an object")
    inputs: list[Tensor] = []
    offset = 0
    for i, raw in enumerate(raw_inputs):
        where = f"inputs[{i}]"
        if not isinstance(raw, dict):
            raise ApiError(400, f"{where} must be an object")
        name = raw.get("name")
        dtype = raw.get("datatype")
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"{where}.name must be a string")
        if dtype not in DTYPES:
            raise ApiError(400, f"{where}.datatype {dtype!r} is not one of {', '.join(DTYPES)}")
        shape = _shape(raw.get("shape"), where)
        count = int(np.prod(shape))
        p = raw.get("parameters") or {}
        size = p.get("binary_data_size") if isinstance(p, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise ApiError(400, f"{where}.parameters.binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise ApiError(400, f"{where} declares {size} binary bytes but only {len(binary) - offset} remain")
            buf = bytes(binary[offset : offset + size])
            offset += size
            if dtype == "BYTES":
                arr = _bytes_elements(buf, count, where)
            else:
                itemsize = np.dtype(DTYPES[dtype]).itemsize
                if size != count * itemsize:
                    raise ApiError(400, f"{where}: {size} binary bytes for shape {shape} of {dtype} (expected {count * itemsize})")
                arr = np.frombuffer(buf, dtype=DTYPES[dtype]).reshape(shape)
        else:
            if "data" not in raw:
                raise ApiError(400, f"{where} has neither 'data' nor parameters.binary_data_size")
            flat = _flatten(raw["data"])
            if len(flat) != count:
                raise ApiError(400, f"{where}: {len(flat)} values for shape {shape}")
            if dtype == "BYTES":
                items = []
                for v in flat:
                    if not isinstance(v, str):
                        raise ApiError(400, f"{where}: BYTES values in JSON must be strings (base64 for binary)")
                    try:
                        items.append(base64.b64decode(v, validate=True))
                    except (binascii.Error, ValueError):
                        items.append(v.encode())
                arr = np.empty(count, dtype=object)
                arr[:] = items
            else:
                try:
                    arr = np.asarray(flat, dtype=DTYPES[dtype]).reshape(shape)
                except (TypeError, ValueError, OverflowError):
                    raise ApiError(400, f"{where}: values do not fit {dtype}") from None
                if not all(isinstance(v, (int, float, bool)) for v in flat[:1000]):
                    raise ApiError(400, f"{where}: values must be numbers")
        inputs.append(Tensor(name=name, datatype=dtype, shape=shape, data=arr))
    if offset != len(binary):
        raise ApiError(400, f"{len(binary) - offset} binary bytes after the last input")
    outputs = None
    binary_outputs: set[str] = set()
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise ApiError(400, "'outputs' must be a list")
        outputs = []
        for j, o in enumerate(raw_outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise ApiError(400, f"outputs[{j}] must be an object with a name")
            outputs.append(o["name"])
            op = o.get("parameters") or {}
            if isinstance(op, dict) and op.get("binary_data"):
                binary_outputs.add(o["name"])
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ApiError(400, "'id' must be a string")
    return InferRequest(
        id=rid,
        inputs=inputs,
        outputs=outputs,
        binary_outputs=binary_outputs,
        binary_default=bool(params.get("binary_data_output")),
        parameters=params,
    )


def encode_infer_response(
    model: str, version: str, request_id: str | None, outputs: Sequence[tuple[str, np.ndarray]], binary: set[str] | bool,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers; ``binary`` names the outputs sent as raw bytes; ``parameters`` the response's."""
    heads, blobs = [], []
    for name, arr in outputs:
        arr = np.ascontiguousarray(arr)
        entry: dict[str, Any] = {"name": name, "datatype": np_to_v2(arr.dtype), "shape": list(arr.shape)}
        as_binary = binary if isinstance(binary, bool) else name in binary
        if as_binary:
            data = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = arr.flatten().tolist()
        heads.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": heads}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    head = json.dumps(doc).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }
