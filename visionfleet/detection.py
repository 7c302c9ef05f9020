"""The detection contract's names, kept for callers that import them from here.

A registered detection model returns, per image, a fixed number ``K`` of rows:
``boxes`` float32 ``[K, 4]`` (x1, y1, x2, y2 in model-input pixels), ``scores`` float32
``[K]`` and ``classes`` int64 ``[K]``, sorted by score and padded with score 0 (class
-1), in the order :data:`DETECTION_OUTPUTS`. Turning them into an answer (padding
dropped, boxes mapped back to the original image) is
:func:`visionfleet.predict.predictions`, the one prediction path.
"""

from __future__ import annotations

from visionfleet.names import DETECTION_OUTPUTS

__all__ = ["DETECTION_OUTPUTS"]
