# No `from __future__ import annotations`: FastAPI reads these annotations at runtime.
"""Open Inference Protocol v2 routes (KServe / Triton REST), for existing clients.

``/v2``, ``/v2/health/live|ready``, ``/v2/models/{m}[/versions/{v}]`` metadata and
``/ready``, and ``POST .../infer`` with JSON tensors or the binary tensor extension.
The input is ``images``: UINT8 ``[N, H, W, 3]`` (any H and W: resized with the model's
own mode) or BYTES ``[N]`` of encoded images (decoded with the server's imaging code).
Outputs: ``probs`` FP32 ``[N, C]`` for classification; ``boxes`` FP32 ``[N, K, 4]``
(input-image pixels), ``scores`` FP32 ``[N, K]``, ``classes`` INT64 ``[N, K]`` for
detection. ``parameters.size`` (``"320x320"``) serves the images at one of the card's
``input_sizes`` (default: the listed size nearest each image); the response's
``parameters.sizes`` says which size each image was served at. A version-less model means ``@production`` (and takes part in a running
experiment, like ``/v1/predict``).
"""

import time
import uuid
from typing import Any, List, Optional

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serve_apps.inputs import ApiError, model_ref_from, read_body
from serve_apps.pipeline import PredictionService
from serve_apps.v2 import encode_infer_response, parse_infer_request
from visionfleet.imaging import format_size
from visionfleet.spec import ModelCard, Task

__all__ = ["router"]

_SERVER = {"name": "visionfleet", "version": "0.1.0", "extensions": ["binary_tensor_data"]}


def _ref(model: str, version: Optional[str]) -> str:
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


def _images_from_tensor(tensor: Any, max_pixels: int) -> List[Any]:
    """The request's images: encoded bytes (BYTES) or RGB uint8 pixels (UINT8), validated."""
    if tensor.datatype == "BYTES":
        if tensor.data.ndim != 1:
            raise ApiError(400, f"BYTES input must have shape [N], got {tensor.shape}")
        return [bytes(b) for b in tensor.data]
    if tensor.datatype != "UINT8":
        raise ApiError(400, f"input 'images' must be UINT8 [N, H, W, 3] or BYTES [N]; got {tensor.datatype}")
    arr = tensor.data
    if arr.ndim != 4 or arr.shape[3] not in (1, 3) or arr.shape[0] < 1 or min(arr.shape[1:3]) < 1:
        raise ApiError(400, f"UINT8 input must have shape [N, H, W, 3]; got {tensor.shape}")
    if arr.shape[1] * arr.shape[2] > max_pixels:
        raise ApiError(413, f"images of {arr.shape[2]}x{arr.shape[1]} exceed the pixel limit {max_pixels}")
    if arr.shape[3] == 1:
        arr = np.repeat(arr, 3, axis=3)
    return [np.ascontiguousarray(img) for img in arr]


def router(svc: PredictionService) -> APIRouter:
    """The v2 routes, bound to this replica's prediction service."""
    r = APIRouter()
    cfg = svc.cfg

    @r.get("/v2")
    async def server_metadata() -> dict:
        return _SERVER

    @r.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @r.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        try:
            svc.target(cfg.default_model)
        except ApiError as exc:
            return JSONResponse({"error": f"not ready: {exc.message}"}, status_code=503)
        return JSONResponse({"ready": True})

    def metadata(model: str, version: Optional[str]) -> dict:
        resolved, card = svc.target(_ref(model, version))
        inputs, outputs = _io(card)
        return {
            "name": resolved.name,
            "versions": [str(v) for v in svc.registry.versions(resolved.name)],
            "platform": "onnxruntime_onnx",
            "inputs": inputs,
            "outputs": outputs,
            "parameters": {
                "version": str(resolved.version),
                "task": card.task.value,
                "labels": card.labels,
                "resize": card.resize.value,
                "input_sizes": [format_size(s) for s in card.sizes],
                "accepts": "UINT8 [N,H,W,3] images of any size, or BYTES [N] encoded images; "
                           "parameters.size picks one of input_sizes (default: the nearest to each image)",
            },
        }

    @r.get("/v2/models/{model}")
    async def model_metadata(model: str) -> dict:
        return metadata(model, None)

    @r.get("/v2/models/{model}/versions/{version}")
    async def model_version_metadata(model: str, version: str) -> dict:
        return metadata(model, version)

    def is_ready(model: str, version: Optional[str]) -> dict:
        resolved, _ = svc.target(_ref(model, version))
        return {"name": resolved.name, "version": str(resolved.version), "ready": True}

    @r.get("/v2/models/{model}/ready")
    async def model_ready(model: str) -> dict:
        return is_ready(model, None)

    @r.get("/v2/models/{model}/versions/{version}/ready")
    async def model_version_ready(model: str, version: str) -> dict:
        return is_ready(model, version)

    async def infer(request: Request, model: str, version: Optional[str]) -> Response:
        t0 = time.perf_counter()
        body = await read_body(request.stream(), request.headers.get("content-length"), cfg.max_body_bytes)
        req = parse_infer_request(body, request.headers.get("inference-header-content-length"))
        if len(req.inputs) != 1 or req.inputs[0].name != "images":
            names = [t.name for t in req.inputs]
            raise ApiError(400, f"expected exactly one input named 'images'; got {names}")
        _ref(model, version)  # 400 for NAME:VERSION in the model segment
        images = _images_from_tensor(req.inputs[0], cfg.max_pixels)
        route = svc.route(request.headers, model, version)
        rid = req.id or uuid.uuid4().hex
        ids = [f"{rid}#{i}" if len(images) > 1 else rid for i in range(len(images))]
        size = req.parameters.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, (str, int))):
            raise ApiError(400, f"Got {size!r} for parameters.size; expected HEIGHTxWIDTH such as \"320x320\"")
        outs = await svc.run(route, images, request_ids=ids, t0=t0, top_k=1,
                             client_key=request.headers.get("x-client-id"), name="images",
                             size=None if size is None else str(size))
        card: ModelCard = outs[0].card  # type: ignore[assignment]
        rows = [o.outputs for o in outs]
        if card.task is Task.CLASSIFICATION:
            named = [("probs", np.stack([r[0] for r in rows]).astype(np.float32))]
        else:  # boxes in the pixels of the images as sent
            boxes = np.stack([o.info.to_original(o.outputs[0]) for o in outs]).astype(np.float32)  # type: ignore
            named = [("boxes", boxes), ("scores", np.stack([r[1] for r in rows]).astype(np.float32)),
                     ("classes", np.stack([r[2] for r in rows]).astype(np.int64))]
        wanted = req.outputs
        if wanted is not None:
            known = {n for n, _ in named}
            unknown = [n for n in wanted if n not in known]
            if unknown:
                raise ApiError(400, f"unknown outputs {unknown}; this model returns {sorted(known)}")
            named = [(n, a) for n, a in named if n in wanted]
        binary = True if req.binary_default else req.binary_outputs
        resolved = outs[0].resolved
        content, headers = encode_infer_response(resolved.name, str(resolved.version), req.id, named, binary,
                                                 parameters={"sizes": [o.prediction.size for o in outs]})
        return Response(content=content, headers=headers, media_type=headers["Content-Type"])

    @r.post("/v2/models/{model}/infer")
    async def infer_latest(request: Request, model: str) -> Response:
        return await infer(request, model, None)

    @r.post("/v2/models/{model}/versions/{version}/infer")
    async def infer_version(request: Request, model: str, version: str) -> Response:
        return await infer(request, model, version)

    return r
