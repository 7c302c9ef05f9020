"""`visionfleet models`: list, show, promote and import registered versions."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from visionfleet.cli._common import cli_errors, err, out, print_json, settings

app = typer.Typer(help="The model registry: versions, cards, aliases.", no_args_is_help=True)


def _registry():
    from visionfleet.state import open_registry

    return open_registry(settings())


@app.command("list")
@cli_errors
def list_(as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False) -> None:
    """List models with their versions, aliases and headline metrics."""
    from rich.table import Table

    reg = _registry()
    rows = []
    for name in reg.list_models():
        aliases = reg.aliases(name)
        for v in reg.versions(name):
            card = reg.card(name, v)
            rows.append(
                {
                    "model": name,
                    "version": v,
                    "aliases": sorted(a for a, av in aliases.items() if av == v),
                    "task": card.task.value,
                    "precision": card.precision,
                    "input_size": list(card.input_size),
                    "input_sizes": [list(sz) for sz in card.sizes],
                    "holdout_top1": card.metrics.get("holdout_top1"),
                    "created_at": card.created_at,
                }
            )
    if as_json:
        print_json({"models": rows})
        return
    if not rows:
        out.print("no models registered yet; try `visionfleet train` or `visionfleet demo`")
        return
    table = Table("model", "version", "aliases", "task", "precision", "input", "holdout top-1", "created")
    for r in rows:
        top1 = r["holdout_top1"]
        table.add_row(
            r["model"],
            str(r["version"]),
            ",".join(r["aliases"]),
            r["task"],
            r["precision"],
            ",".join("x".join(map(str, sz)) for sz in r["input_sizes"]),
            f"{top1:.4f}" if isinstance(top1, (int, float)) else "-",
            r["created_at"][:19],
        )
    out.print(table)


@app.command()
@cli_errors
def show(
    ref: Annotated[str, typer.Argument(help="NAME[:VERSION|@ALIAS]")],
    as_json: Annotated[bool, typer.Option("--json", help="print the card as JSON")] = False,
) -> None:
    """Show a version's card."""
    card = _registry().card_for(ref)
    doc = card.model_dump(mode="json")
    if as_json:
        print_json(doc)
        return
    out.print(f"[bold]{card.ref}[/]  {card.task.value}, {len(card.labels)} classes, input {card.input_size[0]}x{card.input_size[1]} ({card.resize.value}), {card.precision}")
    if len(card.sizes) > 1:
        out.print("serves at: " + ", ".join(f"{h}x{w}" for h, w in card.sizes) + " (the first is the default)")
    out.print(f"labels: {', '.join(card.labels[:20])}{' …' if len(card.labels) > 20 else ''}")
    out.print(f"files: " + ", ".join(f"{f.name} ({f.bytes / 1e6:.2f} MB)" for f in card.files))
    out.print("metrics: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in card.metrics.items() if not isinstance(v, dict)))
    out.print(f"lineage: parent={card.lineage.parent} dataset={card.lineage.dataset} run={card.lineage.run}")
    for step in card.lineage.steps:
        out.print(f"  - {step}")


@app.command()
@cli_errors
def promote(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION to point the alias at")],
    alias: Annotated[str, typer.Option(help="alias to move")] = "production",
) -> None:
    """Point an alias (default: production) at a version, atomically."""
    from visionfleet.spec import parse_ref

    r = parse_ref(ref)
    if r.version is None:
        raise ValueError(f"Got {ref!r}; expected NAME:VERSION")
    previous = _registry().set_alias(r.name, alias, r.version, reason="cli promote")
    out.print(f"{r.name}@{alias}: {previous} -> {r.version}")


@app.command()
@cli_errors
def adopt(as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False) -> None:
    """Record versions already in the registry's folders (kept in files before VISIONFLEET_DB, or
    copied into the bucket) in the database, with their aliases.json aliases; safe to run again."""
    adopted = _registry().adopt()
    if as_json:
        print_json({"adopted": adopted})
        return
    if not adopted:
        out.print("nothing to adopt: the database knows every version")
    for name, versions in adopted.items():
        out.print(f"{name}: adopted versions {', '.join(map(str, versions))}")


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(" ", "").split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) <= 0:
        raise ValueError(f"Got {text!r} for --input-size; expected HEIGHTxWIDTH such as 224x224 (or one number)")
    return vals[0], vals[1]


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    """``--input-sizes 224x224,320x320``: distinct HEIGHTxWIDTH sizes, the default first."""
    from visionfleet.imaging import parse_size

    sizes = [parse_size(part, "--input-sizes") for part in text.split(",") if part.strip()]
    if not sizes or len(set(sizes)) != len(sizes):
        raise ValueError(f"Got {text!r} for --input-sizes; expected distinct sizes such as 224x224,320x320")
    return sizes


def _parse_per_channel(text: str, flag: str) -> tuple[float, ...]:
    """``--mean``/``--std``: one value per channel (a,b,c), or one value for every channel."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) not in (1, 3):
        raise ValueError(
            f"Got {text!r} for {flag}; expected 3 comma-separated numbers (one per channel), or one for all channels"
        )
    return vals


def _parse_depths(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise ValueError(f"Got {text!r} for --depths; expected positive integers such as 1,1,1,1")
    return vals


@app.command("import")
@cli_errors
def import_(
    name: Annotated[str, typer.Option("--name", help="model name to register a new version under")],
    labels: Annotated[str, typer.Option("--labels", help="labels FILE (one per line) or a,b,c in output order")],
    file: Annotated[
        Optional[Path],
        typer.Argument(
            help="model.onnx (any framework), a TorchScript model.pt/.torchscript/.ts, or checkpoint.pt/.pth "
            "(built-in architecture); leave out with --from-python",
            show_default=False,
        ),
    ] = None,
    input_size: Annotated[
        Optional[str],
        typer.Option("--input-size", help="model input HEIGHTxWIDTH, e.g. 224x224 (default: the model's fixed size)"),
    ] = None,
    input_sizes: Annotated[
        Optional[str],
        typer.Option(
            "--input-sizes",
            help="serve at several sizes, HxW,HxW,… the default first (a dynamic height and width: .onnx "
            "classifiers; .pt checkpoints are exported so). See docs/serving.md",
        ),
    ] = None,
    task: Annotated[str, typer.Option(help="classification | detection")] = "classification",
    mean: Annotated[
        Optional[str], typer.Option(help="per-channel mean in model channel order, or one value (default 0)")
    ] = None,
    std: Annotated[
        Optional[str], typer.Option(help="per-channel std in model channel order, or one value (default 1)")
    ] = None,
    scale: Annotated[
        Optional[str],
        typer.Option(help="scale of --mean/--std: 0-1 (pixels/255 first) | 0-255 (default 0-1; raw pixels for uint8)"),
    ] = None,
    layout: Annotated[
        str, typer.Option(help="the model's input layout: auto (the axis with 1 or 3 channels) | nchw | nhwc")
    ] = "auto",
    channel_order: Annotated[str, typer.Option("--channel-order", help="RGB | BGR")] = "RGB",
    input_dtype: Annotated[
        str, typer.Option("--input-dtype", help="auto (the graph's) | float32 | float16 | uint8")
    ] = "auto",
    input_name: Annotated[
        Optional[str], typer.Option("--input-name", help="graph input (default: the only one)")
    ] = None,
    output: Annotated[
        Optional[str],
        typer.Option(
            "--output", "--output-name",
            help="graph output NAME (default: the only one, or the only one shaped like the task's)",
        ),
    ] = None,
    outputs_are: Annotated[
        str,
        typer.Option(
            "--outputs-are",
            help="classification output: auto (measured on sample images) | logits (adds Softmax) | probs",
        ),
    ] = "auto",
    resize: Annotated[
        Optional[str],
        typer.Option(help="stretch | letterbox | center-crop (default: letterbox for detection, as YOLO exporters)"),
    ] = None,
    framework: Annotated[
        Optional[str], typer.Option(help="where the model came from: pytorch, tensorflow, paddle… (recorded)")
    ] = None,
    score_threshold: Annotated[
        Optional[float], typer.Option("--score-threshold", help="detection: min box score (default 0.25)")
    ] = None,
    iou_threshold: Annotated[
        Optional[float], typer.Option("--iou-threshold", help="detection: NMS IoU threshold (default 0.45)")
    ] = None,
    max_detections: Annotated[
        Optional[int], typer.Option("--max-detections", help="detection: K boxes per image (default 100)")
    ] = None,
    head_layout: Annotated[
        Optional[str],
        typer.Option(
            "--head-layout",
            help="detection: auto | channels-first [N,4+C,A] | anchors-first [N,A,4+C] | end-to-end [N,K,6] | "
            "nms-outputs (num_dets, boxes, scores, classes) | boxes-scores ([N,A,4] and [N,A,C])",
        ),
    ] = None,
    box_format: Annotated[
        Optional[str],
        typer.Option("--box-format", help="detection, boxes-scores heads: xyxy | cxcywh (auto only from output names)"),
    ] = None,
    objectness: Annotated[
        Optional[bool], typer.Option("--objectness/--no-objectness", help="detection: YOLOv5-style objectness column")
    ] = None,
    class_agnostic: Annotated[bool, typer.Option("--class-agnostic", help="detection: one NMS across classes")] = False,
    arch: Annotated[Optional[str], typer.Option(help=".pt: built-in architecture (resnet | mobilenetv3)")] = None,
    width: Annotated[Optional[int], typer.Option(help=".pt: channels of the first stage")] = None,
    depths: Annotated[Optional[str], typer.Option(help=".pt: stage depths, e.g. 1,1,1,1")] = None,
    stem_stride: Annotated[Optional[int], typer.Option("--stem-stride", help=".pt: 1 or 2")] = None,
    sample_images: Annotated[
        Optional[Path],
        typer.Option("--sample-images", help="folder of images for the parity check (default: synthetic)"),
    ] = None,
    from_python: Annotated[
        Optional[str],
        typer.Option(
            "--from-python",
            help="package.module:function returning an nn.Module or (module, example_input); runs that code",
        ),
    ] = None,
    weights: Annotated[
        Optional[Path],
        typer.Option(help="--from-python: a state dict for the module, loaded with torch.load(weights_only=True)"),
    ] = None,
    description: Annotated[str, typer.Option(help="free text for the card")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="print the stored card as JSON")] = False,
) -> None:
    """Import a model from any framework: declare its preprocessing, get a contract-obeying version.

    ONNX graphs are wrapped: uint8 NHWC images in; probabilities, or boxes/scores/classes for YOLO-style heads, out.
    Input size, layout, dtype and channels are read from the graph unless given; whether a classifier returns logits
    is measured on sample images unless --outputs-are says.
    The wrapped model is checked against running the original by hand on real images, then registered.
    A .pt/.pth state dict of a built-in architecture is loaded with torch.load(weights_only=True) and exported.
    TorchScript archives and --from-python modules are converted to ONNX (checked against torch), then imported.
    TensorRT engines and pickles are refused. See docs/model-import.md.
    """
    from edge_export.importer import (
        CHECKPOINT_SUFFIXES,
        ImportRequest,
        check_source_file,
        load_sample_images,
        parse_labels,
    )
    from edge_export.importer.convert import import_python, source_format
    from train.checkpoint_import import import_model
    from visionfleet.spec import validate_name

    if (file is None) == (from_python is None):
        raise ValueError(
            f"Got {'both a FILE and --from-python' if file else 'neither a FILE nor --from-python'}; expected one "
            "(a model file to import, or --from-python package.module:function)"
        )
    if weights is not None and from_python is None:
        raise ValueError("Got --weights without --from-python; expected it only with --from-python")
    src = check_source_file(file) if file is not None else None
    validate_name(name)
    converted = from_python is not None or source_format(src) is not None
    is_checkpoint = src is not None and src.suffix.lower() in CHECKPOINT_SUFFIXES and not converted
    if resize is None:
        resize = "letterbox" if task.strip().lower() == "detection" else "stretch"
    detection = {
        "score_threshold": score_threshold,
        "iou_threshold": iou_threshold,
        "max_detections": max_detections,
        "head_layout": head_layout,
        "objectness": objectness,
        "class_agnostic": class_agnostic or None,
        "box_format": box_format,
    }
    given = {k: v for k, v in detection.items() if v is not None}
    if task != "detection" and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"Got {flags} for task {task!r}; expected them only with --task detection")
    sizes = _parse_sizes(input_sizes) if input_sizes is not None else None
    if sizes is not None:
        if input_size is None:
            input_size = f"{sizes[0][0]}x{sizes[0][1]}"
        elif _parse_size(input_size) != sizes[0]:
            raise ValueError(f"Got --input-size {input_size} and --input-sizes {input_sizes}; expected --input-size to "
                             "be the first of --input-sizes (the default), or left out")
        if from_python is not None and len(sizes) > 1:
            raise ValueError("Got --input-sizes with --from-python; expected one size (import the exported ONNX with "
                             "--input-sizes)")
    outputs_kind: Optional[str] = outputs_are
    if is_checkpoint:
        # A built-in architecture is what "auto" reads: RGB, NCHW, float32, logits; only
        # its input size is not in a state dict.
        if input_size is None:
            raise ValueError(
                f"Got no --input-size for the PyTorch checkpoint {src.name}; expected HEIGHTxWIDTH (a state dict "
                "does not record the size it was trained at)"
            )
        layout = "NCHW" if layout.strip().lower() == "auto" else layout
        input_dtype = "float32" if input_dtype.strip().lower() == "auto" else input_dtype
        if outputs_kind.strip().lower() == "auto":
            outputs_kind = None
        if output is not None and output.strip().lower() in ("logits", "probs") and outputs_kind is None:
            outputs_kind, output = output, None  # the older spelling --output logits|probs
    request = ImportRequest.parse(
        task=task,
        labels=parse_labels(labels),
        input_size=_parse_size(input_size) if input_size is not None else None,
        layout=layout,
        input_dtype=input_dtype,
        channel_order=channel_order,
        mean=_parse_per_channel(mean, "--mean") if mean is not None else (0.0, 0.0, 0.0),
        std=_parse_per_channel(std, "--std") if std is not None else (1.0, 1.0, 1.0),
        scale=scale,
        resize=resize,
        output=outputs_kind,
        input_name=input_name,
        output_name=output,
        framework=framework or ("pytorch" if is_checkpoint or converted else "onnx"),
        **given,
    )
    spec = request.to_spec()
    arch_opts = {
        "arch": arch,
        "width": width,
        "depths": _parse_depths(depths) if depths else None,
        "stem_stride": stem_stride,
    }
    images = None
    if sample_images is not None:
        # An ONNX model's size may only be known once its graph is read: import_onnx
        # loads the folder then; a checkpoint's size is declared.
        images = load_sample_images(sample_images, spec.input_size, spec.resize) if spec.input_size else sample_images
    if from_python is not None:
        if any(v is not None for v in arch_opts.values()):
            raise ValueError("Got --arch/--width/--depths/--stem-stride with --from-python; expected none (the "
                             "function builds the module)")
        with err.status(f"exporting {from_python} to ONNX, checking it against torch, importing…"):
            card = import_python(from_python, _registry(), name, spec, weights=weights, images=images,
                                 description=description)
    else:
        # Conversion (TorchScript, …) takes seconds; say what is going on, on stderr.
        working = err.status(f"converting {src.name} to ONNX, checking it, importing…") if converted else nullcontext()
        with working:
            card = import_model(src, _registry(), name, spec, arch=arch_opts, images=images,
                                description=description, input_sizes=sizes)
    if as_json:
        print_json(card.model_dump(mode="json"))
        return
    parity = card.metrics.get("import_parity") or card.metrics.get("export_parity") or {}
    out.print(
        f"registered [bold]{card.ref}[/]: {card.task.value}, {len(card.labels)} labels, input "
        f"{card.input_size[0]}x{card.input_size[1]} ({card.resize.value}), {card.precision}, from {card.framework}"
    )
    if len(card.sizes) > 1:
        out.print("serves at " + ", ".join(f"{h}x{w}" for h, w in card.sizes) + " (dynamic height and width)")
    steps = card.lineage.steps
    if steps and steps[0].get("op") == "convert":
        conv = steps[0]["conversion_parity"]
        runtimes = conv.get("runtimes", "the source runtime vs onnxruntime")
        out.print(f"converted from {steps[0]['format']} ({steps[0]['converter']}): {runtimes} max |diff| "
                  f"{conv['max_abs_diff']:.2e} on {conv['n']} images")
    agreement = parity.get("agreement", parity.get("top1_agreement"))
    out.print(
        f"parity on {parity.get('n')} images: max |diff| {parity.get('max_abs_diff', 0):.2e}, "
        f"agreement {agreement:.2%}"
    )
    head = next((st["head"] for st in card.lineage.steps if isinstance(st.get("head"), dict)), None)
    if head:
        out.print(f"head: {head['kind']}, {head['family']}; added: {head['import_added']}")
    pre = card.preprocessing
    read = pre.get("read_from_model")
    if read:
        out.print(f"read from the model: {', '.join(read)} ({pre.get('layout')}, {pre.get('dtype')}, "
                  f"{pre.get('channels')} channel{'s' if pre.get('channels') != 1 else ''})")
    if pre.get("output_kind_from"):
        out.print(f"outputs are {pre['output']} ({pre['output_kind_from']})"
                  + ("; a softmax was added" if pre.get("softmax_added") else ""))
