"""Offline inference building blocks: many inputs in, one flat result row per input out.

Shared by the Ray Data batch job (``cluster/jobs/batch_infer.py``) and the video runner
(``visionfleet/video.py``), so both preprocess exactly like the server
(:func:`visionfleet.imaging.preprocess` with the card's sizes and resize mode),
predict through the server's path (:func:`visionfleet.predict.predictions`) and
write the same columns. Models load with :func:`visionfleet.inference.load_model_dir`. Pure numpy; ``pyarrow`` is imported inside the functions that
build Arrow schemas and tables.

A result row has the server's fields, flattened for Parquet:

========================  ======================================================
column                    meaning
========================  ======================================================
``model``, ``version``    the concrete version that ran (an alias is resolved once)
``label``, ``class_id``   top-1 class (for detection: the highest-scoring box's)
``score``                 top-1 probability (detection: highest box score, 0 if none)
``probs``                 classification: top-k ``[{label, prob}]``, descending
``confidence``            same as ``score``; ``margin`` to the runner-up
``entropy``               classification: normalized entropy of the full vector
``detections``, ``count`` detection: ``[{label, class_id, score, box}]`` in
                          original-image pixels, and their number
``width``, ``height``     the original image (or frame) size
``input_size``            the model-input size used, ``HEIGHTxWIDTH``
``error``                 why this input has no prediction (null when it has one)
========================  ======================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from visionfleet.imaging import ImageError, ResizeInfo, choose_size, preprocess
from visionfleet.predict import predictions
from visionfleet.spec import ModelCard, Task

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

__all__ = [
    "Preprocessed",
    "preprocess_encoded",
    "predict_preprocessed",
    "result_rows",
    "error_row",
    "result_fields",
    "result_schema",
    "rows_to_table",
]


@dataclass(frozen=True)
class Preprocessed:
    """Model inputs for a list of encoded images, with one error per undecodable input.

    ``images[i]`` is the model input of input ``i`` at the size chosen for it
    (:func:`visionfleet.imaging.choose_size`: the one asked for, else the card's size
    nearest the image), zeros at the default size where ``errors[i]`` is set; ``ok``
    indexes the good rows. :meth:`batches` groups the good rows by size (images of
    different sizes never share a tensor); :attr:`pixels` stacks them when they share one.
    """

    images: tuple[np.ndarray, ...]  # uint8 [H, W, 3] each
    infos: tuple[ResizeInfo | None, ...]
    errors: tuple[str | None, ...]

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The (height, width) of every input's model input."""
        return tuple((int(a.shape[0]), int(a.shape[1])) for a in self.images)

    @property
    def pixels(self) -> np.ndarray:
        """uint8 ``[n, H, W, 3]``: every input at one size.

        Raises:
            ValueError: the inputs were resized to different sizes (use :meth:`batches`).
        """
        found = sorted(set(self.sizes))
        if len(found) > 1:
            raise ValueError(f"Got inputs at sizes {', '.join(f'{h}x{w}' for h, w in found)}; expected one size "
                             "for one tensor (use Preprocessed.batches(), one per size)")
        return np.stack(self.images) if self.images else np.zeros((0, 1, 1, 3), np.uint8)

    def batches(self) -> list[tuple[tuple[int, int], np.ndarray, np.ndarray]]:
        """``(size, indices, pixels [k, H, W, 3])`` per size among the good rows, in first-seen order."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (hw, err) in enumerate(zip(self.sizes, self.errors)):
            if err is None:
                groups.setdefault(hw, []).append(i)
        return [(hw, np.array(idx), np.stack([self.images[i] for i in idx])) for hw, idx in groups.items()]


def preprocess_encoded(blobs: Sequence[bytes | None], card: ModelCard, *, max_pixels: int,
                       size: str | None = None) -> Preprocessed:
    """Decode and resize encoded images the way the server does; a bad image is its own error.

    Args:
        blobs: encoded image bytes (None counts as empty).
        card: the model's card (input sizes and resize mode).
        max_pixels: refuse images declaring more pixels (from the header, before decoding).
        size: one of the card's ``input_sizes`` for every image (``"320x320"``); default:
            each image at the listed size nearest its own, as the server does.
    Raises:
        SizeNotServed: ``size`` is not one of the card's sizes.
    """
    sizes = card.sizes
    choose_size(sizes, None, size)  # an unlisted size fails the job, not each row
    blank = np.zeros((*sizes[0], 3), np.uint8)
    images: list[np.ndarray] = []
    infos: list[ResizeInfo | None] = []
    errors: list[str | None] = []
    for data in blobs:
        try:
            img, info = preprocess(bytes(data or b""), sizes, card.resize, size=size, max_pixels=max_pixels)
        except ImageError as exc:
            images.append(blank)
            infos.append(None)
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        images.append(img)
        infos.append(info)
        errors.append(None)
    return Preprocessed(tuple(images), tuple(infos), tuple(errors))


def predict_preprocessed(card: ModelCard, run: Callable[[np.ndarray], Sequence[np.ndarray]], prep: Preprocessed, *,
                         top_k: int = 5) -> list[dict[str, Any]]:
    """One row per input of ``prep``: one ``run`` (a model call) per size, error rows where decoding failed."""
    rows: list[dict[str, Any]] = [error_row(card.task, e) if e is not None else {} for e in prep.errors]
    for _, idx, pixels in prep.batches():
        for i, row in zip(idx, result_rows(card, run(pixels), [prep.infos[int(i)] for i in idx], top_k=top_k)):
            rows[int(i)] = row
    return rows


def _empty_row(task: Task) -> dict[str, Any]:
    row: dict[str, Any] = {"label": None, "class_id": None, "score": None, "confidence": None, "margin": None}
    if task is Task.CLASSIFICATION:
        row.update(probs=None, entropy=None)
    else:
        row.update(detections=None, count=None)
    row.update(width=None, height=None, input_size=None, error=None)
    return row


def error_row(task: Task, message: str) -> dict[str, Any]:
    """A row for an input that has no prediction (result columns null, ``error`` set)."""
    row = _empty_row(task)
    row["error"] = message
    return row


def result_rows(
    card: ModelCard, outputs: Sequence[np.ndarray], infos: Sequence[ResizeInfo], *, top_k: int = 5
) -> list[dict[str, Any]]:
    """One row per image of a batch's model outputs (without the model/version/key columns).

    Args:
        card: the card of the model that ran.
        outputs: the session outputs for the batch, in the loader's output order
            (classification: probs ``[n, C]``; detection: boxes, scores, classes).
        infos: how each image was resized (maps detection boxes back to the original).
        top_k: classes kept in ``probs``.
    """
    return [p.row() for p in predictions(card, outputs, infos, top_k=top_k)]


def result_fields(task: Task) -> "list[pa.Field]":
    """The Arrow fields of :func:`result_rows` / :func:`error_row` plus model and version."""
    import pyarrow as pa

    fields = [
        pa.field("model", pa.string()),
        pa.field("version", pa.int32()),
        pa.field("label", pa.string()),
        pa.field("class_id", pa.int32()),
        pa.field("score", pa.float64()),
    ]
    if task is Task.CLASSIFICATION:
        fields.append(pa.field("probs", pa.list_(pa.struct([("label", pa.string()), ("prob", pa.float64())]))))
    else:
        det = pa.struct(
            [
                ("label", pa.string()),
                ("class_id", pa.int32()),
                ("score", pa.float64()),
                ("box", pa.list_(pa.float64(), 4)),
            ]
        )
        fields += [pa.field("detections", pa.list_(det)), pa.field("count", pa.int32())]
    fields += [pa.field("confidence", pa.float64()), pa.field("margin", pa.float64())]
    if task is Task.CLASSIFICATION:
        fields.append(pa.field("entropy", pa.float64()))
    fields += [pa.field("width", pa.int32()), pa.field("height", pa.int32()), pa.field("input_size", pa.string()),
               pa.field("error", pa.string())]
    return fields


def result_schema(task: Task, key_fields: "Sequence[pa.Field]" = ()) -> "pa.Schema":
    """The output schema: the input's key columns first, then :func:`result_fields`."""
    import pyarrow as pa

    return pa.schema([*key_fields, *result_fields(task)])


def rows_to_table(rows: Sequence[dict[str, Any]], schema: "pa.Schema") -> "pa.Table":
    """Rows (dicts with every schema column) as a table with exactly ``schema``."""
    import pyarrow as pa

    return pa.Table.from_pylist(list(rows), schema=schema)
