"""Frame sources: a folder of images (watched), a video file, or a camera.

Each frame has a *key*: for files and video frames it is stable (path, size,
modification time, frame index), so the outbox's frame table tells a restarted agent
which frames it already predicted; a camera frame gets a random key (it exists once).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

__all__ = ["Frame", "IMAGE_SUFFIXES", "folder_frames", "video_frames", "camera_frames", "open_source", "guess_target"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Frame:
    """One input: encoded bytes (files) or a decoded RGB array (video, camera)."""

    key: str
    stable: bool  # the key identifies the same frame after a restart
    data: bytes | None = None
    rgb: np.ndarray | None = None
    name: str = ""


def folder_frames(folder: Path, *, stop: threading.Event, seen: Callable[[str], bool], watch: bool = True,
                  poll_s: float = 1.0) -> Iterator[Frame]:
    """Images in ``folder`` in name order, then new ones as they appear (``watch``).

    Hidden files and other suffixes are ignored: write a frame under a temporary
    hidden name and rename it into place, so the agent never reads half a file.
    """
    done: set[str] = set()
    while not stop.is_set():
        new = 0
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except FileNotFoundError:
            entries = []
        for e in entries:
            if stop.is_set():
                return
            if e.name.startswith(".") or not e.name.lower().endswith(IMAGE_SUFFIXES) or not e.is_file():
                continue
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            key = f"file:{e.name}:{st.st_size}:{st.st_mtime_ns}"
            if key in done:
                continue
            done.add(key)
            if seen(key):
                continue
            try:
                data = Path(e.path).read_bytes()
            except OSError:
                continue
            new += 1
            yield Frame(key, True, data=data, name=e.name)
        if not watch and new == 0:
            return
        if new == 0:
            stop.wait(poll_s)


def video_frames(path: Path, *, stop: threading.Event, seen: Callable[[str], bool], stride: int = 1) -> Iterator[Frame]:
    """Frames of a video file (every ``stride``-th), keyed by file identity and index."""
    import cv2

    st = path.stat()
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"Got {path}, which OpenCV cannot open as a video")
    try:
        idx = -1
        while not stop.is_set():
            ok, bgr = cap.read()
            if not ok:
                return
            idx += 1
            if idx % stride:
                continue
            key = f"video:{path.name}:{st.st_size}:{st.st_mtime_ns}:{idx}"
            if seen(key):
                continue
            yield Frame(key, True, rgb=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), name=f"{path.name}#{idx}")
    finally:
        cap.release()


def camera_frames(index: int, *, stop: threading.Event, stride: int = 1, fps: float | None = None) -> Iterator[Frame]:
    """Frames of a camera (``cv2.VideoCapture(index)``); a dropped camera is reopened."""
    import cv2

    cap = None
    idx = -1
    last = 0.0
    while not stop.is_set():
        if cap is None or not cap.isOpened():
            cap = cv2.VideoCapture(index)
            if not cap.isOpened():
                stop.wait(2.0)
                continue
        ok, bgr = cap.read()
        if not ok:
            cap.release()
            cap = None
            continue
        idx += 1
        if idx % stride:
            continue
        if fps:
            wait = last + 1.0 / fps - time.monotonic()
            if wait > 0:
                stop.wait(wait)
            last = time.monotonic()
        yield Frame(f"camera:{index}:{uuid.uuid4().hex}", False, rgb=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),
                    name=f"camera{index}#{idx}")
    if cap is not None:
        cap.release()


def open_source(spec: str, *, stop: threading.Event, seen: Callable[[str], bool], watch: bool = True,
                stride: int = 1, poll_s: float = 1.0) -> Iterator[Frame]:
    """A folder path, a video file path, or ``camera:N``.

    Raises:
        ValueError: the source does not exist or is not one of these.
    """
    if stride < 1:
        raise ValueError(f"Got {stride} for stride; expected >= 1")
    if spec.startswith("camera:"):
        try:
            index = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"Got {spec!r} for source; expected camera:N with a device number") from None
        return camera_frames(index, stop=stop, stride=stride)
    path = Path(spec).expanduser()
    if path.is_dir():
        return folder_frames(path, stop=stop, seen=seen, watch=watch, poll_s=poll_s)
    if path.is_file():
        return video_frames(path, stop=stop, seen=seen, stride=stride)
    raise ValueError(f"Got {spec!r} for source; expected a folder of images, a video file or camera:N")


def guess_target() -> str:
    """This machine's target: jetson (an NVIDIA Tegra board), arm64-cpu, or x86-cpu."""
    import platform

    if Path("/etc/nv_tegra_release").exists():
        return "jetson"
    return "arm64-cpu" if platform.machine().lower() in ("aarch64", "arm64") else "x86-cpu"
