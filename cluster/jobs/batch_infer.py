"""Batch inference at scale on Ray Data: a folder of images or a Parquet dataset -> Parquet results.

The pipeline (each stage streams into the next; nothing is collected on the driver)::

    read_binary_files(folder, include_paths=True)      # or read_parquet(files, columns)
      -> map_batches(_decode)        tasks: visionfleet.imaging (load_for_model), as the server
      -> map_batches(OrtPredictor)   an autoscaling actor pool of ONNX Runtime sessions
      -> write_parquet(out)

Decoding uses our imaging code, never Ray's PIL image reader, so a job's inputs are
byte-for-byte the server's. An undecodable input becomes one row with ``error`` set;
it never fails the job.

Multi-node: the driver resolves the model reference once (an alias flipping mid-job
cannot mix versions), and ships only small values to workers (the card, the version
id, options). Actors load the version from the registry under ``$VISIONFLEET_HOME``,
which reaches them through ``runtime_env``; on a cluster the state dir, the input and
the output must be on storage every node sees (a shared mount or ``s3://``).

Run it from the CLI (``visionfleet infer DIR --model REF --out results.parquet``) or as
a ``ray job submit`` entrypoint: ``python -m cluster.jobs.batch_infer --model demo:1
--input DIR --out results.parquet``.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionfleet.datasets.store import IMAGE_SUFFIXES
from cluster.local import connect_ray
from visionfleet.imaging import ResizeInfo, sniff_format
from visionfleet.settings import ENV_HOME, Settings
from visionfleet.spec import ModelCard, parse_ref

__all__ = [
    "InputKind",
    "BatchJobConfig",
    "JobInput",
    "BatchSummary",
    "resolve_input",
    "check_job",
    "build_dataset",
    "connect_ray",
    "run_batch_job",
    "OrtPredictor",
    "main",
]

_PARQUET_MAGIC = b"PAR1"
_HEAD_BYTES = 600  # enough to sniff any image format or video container (MPEG-TS: 3 packets)
# Ground-truth columns of our dataset schema, copied to the output when both are present.
_TRUE_LABEL_COLUMNS = ("label", "label_name")


class InputKind(str, enum.Enum):
    IMAGES = "images"  # a folder (searched recursively) or one image file: key column ``path``
    PARQUET = "parquet"  # Parquet files with encoded images: key column ``id``


@dataclass(frozen=True)
class BatchJobConfig:
    """One batch job; built at the edge (CLI, job entrypoint) and passed down.

    Args:
        model: ``NAME[:VERSION|@ALIAS]``, resolved once on the driver.
        input: a folder of images, an image file, a Parquet file or folder, a dataset
            folder (``manifest.json`` + splits), or an ``s3://``-style URI.
        out: the output folder of Parquet part files (local path or URI).
        split: for a dataset folder, the split to run (default: every split).
        image_column, id_column: for Parquet input, where the encoded images and their ids are.
        batch_size: images per ONNX Runtime call (and per decode task batch).
        top_k: classes kept in ``probs``.
        threads: ONNX Runtime intra-op threads per actor.
        min_actors, max_actors: the autoscaling range of the actor pool.
        actor_cpus, decode_cpus: logical CPUs Ray reserves per actor / per read or
            decode task (fractions let a 2-core box also hold the Serve app).
        overwrite: replace an existing output folder.
    """

    model: str
    input: str
    out: str
    split: str | None = None
    image_column: str = "image"
    id_column: str = "id"
    batch_size: int = 32
    top_k: int = 5
    threads: int = 1
    min_actors: int = 1
    max_actors: int = 2
    actor_cpus: float = 0.5
    decode_cpus: float = 0.25
    overwrite: bool = False

    def __post_init__(self) -> None:
        parse_ref(self.model)
        for name in ("batch_size", "top_k", "threads", "min_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"Got {getattr(self, name)} for {name}; expected >= 1")
        if self.max_actors < self.min_actors:
            raise ValueError(f"Got max_actors {self.max_actors} < min_actors {self.min_actors}; expected max >= min")
        for name in ("actor_cpus", "decode_cpus"):
            if not 0 < getattr(self, name) <= 64:
                raise ValueError(f"Got {getattr(self, name)} for {name}; expected 0 < cpus <= 64")
        if not self.input:
            raise ValueError("Got an empty input; expected a folder, a Parquet file or a URI")
        if not self.out:
            raise ValueError("Got an empty out; expected an output folder")


@dataclass(frozen=True)
class JobInput:
    """The input as the driver resolved it: what Ray reads, and which columns go through."""

    kind: InputKind
    paths: tuple[str, ...]
    image_column: str  # where the encoded bytes are in what Ray reads
    key_column: str  # the input column that identifies a row
    passthrough: tuple[str, ...] = ()  # input columns copied to the output (ground truth)


@dataclass(frozen=True)
class BatchSummary:
    """What a job wrote."""

    model: str
    version: int
    kind: InputKind
    out: str
    rows: int
    errors: int
    seconds: float
    first_errors: tuple[str, ...] = ()

    @property
    def images_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["first_errors"] = list(self.first_errors)
        d["seconds"] = round(self.seconds, 3)
        d["images_per_s"] = round(self.images_per_s, 1)
        return d


# --------------------------------------------------------------------------- driver side
def _is_uri(path: str) -> bool:
    return "://" in path


def _absolute(path: str) -> str:
    """Local paths made absolute at the edge; URIs as given."""
    return path if _is_uri(path) else str(Path(path).expanduser().resolve())


def _parquet_schema(paths: tuple[str, ...]):
    """The schema of the first path (each a file, folder or URI), read from footers only."""
    import pyarrow.dataset as pads

    try:
        return pads.dataset(paths[0], format="parquet").schema
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise ValueError(f"cannot read Parquet at {paths[0]}: {exc}") from None


def _parquet_input(paths: tuple[str, ...], cfg: BatchJobConfig) -> JobInput:
    import pyarrow as pa

    schema = _parquet_schema(paths)
    names = set(schema.names)
    if cfg.image_column not in names:
        raise ValueError(
            f"Got Parquet without column {cfg.image_column!r} (columns: {sorted(names)}); "
            "expected encoded images there (set the image column)"
        )
    image_type = schema.field(cfg.image_column).type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise ValueError(f"Got column {cfg.image_column!r} of type {image_type}; expected binary (encoded images)")
    if cfg.id_column not in names:
        raise ValueError(
            f"Got Parquet without column {cfg.id_column!r} (columns: {sorted(names)}); "
            "expected a row id there (set the id column)"
        )
    passthrough = _TRUE_LABEL_COLUMNS if set(_TRUE_LABEL_COLUMNS) <= names else ()
    return JobInput(InputKind.PARQUET, paths, cfg.image_column, cfg.id_column, passthrough)


def resolve_input(cfg: BatchJobConfig) -> JobInput:
    """Decide what the input is and check it before Ray starts reading.

    Raises:
        FileNotFoundError: the input does not exist, or a dataset lacks the split.
        ValueError: a file that is neither Parquet nor an image, a folder without
            images, Parquet without the image or id column, or ``split`` on non-dataset input.
    """
    src = _absolute(cfg.input)
    if _is_uri(src):
        if cfg.split:
            raise ValueError(f"Got split {cfg.split!r} for {src}; expected split only with a dataset folder")
        if src.rstrip("/").endswith(".parquet"):
            return _parquet_input((src,), cfg)
        return JobInput(InputKind.IMAGES, (src,), "bytes", "path")
    p = Path(src)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    if p.is_dir() and (p / "manifest.json").is_file():
        from visionfleet.datasets.store import read_info

        info = read_info(p)
        splits = [cfg.split] if cfg.split else sorted(info.splits)
        paths = []
        for s in splits:
            if not sorted((p / s).glob("*.parquet")):
                raise FileNotFoundError(f"dataset {p} has no split {s!r} (splits: {sorted(info.splits)})")
            paths.append(str(p / s))
        return _parquet_input(tuple(paths), cfg)
    if cfg.split:
        raise ValueError(f"Got split {cfg.split!r} for {p}; expected split only with a dataset folder (manifest.json)")
    if p.is_dir():
        if p.suffix == ".parquet" or any(p.glob("*.parquet")):
            return _parquet_input((str(p),), cfg)
        if next((f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()), None) is None:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {p}")
        return JobInput(InputKind.IMAGES, (str(p),), "bytes", "path")
    with open(p, "rb") as fh:
        head = fh.read(_HEAD_BYTES)
    if head[:4] == _PARQUET_MAGIC:
        return _parquet_input((str(p),), cfg)
    if sniff_format(head) is not None:
        return JobInput(InputKind.IMAGES, (str(p),), "bytes", "path")
    from visionfleet.video import sniff_container

    if sniff_container(head) is not None:
        raise ValueError(f"{p} is a video; run it with `visionfleet infer VIDEO --model REF --out frames.parquet`")
    raise ValueError(f"{p} is neither a Parquet file nor an image; expected a folder of images or Parquet")


def _key_fields(job: JobInput):
    import pyarrow as pa

    if job.kind is InputKind.IMAGES:
        return [pa.field("path", pa.string())]
    fields = [pa.field("id", pa.string())]
    if job.passthrough:
        fields += [pa.field("true_label", pa.string()), pa.field("true_class_id", pa.int32())]
    return fields


def _check_out(out: str, overwrite: bool) -> None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(out) if _is_uri(out) else (pafs.LocalFileSystem(), out)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise FileExistsError(f"{out} is a file; expected an output folder (Parquet part files go inside)")
    if info.type == pafs.FileType.Directory and not overwrite:
        if fs.get_file_info(pafs.FileSelector(path, recursive=False)):
            raise FileExistsError(f"{out} exists and is not empty; choose another output or overwrite it")
    if not _is_uri(out) and not Path(out).parent.is_dir():
        raise FileNotFoundError(f"no such folder for the output: {Path(out).parent}")


# --------------------------------------------------------------------------- worker side
def _decode(
    batch: dict[str, np.ndarray],
    *,
    card: ModelCard,
    max_pixels: int,
    image_column: str,
    key_column: str,
    passthrough: tuple[str, ...],
) -> dict[str, np.ndarray]:
    """Ray task: encoded images -> model-size pixels, with one error per bad input."""
    from visionfleet.offline import preprocess_encoded

    prep = preprocess_encoded(list(batch[image_column]), card, max_pixels=max_pixels)
    infos = [i or ResizeInfo(1.0, 1.0, 0.0, 0.0, 0, 0) for i in prep.infos]
    if len(card.sizes) == 1:
        pixels = prep.pixels
    else:  # a card with several sizes: always a ragged column (Ray Data's variable-shaped tensors), so every block
        # has the same column type whatever sizes its images went to
        pixels = np.empty(len(prep.images), dtype=object)
        pixels[:] = list(prep.images)
    out: dict[str, np.ndarray] = {
        "key": np.array([str(k) for k in batch[key_column]], dtype=object),
        "pixels": pixels,
        "error": np.array(["" if e is None else e for e in prep.errors], dtype=object),
        "resize": np.array(
            [[i.scale_x, i.scale_y, i.offset_x, i.offset_y, i.original_width, i.original_height, i.input_width,
              i.input_height] for i in infos],
            dtype=np.float64,
        ).reshape(len(infos), 8),
    }
    for col in passthrough:
        out[col] = np.asarray(batch[col])
    return out


class OrtPredictor:
    """Ray Data actor: one ONNX Runtime session per actor, loaded from the registry by id.

    Args:
        model_id: ``NAME:VERSION`` (already resolved on the driver).
        threads: ONNX Runtime intra-op threads.
        top_k: classes kept in ``probs``.
        key_fields: the output's key columns (Arrow fields), first in the schema.
    """

    def __init__(self, model_id: str, threads: int, top_k: int, key_fields: list) -> None:
        from visionfleet.inference import RuntimeOptions, load_model_dir
        from visionfleet.offline import result_schema
        from visionfleet.registry import Registry

        if not os.path.isabs(os.environ.get(ENV_HOME, "")):
            # A relative or missing state dir would resolve against this worker's own cwd.
            raise RuntimeError(f"{ENV_HOME} is not an absolute path in this worker; pass it through runtime_env")
        settings = Settings.from_env()
        name, _, version = model_id.partition(":")
        registry = Registry.from_settings(settings)  # remote versions: this node's cache, by content hash
        self.model = load_model_dir(registry.local_dir(name, int(version)), RuntimeOptions(threads=threads))
        self.top_k = top_k
        self.schema = result_schema(self.model.card.task, key_fields)
        self.key_name = key_fields[0].name

    def __call__(self, batch: dict[str, np.ndarray]):
        from visionfleet.offline import error_row, result_rows, rows_to_table

        card = self.model.card
        errors = batch["error"]
        ok = np.array([not e for e in errors], dtype=bool)
        rows: list[dict[str, Any]] = [error_row(card.task, str(e)) for e in errors]
        groups: dict[tuple[int, int], list[int]] = {}  # one ONNX Runtime call per input size
        for i in np.flatnonzero(ok):
            groups.setdefault(tuple(np.shape(batch["pixels"][i])[:2]), []).append(int(i))
        for idx in groups.values():
            infos = [ResizeInfo(*map(float, r[:4]), *map(int, r[4:])) for r in batch["resize"][idx]]
            outputs = self.model.run(np.ascontiguousarray(np.stack([batch["pixels"][i] for i in idx])))
            for i, row in zip(idx, result_rows(card, outputs, infos, top_k=self.top_k)):
                rows[i] = row
        for i, row in enumerate(rows):
            row[self.key_name] = str(batch["key"][i])
            row["model"], row["version"] = card.name, card.version
            if "label_name" in batch:
                row["true_label"] = _opt(batch["label_name"][i], str)
                row["true_class_id"] = _opt(batch["label"][i], int)
        return rows_to_table(rows, self.schema)


def _opt(value: Any, kind: type) -> Any:
    """A nullable input value: None (or NaN, as numpy shows a null number) stays None."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return kind(value)


# --------------------------------------------------------------------------- the job
def build_dataset(cfg: BatchJobConfig, settings: Settings, job: JobInput, card: ModelCard):
    """The lazy Ray Dataset of result rows (nothing runs until it is written or iterated)."""
    import ray.data

    from cluster.local import runtime_env

    if job.kind is InputKind.IMAGES:
        ds = ray.data.read_binary_files(
            list(job.paths),
            include_paths=True,
            file_extensions=sorted(s.lstrip(".") for s in IMAGE_SUFFIXES),
            num_cpus=cfg.decode_cpus,
        )
    else:
        # select_columns is pushed down into the read: the other columns stay on disk.
        columns = [job.image_column, job.key_column, *job.passthrough]
        ds = ray.data.read_parquet(list(job.paths), num_cpus=cfg.decode_cpus).select_columns(columns)
    ds = ds.map_batches(
        _decode,
        batch_size=cfg.batch_size,
        num_cpus=cfg.decode_cpus,
        fn_kwargs={
            "card": card,
            "max_pixels": settings.max_pixels,
            "image_column": job.image_column,
            "key_column": job.key_column,
            "passthrough": job.passthrough,
        },
    )
    return ds.map_batches(
        OrtPredictor,
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        num_cpus=cfg.actor_cpus,
        fn_constructor_kwargs={
            "model_id": card.ref,
            "threads": cfg.threads,
            "top_k": cfg.top_k,
            "key_fields": _key_fields(job),
        },
        # The state dir reaches every actor, on every node, through runtime_env (DESIGN: Runtime).
        runtime_env=runtime_env(settings),
    )


def _summarize(out: str, cfg: BatchJobConfig, card: ModelCard, job: JobInput, seconds: float) -> BatchSummary:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    table = pads.dataset(out, format="parquet").to_table(columns=["error"])
    err = table.column("error")
    bad = pc.filter(err, pc.is_valid(err))
    return BatchSummary(
        model=card.name,
        version=int(card.version or 0),
        kind=job.kind,
        out=out,
        rows=table.num_rows,
        errors=len(bad),
        seconds=seconds,
        first_errors=tuple(str(x) for x in bad.slice(0, 5).to_pylist()),
    )


def check_job(cfg: BatchJobConfig, settings: Settings) -> tuple[JobInput, ModelCard]:
    """Everything that can be checked before Ray starts: input, output and model.

    The model reference is resolved here, once: every actor runs the same version even
    if an alias moves while the job runs.

    Raises:
        ValueError, FileNotFoundError, FileExistsError: bad input or output.
        LookupError: unknown model, version or alias.
    """
    from visionfleet.state import open_registry

    job = resolve_input(cfg)
    _check_out(_absolute(cfg.out), cfg.overwrite)
    registry = open_registry(settings)  # a store or database that cannot be used: a clear error here
    resolved = registry.resolve(cfg.model)
    return job, registry.card(resolved.name, resolved.version)


def run_batch_job(cfg: BatchJobConfig, settings: Settings) -> BatchSummary:
    """Run a batch job on the connected Ray cluster and write Parquet results to ``cfg.out``.

    Ray must be initialized (the CLI and :func:`main` do it, see :func:`connect_ray`).
    Progress is Ray Data's, on stderr.

    Raises:
        the errors of :func:`check_job`, before any work starts.
    """
    import ray.data

    out = _absolute(cfg.out)
    job, card = check_job(cfg, settings)
    ds = build_dataset(cfg, settings, job, card)
    t0 = time.perf_counter()
    ds.write_parquet(out, mode=ray.data.SaveMode.OVERWRITE if cfg.overwrite else ray.data.SaveMode.APPEND)
    seconds = time.perf_counter() - t0
    return _summarize(out, cfg, card, job, seconds)


# --------------------------------------------------------------------------- entrypoint
def _parser() -> argparse.ArgumentParser:
    d = BatchJobConfig.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="python -m cluster.jobs.batch_infer",
        description="Batch inference on Ray Data (a `ray job submit` entrypoint); prints a JSON summary.",
    )
    p.add_argument("--model", required=True, help="NAME[:VERSION|@ALIAS]")
    p.add_argument("--input", required=True, help="folder of images, Parquet file/folder, dataset folder or URI")
    p.add_argument("--out", required=True, help="output folder for Parquet part files")
    p.add_argument("--home", help=f"state dir (default ${ENV_HOME}, else ./.visionfleet); made absolute here")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, as set by `ray job submit`, else a local Ray)")
    p.add_argument("--split", help="dataset split (default: all)")
    p.add_argument("--image-column", default=d["image_column"].default)
    p.add_argument("--id-column", default=d["id_column"].default)
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default)
    p.add_argument("--top-k", type=int, default=d["top_k"].default)
    p.add_argument("--threads", type=int, default=d["threads"].default, help="ONNX Runtime threads per actor")
    p.add_argument("--min-actors", type=int, default=d["min_actors"].default)
    p.add_argument("--max-actors", type=int, default=d["max_actors"].default)
    p.add_argument("--actor-cpus", type=float, default=d["actor_cpus"].default)
    p.add_argument("--decode-cpus", type=float, default=d["decode_cpus"].default)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """The job entrypoint: parse, check, connect, run, print the summary as JSON on stdout."""
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env(args.home)
        os.environ[ENV_HOME] = str(settings.home)  # absolute, for this driver and its workers
        cfg = BatchJobConfig(
            model=args.model,
            input=args.input,
            out=args.out,
            split=args.split,
            image_column=args.image_column,
            id_column=args.id_column,
            batch_size=args.batch_size,
            top_k=args.top_k,
            threads=args.threads,
            min_actors=args.min_actors,
            max_actors=args.max_actors,
            actor_cpus=args.actor_cpus,
            decode_cpus=args.decode_cpus,
            overwrite=args.overwrite,
        )
        check_job(cfg, settings)  # clear errors before Ray starts
        # stdout carries only the JSON summary: what the Ray driver prints meanwhile (raylet
        # warnings such as "N PYTHON worker processes have been started") goes to stderr.
        summary_out, sys.stdout = sys.stdout, sys.stderr
        try:
            connect_ray(settings, args.address)
            summary = run_batch_job(cfg, settings)
        finally:
            sys.stdout = summary_out
    except (ValueError, FileNotFoundError, FileExistsError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary.to_dict(), indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
