"""`visionfleet infer`: run a registered model over a video, a folder of images or a Parquet dataset.

A video runs here, in-process (OpenCV decode, batched ONNX Runtime). A folder or a
Parquet dataset runs as a Ray Data job (``cluster.jobs.batch_infer``) on the local Ray,
this state dir's head, or ``--address``; the same job is a ``ray job submit``
entrypoint (``python -m cluster.jobs.batch_infer``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from visionfleet.cli._common import cli_errors, err, out, print_json, progress, settings

app = typer.Typer()

_VIDEO_BATCH = 16
_JOB_BATCH = 32


def _is_video(source: str) -> bool:
    """Everything that is not a folder, a URI, Parquet or an image is tried as a video."""
    from visionfleet.imaging import sniff_format

    if "://" in source:
        return False
    p = Path(source).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    if p.is_dir():
        return False
    with open(p, "rb") as fh:
        head = fh.read(16)
    return head[:4] != b"PAR1" and sniff_format(head) is None


def _refuse(options: dict[str, Any], applies_to: str) -> None:
    given = [name for name, value in options.items() if value not in (None, False)]
    if given:
        verb = "it applies" if len(given) == 1 else "they apply"
        raise ValueError(f"Got {', '.join(given)}; {verb} only to {applies_to}")


@app.command()
@cli_errors
def infer(
    source: Annotated[
        str, typer.Argument(help="video file, folder of images, Parquet file/folder, dataset folder or URI")
    ],
    model: Annotated[str, typer.Option(help="NAME[:VERSION|@ALIAS]")],
    out_path: Annotated[
        str, typer.Option("--out", help="video: frames.parquet or frames.jsonl; images/Parquet: an output folder")
    ],
    every: Annotated[Optional[int], typer.Option(help="video: run every N-th frame")] = None,
    fps: Annotated[Optional[float], typer.Option(help="video: run about F frames per second of video")] = None,
    allow_truncated: Annotated[
        bool, typer.Option(help="video: keep the frames of a truncated file instead of failing")
    ] = False,
    batch: Annotated[
        Optional[int], typer.Option(help=f"images per ONNX Runtime call (video {_VIDEO_BATCH}, jobs {_JOB_BATCH})")
    ] = None,
    top_k: Annotated[int, typer.Option(help="classes kept in probs")] = 5,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads (per actor for jobs)")] = 1,
    split: Annotated[Optional[str], typer.Option(help="dataset folder: the split to run (default: all)")] = None,
    image_column: Annotated[
        Optional[str], typer.Option(help="Parquet: column of encoded images (default image)")
    ] = None,
    id_column: Annotated[Optional[str], typer.Option(help="Parquet: column of row ids (default id)")] = None,
    min_actors: Annotated[
        Optional[int], typer.Option(help="jobs: smallest ONNX Runtime actor pool (default 1)")
    ] = None,
    max_actors: Annotated[Optional[int], typer.Option(help="jobs: largest ONNX Runtime actor pool (default 2)")] = None,
    actor_cpus: Annotated[Optional[float], typer.Option(help="jobs: logical CPUs per actor (default 0.5)")] = None,
    address: Annotated[
        Optional[str], typer.Option(help="jobs: Ray address (default: this state dir's head, else a local Ray)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run a model over a video (per-frame results) or a folder / Parquet dataset (a Ray Data job)."""
    job_only = {
        "--split": split,
        "--image-column": image_column,
        "--id-column": id_column,
        "--min-actors": min_actors,
        "--max-actors": max_actors,
        "--actor-cpus": actor_cpus,
        "--address": address,
    }
    if _is_video(source):
        _refuse(job_only, "folder and Parquet jobs")
        doc = _video(
            source, model, out_path, every, fps, allow_truncated, batch or _VIDEO_BATCH, top_k, threads, overwrite
        )
        if not as_json:
            out.print(
                f"{doc['frames_inferred']} of {doc['frames_seen']} frames -> {doc['out']}  "
                f"({doc['model']}:{doc['version']}, {doc['seconds']:.1f} s, {doc['frames_per_s']:.0f} frames/s)"
                + ("  (truncated file: partial result)" if doc["truncated"] else "")
            )
    else:
        _refuse({"--every": every, "--fps": fps, "--allow-truncated": allow_truncated}, "video input")
        from cluster.jobs.batch_infer import BatchJobConfig

        d = BatchJobConfig.__dataclass_fields__
        cfg = BatchJobConfig(
            model=model,
            input=source,
            out=out_path,
            split=split,
            image_column=image_column or d["image_column"].default,
            id_column=id_column or d["id_column"].default,
            batch_size=batch or _JOB_BATCH,
            top_k=top_k,
            threads=threads,
            min_actors=min_actors if min_actors is not None else d["min_actors"].default,
            max_actors=max_actors if max_actors is not None else d["max_actors"].default,
            actor_cpus=actor_cpus if actor_cpus is not None else d["actor_cpus"].default,
            overwrite=overwrite,
        )
        doc = _job(cfg, address)
        if not as_json:
            out.print(
                f"{doc['rows']} rows ({doc['errors']} errors) -> {doc['out']}  "
                f"({doc['model']}:{doc['version']}, {doc['seconds']:.1f} s, {doc['images_per_s']:.1f} images/s)"
            )
            for e in doc["first_errors"]:
                err.print(f"  [yellow]error row:[/] {e}")
    if as_json:
        print_json(doc)


def _video(
    source: str,
    model: str,
    out_path: str,
    every: Optional[int],
    fps: Optional[float],
    allow_truncated: bool,
    batch: int,
    top_k: int,
    threads: int,
    overwrite: bool,
) -> dict[str, Any]:
    from visionfleet.inference import RuntimeOptions, load_model_dir
    from visionfleet.state import open_registry
    from visionfleet.video import Sampling, infer_video, output_format_for, probe_video

    sampling = Sampling(every=every if every is not None else 1, fps=fps)
    output_format_for(out_path)
    source = str(Path(source).expanduser().resolve())  # absolute at the edge, as in the summary
    out_path = str(Path(out_path).expanduser().resolve())
    info = probe_video(source)  # a non-video fails before the model loads
    s = settings()
    registry = open_registry(s)
    resolved = registry.resolve(model)
    loaded = load_model_dir(registry.local_dir(resolved.name, resolved.version), RuntimeOptions(threads=threads))
    with progress() as p:
        task = p.add_task(f"{Path(source).name}", total=info.frame_count, info=f"{resolved}")
        summary = infer_video(
            source,
            loaded,
            out_path,
            sampling=sampling,
            batch_size=batch,
            top_k=top_k,
            allow_truncated=allow_truncated,
            overwrite=overwrite,
            on_seen=lambda n: p.advance(task, n),
        )
    return summary.to_dict()


def _job(cfg, address: Optional[str]) -> dict[str, Any]:
    from cluster.jobs.batch_infer import check_job, connect_ray, run_batch_job

    s = settings()
    check_job(cfg, s)  # clear errors before Ray starts
    err.print(f"[dim]starting a Ray Data job on {cfg.input}[/]")
    connect_ray(s, address)
    return run_batch_job(cfg, s).to_dict()
