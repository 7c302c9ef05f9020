"""BentoML serving the same ONNX model with the same preprocessing (its own venv).

    python3 -m venv bench/.venv-bentoml && bench/.venv-bentoml/bin/pip install bentoml . 
    VF_MODEL_DIR=.visionfleet/registry/demo/1 VF_THREADS=2 \\
        bench/.venv-bentoml/bin/bentoml serve bench/baselines/bentoml_service.py:Classifier --port 8200

The request body is the raw image (``Content-Type: application/octet-stream``), read
through BentoML's root-input bytes parameter.
"""

from __future__ import annotations

import os

import bentoml

from visionfleet.imaging import load_for_model
from visionfleet.inference import RuntimeOptions, load_model_dir
from visionfleet.predict import predictions


@bentoml.service(workers=1, traffic={"timeout": 60, "max_concurrency": 256})
class Classifier:
    def __init__(self) -> None:
        self.model = load_model_dir(os.environ["VF_MODEL_DIR"], RuntimeOptions(threads=int(os.environ.get("VF_THREADS", "2"))))

    @bentoml.api(route="/v1/predict")
    def predict(self, image: bytes, /) -> dict:
        img, info = load_for_model(image, self.model.card.input_size, self.model.card.resize)
        return predictions(self.model.card, self.model.run(img[None]), [info], top_k=5)[0].response()
