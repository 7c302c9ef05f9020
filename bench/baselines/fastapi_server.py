"""A plain single-process FastAPI + uvicorn + ONNX Runtime server: the same preprocessing
and model as visionfleet, none of the serving system.

    python bench/baselines/fastapi_server.py --model-dir .visionfleet/registry/demo/1 --port 8100 --threads 2
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from visionfleet.imaging import ImageError, load_for_model
from visionfleet.inference import RuntimeOptions, load_model_dir
from visionfleet.predict import predictions


def build(model_dir: str, threads: int) -> FastAPI:
    model = load_model_dir(model_dir, RuntimeOptions(threads=threads))
    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(request: Request):
        body = await request.body()
        try:
            img, info = load_for_model(body, model.card.input_size, model.card.resize)
        except ImageError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return predictions(model.card, model.run(img[None]), [info], top_k=5)[0].response()

    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    uvicorn.run(build(a.model_dir, a.threads), host="127.0.0.1", port=a.port, log_level="warning", access_log=False)
