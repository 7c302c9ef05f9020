"""Send one image to a running visionfleet server with nothing but the standard library.

Usage: python docs/examples/predict_http.py IMAGE [URL]
"""

import json
import sys
import urllib.request

image_path = sys.argv[1]
url = sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:8000"

with open(image_path, "rb") as f:
    body = f.read()

request = urllib.request.Request(
    f"{url}/v1/predict?top_k=3",
    data=body,
    method="POST",
    headers={"Content-Type": "application/octet-stream"},
)
with urllib.request.urlopen(request, timeout=30) as response:
    result = json.loads(response.read())

print(f"{result['label']} ({result['score']:.2f}) from {result['model']}:{result['version']}")
for label, p in result["probs"].items():
    print(f"  {label:<10} {p:.3f}")
