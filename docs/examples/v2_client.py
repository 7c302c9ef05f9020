"""Call visionfleet with the Triton/KServe client (Open Inference Protocol v2).

Usage: python docs/examples/v2_client.py [HOST:PORT] [MODEL]
"""

import sys

import numpy as np
import tritonclient.http as httpclient

url = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8000"
model = sys.argv[2] if len(sys.argv) > 2 else "demo"

client = httpclient.InferenceServerClient(url=url)
print("live:", client.is_server_live(), "ready:", client.is_model_ready(model))
meta = client.get_model_metadata(model)
_, height, width, _ = meta["inputs"][0]["shape"]
print("input:", meta["inputs"][0], "labels:", meta["parameters"]["labels"][:3], "...")

# A batch of two uint8 images at the model's size (any size works: the server resizes).
images = np.random.default_rng(0).integers(0, 255, (2, height, width, 3), dtype=np.uint8)
tensor = httpclient.InferInput("images", list(images.shape), "UINT8")
tensor.set_data_from_numpy(images, binary_data=True)  # the binary tensor extension
result = client.infer(model, [tensor], outputs=[httpclient.InferRequestedOutput("probs", binary_data=True)])
probs = result.as_numpy("probs")
print("probs:", probs.shape, "top-1 per image:", probs.argmax(1).tolist())
