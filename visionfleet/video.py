"""Run a video file through a registered model: OpenCV decode, frame sampling, batched ONNX Runtime.

Frames are resized with :func:`visionfleet.imaging.resize_image` and converted to RGB,
so a frame gets exactly the input the server would give the same picture. Results go
to Parquet or JSON lines, one row per sampled frame (``frame``, ``timestamp_ms`` and
the columns of :mod:`visionfleet.offline`).

Input rules:
  * the container is sniffed from magic bytes (MP4/MOV, AVI, Matroska/WebM, MPEG-TS,
    MPEG-PS, FLV, ASF/WMV, Ogg); anything else is refused before FFmpeg sees it. FFmpeg
    would otherwise "play" a text file (its ``tty`` demuxer) or an image, and a
    playlist could make it open other files or URLs;
  * a file that stops decoding short of the frame count its header declares is
    truncated: an error, unless the caller accepts a partial result.

Decoding runs in a reader thread while the main thread runs the model: OpenCV and
ONNX Runtime both release the GIL, so on two cores the two overlap.
"""

from __future__ import annotations

import enum
import json
import math
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np

from visionfleet.imaging import choose_size, resize_image
from visionfleet.inference import LoadedModel
from visionfleet.offline import result_rows
from visionfleet.spec import Task

__all__ = [
    "VideoError",
    "NotAVideo",
    "TruncatedVideo",
    "VideoContainer",
    "OutputFormat",
    "VideoInfo",
    "Sampling",
    "Frame",
    "VideoSummary",
    "sniff_container",
    "probe_video",
    "iter_frames",
    "frame_input",
    "output_format_for",
    "infer_video",
]


class VideoError(ValueError):
    """A video that cannot be read; the message is safe to show a user."""


class NotAVideo(VideoError):
    pass


class TruncatedVideo(VideoError):
    pass


class VideoContainer(str, enum.Enum):
    MP4 = "mp4/mov"
    AVI = "avi"
    MATROSKA = "matroska/webm"
    MPEG_TS = "mpeg-ts"
    MPEG_PS = "mpeg-ps"
    FLV = "flv"
    ASF = "asf/wmv"
    OGG = "ogg"


class OutputFormat(str, enum.Enum):
    PARQUET = "parquet"
    JSONL = "jsonl"


_OUTPUT_SUFFIXES = {".parquet": OutputFormat.PARQUET, ".jsonl": OutputFormat.JSONL}
# ISO base media (MP4, MOV, 3GP, M4V): the first box is one of these.
_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}
_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
_TS_PACKET = 188


def sniff_container(head: bytes) -> VideoContainer | None:
    """The container from the first bytes of a file, or None when it is not one we read."""
    if len(head) >= 8 and head[4:8] in _MP4_BOXES:
        return VideoContainer.MP4
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return VideoContainer.AVI
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return VideoContainer.MATROSKA
    if head[:1] == b"\x47" and len(head) > 2 * _TS_PACKET and head[_TS_PACKET] == head[2 * _TS_PACKET] == 0x47:
        return VideoContainer.MPEG_TS
    if head[:4] == b"\x00\x00\x01\xba":
        return VideoContainer.MPEG_PS
    if head[:4] == b"FLV\x01":
        return VideoContainer.FLV
    if head[:16] == _ASF_GUID:
        return VideoContainer.ASF
    if head[:4] == b"OggS":
        return VideoContainer.OGG
    return None


def output_format_for(out: str | os.PathLike[str]) -> OutputFormat:
    """The output format from the file suffix (``.parquet`` or ``.jsonl``)."""
    suffix = Path(out).suffix.lower()
    if suffix not in _OUTPUT_SUFFIXES:
        raise ValueError(f"Got {str(out)!r} for the output; expected a .parquet or .jsonl file")
    return _OUTPUT_SUFFIXES[suffix]


@dataclass(frozen=True)
class VideoInfo:
    """What the container declares about its video stream."""

    path: str
    container: VideoContainer
    codec: str
    width: int
    height: int
    fps: float
    frame_count: int | None  # None when the container does not say


@dataclass(frozen=True)
class Sampling:
    """Which frames to run: every ``every``-th frame, or about ``fps`` frames per second."""

    every: int = 1
    fps: float | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"Got {self.every} for every; expected >= 1")
        if self.fps is not None:
            if not (math.isfinite(self.fps) and self.fps > 0):
                raise ValueError(f"Got {self.fps} for fps; expected a positive number")
            if self.every != 1:
                raise ValueError(f"Got every={self.every} and fps={self.fps}; expected one of them, not both")


@dataclass(frozen=True)
class Frame:
    index: int  # position in the stream, counting every decoded frame from 0
    timestamp_ms: float
    bgr: np.ndarray  # as OpenCV decodes it


def _open(path: Path) -> tuple[Any, VideoContainer]:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as fh:
        head = fh.read(2 * _TS_PACKET + 1)
    if not head:
        raise NotAVideo(f"{path} is empty")
    container = sniff_container(head)
    if container is None:
        from visionfleet.imaging import sniff_format

        if sniff_format(head) is not None:
            raise NotAVideo(f"{path} is an image, not a video; run images as a folder job or `visionfleet predict`")
        raise NotAVideo(
            f"{path} is not a video we can read; expected MP4/MOV, AVI, Matroska/WebM, MPEG-TS/PS, FLV, ASF/WMV or Ogg"
        )
    # FFmpeg's own log lines ("moov atom not found", "overread 8") would interleave with
    # the progress bar; the error we raise says the same thing once. Users can override.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    finally:
        cv2.utils.logging.setLogLevel(level)
    if not cap.isOpened():
        cap.release()
        raise NotAVideo(f"{path} looks like {container.value} but FFmpeg cannot open it (truncated or corrupt?)")
    return cap, container


def _info(cap: Any, path: Path, container: VideoContainer) -> VideoInfo:
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF
    codec = "".join(chr((fourcc >> (8 * i)) & 0xFF) for i in range(4)).strip("\x00 ") if fourcc else ""
    count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    fps = cap.get(cv2.CAP_PROP_FPS)
    return VideoInfo(
        path=str(path),
        container=container,
        codec=codec if codec.isprintable() else "",
        width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
        height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        fps=float(fps) if math.isfinite(fps) and fps > 0 else 0.0,
        frame_count=int(count) if math.isfinite(count) and 0 < count < 2**31 else None,
    )


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Open a video and read what it declares (size, fps, frame count) without decoding it.

    Raises:
        FileNotFoundError: no such file.
        NotAVideo: not a container we read, or FFmpeg cannot open it.
    """
    p = Path(path)
    cap, container = _open(p)
    try:
        return _info(cap, p, container)
    finally:
        cap.release()


def _is_truncated(seen: int, declared: int | None) -> bool:
    # Some containers (Matroska, MPEG) only estimate the count from the duration, so a
    # frame or 1% short is normal; a file cut off mid-way falls far shorter.
    return declared is not None and declared - seen > max(1, declared // 100)


def iter_frames(
    path: str | os.PathLike[str],
    sampling: Sampling = Sampling(),
    *,
    on_seen: Callable[[int], None] | None = None,
    allow_truncated: bool = False,
) -> Iterator[Frame]:
    """Yield the sampled frames of a video, in order.

    Skipped frames are only demuxed (``grab``), not converted. ``on_seen(n)`` is called
    with the number of stream frames passed since the last call (for progress bars).

    Raises:
        NotAVideo: see :func:`probe_video`, or no frame decodes at all.
        TruncatedVideo: decoding stopped well short of the declared frame count (after
            the frames that did decode were yielded), unless ``allow_truncated``.
    """
    p = Path(path)
    cap, container = _open(p)
    try:
        info = _info(cap, p, container)
        step_ms = 1000.0 / sampling.fps if sampling.fps else None
        half_frame_ms = 500.0 / info.fps if info.fps else 1e-3
        next_ms = 0.0
        index = -1
        while True:
            if not cap.grab():
                break
            index += 1
            if on_seen:
                on_seen(1)
            ts = cap.get(cv2.CAP_PROP_POS_MSEC)
            if not math.isfinite(ts) or ts < 0 or (ts == 0 and index > 0):
                ts = index * 1000.0 / info.fps if info.fps else 0.0
            if step_ms is not None:
                # Take the frame nearest each point of a fixed time grid: half a frame of
                # slack absorbs PTS rounding (3 x 33.33 ms is not exactly 100 ms).
                if ts + half_frame_ms < next_ms:
                    continue
                # Advance to the first grid point after this frame; after a gap in the
                # stream this skips the missed points instead of emitting a burst.
                next_ms += step_ms * max(1, math.floor((ts - next_ms) / step_ms) + 1)
            elif index % sampling.every:
                continue
            ok, bgr = cap.retrieve()
            if not ok or bgr is None:
                break
            yield Frame(index, float(ts), bgr)
        seen = index + 1
        if seen == 0:
            raise NotAVideo(f"{p} has no decodable video frames")
        if not allow_truncated and _is_truncated(seen, info.frame_count):
            raise TruncatedVideo(
                f"{p} is truncated: decoding stopped at frame {seen} of the {info.frame_count} its header declares"
            )
    finally:
        cap.release()


def frame_input(bgr: np.ndarray, size: tuple[int, int], mode) -> tuple[np.ndarray, Any]:
    """A decoded BGR frame as model input: resized with the server's code, then RGB.

    Resizing before the channel swap gives the same pixels as swapping first (both act
    per channel, and the letterbox fill is gray) while converting far fewer of them.
    """
    small, info = resize_image(bgr, size, mode)
    return cv2.cvtColor(small, cv2.COLOR_BGR2RGB), info


@dataclass(frozen=True)
class VideoSummary:
    """What a video run did; ``truncated`` only when a partial result was accepted."""

    path: str
    out: str
    model: str
    version: int
    frames_seen: int
    frames_inferred: int
    declared_frames: int | None
    fps: float
    seconds: float
    truncated: bool

    @property
    def frames_per_s(self) -> float:
        """Stream frames processed per second (decoded or skipped)."""
        return self.frames_seen / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "out": self.out,
            "model": self.model,
            "version": self.version,
            "frames_seen": self.frames_seen,
            "frames_inferred": self.frames_inferred,
            "declared_frames": self.declared_frames,
            "video_fps": self.fps,
            "seconds": round(self.seconds, 3),
            "frames_per_s": round(self.frames_per_s, 1),
            "inferred_per_s": round(self.frames_inferred / self.seconds, 1) if self.seconds > 0 else 0.0,
            "truncated": self.truncated,
        }


def video_schema(task: Task):
    """The Arrow schema of a video result file."""
    import pyarrow as pa

    from visionfleet.offline import result_schema

    return result_schema(task, [pa.field("frame", pa.int64()), pa.field("timestamp_ms", pa.float64())])


class _Writer:
    """Rows to a temp file beside ``out``; renamed into place only when the run succeeds."""

    def __init__(self, out: Path, fmt: OutputFormat, schema) -> None:
        self.out = out
        self.fmt = fmt
        self.schema = schema
        self.tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._pq = None
        self._fh = None
        if fmt is OutputFormat.PARQUET:
            import pyarrow.parquet as pq

            self._pq = pq.ParquetWriter(self.tmp, schema)
        else:
            self._fh = open(self.tmp, "w", encoding="utf-8")

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self._pq is not None:
            from visionfleet.offline import rows_to_table

            self._pq.write_table(rows_to_table(rows, self.schema))
        else:
            names = self.schema.names  # the Parquet column order, keys first
            for row in rows:
                self._fh.write(json.dumps({k: row.get(k) for k in names}, allow_nan=False) + "\n")

    def commit(self) -> None:
        self._close()
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        self._close()
        self.tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._pq is not None:
            self._pq.close()
            self._pq = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None


_DONE = object()


def _prefetch(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``items`` in a thread, ``depth`` items ahead; errors surface in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
            put(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # releases the capture now when the consumer stopped early

    t = threading.Thread(target=run, name="video-decode", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        t.join(timeout=5)


def _batches(
    frames: Iterator[Frame], size: tuple[int, int], mode, batch: int
) -> Iterator[tuple[list[tuple[int, float]], np.ndarray, list[Any]]]:
    """Model-ready batches of ``((index, timestamp_ms), ...), pixels, resize infos``.

    Resizing and the RGB swap happen here, in the reader thread; full-size frames are
    dropped as soon as they are resized.
    """
    group: list[tuple[int, float]] = []
    pixels: list[np.ndarray] = []
    infos: list[Any] = []
    for f in frames:
        img, info = frame_input(f.bgr, size, mode)
        group.append((f.index, f.timestamp_ms))
        pixels.append(img)
        infos.append(info)
        if len(group) == batch:
            yield group, np.stack(pixels), infos
            group, pixels, infos = [], [], []
    if group:
        yield group, np.stack(pixels), infos


def infer_video(
    path: str | os.PathLike[str],
    model: LoadedModel,
    out: str | os.PathLike[str],
    *,
    sampling: Sampling = Sampling(),
    batch_size: int = 16,
    top_k: int = 5,
    allow_truncated: bool = False,
    overwrite: bool = False,
    on_seen: Callable[[int], None] | None = None,
) -> VideoSummary:
    """Run a video through ``model`` and write one row per sampled frame to ``out``.

    Args:
        path: the video file.
        model: a loaded registered version (:func:`visionfleet.inference.load_model_dir`,
            which puts a detection model's outputs in the order rows are built from).
        out: ``*.parquet`` or ``*.jsonl``; written to a temp file and renamed at the end,
            so a failed run leaves no partial output.
        sampling: which frames to run.
        batch_size: frames per ONNX Runtime call.
        top_k: classes kept in ``probs``.
        allow_truncated: keep the frames of a truncated file instead of failing.
        overwrite: replace an existing ``out``.
        on_seen: progress callback, called with the number of stream frames passed.
    Raises:
        FileNotFoundError, FileExistsError, ValueError (bad options), NotAVideo, TruncatedVideo.
    """
    if batch_size < 1:
        raise ValueError(f"Got {batch_size} for batch_size; expected >= 1")
    if top_k < 1:
        raise ValueError(f"Got {top_k} for top_k; expected >= 1")
    out_p = Path(out)
    fmt = output_format_for(out_p)
    if out_p.exists() and not overwrite:
        raise FileExistsError(f"{out_p} exists; choose another output or pass overwrite")
    if not out_p.parent.is_dir():
        raise FileNotFoundError(f"no such folder for the output: {out_p.parent}")
    info = probe_video(path)  # a non-video fails here, before any output is created
    card = model.card
    schema = video_schema(card.task)
    seen = 0

    def count(n: int) -> None:
        nonlocal seen
        seen += n
        if on_seen:
            on_seen(n)

    writer = _Writer(out_p, fmt, schema)
    inferred = 0
    truncated = False
    t0 = time.perf_counter()
    try:
        frames = iter_frames(path, sampling, on_seen=count, allow_truncated=True)
        # A video has one frame size: every frame goes to the card's size nearest it (choose_size).
        size = choose_size(card.sizes, (info.height, info.width) if info.width and info.height else None)
        for group, pixels, infos in _prefetch(_batches(frames, size, card.resize, batch_size), 2):
            outputs = model.run(pixels)
            rows = result_rows(card, outputs, infos, top_k=top_k)
            for (index, ts), row in zip(group, rows):
                row.update(frame=index, timestamp_ms=ts, model=card.name, version=card.version)
            writer.write(rows)
            inferred += len(rows)
        if _is_truncated(seen, info.frame_count):
            if not allow_truncated:
                raise TruncatedVideo(
                    f"{info.path} is truncated: decoding stopped at frame {seen} of the {info.frame_count} "
                    "its header declares (no output written; accept a partial result with --allow-truncated)"
                )
            truncated = True
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return VideoSummary(
        path=info.path,
        out=str(out_p),
        model=card.name,
        version=int(card.version or 0),
        frames_seen=seen,
        frames_inferred=inferred,
        declared_frames=info.frame_count,
        fps=info.fps,
        seconds=time.perf_counter() - t0,
        truncated=truncated,
    )
