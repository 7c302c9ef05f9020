"""From a training checkpoint to a registered, self-describing ONNX model version."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from visionfleet.registry import Registry
from visionfleet.spec import Lineage, ModelCard, Task

__all__ = ["register_checkpoint"]


def register_checkpoint(
    checkpoint: str | Path,
    registry: Registry,
    name: str,
    *,
    parity_images: np.ndarray,
    run_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    parent: str | None = None,
    steps: list[dict[str, Any]] | None = None,
    description: str = "",
    set_production_if_none: bool = True,
    aliases: tuple[str, ...] = (),
    input_sizes: Sequence[tuple[int, int]] | None = None,
) -> ModelCard:
    """Export ``model.pt`` to ONNX (with the parity check) and register both files.

    ``input_sizes`` (the trained size first) keeps H x W dynamic in the ONNX graph, checks
    parity at each size and lists them in the card, so the version serves at all of them.

    Returns the stored card; the new version's number is ``card.version``.
    """
    from edge_export.onnx_export import export_onnx
    from train.checkpoint import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    input_size = tuple(int(v) for v in meta["input_size"])
    sizes = [tuple(int(v) for v in sz) for sz in input_sizes] if input_sizes else None
    if sizes and sizes[0] != input_size:
        raise ValueError(f"Got input_sizes starting with {sizes[0][0]}x{sizes[0][1]}; expected the trained size "
                         f"{input_size[0]}x{input_size[1]} first (the default)")
    labels = list(meta["labels"])
    trained = json.loads(meta.get("metrics", "{}")) if isinstance(meta.get("metrics"), str) else {}
    card_metrics = {
        "holdout_top1": trained.get("top1"),
        "holdout_ece": trained.get("ece"),
        "holdout_n": trained.get("n"),
        "per_class_top1": trained.get("per_class"),
        "balanced_top1": trained.get("balanced_top1"),
        # rows: true label, columns: predicted, in the order of "labels"
        "confusion_matrix": {"labels": labels, "matrix": trained["confusion"]} if trained.get("confusion") else None,
        "validation_top1": trained.get("val_top1"),
        "best_epoch": trained.get("best_epoch"),
        "epochs_run": trained.get("epochs_run"),
        **(metrics or {}),
    }
    card_metrics = {k: v for k, v in card_metrics.items() if v is not None}
    with tempfile.TemporaryDirectory(prefix="vf-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        parity = export_onnx(
            model,
            onnx_path,
            input_size=input_size,  # type: ignore[arg-type]
            mean=meta["mean"],
            std=meta["std"],
            metadata={
                "task": Task.CLASSIFICATION.value,
                "labels": labels,
                "resize": meta["resize"],
                "model_name": name,
                "framework": "pytorch",
                "arch": meta["arch"],
            },
            parity_images=parity_images,
            input_sizes=sizes if sizes and len(sizes) > 1 else None,
        )
        card = ModelCard(
            name=name,
            task=Task.CLASSIFICATION,
            labels=labels,
            input_size=input_size,  # type: ignore[arg-type]
            input_sizes=sizes if sizes and len(sizes) > 1 else [],
            resize=meta["resize"],
            model_file="model.onnx",
            format="onnx",
            precision="fp32",
            framework="pytorch",
            arch=dict(meta["arch"]),
            preprocessing={
                "mean": list(meta["mean"]),
                "std": list(meta["std"]),
                "scale": "0-255",
                "layout": "NHWC",
                "channel_order": "RGB",
                "dtype": "uint8",
                "folded_into_graph": True,
            },
            metrics={**card_metrics, "export_parity": parity.to_dict() if parity else None},
            lineage=Lineage(
                parent=parent,
                dataset=str(meta.get("dataset")) if meta.get("dataset") else None,
                run=run_id,
                steps=steps or [{"op": "train", "run": run_id,
                                 **({"training": json.loads(meta["training"])} if meta.get("training") else {})}],
            ),
            description=description,
        )
        torch_path = Path(tmp) / "model.pt"
        torch_path.write_bytes(Path(checkpoint).read_bytes())
        return registry.register(
            card,
            {"onnx": onnx_path, "torch": torch_path},
            set_production_if_none=set_production_if_none,
            aliases=aliases,
        )
