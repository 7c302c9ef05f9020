"""`visionfleet data`: generate, import and list datasets."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Annotated, Optional

import typer

from visionfleet.cli._common import cli_errors, err, out, parse_float_list, print_json, progress, settings

app = typer.Typer(help="Datasets: generate synthetic data, import image folders, list.", no_args_is_help=True)


def _dest(out_path: Optional[Path], name: str) -> tuple[Path, Optional[str]]:
    """The folder to write, and the store URI to publish it to afterwards (None: the folder is the dataset).

    ``--out`` is a folder; otherwise the dataset goes to the store area ``datasets``: its folder
    on one machine (``<home>/datasets/<name>``), or a local staging folder published to
    ``s3://.../datasets/<name>`` when the area is an object store.
    """
    if out_path:
        return out_path.resolve(), None
    s = settings().ensure()
    area = s.store_uri("datasets")
    if "://" not in area:
        return Path(area) / name, None
    from visionfleet.store import open_store

    uri = f"{area.rstrip('/')}/{name}"
    if open_store(uri).exists("_content.json"):
        raise FileExistsError(f"a dataset already exists at {uri}; choose another --name or delete it")
    return s.cache_dir / "datasets" / f".staging-{uuid.uuid4().hex[:12]}" / name, uri


def _publish(dest: Path, uri: Optional[str]) -> str:
    """Upload a staged dataset to the store (it then becomes this node's cached copy); returns where it is."""
    if uri is None:
        return str(dest)
    from visionfleet.datasets.store import publish_dataset

    publish_dataset(dest, uri, cache_dir=settings().cache_dir)  # moves dest into the cache
    shutil.rmtree(dest.parent, ignore_errors=True)  # the empty staging folder
    return uri


@app.command()
@cli_errors
def synth(
    name: Annotated[str, typer.Option(help="dataset name under the state dir (ignored with --out)")] = "synth",
    out_path: Annotated[Optional[Path], typer.Option("--out", help="dataset folder to create")] = None,
    n_train: Annotated[int, typer.Option(help="training images")] = 12000,
    n_holdout: Annotated[int, typer.Option(help="held-out images")] = 2500,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 64,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same images)")] = 0,
    index_offset: Annotated[int, typer.Option(help="first sample index (fresh samples from the same seed)")] = 0,
    image_format: Annotated[str, typer.Option("--format", help="png|jpeg|webp|bmp|tiff")] = "png",
    brightness: Annotated[float, typer.Option(help="drift: added brightness (0..255 units)")] = 0.0,
    contrast: Annotated[float, typer.Option(help="drift: contrast factor")] = 1.0,
    blur: Annotated[float, typer.Option(help="drift: Gaussian blur sigma (px at 64 px)")] = 0.0,
    noise: Annotated[float, typer.Option(help="drift: Gaussian noise std")] = 0.0,
    color_cast: Annotated[str, typer.Option(help="drift: R,G,B offsets")] = "0,0,0",
    jpeg_quality: Annotated[Optional[int], typer.Option(help="drift: re-encode as JPEG at this quality")] = None,
    task: Annotated[str, typer.Option(help="classification (one shape per image, Parquet) | detection (several, COCO boxes)")] = "classification",
    max_objects: Annotated[int, typer.Option(help="detection: at most this many shapes per image")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="print the dataset manifest as JSON")] = False,
) -> None:
    """Generate the procedural shapes dataset (train and holdout splits): Parquet, or COCO boxes with --task detection."""
    from visionfleet.datasets.store import synthesize

    if task not in ("classification", "detection"):
        raise ValueError(f"Got {task!r} for --task; expected classification or detection")
    if task == "detection":
        if out_path is None and "://" in settings().store_uri("datasets"):
            raise ValueError("Got --task detection with the datasets area on an object store; expected --out "
                             "(detection datasets stay local folders)")
        return _synth_detection(_dest(out_path, name)[0], n_train, n_holdout, size, seed, max_objects, as_json)
    from visionfleet.datasets.synth import Drift

    drift = Drift(
        brightness=brightness,
        contrast=contrast,
        blur=blur,
        noise=noise,
        color_cast=parse_float_list(color_cast, 3, "--color-cast"),  # type: ignore[arg-type]
        jpeg_quality=jpeg_quality,
    )
    dest, uri = _dest(out_path, name)
    with progress() as p:
        task = p.add_task("generating", total=n_train + n_holdout, info=uri or str(dest))
        info = synthesize(
            dest,
            n_train=n_train,
            n_holdout=n_holdout,
            size=size,
            seed=seed,
            drift=drift,
            image_format=image_format,
            name=dest.name,
            progress=lambda k: p.advance(task, k),
            index_offset=index_offset,
        )
    where = _publish(dest, uri)
    if as_json:
        print_json({"path": where, **info.__dict__})
    else:
        out.print(f"dataset {info.name}: {info.splits} at {where}")


def _synth_detection(dest: Path, n_train: int, n_holdout: int, size: int, seed: int, max_objects: int, as_json: bool) -> None:
    """Detection variant: several shapes per image on cluttered backgrounds, COCO annotations per split."""
    from visionfleet.datasets.detect import synthesize_detection

    with progress() as p:
        task = p.add_task("generating", total=n_train + n_holdout, info=str(dest))
        manifest = synthesize_detection(
            dest, n_train=n_train, n_holdout=n_holdout, size=size, seed=seed, max_objects=max_objects,
            name=dest.name, progress=lambda k: p.advance(task, k),
        )
    if as_json:
        print_json({"path": str(dest), **manifest})
    else:
        out.print(f"detection dataset {manifest['name']}: {manifest['splits']}, {manifest['params']['boxes']} boxes at {dest}")


@app.command("import-folder")
@cli_errors
def import_folder(
    root: Annotated[Path, typer.Argument(help="folder laid out as ROOT/<class>/<image>")],
    name: Annotated[Optional[str], typer.Option(help="dataset name (default: the folder's name)")] = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="dataset folder to create")] = None,
    holdout_fraction: Annotated[float, typer.Option(help="share of images held out")] = 0.2,
    seed: Annotated[int, typer.Option(help="salt of the stable split hash")] = 0,
    flips: Annotated[Optional[str], typer.Option(
        help="record how training may flip these images: off|horizontal|dihedral (default: train decides)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Import an ImageFolder tree (one sub-folder per class) into the Parquet schema."""
    from visionfleet.datasets.store import IMAGE_SUFFIXES, _write_manifest, import_image_folder

    if flips is not None and flips not in ("off", "horizontal", "dihedral"):
        raise ValueError(f"Got {flips!r} for --flips; expected off, horizontal or dihedral (or leave it out)")
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    ds_name = name or root.resolve().name
    dest, uri = _dest(out_path, ds_name)
    total = sum(1 for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    with progress() as p:
        task = p.add_task("importing", total=total, info=str(root))
        info, skipped = import_image_folder(
            root,
            dest,
            holdout_fraction=holdout_fraction,
            seed=seed,
            name=dest.name,
            progress=lambda k: p.advance(task, k),
        )
    if flips is not None:  # read by `visionfleet train --flips auto` (train.auto)
        info.params["flips"] = flips
        _write_manifest(dest, info)
    where = _publish(dest, uri)
    if as_json:
        print_json({"path": where, **info.__dict__, "skipped_files": skipped})
        return
    out.print(f"dataset {info.name}: {len(info.labels)} classes, {info.splits} at {where}")
    for rel, why in skipped[:20]:
        err.print(f"[yellow]skipped[/] {rel}: {why}")
    if len(skipped) > 20:
        err.print(f"[yellow]… and {len(skipped) - 20} more skipped[/]")


@app.command("import-builtin")
@cli_errors
def import_builtin_cmd(
    dataset: Annotated[str, typer.Argument(help="lfw-faces | elpv | digits (real images shipped in PyPI wheels)")],
    name: Annotated[Optional[str], typer.Option(help="dataset name (default: the built-in's name)")] = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="dataset folder to create")] = None,
    holdout_fraction: Annotated[float, typer.Option(help="share of images held out (a stable hash of each id)")] = 0.25,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Import a real image dataset that ships inside a package (the `datasets` extra)."""
    from visionfleet.datasets.builtin import BUILTIN, import_builtin

    if dataset not in BUILTIN:
        raise ValueError(f"Got {dataset!r} for the built-in dataset; expected one of {', '.join(sorted(BUILTIN))}")
    dest, uri = _dest(out_path, name or dataset)
    with progress() as p:
        task = p.add_task("importing", total=None, info=f"{dataset}: {BUILTIN[dataset].summary}")
        info = import_builtin(dataset, dest, holdout_fraction=holdout_fraction, progress=lambda k: p.advance(task, k))
    where = _publish(dest, uri)
    if as_json:
        print_json({"path": where, **info.__dict__})
        return
    out.print(f"dataset {info.name}: {len(info.labels)} classes {info.labels}, {info.splits} at {where} "
              f"(from {BUILTIN[dataset].package}; licence {BUILTIN[dataset].licence})")


@app.command("list")
@cli_errors
def list_(as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False) -> None:
    """List the datasets in the store area `datasets` (<home>/datasets on one machine)."""
    from rich.table import Table

    from visionfleet.datasets.store import list_datasets

    rows = []
    for ref, info in list_datasets(settings().store_uri("datasets")):
        rows.append({"name": info.name, "path": ref, "labels": len(info.labels), "splits": info.splits, "source": info.source})
    if as_json:
        print_json({"datasets": rows})
        return
    table = Table("name", "classes", "splits", "source")
    for r in rows:
        table.add_row(r["name"], str(r["labels"]), str(r["splits"]), r["source"])
    out.print(table)
