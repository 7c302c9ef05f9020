"""A small anchor-free detector (FCOS-style, one output scale) and its training targets and loss.

Plain conv backbone (stride 16) with one top-down merge into the stride-8 map, a shared
3x3 tower and three 1x1 heads per grid point: class logits, centerness logit and the
four distances (left, top, right, bottom) from the point to the box sides. No anchors:
a point is positive for a box when it lies inside the box and near its centre
("center sampling", FCOS), the smallest box wins where boxes overlap. The score of a
point is ``sqrt(sigmoid(cls) * sigmoid(centerness))``.

``forward`` returns the raw maps flattened over the grid (cls ``[N, C, A]``, centerness
``[N, 1, A]``, distances ``[N, 4, A]``), which is what the ONNX export takes; the
decode (scores, boxes in input pixels) and NMS live in the exported graph
(:mod:`train.detect_export`) and, for checks and training, in :func:`decode` here.

Built through :func:`train.models.build_model` with ``ArchSpec(arch="anchorfree")``:
``width`` is the stride-8 channel count / 4, ``depths`` the extra 3x3 convs per stage.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AnchorFreeDetector", "DETECTION_ARCHS", "grid_points", "targets", "detection_loss", "decode", "STRIDE"]

STRIDE = 8
DETECTION_ARCHS = ("anchorfree",)


def _cbr(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AnchorFreeDetector(nn.Module):
    """FCOS-style single-scale detector; float NCHW in (normalized), raw maps out."""

    stride = STRIDE

    def __init__(self, spec) -> None:  # spec: train.models.ArchSpec
        super().__init__()
        w = spec.width
        depths = list(spec.depths) + [1] * max(0, 4 - len(spec.depths))
        chans = [w, 2 * w, 4 * w, 8 * w]  # strides 2, 4, 8, 16
        stages: list[nn.Module] = []
        cin = 3
        for c, d in zip(chans, depths):
            layers = [_cbr(cin, c, 2)] + [_cbr(c, c) for _ in range(d - 1 if cin == 3 else d)]
            stages.append(nn.Sequential(*layers))
            cin = c
        self.stage2, self.stage4, self.stage8, self.stage16 = stages
        head = 4 * w
        self.lateral = nn.Conv2d(8 * w, head, 1)
        self.merge = _cbr(head, head)
        self.tower = nn.Sequential(_cbr(head, head), _cbr(head, head))
        self.cls = nn.Conv2d(head, spec.num_classes, 1)
        self.ctr = nn.Conv2d(head, 1, 1)
        self.reg = nn.Conv2d(head, 4, 1)
        # Focal-loss prior (RetinaNet): start with every point at p = 0.01, so the
        # background's loss does not swamp the first steps.
        nn.init.constant_(self.cls.bias, -math.log((1 - 0.01) / 0.01))
        self.num_classes = spec.num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c8 = self.stage8(self.stage4(self.stage2(x)))
        c16 = self.stage16(c8)
        up = F.interpolate(self.lateral(c16), size=c8.shape[2:], mode="nearest")
        f = self.tower(self.merge(c8 + up))
        n = x.shape[0]
        return (
            self.cls(f).reshape(n, self.num_classes, -1),
            self.ctr(f).reshape(n, 1, -1),
            self.reg(f).reshape(n, 4, -1),
        )


def grid_points(h: int, w: int, stride: int = STRIDE) -> torch.Tensor:
    """Centres ``[A, 2]`` (x, y, input pixels) of the output grid, row-major like the flattened maps."""
    gh, gw = math.ceil(h / stride), math.ceil(w / stride)
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij")
    return torch.stack([(xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride], 1)


def distances(reg: torch.Tensor, stride: int = STRIDE) -> torch.Tensor:
    """Raw distance logits -> l, t, r, b in pixels (softplus keeps them positive and smooth)."""
    return F.softplus(reg) * stride


def targets(points: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor, stride: int = STRIDE, radius: float = 1.5):
    """Per-point targets for a batch: class (-1 background) ``[N, A]``, box ``[N, A, 4]`` (x1, y1, x2, y2).

    ``boxes`` ``[N, M, 4]`` and ``classes`` ``[N, M]`` are padded with class -1.
    """
    px, py = points[:, 0][None, :, None], points[:, 1][None, :, None]  # [1, A, 1]
    x1, y1, x2, y2 = (boxes[..., i][:, None, :] for i in range(4))  # [N, 1, M]
    inside = (px > x1) & (px < x2) & (py > y1) & (py < y2)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    r = radius * stride
    near = ((px - cx).abs() < r) & ((py - cy).abs() < r)
    valid = (classes >= 0)[:, None, :]
    area = ((x2 - x1) * (y2 - y1)).expand(-1, points.shape[0], -1)
    cand = inside & near & valid
    # a small box whose centre falls between grid points still gets the point nearest its centre
    d2 = (px - cx) ** 2 + (py - cy) ** 2  # [N, A, M]
    nearest = d2.argmin(1, keepdim=True)  # [N, 1, M]
    cand = cand | (torch.zeros_like(cand).scatter_(1, nearest, True) & inside & valid)
    area = torch.where(cand, area, torch.full_like(area, float("inf")))
    best_area, best = area.min(2)  # [N, A]
    pos = torch.isfinite(best_area)
    cls_t = torch.where(pos, classes.gather(1, best), torch.full_like(best, -1))
    box_t = boxes.gather(1, best[..., None].expand(-1, -1, 4))
    return cls_t, box_t


def _giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - GIoU of matching x1, y1, x2, y2 rows."""
    ix1, iy1 = torch.max(pred[:, 0], target[:, 0]), torch.max(pred[:, 1], target[:, 1])
    ix2, iy2 = torch.min(pred[:, 2], target[:, 2]), torch.min(pred[:, 3], target[:, 3])
    inter = (ix2 - ix1).clamp(min=0) * (iy2 - iy1).clamp(min=0)
    ap = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    at = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    union = ap + at - inter + 1e-6
    iou = inter / union
    ex1, ey1 = torch.min(pred[:, 0], target[:, 0]), torch.min(pred[:, 1], target[:, 1])
    ex2, ey2 = torch.max(pred[:, 2], target[:, 2]), torch.max(pred[:, 3], target[:, 3])
    enclose = (ex2 - ex1) * (ey2 - ey1) + 1e-6
    return 1 - (iou - (enclose - union) / enclose)


def detection_loss(outputs, points: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """FCOS loss: sigmoid focal loss (classes), BCE (centerness), GIoU weighted by centerness (boxes)."""
    cls, ctr, reg = outputs
    n, c, a = cls.shape
    cls_t, box_t = targets(points, boxes, classes)
    pos = cls_t >= 0
    num_pos = max(1.0, float(pos.sum()))
    onehot = torch.zeros(n, a, c, device=cls.device)
    onehot[pos] = F.one_hot(cls_t[pos], c).float()
    logits = cls.transpose(1, 2)  # [N, A, C]
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    alpha = 0.25 * onehot + 0.75 * (1 - onehot)
    loss_cls = (alpha * ce * (1 - p_t) ** 2).sum() / num_pos
    if not pos.any():
        zero = reg.sum() * 0 + ctr.sum() * 0
        return loss_cls + zero, {"cls": float(loss_cls.detach()), "box": 0.0, "ctr": 0.0, "pos": 0}
    pts = points[None].expand(n, -1, -1)[pos]  # [P, 2]
    tb = box_t[pos]
    l, t = pts[:, 0] - tb[:, 0], pts[:, 1] - tb[:, 1]
    r, b = tb[:, 2] - pts[:, 0], tb[:, 3] - pts[:, 1]
    ctr_t = torch.sqrt((torch.min(l, r) / torch.max(l, r)).clamp(min=0) * (torch.min(t, b) / torch.max(t, b)).clamp(min=0))
    d = distances(reg.transpose(1, 2)[pos])  # [P, 4]
    pred = torch.stack([pts[:, 0] - d[:, 0], pts[:, 1] - d[:, 1], pts[:, 0] + d[:, 2], pts[:, 1] + d[:, 3]], 1)
    w = ctr_t.clamp(min=0.1)
    loss_box = (_giou_loss(pred, tb) * w).sum() / w.sum()
    loss_ctr = F.binary_cross_entropy_with_logits(ctr.transpose(1, 2)[pos][:, 0], ctr_t, reduction="mean")
    loss = loss_cls + 2.0 * loss_box + loss_ctr
    stats = {"cls": float(loss_cls.detach()), "box": float(loss_box.detach()), "ctr": float(loss_ctr.detach())}
    return loss, stats | {"pos": int(pos.sum())}


def decode(outputs, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw maps -> (scores ``[N, C, A]``, boxes ``[N, A, 4]`` x1, y1, x2, y2 unclipped), as the exported graph does."""
    cls, ctr, reg = outputs
    scores = torch.sqrt(torch.sigmoid(cls) * torch.sigmoid(ctr))
    d = distances(reg)  # [N, 4, A]
    px, py = points[:, 0], points[:, 1]
    boxes = torch.stack([px - d[:, 0], py - d[:, 1], px + d[:, 2], py + d[:, 3]], 2)
    return scores, boxes
