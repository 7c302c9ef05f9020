"""Parquet image datasets: encoded image bytes + label + metadata, one folder per split.

Layout of a dataset folder::

    manifest.json                 name, labels, splits and their sizes, provenance
    train/part-00000.parquet      columns: id, image, label, label_name, source,
    holdout/part-00000.parquet             width, height, format, meta (JSON)

Images stay encoded (the bytes a camera or client would send); they are decoded with
:mod:`visionfleet.imaging`, the same code the server and the edge agent use.

Where datasets live: the store area ``datasets`` (``Settings.store_uri("datasets")``). On one
machine that is ``<home>/datasets`` and a dataset is its folder, as always. On an object store
(``s3://bucket/prefix/datasets``) a dataset is written to a local folder, then
:func:`publish_dataset` uploads its files and, last, ``_content.json`` (every file's size and
SHA-256 and the dataset's content hash): a dataset without it is incomplete and unreadable.
:func:`local_dataset` gives any node a local folder for a dataset reference: a folder as is, a
store URI as a copy in ``<cache_dir>/datasets/<content hash>`` (downloaded once per node,
checked against the hashes, renamed into place whole), so training on a node that did not
write the dataset reads the same bytes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from visionfleet.imaging import (
    ImageError,
    ImageFormat,
    ResizeMode,
    encode_image,
    image_size,
    load_for_model,
    sniff_format,
)

__all__ = [
    "SCHEMA",
    "DatasetInfo",
    "DatasetWriter",
    "synthesize",
    "import_image_folder",
    "read_info",
    "read_split",
    "load_arrays",
    "resolve_dataset",
    "resolve_dataset_ref",
    "publish_dataset",
    "local_dataset",
    "list_datasets",
    "IMAGE_SUFFIXES",
]

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("label_name", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("format", pa.string()),
        pa.field("meta", pa.string()),
    ]
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
_MANIFEST = "manifest.json"
_CONTENT = "_content.json"  # on an object store: the dataset's files and content hash, written last
_ROWS_PER_FILE = 50_000
_ROW_GROUP = 2_000

Progress = Callable[[int], None]  # called with the number of rows just written


@dataclass
class DatasetInfo:
    name: str
    labels: list[str]
    splits: dict[str, int] = field(default_factory=dict)
    source: str = ""
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())
    params: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def resolve_dataset(ref: str | os.PathLike[str], datasets_dir: Path) -> Path:
    """A dataset given as a folder path, or as a name under the state dir's datasets."""
    p = Path(ref).expanduser()
    if p.is_dir() or os.sep in str(ref) or str(ref).startswith("."):
        return p.resolve()
    return (datasets_dir / str(ref)).resolve()


def resolve_dataset_ref(ref: str | os.PathLike[str], settings) -> str:  # noqa: ANN001 - visionfleet.settings.Settings
    """A dataset reference any node can open with :func:`local_dataset`: a folder path (as
    :func:`resolve_dataset`), a store URI as given, or a name in the store area ``datasets``
    (``<home>/datasets/<name>`` on one machine, ``s3://.../datasets/<name>`` on a cluster)."""
    raw = os.fspath(ref)
    if "://" in raw:
        return raw.rstrip("/")
    area = settings.store_uri("datasets")
    if "://" not in area:
        return str(resolve_dataset(raw, Path(area)))
    p = Path(raw).expanduser()
    if p.is_dir() or os.sep in raw or raw.startswith("."):
        return str(p.resolve())
    return f"{area.rstrip('/')}/{raw}"


def read_info(path: str | os.PathLike[str]) -> DatasetInfo:
    """The manifest of a dataset folder, or of a published dataset at a store URI."""
    raw = os.fspath(path)
    if "://" in raw:
        from visionfleet.store import StoreError, open_store

        store = open_store(raw)
        try:
            if not store.exists(_CONTENT):
                raise FileNotFoundError(f"no dataset at {raw} (missing {_CONTENT}: never published, or its upload "
                                        f"did not finish)")
            return DatasetInfo(**json.loads(store.read_bytes(_MANIFEST)))
        except StoreError as e:
            raise FileNotFoundError(f"no dataset at {raw}: {e}") from e
    mf = Path(raw) / _MANIFEST
    if not mf.is_file():
        raise FileNotFoundError(f"no dataset at {path} (missing {_MANIFEST})")
    return DatasetInfo(**json.loads(mf.read_text()))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _content_of(folder: Path) -> dict:
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256_file(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "files": files}


def publish_dataset(folder: str | os.PathLike[str], uri: str, *, cache_dir: Path | None = None) -> str:
    """Upload a finished dataset folder to ``uri`` (files first, ``_content.json`` last); returns its content hash.

    With ``cache_dir`` the folder then becomes this node's cached copy (``<cache_dir>/datasets/<hash>``),
    so the writer does not download what it just wrote.

    Raises:
        FileNotFoundError: ``folder`` is not a dataset (no manifest).
        FileExistsError: a dataset is published at ``uri`` already.
        visionfleet.store.StoreError: the store refused or did not answer.
    """
    import pyarrow.fs as pafs

    from visionfleet.store import open_store

    folder = Path(folder)
    read_info(folder)
    store = open_store(uri)
    if store.exists(_CONTENT):
        raise FileExistsError(f"a dataset already exists at {uri}; choose another name or delete it")
    content = _content_of(folder)
    for rel in content["files"]:
        store._call(f"upload {uri}/{rel}", pafs.copy_files, str(folder / rel), store.path(rel),
                    pafs.LocalFileSystem(), store.fs)
    store.write_bytes(_CONTENT, json.dumps(content, indent=1).encode())
    if cache_dir is not None:
        _into_cache(folder, Path(cache_dir) / "datasets" / content["sha256"])
    return content["sha256"]


def _into_cache(tmp: Path, dest: Path) -> Path:
    """Rename a complete folder to its cache place; a copy that got there first wins."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not (dest / _MANIFEST).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def local_dataset(ref: str | os.PathLike[str], cache_dir: Path) -> Path:
    """A local folder of the dataset ``ref``: a folder path as is; a store URI as this node's copy
    in ``<cache_dir>/datasets/<content hash>`` (downloaded once, every file checked against
    ``_content.json``, renamed into place whole, so concurrent readers never see half of it).

    Raises:
        FileNotFoundError: no published dataset at ``ref``.
        ValueError: a downloaded file does not match its recorded hash.
        visionfleet.store.StoreError: the store refused or did not answer.
    """
    import pyarrow.fs as pafs

    from visionfleet.store import StoreError, open_store

    raw = os.fspath(ref)
    if "://" not in raw:
        return Path(raw)
    store = open_store(raw)
    try:
        content = json.loads(store.read_bytes(_CONTENT))
    except StoreError as e:
        if store.exists(_CONTENT):
            raise
        raise FileNotFoundError(f"no dataset at {raw} (missing {_CONTENT}: never published, or its upload did not "
                                f"finish)") from e
    dest = Path(cache_dir) / "datasets" / content["sha256"]
    if (dest / _MANIFEST).is_file():
        return dest
    tmp = dest.parent / f".tmp-{content['sha256'][:12]}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for rel, meta in content["files"].items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            store._call(f"download {raw}/{rel}", pafs.copy_files, store.path(rel), str(target),
                        store.fs, pafs.LocalFileSystem())
            got = _sha256_file(target)
            if got != meta["sha256"]:
                raise ValueError(f"Got SHA-256 {got[:16]}… for {raw}/{rel}; expected {meta['sha256'][:16]}… "
                                 f"(the store's copy changed after it was published)")
        return _into_cache(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def list_datasets(area: str) -> list[tuple[str, DatasetInfo]]:
    """``(reference, info)`` of every dataset in a store area (a folder or a URI), by name."""
    if "://" not in area:
        root = Path(area)
        return [(str(mf.parent), read_info(mf.parent)) for mf in sorted(root.glob(f"*/{_MANIFEST}"))] \
            if root.is_dir() else []
    from visionfleet.store import open_store

    store = open_store(area)
    rows = []
    for key, _, is_dir in sorted(store.list("")):
        if is_dir and store.exists(f"{key}/{_CONTENT}"):
            ref = f"{area.rstrip('/')}/{key}"
            rows.append((ref, read_info(ref)))
    return rows


class DatasetWriter:
    """Append rows to a split; call :meth:`close` (or use as a context manager)."""

    def __init__(self, path: Path, split: str) -> None:
        if not split.isidentifier():
            raise ValueError(f"Got {split!r} for split; expected a simple name like train or holdout")
        self.dir = Path(path) / split
        self.dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.dir.glob("part-*.parquet"))
        self._part = len(existing)
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0
        self._buf: list[dict] = []
        self.rows = 0

    def _flush(self) -> None:
        if not self._buf:
            return
        if self._writer is None or self._in_file >= _ROWS_PER_FILE:
            if self._writer is not None:
                self._writer.close()
            self._writer = pq.ParquetWriter(self.dir / f"part-{self._part:05d}.parquet", SCHEMA)
            self._part += 1
            self._in_file = 0
        table = pa.Table.from_pylist(self._buf, schema=SCHEMA)
        self._writer.write_table(table)
        self._in_file += len(self._buf)
        self._buf = []

    def write(self, row: dict) -> None:
        self._buf.append(row)
        self.rows += 1
        if len(self._buf) >= _ROW_GROUP:
            self._flush()

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_manifest(path: Path, info: DatasetInfo) -> None:
    tmp = path / f".{_MANIFEST}.{uuid.uuid4().hex}"
    tmp.write_text(info.to_json())
    tmp.replace(path / _MANIFEST)


def synthesize(
    out: Path,
    *,
    n_train: int,
    n_holdout: int,
    size: int = 64,
    seed: int = 0,
    drift=None,
    image_format: str = "png",
    name: str | None = None,
    progress: Progress | None = None,
    index_offset: int = 0,
    classes: "list[str] | tuple[str, ...] | None" = None,
) -> DatasetInfo:
    """Generate the procedural dataset into ``out`` (train and holdout splits).

    Train and holdout use disjoint sample indices of the same seed, so they never share
    an image. ``index_offset`` shifts both, to draw fresh samples from the same seed.
    ``classes`` keeps only those classes (balanced, in that order: label ``i`` is
    ``classes[i]``) for a smaller, easier task; the default is all ten.
    """
    from visionfleet.datasets.synth import CLASSES, Drift, SynthConfig, generate

    subset = list(classes) if classes else None
    if subset is not None:
        unknown = [c for c in subset if c not in CLASSES]
        if unknown or len(set(subset)) != len(subset) or len(subset) < 2:
            raise ValueError(f"Got classes {subset}; expected 2 or more distinct names from {', '.join(CLASSES)}")
    names = subset or list(CLASSES)
    drift = drift or Drift()
    fmt = ImageFormat(image_format)
    if drift.jpeg_quality is not None:
        fmt = ImageFormat.JPEG
    if n_train < 0 or n_holdout < 0 or n_train + n_holdout == 0:
        raise ValueError(f"Got n_train={n_train}, n_holdout={n_holdout}; expected non-negative, not both 0")
    out = Path(out)
    if (out / _MANIFEST).exists():
        raise FileExistsError(f"a dataset already exists at {out}; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    quality = drift.jpeg_quality or 92
    splits = {}
    start = index_offset
    for split, n in (("train", n_train), ("holdout", n_holdout)):
        if n == 0:
            continue
        with DatasetWriter(out, split) as w:
            cfg = SynthConfig(n=n, size=size, seed=seed, drift=drift, image_format=fmt.value)
            fixed = None if subset is None else [CLASSES.index(subset[(start + k) % len(subset)]) for k in range(n)]
            for idx, img, label in generate(cfg, start=start, labels=fixed):
                data = encode_image(img, fmt, quality)
                name_ = CLASSES[label]
                w.write(
                    {
                        "id": f"synth-{seed}-{idx}",
                        "image": data,
                        "label": names.index(name_),
                        "label_name": name_,
                        "source": "synth",
                        "width": size,
                        "height": size,
                        "format": fmt.value,
                        "meta": json.dumps({"seed": seed, "index": idx}),
                    }
                )
                if progress:
                    progress(1)
        splits[split] = n
        start += n
    info = DatasetInfo(
        name=name or out.name,
        labels=names,
        splits=splits,
        source="synth",
        params={
            "seed": seed,
            "size": size,
            "index_offset": index_offset,
            "format": fmt.value,
            "drift": drift.to_dict(),
            **({"classes": subset} if subset else {}),
        },
    )
    _write_manifest(out, info)
    return info


def _split_of(rel: str, holdout_fraction: float, seed: int) -> str:
    h = hashlib.sha256(f"{seed}:{rel}".encode()).digest()
    return "holdout" if int.from_bytes(h[:8], "big") / 2**64 < holdout_fraction else "train"


def import_image_folder(
    root: Path,
    out: Path,
    *,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    max_pixels: int = 40_000_000,
    name: str | None = None,
    progress: Progress | None = None,
) -> tuple[DatasetInfo, list[tuple[str, str]]]:
    """Import ``root/<class>/*.<image>`` into the Parquet schema.

    The split is a stable hash of each file's relative path, so re-importing a grown
    folder keeps every old file in its split. Unreadable files are skipped and
    returned as ``(path, reason)``.

    Raises:
        FileNotFoundError, ValueError: no folder, no class folders or no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"Got {holdout_fraction} for holdout_fraction; expected 0 <= f < 1")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"Got {len(classes)} class folders in {root}; expected at least 2 (root/<class>/*.jpg)")
    out = Path(out)
    if (out / _MANIFEST).exists():
        raise FileExistsError(f"a dataset already exists at {out}; choose another --out or delete it")
    files = [
        (ci, p)
        for ci, c in enumerate(classes)
        for p in sorted((root / c).rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[tuple[str, str]] = []
    writers = {s: DatasetWriter(out, s) for s in ("train", "holdout")}
    try:
        for ci, p in files:
            rel = p.relative_to(root).as_posix()
            data = p.read_bytes()
            try:
                w, h = image_size(data)
                if w * h > max_pixels:
                    raise ImageError(f"{w}x{h} exceeds the pixel limit {max_pixels}")
                # Decode once to refuse truncated/corrupt files now rather than at training.
                load_for_model(data, (32, 32), ResizeMode.STRETCH, max_pixels=max_pixels)
            except ImageError as exc:
                skipped.append((rel, str(exc)))
                if progress:
                    progress(1)
                continue
            fmt = sniff_format(data)
            split = _split_of(rel, holdout_fraction, seed)
            writers[split].write(
                {
                    "id": f"file-{hashlib.sha256(rel.encode()).hexdigest()[:16]}",
                    "image": data,
                    "label": ci,
                    "label_name": classes[ci],
                    "source": f"imagefolder:{root.name}",
                    "width": w,
                    "height": h,
                    "format": fmt.value if fmt else None,
                    "meta": json.dumps({"path": rel}),
                }
            )
            if progress:
                progress(1)
    finally:
        for w_ in writers.values():
            w_.close()
    splits = {s: w_.rows for s, w_ in writers.items() if w_.rows}
    if not splits:
        raise ValueError(f"none of the {len(files)} images under {root} could be read")
    info = DatasetInfo(
        name=name or out.name,
        labels=classes,
        splits=splits,
        source=f"imagefolder:{root}",
        params={"holdout_fraction": holdout_fraction, "seed": seed, "skipped": len(skipped)},
    )
    _write_manifest(out, info)
    return info, skipped


def read_split(path: Path, split: str, columns: list[str] | None = None) -> pa.Table:
    d = Path(path) / split
    parts = sorted(d.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"dataset {path} has no split {split!r}")
    return pa.concat_tables([pq.read_table(p, columns=columns, schema=SCHEMA) for p in parts])


def iter_rows(path: Path, split: str, columns: list[str] | None = None) -> Iterator[dict]:
    for p in sorted((Path(path) / split).glob("part-*.parquet")):
        pf = pq.ParquetFile(p)
        for batch in pf.iter_batches(columns=columns):
            yield from batch.to_pylist()


def load_arrays(
    path: Path,
    split: str,
    size: tuple[int, int],
    resize: ResizeMode | str = ResizeMode.STRETCH,
    *,
    shard: tuple[int, int] | None = None,
    limit: int | None = None,
    max_pixels: int = 40_000_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a split into ``(images uint8 [N,H,W,3], labels int64 [N])``.

    ``shard=(rank, world)`` keeps every world-th row starting at rank (for data-parallel
    workers); ``limit`` keeps the first rows only.
    """
    table = read_split(path, split, columns=["image", "label"])
    n = table.num_rows if limit is None else min(limit, table.num_rows)
    idx: Iterable[int] = range(n)
    if shard is not None:
        rank, world = shard
        idx = range(rank, n, world)
    idx = list(idx)
    images = table.column("image")
    labels = table.column("label").to_numpy()
    out = np.empty((len(idx), size[0], size[1], 3), np.uint8)
    for k, i in enumerate(idx):
        out[k], _ = load_for_model(images[i].as_py(), size, resize, max_pixels=max_pixels)
    return out, labels[idx].astype(np.int64)
