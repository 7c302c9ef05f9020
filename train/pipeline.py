"""From a training checkpoint to a registered, self-describing ONNX model version."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

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
) -> ModelCard:
    """Export ``model.pt`` to ONNX (with the parity check) and register both files.

    Returns the stored card; the new version's number is ``card.version``.
    """
    from edge_export.onnx_export import export_onnx
    from train.checkpoint import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    input_size = tuple(int(v) for v in meta["input_size"])
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
        )
        card = ModelCard(
            name=name,
            task=Task.CLASSIFICATION,
            labels=labels,
            input_size=input_size,  # type: ignore[arg-type]
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
