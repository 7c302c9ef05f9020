"""Decode any supported image and resize it the way every model input is prepared."""

from visionfleet.datasets.synth import render_sample
from visionfleet.imaging import ImageError, decode_image, encode_image, resize_image

picture, label = render_sample(seed=0, index=1, size=120)  # an RGB uint8 array
data = encode_image(picture, "webp", quality=90)           # bytes, as a client would send

rgb = decode_image(data)                                    # RGB uint8, EXIF applied
for mode in ("stretch", "letterbox", "center-crop"):
    model_input, info = resize_image(rgb, (64, 96), mode)
    print(mode, model_input.shape, f"scale x={info.scale_x:.3f} y={info.scale_y:.3f}")

try:
    decode_image(data[: len(data) // 2])
except ImageError as exc:                                   # typed, safe to show a user
    print("refused:", exc)
