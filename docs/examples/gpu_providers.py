"""What this machine offers for TensorRT, and the ONNX Runtime settings a GPU server would use."""

import tempfile

from edge_export.tensorrt import TensorRTUnavailable, detect, gpu_runtime_options, require_tensorrt

available = detect()  # finds TensorRT, CUDA devices and ORT providers without importing them
print("TensorRT:", available.tensorrt, "| CUDA devices:", available.cuda_devices or "none")

cache = tempfile.mkdtemp(prefix="trt-cache-")
# On a GPU server ONNX Runtime reports TensorRT and CUDA; here we pass that list to see
# the settings. Without `available=...` the call uses what this machine really has.
opts = gpu_runtime_options(
    "fp16",
    cache,
    threads=2,
    available=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    input_size=(224, 224),   # one optimization profile for the dynamic batch
    min_batch=1,
    opt_batch=8,
    max_batch=32,
)
print("providers in order:", opts.providers)
for key, value in sorted(opts.provider_options["TensorrtExecutionProvider"].items()):
    print(f"  {key} = {value}")

here = gpu_runtime_options("fp16", cache)  # what a session on this machine would get
print("on this machine:", here.providers)

try:
    require_tensorrt()
    print("TensorRT engine builds: ready")
except TensorRTUnavailable as exc:  # says exactly what is missing
    print("TensorRT engine builds: unavailable:", exc)
