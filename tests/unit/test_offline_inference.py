"""Offline inference without Ray: video runs, result rows, batch-job parts and `visionfleet infer` errors.

The model is a real ONNX graph (mean colour -> 3 classes) run by real ONNX Runtime; the
videos are written here with OpenCV (MJPG in AVI, mp4v in MP4).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from visionfleet.cli import app
from visionfleet.imaging import ResizeMode, encode_image, load_for_model
from visionfleet.inference import RuntimeOptions, load_model_dir
from visionfleet.offline import (
    error_row,
    preprocess_encoded,
    result_rows,
    result_schema,
    rows_to_table,
)
from visionfleet.registry import Registry
from visionfleet.spec import ModelCard, Task
from visionfleet.video import (
    NotAVideo,
    Sampling,
    TruncatedVideo,
    VideoContainer,
    frame_input,
    infer_video,
    iter_frames,
    probe_video,
    sniff_container,
)

REPO = Path(__file__).resolve().parents[2]
LABELS = ["red", "green", "blue"]
N_FRAMES, VIDEO_FPS, W, H = 40, 10.0, 64, 48
runner = CliRunner()


def _colour_model(size: int) -> onnx.ModelProto:
    """uint8 NHWC [N, size, size, 3] -> probs [N, 3]: softmax of a linear map of the mean RGB."""
    w = np.array([[0.05, -0.03, 0.0], [0.0, 0.04, -0.02], [-0.04, 0.0, 0.05]], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=1),
        ],
        "colour",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _want(probs: np.ndarray, top_k: int) -> dict:
    """The expected answer for one prob vector, computed here with numpy (an independent reference)."""
    p = np.asarray(probs, np.float64)
    order = np.argsort(-p)[:top_k]
    entropy = float(-(p * np.log(np.clip(p, 1e-12, 1))).sum() / np.log(p.size))
    return {"label": LABELS[int(order[0])], "class_id": int(order[0]), "score": float(p[order[0]]),
            "probs": [LABELS[int(i)] for i in order], "entropy": entropy}


def _frame(i: int) -> np.ndarray:
    """A BGR frame whose dominant colour cycles blue, green, red, with a gradient for resizing."""
    f = np.zeros((H, W, 3), np.uint8)
    f[:, :, i % 3] = 180
    f[:, :, (i + 1) % 3] = np.linspace(0, 90, W, dtype=np.uint8)[None, :]
    f[: H // 3, : W // 4] = (i * 6) % 256
    return f


def _write_video(path: Path, fourcc: str) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), VIDEO_FPS, (W, H))
    assert w.isOpened(), f"OpenCV cannot write {fourcc} here"
    for i in range(N_FRAMES):
        w.write(_frame(i))
    w.release()
    return path


@pytest.fixture
def registered(home: Path) -> Registry:
    reg = Registry(home / "registry")
    onnx.save(_colour_model(16), home / "model.onnx")
    reg.register(ModelCard(name="colour", labels=LABELS, input_size=(16, 16)), {"onnx": home / "model.onnx"})
    lb = home / "lb"
    lb.mkdir()
    onnx.save(_colour_model(24), lb / "model.onnx")
    reg.register(
        ModelCard(name="colour-lb", labels=LABELS, input_size=(24, 24), resize=ResizeMode.LETTERBOX),
        {"onnx": lb / "model.onnx"},
    )
    return reg


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {"avi": _write_video(d / "clip.avi", "MJPG"), "mp4": _write_video(d / "clip.mp4", "mp4v")}


def _decoded_frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return frames


# ----------------------------------------------------------------------------- containers
@pytest.mark.parametrize(
    "head,kind",
    [
        (b"\x00\x00\x00\x18ftypisom" + bytes(8), VideoContainer.MP4),
        (b"\x00\x00\x00\x08moov" + bytes(8), VideoContainer.MP4),
        (b"RIFF\x00\x00\x00\x00AVI LIST", VideoContainer.AVI),
        (b"\x1a\x45\xdf\xa3" + bytes(12), VideoContainer.MATROSKA),
        ((b"\x47" + bytes(187)) * 3, VideoContainer.MPEG_TS),
        (b"\x00\x00\x01\xba" + bytes(12), VideoContainer.MPEG_PS),
        (b"FLV\x01\x05" + bytes(11), VideoContainer.FLV),
        (bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c"), VideoContainer.ASF),
        (b"OggS" + bytes(12), VideoContainer.OGG),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", None),  # an image in a RIFF container
        (b"\xff\xd8\xff\xe0" + bytes(12), None),
        (b"hello world, not a video", None),
        (b"#EXTM3U\n#EXT-X-VERSION:3\n", None),  # a playlist never reaches FFmpeg
        (b"", None),
    ],
)
def test_sniff_container(head: bytes, kind: VideoContainer | None) -> None:
    assert sniff_container(head) is kind


def test_our_test_videos_are_sniffed_and_probed(videos: dict[str, Path]) -> None:
    for name, kind in (("avi", VideoContainer.AVI), ("mp4", VideoContainer.MP4)):
        info = probe_video(videos[name])
        assert info.container is kind
        assert (info.width, info.height, info.fps, info.frame_count) == (W, H, VIDEO_FPS, N_FRAMES)
    assert probe_video(videos["avi"]).codec == "MJPG"


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(
    "kwargs", [{"every": 0}, {"fps": 0.0}, {"fps": -1.0}, {"fps": float("nan")}, {"every": 2, "fps": 5.0}]
)
def test_bad_sampling_is_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="Got"):
        Sampling(**kwargs)


@pytest.mark.parametrize(
    "sampling,indices",
    [
        (Sampling(), list(range(N_FRAMES))),
        (Sampling(every=3), list(range(0, N_FRAMES, 3))),
        (Sampling(fps=5.0), list(range(0, N_FRAMES, 2))),  # 10 fps video -> every 2nd frame
        (Sampling(fps=2.5), list(range(0, N_FRAMES, 4))),
        (Sampling(fps=100.0), list(range(N_FRAMES))),  # faster than the video: every frame once
    ],
)
@pytest.mark.parametrize("kind", ["avi", "mp4"])
def test_frame_sampling_picks_exact_frames_and_timestamps(
    videos: dict[str, Path], kind: str, sampling: Sampling, indices: list[int]
) -> None:
    seen: list[int] = []
    frames = list(iter_frames(videos[kind], sampling, on_seen=seen.append))
    assert [f.index for f in frames] == indices
    assert [f.timestamp_ms for f in frames] == pytest.approx([i * 100.0 for i in indices])
    assert sum(seen) == N_FRAMES  # every stream frame is counted, sampled or not


# ----------------------------------------------------------------------------- parity with serving
@pytest.mark.parametrize("mode", list(ResizeMode))
def test_frame_input_equals_the_server_preprocessing_of_the_same_picture(
    videos: dict[str, Path], mode: ResizeMode
) -> None:
    for bgr in _decoded_frames(videos["avi"])[:5]:
        png = encode_image(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), "png")  # lossless: the same picture
        served, served_info = load_for_model(png, (24, 20), mode)
        mine, info = frame_input(bgr, (24, 20), mode)
        np.testing.assert_array_equal(mine, served)
        assert info == served_info


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
@pytest.mark.parametrize("model_name", ["colour", "colour-lb"])
def test_video_rows_match_the_model_run_by_hand(
    registered: Registry, videos: dict[str, Path], tmp_path: Path, fmt: str, model_name: str
) -> None:
    model = load_model_dir(registered.local_dir(model_name, 1))
    out = tmp_path / f"frames.{fmt}"
    progress: list[int] = []
    summary = infer_video(videos["mp4"], model, out, batch_size=7, sampling=Sampling(every=2), on_seen=progress.append)
    counts = (summary.frames_seen, summary.frames_inferred, summary.declared_frames)
    assert counts == (N_FRAMES, N_FRAMES // 2, N_FRAMES)
    assert sum(progress) == N_FRAMES and not summary.truncated
    rows = pq.read_table(out).to_pylist() if fmt == "parquet" else [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["frame"] for r in rows] == list(range(0, N_FRAMES, 2))

    reference = load_model_dir(registered.local_dir(model_name, 1), RuntimeOptions(threads=1))
    card = reference.card
    frames = _decoded_frames(videos["mp4"])
    for r in rows:
        rgb = cv2.cvtColor(frames[r["frame"]], cv2.COLOR_BGR2RGB)
        img, _ = load_for_model(encode_image(rgb, "png"), card.input_size, card.resize)
        probs = reference.run(img[None])[0][0]
        want = _want(probs, 5)
        assert (r["label"], r["class_id"]) == (want["label"], want["class_id"])
        assert r["score"] == pytest.approx(want["score"], abs=1e-6)
        assert [p["label"] for p in r["probs"]] == want["probs"]
        assert r["entropy"] == pytest.approx(want["entropy"], abs=1e-6)
        assert (r["model"], r["version"], r["width"], r["height"], r["error"]) == (model_name, 1, W, H, None)
        assert r["timestamp_ms"] == pytest.approx(r["frame"] * 100.0)
    # The dominant colour cycles blue, green, red: the model sees it.
    assert [r["label"] for r in rows[:3]] == ["blue", "red", "green"]


def test_parquet_and_jsonl_hold_the_same_rows(registered: Registry, videos: dict[str, Path], tmp_path: Path) -> None:
    model = load_model_dir(registered.local_dir("colour", 1))
    infer_video(videos["avi"], model, tmp_path / "a.parquet", sampling=Sampling(fps=2.5))
    infer_video(videos["avi"], model, tmp_path / "a.jsonl", sampling=Sampling(fps=2.5))
    table = pq.read_table(tmp_path / "a.parquet")
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert table.num_rows == len(lines) == 10
    assert table.schema.names == list(lines[0])  # same columns, same order
    assert table.to_pylist() == lines


# ----------------------------------------------------------------------------- bad videos
def test_non_videos_are_refused_with_a_clear_error(registered: Registry, tmp_path: Path) -> None:
    model = load_model_dir(registered.local_dir("colour", 1))
    text = tmp_path / "notes.mp4"
    text.write_text("hello " * 200)  # FFmpeg's tty demuxer would 'play' this
    image = tmp_path / "still.mp4"
    image.write_bytes(encode_image(np.zeros((8, 8, 3), np.uint8), "jpeg"))
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    for path, needle in ((text, "not a video"), (image, "is an image"), (empty, "is empty")):
        with pytest.raises(NotAVideo, match=needle):
            infer_video(path, model, tmp_path / "out.jsonl")
        assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(FileNotFoundError):
        probe_video(tmp_path / "missing.mp4")


def test_truncated_videos_fail_unless_a_partial_result_is_accepted(
    registered: Registry, videos: dict[str, Path], tmp_path: Path
) -> None:
    model = load_model_dir(registered.local_dir("colour", 1))
    data = videos["avi"].read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "cut.parquet"
    with pytest.raises(TruncatedVideo, match=f"of the {N_FRAMES} its header declares"):
        infer_video(cut, model, out)
    assert list(tmp_path.glob("*.parquet*")) == [] and list(tmp_path.glob(".cut*")) == []  # no output, no temp file
    summary = infer_video(cut, model, out, allow_truncated=True)
    assert summary.truncated and 0 < summary.frames_inferred < N_FRAMES
    assert pq.read_table(out).num_rows == summary.frames_inferred
    assert pq.read_table(out).column("frame").to_pylist() == list(range(summary.frames_inferred))
    # An MP4 cut before its index (moov) cannot even be opened.
    data = videos["mp4"].read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(NotAVideo, match="cannot open"):
        probe_video(tmp_path / "cut.mp4")


def test_output_rules(registered: Registry, videos: dict[str, Path], tmp_path: Path) -> None:
    model = load_model_dir(registered.local_dir("colour", 1))
    with pytest.raises(ValueError, match=r"\.parquet or \.jsonl"):
        infer_video(videos["avi"], model, tmp_path / "frames.csv")
    (tmp_path / "frames.jsonl").write_text("old")
    with pytest.raises(FileExistsError):
        infer_video(videos["avi"], model, tmp_path / "frames.jsonl")
    infer_video(videos["avi"], model, tmp_path / "frames.jsonl", overwrite=True, sampling=Sampling(every=10))
    assert len((tmp_path / "frames.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="batch_size"):
        infer_video(videos["avi"], model, tmp_path / "x.jsonl", batch_size=0)


# ----------------------------------------------------------------------------- rows and schema
def test_preprocess_encoded_keeps_one_error_per_bad_input() -> None:
    card = ModelCard(name="m", labels=LABELS, input_size=(16, 16), resize=ResizeMode.CENTER_CROP)
    good = encode_image(cv2.cvtColor(_frame(1), cv2.COLOR_BGR2RGB), "jpeg")
    png = encode_image(cv2.cvtColor(_frame(2), cv2.COLOR_BGR2RGB), "png")
    blobs = [good, b"", None, png[: len(png) - 20], b"not an image", good]
    prep = preprocess_encoded(blobs, card, max_pixels=10_000)
    assert prep.ok.tolist() == [True, False, False, False, False, True]
    assert prep.errors[1].startswith("EmptyImage") and prep.errors[3].startswith("TruncatedImage")
    assert prep.errors[4].startswith("UnsupportedImageFormat")
    want, info = load_for_model(good, (16, 16), ResizeMode.CENTER_CROP)
    np.testing.assert_array_equal(prep.pixels[0], want)
    assert prep.infos[5] == info and not prep.pixels[1].any()
    big = preprocess_encoded([good], card, max_pixels=100)  # 64x48 > 100 pixels
    assert big.errors[0].startswith("ImageTooLarge")


def test_detection_rows_follow_the_server_shape_and_map_boxes_back() -> None:
    from visionfleet.imaging import ResizeInfo

    card = ModelCard(name="det", task=Task.DETECTION, labels=["cat", "dog"], input_size=(32, 32))
    boxes = np.array([[[1, 2, 10, 12], [4, 4, 8, 8], [0, 0, 0, 0]], [[0, 0, 0, 0]] * 3], np.float32)
    scores = np.array([[0.4, 0.9, 0.0], [0.0, 0.0, 0.0]], np.float32)
    classes = np.array([[0, 1, -1], [-1, -1, -1]], np.int64)
    infos = [ResizeInfo(0.5, 0.5, 0.0, 0.0, 64, 64), ResizeInfo(1.0, 1.0, 0.0, 0.0, 32, 32)]
    rows = result_rows(card, [boxes, scores, classes], infos)
    want = [{"label": "dog", "class_id": 1, "score": pytest.approx(0.9), "box": [8.0, 8.0, 16.0, 16.0]},
            {"label": "cat", "class_id": 0, "score": pytest.approx(0.4), "box": [2.0, 4.0, 20.0, 24.0]}]
    assert rows[0]["detections"] == want and rows[0]["count"] == 2
    assert (rows[0]["label"], rows[0]["score"], rows[0]["margin"]) == ("dog", pytest.approx(0.9), pytest.approx(0.5))
    assert rows[0]["detections"][0]["box"] == [8.0, 8.0, 16.0, 16.0]  # model pixels x2
    assert (rows[1]["label"], rows[1]["score"], rows[1]["count"], rows[1]["detections"]) == (None, 0.0, 0, [])
    schema = result_schema(Task.DETECTION)
    table = rows_to_table([{**r, "model": "det", "version": 1} for r in rows] + [
        {**error_row(Task.DETECTION, "CorruptImage: x"), "model": "det", "version": 1}
    ], schema)
    assert table.num_rows == 3 and table.column("error").null_count == 2


@pytest.mark.parametrize("task", list(Task))
def test_error_rows_have_exactly_the_schema_columns(task: Task) -> None:
    import pyarrow as pa

    schema = result_schema(task, [pa.field("path", pa.string())])
    row = {**error_row(task, "EmptyImage: empty image"), "path": "x.jpg", "model": "m", "version": 2}
    assert set(row) == set(schema.names)
    assert rows_to_table([row], schema).to_pylist()[0]["error"] == "EmptyImage: empty image"


# ----------------------------------------------------------------------------- batch-job parts (no Ray)
def _images_folder(root: Path) -> Path:
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(5):
        rgb = cv2.cvtColor(_frame(i), cv2.COLOR_BGR2RGB)
        sub = root / ("a/deep" if i % 2 else "b")
        (sub / f"{i}.{'png' if i % 2 else 'jpg'}").write_bytes(encode_image(rgb, "png" if i % 2 else "jpeg"))
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (root / "README.txt").write_text("not an image")
    return root


def test_decode_and_predictor_without_ray_give_one_row_per_input(
    home: Path, registered: Registry, tmp_path: Path
) -> None:
    import pyarrow as pa

    from cluster.jobs.batch_infer import OrtPredictor, _decode

    folder = _images_folder(tmp_path / "imgs")
    paths = sorted(p for p in folder.rglob("*") if p.suffix in {".jpg", ".png"})
    batch = {
        "bytes": np.array([p.read_bytes() for p in paths], dtype=object),
        "path": np.array([str(p) for p in paths], dtype=object),
    }
    card = registered.card("colour", 1)
    decoded = _decode(batch, card=card, max_pixels=1_000_000, image_column="bytes", key_column="path", passthrough=())
    predictor = OrtPredictor("colour:1", threads=1, top_k=2, key_fields=[pa.field("path", pa.string())])
    table = predictor(decoded)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert len(rows) == len(paths) == 6
    broken = rows[str(folder / "b" / "broken.jpg")]
    assert broken["label"] is None and broken["error"].startswith("CorruptImage")
    reference = load_model_dir(registered.local_dir("colour", 1))
    for p in paths:
        if p.name == "broken.jpg":
            continue
        img, _ = load_for_model(p.read_bytes(), (16, 16), ResizeMode.STRETCH)
        want = _want(reference.run(img[None])[0][0], 2)
        got = rows[str(p)]
        assert got["label"] == want["label"] and got["score"] == pytest.approx(want["score"], abs=1e-6)
        assert [x["label"] for x in got["probs"]] == want["probs"] and got["error"] is None


def test_the_predictor_refuses_a_worker_without_an_absolute_state_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa

    from cluster.jobs.batch_infer import OrtPredictor

    monkeypatch.setenv("VISIONFLEET_HOME", "relative/home")
    with pytest.raises(RuntimeError, match="runtime_env"):
        OrtPredictor("colour:1", threads=1, top_k=2, key_fields=[pa.field("path", pa.string())])


def test_resolve_input_kinds_and_errors(home: Path, tmp_path: Path, videos: dict[str, Path]) -> None:
    from cluster.jobs.batch_infer import BatchJobConfig, InputKind, resolve_input
    from visionfleet.datasets.store import synthesize

    def cfg(src: Path | str, **kw) -> BatchJobConfig:
        return BatchJobConfig(model="colour", input=str(src), out=str(tmp_path / "out"), **kw)

    folder = _images_folder(tmp_path / "imgs")
    ds = tmp_path / "ds"
    synthesize(ds, n_train=4, n_holdout=3, size=16)
    job = resolve_input(cfg(folder))
    assert (job.kind, job.key_column, job.paths) == (InputKind.IMAGES, "path", (str(folder),))
    job = resolve_input(cfg(ds))
    assert job.kind is InputKind.PARQUET and job.passthrough == ("label", "label_name")
    assert job.paths == (str(ds / "holdout"), str(ds / "train"))
    assert resolve_input(cfg(ds, split="holdout")).paths == (str(ds / "holdout"),)
    part = next((ds / "train").glob("*.parquet"))
    assert resolve_input(cfg(part)).kind is InputKind.PARQUET
    for src, kw, err, needle in (
        (tmp_path / "nope", {}, FileNotFoundError, "no such file"),
        (ds, {"split": "test"}, FileNotFoundError, "no split 'test'"),
        (folder, {"split": "train"}, ValueError, "only with a dataset folder"),
        (part, {"image_column": "pixels"}, ValueError, "without column 'pixels'"),
        (part, {"image_column": "label_name"}, ValueError, "expected binary"),
        (part, {"id_column": "uid"}, ValueError, "without column 'uid'"),
        (videos["mp4"], {}, ValueError, "is a video"),
        (folder / "README.txt", {}, ValueError, "neither a Parquet file nor an image"),
        (folder / "a", {}, ValueError, None),  # only a sub-folder of images: fine, checked below
    ):
        if needle is None:
            assert resolve_input(cfg(src, **kw)).kind is InputKind.IMAGES
            continue
        with pytest.raises(err, match=needle):
            resolve_input(cfg(src, **kw))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        resolve_input(cfg(tmp_path / "empty"))


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"model": "bad ref!"}, "model reference"),
        ({"batch_size": 0}, "batch_size"),
        ({"min_actors": 3, "max_actors": 2}, "max_actors"),
        ({"actor_cpus": 0}, "actor_cpus"),
        ({"threads": 0}, "threads"),
    ],
)
def test_bad_job_config_is_refused(kw: dict, needle: str) -> None:
    from cluster.jobs.batch_infer import BatchJobConfig

    base = {"model": "m", "input": "x", "out": "y"}
    with pytest.raises(ValueError, match=needle):
        BatchJobConfig(**{**base, **kw})


def test_job_entrypoint_reports_bad_input_with_exit_2(home: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "cluster.jobs.batch_infer", "--model", "demo:1",
         "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert r.returncode == 2 and "error: no such file or folder" in r.stderr and "Traceback" not in r.stderr
    assert "ray" not in r.stdout


# ----------------------------------------------------------------------------- CLI
def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_cli_runs_a_video_and_prints_json(registered: Registry, videos: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "frames.jsonl"
    r = invoke("infer", str(videos["avi"]), "--model", "colour@production", "--out", str(out),
               "--fps", "2", "--batch", "3", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout[r.stdout.index("{"):])
    assert (doc["frames_seen"], doc["frames_inferred"], doc["model"], doc["version"]) == (N_FRAMES, 8, "colour", 1)
    assert len(out.read_text().splitlines()) == 8


def test_cli_bad_arguments_exit_2_with_a_message_before_any_work(
    registered: Registry, videos: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cluster.jobs.batch_infer as bi

    started: list[bool] = []
    monkeypatch.setattr(bi, "connect_ray", lambda *a, **k: started.append(True))
    folder = _images_folder(tmp_path / "imgs")
    text = tmp_path / "clip.mp4"
    text.write_text("hello " * 100)
    cut = tmp_path / "cut.avi"
    data = videos["avi"].read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "part.parquet").write_bytes(b"x")
    video = str(videos["avi"])
    out = str(tmp_path / "f.jsonl")
    cases = [
        ((video, "--model", "colour", "--out", out, "--every", "2", "--fps", "1"), "not both"),
        ((video, "--model", "colour", "--out", out, "--every", "0"), "expected >= 1"),
        ((video, "--model", "colour", "--out", str(tmp_path / "f.csv")), ".parquet or .jsonl"),
        ((video, "--model", "colour", "--out", out, "--split", "train"), "--split"),
        ((video, "--model", "colour", "--out", out, "--max-actors", "3"), "only to folder and Parquet jobs"),
        ((video, "--model", "nope", "--out", out), "unknown model 'nope'"),
        ((video, "--model", "colour:7", "--out", out), "no version 7"),
        ((str(text), "--model", "colour", "--out", out), "not a video"),
        ((str(cut), "--model", "colour", "--out", out), "is truncated"),
        ((str(tmp_path / "missing.mp4"), "--model", "colour", "--out", out), "no such file"),
        ((str(folder), "--model", "colour", "--out", str(tmp_path / "o"), "--every", "2"), "only to video input"),
        ((str(folder), "--model", "colour", "--out", str(tmp_path / "o"), "--split", "x"), "dataset folder"),
        ((str(folder), "--model", "colour", "--out", str(tmp_path / "taken")), "not empty"),
        ((str(folder), "--model", "colour", "--out", str(tmp_path / "o"), "--min-actors", "0"), "min_actors"),
        ((str(folder), "--model", "ghost", "--out", str(tmp_path / "o")), "unknown model 'ghost'"),
    ]
    for args, needle in cases:
        r = invoke("infer", *args)
        assert r.exit_code == 2, (args, r.output)
        assert "error:" in r.output and needle in " ".join(r.output.split()), (args, r.output)
        assert "Traceback" not in r.output
    assert not started  # every bad argument was caught before Ray
    assert not Path(out).exists() and not list(tmp_path.glob(".f.jsonl*"))


def test_docs_video_example_runs(registered: Registry, videos: dict[str, Path], tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "docs/examples/video_inference.py"),
         str(videos["mp4"]), "colour", str(tmp_path / "f.jsonl")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "mp4/mov FMP4 64x48 @ 10 fps, 40 frames" in r.stdout  # OpenCV's mp4v writes the FMP4 tag
    assert "8 of 40 frames" in r.stdout
    assert "   0.00 s  blue\n   0.50 s  red\n   1.00 s  green\n" in r.stdout


# ----------------------------------------------------------------------------- a real detection model
def _constant_detector(size: int) -> onnx.ModelProto:
    """A YOLO-style head with four fixed anchors [1, 4 + 3, 4] (cx, cy, w, h, 3 class scores) for any image."""
    anchors = np.array(
        [
            [30, 30, 20, 20, 0.9, 0.1, 0.0],  # car, kept
            [32, 30, 20, 20, 0.8, 0.0, 0.0],  # car, suppressed by NMS
            [31, 30, 20, 20, 0.1, 0.7, 0.0],  # person, kept (per-class NMS)
            [70, 70, 10, 30, 0.0, 0.0, 0.6],  # dog, kept
        ],
        np.float32,
    ).T[None]
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=0),  # [N]
            helper.make_node("Reshape", ["m", "shape3"], ["m3"]),  # [N, 1, 1]
            helper.make_node("Mul", ["m3", "zero"], ["z"]),
            helper.make_node("Add", ["z", "base"], ["output0"]),  # [N, 7, 4]
        ],
        "constant_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 7, 4])],
        initializer=[
            numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape3"),
            numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "zero"),
            numpy_helper.from_array(anchors, "base"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def test_a_detection_model_gives_boxes_in_original_pixels_for_frames_and_files(home: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    from edge_export import importer as imp
    from cluster.jobs.batch_infer import OrtPredictor, _decode

    src = tmp_path / "head.onnx"
    onnx.save(_constant_detector(100), str(src))
    reg = Registry(home / "registry")
    spec = imp.ImportSpec(
        task=Task.DETECTION, labels=("car", "person", "dog"), input_size=(100, 100), resize=imp.ResizeMode.LETTERBOX,
        detection=imp.DetectionOptions(score_threshold=0.25, iou_threshold=0.45, max_detections=5),
    )
    card = imp.import_onnx(src, reg, "det", spec)
    # A 200x100 picture is letterboxed to 100x100 (scale 0.5, 25 px bars): x / 0.5, (y - 25) / 0.5.
    want = [[40, 0, 80, 30], [42, 0, 82, 30], [130, 60, 150, 100]]
    frame = np.full((100, 200, 3), 90, np.uint8)

    w = cv2.VideoWriter(str(tmp_path / "wide.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (200, 100))
    for _ in range(6):
        w.write(frame)
    w.release()
    model = load_model_dir(reg.local_dir("det", card.version))
    out = tmp_path / "det.parquet"
    summary = infer_video(tmp_path / "wide.avi", model, out, batch_size=4)
    rows = pq.read_table(out).to_pylist()
    assert summary.frames_inferred == len(rows) == 6
    assert pq.read_table(out).schema.field("detections").type.value_type.field("box").type == pa.list_(pa.float64(), 4)

    png = encode_image(frame, "png")
    batch = {"bytes": np.array([png, b"junk"], dtype=object), "path": np.array(["a.png", "b.png"], dtype=object)}
    decoded = _decode(batch, card=card, max_pixels=1_000_000, image_column="bytes", key_column="path", passthrough=())
    files = OrtPredictor(card.ref, threads=1, top_k=5, key_fields=[pa.field("path", pa.string())])(decoded).to_pylist()
    assert files[1]["error"].startswith("UnsupportedImageFormat") and files[1]["detections"] is None
    for row in [*rows, files[0]]:
        assert (row["label"], row["count"], row["width"], row["height"]) == ("car", 3, 200, 100)
        assert row["score"] == pytest.approx(0.9) and row["margin"] == pytest.approx(0.2)
        assert [d["label"] for d in row["detections"]] == ["car", "person", "dog"]
        np.testing.assert_allclose([d["box"] for d in row["detections"]], want, atol=1e-3)
