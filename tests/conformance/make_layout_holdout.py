"""Write the layout holdout: rendered document pages with their boxes, in COCO JSON (truth by construction).

``python -m tests.conformance.make_layout_holdout [--images DIR]`` rewrites
``tests/conformance/data/layout_holdout/annotations.json``; ``--images`` also writes the
pages as PNG (they are not kept in the repository: :func:`corpus.render_page` redraws
each one from its ``seed``). Categories are PP-PicoDet CDLA's ten classes, in its order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tests.conformance.corpus import BY_ID, render_page

OUT = Path(__file__).parent / "data" / "layout_holdout" / "annotations.json"
SEEDS = list(range(1000, 1012))


def build(images: Path | None = None) -> dict:
    labels = BY_ID["pp-picodet-layout-cdla"].request["labels"]
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(labels)]
    coco = {"info": {"description": "rendered document pages; boxes are where each block was drawn",
                     "renderer": "tests.conformance.corpus.render_page(seed)"},
            "categories": cats, "images": [], "annotations": []}
    for k, seed in enumerate(SEEDS):
        page, boxes = render_page(seed)
        name = f"page_{seed}.png"
        if images is not None:
            from PIL import Image

            images.mkdir(parents=True, exist_ok=True)
            Image.fromarray(page).save(images / name)
        coco["images"].append({"id": k + 1, "file_name": name, "height": int(page.shape[0]),
                               "width": int(page.shape[1]), "seed": seed})
        for b in boxes:
            x1, y1, x2, y2 = b["box"]
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": k + 1,
                "category_id": labels.index(b["label"]) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    return coco


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=Path, default=None, help="also write the pages as PNG here")
    args = ap.parse_args()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(build(args.images), indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
