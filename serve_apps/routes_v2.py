# No `from __future__ import annotations`: FastAPI reads these annotations at runtime.
"""Open Inference Protocol v2 routes (KServe / Triton REST), for existing clients.

``/v2``, ``/v2/health/live|ready``, ``/v2/models/{m}[/versions/{v}]`` metadata and
``/ready``, and ``POST .../infer`` with JSON tensors or the binary tensor extension.
The input is ``images``: UINT8 ``[N, H, W, 3]`` (any H and W: resized with the model's
own mode) or BYTES ``[N]`` of encoded images (decoded with the server's imaging code).
Outputs: ``probs`` FP32 ``[N, C]`` for classification; ``boxes`` FP32 ``[N, K, 4]``
(input-image pixels), ``scores`` FP32 ``[N, K]``, ``classes`` INT64 ``[N, K]`` for
detection. A version-less model means ``@production`` (and takes part in a running
experiment, like ``/v1/predict``).
"""

import asyncio
import time
import uuid
from typing import Any, Optional

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from serve_apps.api import api, ingress
from serve_apps.inputs import ApiError, read_body, status_for_image_error
from serve_apps.v2 import encode_infer_response, parse_infer_request
from visionfleet.imaging import ImageError, ResizeInfo, resize_image
from visionfleet.spec import ModelCard, Task

__all__: list = []

_SERVER = {"name": "visionfleet", "version": "0.1.0", "extensions": ["binary_tensor_data"]}


def _ref(model: str, version: Optional[str]) -> str:
    from serve_apps.inputs import model_ref_from

    if any(c in model for c in ":@"):
        raise ApiError(400, "give the version in the path: /v2/models/{name}/versions/{version}")
    return model_ref_from(model, version, model)


def _io(card: ModelCard) -> "tuple[list, list]":
    h, w = card.input_size
    inputs = [{"name": "images", "datatype": "UINT8", "shape": [-1, h, w, 3]}]
    if card.task is Task.DETECTION:
        k = int((card.preprocessing.get("postprocessing") or {}).get("max_detections") or -1)
        outputs = [
            {"name": "boxes", "datatype": "FP32", "shape": [-1, k, 4]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, k]},
            {"name": "classes", "datatype": "INT64", "shape": [-1, k]},
        ]
    else:
        outputs = [{"name": "probs", "datatype": "FP32", "shape": [-1, len(card.labels)]}]
    return inputs, outputs


@api.get("/v2")
async def server_metadata() -> dict:
    return _SERVER


@api.get("/v2/health/live")
async def live() -> dict:
    return {"live": True}


@api.get("/v2/health/ready")
async def ready() -> JSONResponse:
    ing = ingress()
    try:
        ing.target(ing.cfg.default_model)
    except ApiError as exc:
        return JSONResponse({"error": f"not ready: {exc.message}"}, status_code=503)
    return JSONResponse({"ready": True})


async def _metadata(model: str, version: Optional[str]) -> dict:
    ing = ingress()
    resolved, card = ing.target(_ref(model, version))
    inputs, outputs = _io(card)
    return {
        "name": resolved.name,
        "versions": [str(v) for v in ing.registry.versions(resolved.name)],
        "platform": "onnxruntime_onnx",
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {
            "version": str(resolved.version),
            "task": card.task.value,
            "labels": card.labels,
            "resize": card.resize.value,
            "accepts": "UINT8 [N,H,W,3] images of any size, or BYTES [N] encoded images",
        },
    }


@api.get("/v2/models/{model}")
async def model_metadata(model: str) -> dict:
    return await _metadata(model, None)


@api.get("/v2/models/{model}/versions/{version}")
async def model_version_metadata(model: str, version: str) -> dict:
    return await _metadata(model, version)


async def _ready(model: str, version: Optional[str]) -> dict:
    resolved, _ = ingress().target(_ref(model, version))
    return {"name": resolved.name, "version": str(resolved.version), "ready": True}


@api.get("/v2/models/{model}/ready")
async def model_ready(model: str) -> dict:
    return await _ready(model, None)


@api.get("/v2/models/{model}/versions/{version}/ready")
async def model_version_ready(model: str, version: str) -> dict:
    return await _ready(model, version)


def _images_from_tensor(ing: Any, tensor: Any, card: ModelCard) -> "list[tuple[np.ndarray, ResizeInfo]]":
    if tensor.datatype == "BYTES":
        if tensor.data.ndim != 1:
            raise ApiError(400, f"BYTES input must have shape [N], got {tensor.shape}")
        out = []
        for i, b in enumerate(tensor.data):
            try:
                out.append(ing._decode(bytes(b), card))
            except ApiError as exc:
                raise ApiError(exc.status, f"images[{i}]: {exc.message}") from None
        return out
    if tensor.datatype != "UINT8":
        raise ApiError(400, f"input 'images' must be UINT8 [N, H, W, 3] or BYTES [N]; got {tensor.datatype}")
    arr = tensor.data
    if arr.ndim != 4 or arr.shape[3] not in (1, 3) or arr.shape[0] < 1 or min(arr.shape[1:3]) < 1:
        raise ApiError(400, f"UINT8 input must have shape [N, H, W, 3]; got {tensor.shape}")
    if arr.shape[1] * arr.shape[2] > ing.cfg.max_pixels:
        raise ApiError(413, f"images of {arr.shape[2]}x{arr.shape[1]} exceed the pixel limit {ing.cfg.max_pixels}")
    if arr.shape[3] == 1:
        arr = np.repeat(arr, 3, axis=3)
    return [resize_image(np.ascontiguousarray(img), card.input_size, card.resize) for img in arr]


async def _infer(request: Request, model: str, version: Optional[str]) -> Response:
    t0 = time.perf_counter()
    ing = ingress()
    body = await read_body(request.stream(), request.headers.get("content-length"), ing.cfg.max_body_bytes)
    req = parse_infer_request(body, request.headers.get("inference-header-content-length"))
    if len(req.inputs) != 1 or req.inputs[0].name != "images":
        names = [t.name for t in req.inputs]
        raise ApiError(400, f"expected exactly one input named 'images'; got {names}")
    _ref(model, version)  # 400 for NAME:VERSION in the model segment
    route = ing.route(request, model, version)
    resolved, card = ing.target(route.ref)
    loop = asyncio.get_running_loop()
    try:
        prepared = await loop.run_in_executor(ing._decode_pool, _images_from_tensor, ing, req.inputs[0], card)
    except ImageError as exc:  # defensive: _decode already maps these
        raise ApiError(status_for_image_error(exc), str(exc)) from None
    batch = np.stack([p[0] for p in prepared])
    outputs = await ing.infer(resolved, batch)
    if card.task is Task.CLASSIFICATION:
        named = [("probs", outputs[0].astype(np.float32))]
        results = [ing.result(card, outputs, i, 1, prepared[i][1]) for i in range(len(prepared))]
    else:
        boxes = np.stack([prepared[i][1].to_original(outputs[0][i]) for i in range(len(prepared))]).astype(np.float32)
        named = [("boxes", boxes), ("scores", outputs[1].astype(np.float32)), ("classes", outputs[2].astype(np.int64))]
        results = [ing.result(card, outputs, i, 1, prepared[i][1]) for i in range(len(prepared))]
    wanted = req.outputs
    if wanted is not None:
        known = {n for n, _ in named}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ApiError(400, f"unknown outputs {unknown}; this model returns {sorted(known)}")
        named = [(n, a) for n, a in named if n in wanted]
    binary = True if req.binary_default else req.binary_outputs
    latency_ms = (time.perf_counter() - t0) * 1000
    rid = req.id or uuid.uuid4().hex
    for i, res in enumerate(results):
        ing.record(request_id=f"{rid}#{i}" if len(results) > 1 else rid, role="primary", route=route, resolved=resolved,
                   card=card, status=200, latency_ms=latency_ms, result=res,
                   outputs_row=outputs[0][i] if card.task is Task.CLASSIFICATION else None,
                   img=prepared[i][0], info=prepared[i][1], client_key=request.headers.get("x-client-id"))
    content, headers = encode_infer_response(resolved.name, str(resolved.version), req.id, named, binary)
    return Response(content=content, headers=headers, media_type=headers["Content-Type"])


@api.post("/v2/models/{model}/infer")
async def infer(request: Request, model: str) -> Response:
    return await _infer(request, model, None)


@api.post("/v2/models/{model}/versions/{version}/infer")
async def infer_version(request: Request, model: str, version: str) -> Response:
    return await _infer(request, model, version)
