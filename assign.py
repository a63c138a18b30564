"""assign.py: which prior learns which box, and the losses built on that choice.

Where this sits in the flow:

    data.augment -> model(images) -> raw per-level outputs
                 -> [assign.py] assignment (no grad) -> losses -> backward

A detector predicts something at every prior (an anchor box for EfficientDet, a grid point
for YOLOX). Before a loss can be computed we must decide, for each prior, whether it should
predict one of the ground-truth boxes (a positive), nothing (a negative / background), or be
left out of the loss (ignored). That decision is the *assignment*. This file holds both
flavours the project uses:

* `assign_max_iou`: EfficientDet style. A fixed rule on anchor-vs-box IoU: IoU >= 0.5
  positive, below 0.5 background (effdet and Google's automl use one threshold; RetinaNet's
  0.4 <= IoU < 0.5 "ignored" band is the neg_iou=0.4 option), and every box's best anchor
  forced positive so that no box goes unlearned.
* `simota_assign`: YOLOX's SimOTA. A dynamic rule that looks at the current predictions: each
  box takes the k priors that are cheapest to make predict it (class cost + 3 x IoU cost),
  with k chosen per box from how well it is already predicted.

Both are batched: ground truth arrives padded to M boxes per image with a `valid` mask; the
G valid boxes of the whole batch become one list, each box tagged with its image, and every
step works on [G, N] grids (boxes x priors), so there is no Python loop over images, priors or
boxes. Label -1 marks a crowd / ignore region (COCO's `iscrowd`: one box drawn around a
group of objects too dense to label one by one): never a target, and the priors it covers are
left out of the background loss, since they may well be looking at an unlabelled object.
A box of zero width or height (callers should drop them, as data.py does) is left out too.

Then the losses that consume each assignment:

* `anchor_loss`: sigmoid focal loss on the classes + Huber loss on encoded box offsets.
* `anchor_free_loss`: IoU loss on decoded boxes + objectness BCE + class BCE against
  IoU-scaled one-hot targets (+ an optional L1 on encoded boxes).
* `detection_loss`: picks the family from the model's `anchors_mode` (what train.py calls).

On a GPU, anything whose *value* the CPU must read (a count, a boolean-mask index, .item())
makes the CPU wait until the GPU has run everything queued, and then the GPU idles while Python
queues the next kernels. The only such value here is the number of valid boxes, and train.py
keeps the `valid` mask on the CPU, where counting costs nothing. Every loss term is summed over
its priors with a where (`_sum_at`: positives, or all but the ignored) rather than by indexing
with a mask: indexing would need the number of positives on the CPU, one such wait per term.

Conventions (see DESIGN.md): boxes are xyxy absolute pixels, float32; labels 0..C-1.
Priors come from `models.make_priors` (centers [N, 2], strides [N], boxes [N, 4]); the box
encoding lives beside them in models.py (`encode_boxes` / `decode_boxes`).
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from models import decode_boxes, encode_boxes, flatten_outputs


# ---------------------------------------------------------------------------------------------
# Box geometry
# ---------------------------------------------------------------------------------------------

def box_area(boxes):
    """boxes: [..., 4] xyxy -> [...] area (0 for degenerate boxes)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _intersection(a, b):
    """Broadcast intersection area of xyxy boxes a [..., 4] and b [..., 4]."""
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    return w * h


def box_iou(a, b, aligned=False, kind="iou", eps=1e-7):
    """IoU of xyxy boxes, and its GIoU / CIoU variants.

    a: [..., N, 4], b: [..., M, 4] -> [..., N, M] (pairwise; leading dims broadcast), or with
    aligned=True a: [..., 4], b: [..., 4] -> [...] (box i of a against box i of b).
    kind: "iou"; "giou" (IoU minus the share of the enclosing box covered by neither box, so
    it still has a gradient when the boxes do not overlap); "ciou" (IoU minus the squared centre
    distance over the squared enclosing diagonal, minus an aspect-ratio term).
    """
    if kind not in ("iou", "giou", "ciou"):
        raise ValueError(f"assign.box_iou: kind={kind!r} is unknown; use 'iou', 'giou' or 'ciou'")
    if not aligned:
        # Pairwise through broadcasting: [..., N, 1, 4] against [..., 1, M, 4].
        a, b = a.unsqueeze(-2), b.unsqueeze(-3)
    inter = _intersection(a, b)
    union = box_area(a) + box_area(b) - inter
    iou = inter / (union + eps)
    if kind == "iou":
        return iou
    # The smallest box enclosing both.
    cw = torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])
    ch = torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    if kind == "giou":
        enclose = cw * ch
        return iou - (enclose - union) / (enclose + eps)
    # CIoU (Zheng et al. 2020): centre distance and aspect-ratio consistency.
    diag2 = cw ** 2 + ch ** 2 + eps
    dx = (a[..., 0] + a[..., 2] - b[..., 0] - b[..., 2]) / 2
    dy = (a[..., 1] + a[..., 3] - b[..., 1] - b[..., 3]) / 2
    wa, ha = a[..., 2] - a[..., 0], (a[..., 3] - a[..., 1]).clamp(min=eps)
    wb, hb = b[..., 2] - b[..., 0], (b[..., 3] - b[..., 1]).clamp(min=eps)
    v = (4 / math.pi ** 2) * (torch.atan(wb / hb) - torch.atan(wa / ha)) ** 2
    # alpha is a trade-off weight; as in the authors' code it gets no gradient, hence the no_grad.
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return iou - (dx ** 2 + dy ** 2) / diag2 - alpha * v


def box_ioa(a, b, eps=1e-7):
    """Intersection over the area of a: a [..., N, 4], b [..., M, 4] -> [..., N, M].

    "How much of box a lies inside region b". Used for crowd regions: a small anchor fully
    inside a big crowd region has a tiny IoU with it but an IoA of 1.
    """
    a2, b2 = a.unsqueeze(-2), b.unsqueeze(-3)
    return _intersection(a2, b2) / (box_area(a2) + eps)


# ---------------------------------------------------------------------------------------------
# Assignment results, and the bookkeeping both assigners share
# ---------------------------------------------------------------------------------------------

class Assignment(NamedTuple):
    """What an assigner decided for each of the N priors of each of the B images.

    positive: [B, N] bool, the prior predicts box gt_index of its image.
    ignored:  [B, N] bool, the prior is left out of the background / objectness loss
              (never True where positive is).
    gt_index: [B, N] int64 index into the M padded boxes, -1 where not positive.
    iou:      [B, N] float32 IoU behind the decision: for max-IoU the anchor's IoU with its
              assigned box (where not positive, its best IoU over the image's real, non-crowd
              boxes, 0 if it has none); for SimOTA the predicted box vs its box, 0 where not
              positive.
    """
    positive: torch.Tensor
    ignored: torch.Tensor
    gt_index: torch.Tensor
    iou: torch.Tensor


def _empty_assignment(B, N, device):
    """The assignment of a batch padded to zero boxes: every prior is background."""
    none = torch.zeros(B, N, dtype=torch.bool, device=device)
    return Assignment(none, none.clone(), torch.full((B, N), -1, dtype=torch.long, device=device),
                      torch.zeros(B, N, device=device))


def _check_targets(gt_boxes, gt_labels, gt_valid):
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"assign.py: targets['boxes'] must be [B, M, 4] xyxy pixels, "
                         f"got {tuple(gt_boxes.shape)}")
    if gt_labels.shape != gt_boxes.shape[:2] or gt_valid.shape != gt_boxes.shape[:2]:
        raise ValueError(f"assign.py: targets['labels'] {tuple(gt_labels.shape)} and targets['valid'] "
                         f"{tuple(gt_valid.shape)} must both be [B, M] = {tuple(gt_boxes.shape[:2])}")


# Both assigners turn the padded [B, M] boxes into one list of the G valid boxes of the batch,
# each knowing its image and its slot, and work on [G, N] grids of (box, prior) pairs. Padding
# then costs nothing (the loader pads to 100 boxes; COCO images hold ~7) and no loop over
# images is needed: a reduction "over the boxes of each image" is a scatter keyed by image.

def _host_to(t, device):
    """A CPU tensor onto `device` without waiting for the GPU: a plain .to("cuda") from pageable
    memory first waits for every queued kernel; from pinned memory with non_blocking=True the
    copy just joins the queue. (A copy of data.to_device: assign.py imports only torch and models.)"""
    if t.device.type != "cpu" or device.type == "cpu":
        return t.to(device)
    if device.type == "cuda":
        t = t.contiguous().pin_memory()
    return t.to(device, non_blocking=True)


def _valid_boxes(gt_boxes, gt_labels, gt_valid):
    """-> img [G], slot [G], boxes [G, 4] float32, labels [G] of the valid boxes.

    G, the number of valid boxes, sizes everything after it, so the CPU has to know it. With
    gt_valid on the CPU (train.py's case, while the boxes are on a GPU) it is counted there;
    with gt_valid on a GPU, nonzero waits for the GPU's whole queue (a forward pass) first."""
    img, slot = gt_valid.nonzero(as_tuple=True)
    img, slot = _host_to(img, gt_boxes.device), _host_to(slot, gt_boxes.device)
    return img, slot, gt_boxes[img, slot].float(), gt_labels[img, slot]


def _any_per_image(pairs, img, B):
    """[G, N] bool -> [B, N] bool: OR over the boxes of each image."""
    counts = torch.zeros(B, pairs.shape[1], dtype=torch.int32, device=pairs.device)
    return counts.index_add_(0, img, pairs.to(torch.int32)) > 0


def _argmax_per_image(values, img, slot, B, no_slot):
    """Max over the boxes of each image: values [G, N] -> best [B, N] and owner [B, N], the slot
    of the box that attains it (the lowest slot on a tie, as argmax does; no_slot where the
    image has no box). Two scatters: the max, then the smallest slot among the boxes at it."""
    G, N = values.shape
    rows = img[:, None].expand(G, N)
    best = values.new_full((B, N), float("-inf")).scatter_reduce_(0, rows, values, "amax")
    at_best = torch.where(values == best[img], slot[:, None].expand(G, N), no_slot)
    owner = torch.full((B, N), no_slot, dtype=torch.long, device=values.device)
    return best, owner.scatter_reduce_(0, rows, at_best, "amin")


# ---------------------------------------------------------------------------------------------
# Max-IoU assignment (EfficientDet anchors)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def assign_max_iou(anchors, gt_boxes, gt_labels, gt_valid, pos_iou=0.5, neg_iou=0.5, ignore_ioa=0.5):
    """Fixed IoU rule between anchors and boxes, batched.

    anchors: [N, 4] xyxy px (priors.boxes). gt_boxes: [B, M, 4] xyxy px; gt_labels: [B, M] int64,
    -1 = crowd / ignore region; gt_valid: [B, M] bool, False = padding (may stay on the CPU:
    see _valid_boxes).
    Returns an Assignment. Each anchor takes the box of its image it overlaps most: IoU >=
    pos_iou positive, neg_iou <= IoU < pos_iou ignored, below background. The default
    neg_iou = pos_iou = 0.5 is effdet's and automl's rule (no ignored band); RetinaNet ignores
    0.4 <= IoU < 0.5 (neg_iou=0.4). Each box's best
    anchor is positive for it whatever its IoU (else a box between anchor sizes would never be
    learned). An anchor with IoA >= ignore_ioa inside a crowd region is ignored unless it is
    positive for a real box.

    The rule reads only anchors and ground truth, never predictions, so it carries no gradient
    by construction; the no_grad keeps the [G, N] temporaries out of autograd's memory.
    """
    _check_targets(gt_boxes, gt_labels, gt_valid)
    B, M = gt_labels.shape
    anchors = anchors.to(gt_boxes).float()
    img, slot, boxes, labels = _valid_boxes(gt_boxes, gt_labels, gt_valid)
    if img.numel() == 0:
        return _empty_assignment(B, anchors.shape[0], gt_boxes.device)
    is_real = (labels >= 0) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # not crowd, not empty

    iou = box_iou(boxes, anchors).masked_fill(~is_real[:, None], -1.0)   # [G, N]; crowds never match
    max_iou, gt_index = _argmax_per_image(iou, img, slot, B, M)          # [B, N]
    positive = max_iou >= pos_iou
    band = (max_iou >= neg_iou) & ~positive

    # Force each box's best anchor (argmax over the anchors, one per box). An anchor that is
    # the best of two boxes goes to the one it overlaps more (effdet gives it to the box listed
    # first). A box overlapping no anchor at all is left unforced.
    # (A comparison with arange, not F.one_hot: a bool [G, N] rather than an int64 one, and no
    # range check, which on a CPU reads the indexes' min and max.)
    best_iou, best_anchor = iou.max(dim=1)                                # [G]
    forced = torch.arange(anchors.shape[0], device=iou.device) == best_anchor[:, None]
    forced &= (is_real & (best_iou > 0))[:, None]
    forced_iou, forced_gt = _argmax_per_image(iou.masked_fill(~forced, -1.0), img, slot, B, M)
    is_forced = forced_iou > 0
    gt_index = torch.where(is_forced, forced_gt, gt_index)
    max_iou = torch.where(is_forced, forced_iou, max_iou)  # the IoU with the box it now learns
    positive = positive | is_forced

    # Crowd regions: IoA (share of the anchor inside the region), not IoU. A crowd box is
    # usually much bigger than the anchors that sit in it, so their IoU with it stays small
    # even when they are fully covered; those anchors would become "background" on people.
    in_crowd = _any_per_image((box_ioa(anchors, boxes).T >= ignore_ioa) & ~is_real[:, None], img, B)
    ignored = (band | in_crowd) & ~positive
    gt_index = torch.where(positive, gt_index, torch.full_like(gt_index, -1))
    return Assignment(positive, ignored, gt_index, max_iou.clamp(min=0))


# ---------------------------------------------------------------------------------------------
# SimOTA (YOLOX anchor-free)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def simota_assign(pred_boxes, cls_logits, obj_logits, centers, strides, gt_boxes, gt_labels, gt_valid,
                  center_radius=2.5, candidate_topk=10, iou_weight=3.0, outside_cost=1e5):
    """YOLOX's SimOTA, batched over images with padded boxes.

    pred_boxes: [B, N, 4] decoded xyxy px; cls_logits: [B, N, C]; obj_logits: [B, N] or None;
    centers: [N, 2] prior centres xy px; strides: [N]; gt_boxes [B, M, 4] xyxy px,
    gt_labels [B, M] (-1 = ignore region), gt_valid [B, M] (may stay on the CPU: see _valid_boxes).
    Returns an Assignment.

    Why no_grad and .detach(): the assignment reads the predictions (their IoU and class scores
    decide who is positive), yet it is a *target*, not something to optimise. Which priors are
    chosen (topk, comparisons) carries no gradient in any case; what would is the IoU returned
    with the choice, which anchor_free_loss uses as the class target (one-hot x IoU). Computed
    from boxes that keep their gradient, that target lets the class loss fall by making the box
    *worse*: early in training the class scores sit near 0.01 (models.PRIOR_PROB), and pulling
    the IoU down to meet them is the cheapest way to agree (in a 3-step test, IoU 0.68 -> 0.20
    while the class loss fell). So the boxes are detached here, and the decorator keeps the
    [G, N] temporaries out of autograd's memory.

    This follows the YOLOX paper and its first code release (centre region 2.5 strides, inside
    box or centre region, 1e5 for a pair not inside both); later YOLOX code changed to a centre-only
    region of 1.5 strides, so its numbers differ from these.

    Steps, on a [G, N] grid of (box, prior) pairs, G = all valid boxes of the batch:
      1. candidates: priors whose centre is inside a box, or within center_radius strides of a
         box's centre (one pool per image, shared by all its boxes, as in YOLOX);
      2. cost = class BCE + iou_weight * -log(IoU) + outside_cost where the prior is not inside
         both this box and this box's centre region;
      3. dynamic k per box = max(1, floor(sum of its candidate_topk best IoUs));
      4. each box takes its k cheapest candidates (one topk over priors, then a rank < k test);
      5. a prior taken by several boxes goes to the cheapest of them.
    """
    _check_targets(gt_boxes, gt_labels, gt_valid)
    pred_boxes, cls_logits = pred_boxes.detach().float(), cls_logits.detach().float()
    B, N, C = cls_logits.shape
    device = cls_logits.device
    centers, strides = centers.to(pred_boxes), strides.to(pred_boxes)

    # The G valid boxes of the batch as one list (see _valid_boxes); a box only ever meets the
    # priors (and predictions) of its own image.
    img, slot, boxes, labels = _valid_boxes(gt_boxes, gt_labels, gt_valid)
    G = img.numel()
    if G == 0:
        return _empty_assignment(B, N, device)
    is_real = (labels >= 0) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # not crowd, not empty

    # The [G, N] planes below are the big tensors of this function, so the arithmetic on them
    # runs in place where it can (fresh 10-50 MB buffers cost as much as the maths on a CPU).

    # 1. Geometry, as distances from each box centre: prior centres [1, N] against box
    # centres [G, 1] -> [G, N]. "Inside the box" is |dx| < w/2 and |dy| < h/2; "inside the
    # centre region" is max(|dx|, |dy|) < center_radius * stride of that prior.
    box_cx, box_cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    half_w, half_h = (boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2
    dx = (centers[None, :, 0] - box_cx[:, None]).abs_()
    dy = (centers[None, :, 1] - box_cy[:, None]).abs_()
    in_box = (dx < half_w[:, None]) & (dy < half_h[:, None])
    in_center = torch.maximum(dx, dy, out=dx) < center_radius * strides[None, :]
    del dx, dy

    # Ignore regions: a prior whose centre is in a crowd box and that no real box takes gets
    # no objectness loss (it may well be looking at an unlabelled person).
    in_crowd = _any_per_image(in_box & ~is_real[:, None], img, B)             # [B, N]
    # The candidate pool is per image, as in YOLOX: a prior near *any* box of the image may be
    # taken by any of its boxes, but a pair that is not inside both this box and its centre
    # region pays outside_cost, so it is only taken when the box has too few priors that are.
    pool = _any_per_image((in_box | in_center) & is_real[:, None], img, B)    # [B, N]
    candidate = pool[img] & is_real[:, None]                         # [G, N]
    outside = ~(in_box & in_center)                                  # [G, N]

    # 2. Costs: class, IoU (0 outside the candidates), and the price of being outside.
    iou = _pair_iou(pred_boxes, boxes, img).mul_(candidate)          # [G, N]
    cost = _pair_class_cost(cls_logits, obj_logits, img, labels)     # [G, N]
    cost -= iou_weight * torch.log(iou + 1e-8)
    cost.add_(outside.to(cost.dtype), alpha=outside_cost)
    cost.masked_fill_(~candidate, float("inf"))

    # 3. Dynamic k. IoUs of non-candidates are 0, so the top-k over all N priors equals YOLOX's
    # top-k over min(k, number of candidates) candidates. k <= candidate_topk since IoU <= 1.
    k = min(candidate_topk, N)
    dynamic_k = iou.topk(k, dim=1).values.sum(dim=1).floor().clamp(min=1)          # [G]

    # 4. Each box's dynamic_k cheapest candidates, without a loop over boxes: the k cheapest of
    # every box at once (one topk), kept where their rank is below the box's own k and they are
    # candidates (finite cost). From here on only these [G, k] picks matter.
    low_cost, low_prior = cost.topk(k, dim=1, largest=False)         # [G, k]
    rank = torch.arange(k, device=device)[None, :]
    take = (rank < dynamic_k[:, None]) & torch.isfinite(low_cost)
    pick_cost = low_cost.masked_fill(~take, float("inf"))
    pick_iou = iou.gather(1, low_prior)

    # 5. Conflicts: a prior picked by several boxes goes to the one it costs least.
    positive, gt_index, matched_iou = _resolve_conflicts(
        img, slot, low_prior, pick_cost, take, pick_iou, B, N, no_owner=gt_boxes.shape[1])
    return Assignment(positive, in_crowd & ~positive, gt_index, matched_iou)


def _pair_iou(pred_boxes, boxes, img):
    """IoU of each box with every prediction of its own image.
    pred_boxes [B, N, 4] and boxes [G, 4] xyxy px, img [G] the image of each box -> [G, N].
    Written out rather than box_iou(...) so the [G, N] planes are reused in place."""
    pred_planes = pred_boxes.permute(2, 0, 1).contiguous()           # [4, B, N] x1 y1 x2 y2
    px1, py1, px2, py2 = (pred_planes[i][img] for i in range(4))     # each [G, N]
    x1, y1, x2, y2 = (boxes[:, i, None] for i in range(4))           # each [G, 1]
    inter = torch.minimum(px2, x2).sub_(torch.maximum(px1, x1)).clamp_(min=0)
    inter.mul_(torch.minimum(py2, y2).sub_(torch.maximum(py1, y1)).clamp_(min=0))
    union = box_area(pred_boxes)[img].add_(box_area(boxes)[:, None]).sub_(inter)
    return inter.div_(union.add_(1e-7))


def _pair_class_cost(cls_logits, obj_logits, img, labels):
    """SimOTA's class cost of every (box, prior) pair of an image -> [G, N].
    cls_logits [B, N, C], obj_logits [B, N] or None, img [G] and labels [G] of each box.

    The cost of a pair (prior n, box of class g) is YOLOX's
      sum_c BCE(p_nc, onehot(g)_c),  p = sqrt(sigmoid(cls) * sigmoid(obj))
    (p = sigmoid(cls) for a head without objectness, obj_logits None).
    Materialised for every pair that is [G, N, C] (16 images x 50 boxes x 8400 priors x 80
    classes = 2.1 GB of float32). But BCE against a one-hot splits: every class contributes
    -log(1 - p_c) except the true one, which contributes -log(p_g) instead. So
      sum_c BCE = sum_c -log(1 - p_c)  +  [-log p_g + log(1 - p_g)]:
    a per-prior total [B, N] plus a correction read from column g: only [G, N] floats.
    (Logs are clamped at -100 as F.binary_cross_entropy does, so p = 0 or 1 stays finite.)"""
    # Class-major [B, C, N] so that reading "class g of image b for every prior" is one row.
    p = cls_logits.transpose(1, 2).contiguous().sigmoid_()           # [B, C, N]
    if obj_logits is not None:
        p.mul_(obj_logits.detach().float().sigmoid()[:, None, :]).sqrt_()
    p_true = p[img, labels.clamp(min=0)]                             # [G, N] p of the box's class (a copy)
    log_not_p = p.neg_().log1p_().clamp_(min=-100)                   # [B, C, N] log(1 - p), in p's memory
    cost = log_not_p.sum(dim=1)[img].neg_()                          # [G, N] sum_c -log(1 - p_c)
    cost -= torch.log(p_true).clamp_(min=-100)                       # the true class: + -log p_g
    cost += torch.log1p(-p_true).clamp_(min=-100)                    #   instead of -log(1 - p_g)
    return cost


def _resolve_conflicts(img, slot, low_prior, pick_cost, take, pick_iou, B, N, no_owner):
    """SimOTA's last step. Box g of image img[g] (slot slot[g]) picked priors low_prior [G, k]
    where take [G, k] is set, at pick_cost [G, k] (inf where not taken) and pick_iou [G, k].
    Several boxes may pick the same prior: it goes to the one it costs least (YOLOX takes the
    argmin over all the image's boxes, which can hand the prior to a box that never picked it;
    we keep to the boxes that did). Returns positive [B, N], gt_index [B, N] (the owner's slot,
    -1 if none) and matched_iou [B, N] (the IoU behind the winning pick).

    Picks are keyed by (image, prior); a scatter-min finds the cheapest cost per key, then a
    scatter-min of the box slot among the picks at that cost names the owner (the lowest slot
    on an exact tie, like argmin). no_owner is a slot no box has (M, the padded box count)."""
    G, k = low_prior.shape
    key = (img[:, None] * N + low_prior).flatten()                   # [G * k] flat prior index
    best = torch.full((B * N,), float("inf"), device=key.device)
    best.scatter_reduce_(0, key, pick_cost.flatten(), "amin")
    wins = (take & (pick_cost == best[key].view(G, k))).flatten()
    owner_src = torch.where(wins, slot[:, None].expand(G, k).flatten(), torch.full_like(key, no_owner))
    owner = torch.full((B * N,), no_owner, dtype=torch.long, device=key.device)
    owner.scatter_reduce_(0, key, owner_src, "amin")
    positive = owner < no_owner
    # The IoU behind the winning pick (the class target of anchor_free_loss scales by it).
    is_owner = wins & (owner[key] == owner_src)
    matched_iou = torch.zeros(B * N, device=key.device)
    matched_iou.scatter_reduce_(0, key, torch.where(is_owner, pick_iou.flatten(), 0.0), "amax")
    return positive.view(B, N), torch.where(positive, owner, -1).view(B, N), matched_iou.view(B, N)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def _num_positives(positive):
    """Number of positives to divide the losses by: a float tensor >= 1.

    Under DDP each rank sees different images; dividing by the mean count over ranks (not
    each rank's own) gives every positive in the global batch the same weight once DDP
    averages the gradients. Clamped at 1 so a batch with no boxes does not divide by 0
    (effdet divides by num_pos + 1 instead: a hair smaller losses, the same training).
    """
    n = positive.sum().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        n = n / torch.distributed.get_world_size()
    return n.clamp(min=1.0)


def _matched_boxes(gt_boxes, assignment, fill):
    """[B, N, 4] the box each prior is assigned, `fill` ([N, 4] prior boxes) where not positive.

    Filling with the prior's own box gives tame values where the loss is masked out: it encodes
    to 0 (anchor_loss) and its IoU with itself is 1 (anchor_free_loss), rather than whatever a
    padding slot holds.
    """
    idx = assignment.gt_index.clamp(min=0).unsqueeze(-1).expand(-1, -1, 4)
    boxes = gt_boxes.float().gather(1, idx)
    return torch.where(assignment.positive.unsqueeze(-1), boxes, fill.to(boxes).expand_as(boxes))


def _split_outputs(outputs, extra):
    """outputs: list of raw levels or an already flat [B, N, 4 + C + extra] -> (box, cls, rest)."""
    flat = flatten_outputs(outputs) if isinstance(outputs, (list, tuple)) else outputs
    num_classes = flat.shape[-1] - 4 - extra
    if num_classes < 1:
        raise ValueError(f"assign.py: outputs have {flat.shape[-1]} channels per prior; expected 4 box + "
                         f"C class{' + 1 objectness' if extra else ''}")
    flat = flat.float()  # the losses' logs and exps in float32 even for bf16 / fp16 outputs (no copy if already)
    return flat[..., :4], flat[..., 4:4 + num_classes], flat[..., 4 + num_classes:]


def _targets_on(targets, device):
    """targets dict -> (boxes [B, M, 4], labels [B, M]) on `device` (the outputs'), and valid
    [B, M] left where it is: on the CPU, counting the boxes costs no GPU wait (_valid_boxes)."""
    boxes, labels, valid = targets["boxes"], targets["labels"], targets["valid"]
    if boxes.shape[1] == 0:  # padded to no box at all: one padding slot, so the gathers have a slot to read
        boxes, labels, valid = boxes.new_zeros(len(boxes), 1, 4), labels.new_full((len(labels), 1), -1), \
            valid.new_zeros(len(valid), 1)
    return _host_to(boxes, device), _host_to(labels, device), valid


def _check_priors(flat_box, priors):
    if priors.centers.shape[0] != flat_box.shape[1]:
        raise ValueError(f"assign.py: the outputs have {flat_box.shape[1]} priors but the priors have "
                         f"{priors.centers.shape[0]}; build them with models.make_priors for the same "
                         f"input_shape, strides and anchors_mode as the model")


def _sum_at(values, mask):
    """Sum of values [B, N, ...] over the priors where mask [B, N] is True.

    A where, not a multiplication by the mask: an inf output at some other prior would give
    inf * 0 = NaN, and the where also hands those priors exactly zero gradient."""
    mask = mask.view(mask.shape + (1,) * (values.dim() - mask.dim()))
    return torch.where(mask, values, 0.0).sum()


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=1.5, label_smoothing=0.0):
    """Per-element focal loss (Lin et al. 2017): [...] -> [...] (not reduced).

    (1 - p_t)^gamma shrinks the loss of easy examples, so the millions of easy background
    anchors do not drown the rest. alpha weighs the two sides: alpha for positives, 1 - alpha
    for negatives; with alpha = 0.25 the positives get the *smaller* weight, which the focal
    loss paper found best once gamma has already quietened the easy negatives. gamma = 1.5
    (RetinaNet used 2.0) and alpha = 0.25 are EfficientDet's.
    Label smoothing pulls the BCE target towards 0.5 (the modulating factor keeps the hard 0/1).
    """
    p = logits.sigmoid()
    p_t = targets * p + (1 - targets) * (1 - p)
    alpha_t = targets * alpha + (1 - targets) * (1 - alpha)
    if label_smoothing > 0:
        targets = targets * (1 - label_smoothing) + 0.5 * label_smoothing
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return alpha_t * (1 - p_t) ** gamma * ce


def anchor_loss(outputs, priors, targets, alpha=0.25, gamma=1.5, delta=0.1, box_weight=50.0,
                label_smoothing=0.0, pos_iou=0.5, neg_iou=0.5, ignore_ioa=0.5):
    """EfficientDet loss: focal loss on classes + Huber on encoded box offsets.

    outputs: the model's raw list (level l: [B, A, 4 + C, H_l, W_l]) or flat [B, N, 4 + C];
    priors: models.Priors for anchors_mode "efficientdet"; targets: dict(boxes [B, M, 4] xyxy
    px, labels [B, M] int64 (-1 ignore), valid [B, M] bool), on the outputs' device or on the CPU.
    Returns dict(cls, box, total) of scalar tensors; total = cls + box_weight * box.
    cls: focal loss summed over classes and non-ignored anchors / number of positives.
    box: Huber(delta) between raw offsets and encode_boxes(assigned box) at positives, summed /
    (4 x number of positives), i.e. a mean per coordinate as EfficientDet does; its box_weight
    of 50 is tuned for that scale (delta = 0.1 and box_weight = 50 are EfficientDet's).
    """
    raw_box, cls, _ = _split_outputs(outputs, extra=0)
    _check_priors(raw_box, priors)
    gt_boxes, gt_labels, gt_valid = _targets_on(targets, cls.device)
    # Assignment from anchors and boxes only (see assign_max_iou): no prediction enters it.
    a = assign_max_iou(priors.boxes, gt_boxes, gt_labels, gt_valid, pos_iou, neg_iou, ignore_ioa)
    num_pos = _num_positives(a.positive)

    # Class targets: one-hot of the assigned box's label at positives, all zeros at negatives;
    # ignored anchors are weighted out entirely.
    # (A scatter into a float tensor, not F.one_hot: that would be int64 [B, N, C], 0.5 GB for
    # 16 images of EfficientDet-D0's 49104 anchors x 90 classes.)
    labels = gt_labels.gather(1, a.gt_index.clamp(min=0)).clamp(min=0)     # [B, N]
    cls_target = torch.zeros_like(cls).scatter_(2, labels.unsqueeze(-1),
                                                a.positive.unsqueeze(-1).to(cls.dtype))
    focal = sigmoid_focal_loss(cls, cls_target, alpha, gamma, label_smoothing)
    cls_loss = _sum_at(focal, ~a.ignored) / num_pos

    # Box targets everywhere (an anchor's own box where it is not positive, which encodes to 0),
    # summed at the positives only: no count of them needed (see the top of the file).
    with torch.no_grad():
        box_target = encode_boxes(_matched_boxes(gt_boxes, a, priors.boxes), priors, "efficientdet")
    huber = F.huber_loss(raw_box, box_target, reduction="none", delta=delta)               # [B, N, 4]
    box_loss = _sum_at(huber, a.positive) / (4 * num_pos)
    return {"cls": cls_loss, "box": box_loss, "total": cls_loss + box_weight * box_loss}


def anchor_free_loss(outputs, priors, targets, use_l1=False, iou_kind="iou", label_smoothing=0.0,
                     box_weight=5.0, cls_weight=1.0, obj_weight=1.0, l1_weight=1.0):
    """YOLOX loss on SimOTA's assignment.

    outputs: the model's raw list (level l: [B, 1, 4 + C + 1, H_l, W_l]) or flat
    [B, N, 4 + C + 1]; priors: models.Priors for "anchor_free"; targets as in anchor_loss.
    Returns dict(box, obj, cls, l1, total) of scalar tensors, each divided by the number of
    positives; total = box_weight * box + obj_weight * obj + cls_weight * cls + l1_weight * l1.
    box: 1 - IoU^2 of decoded prediction vs assigned box at positives (YOLOX's IoU loss; iou_kind
      "giou" / "ciou": 1 - GIoU / 1 - CIoU, which also pull boxes that do not overlap at all),
      weighted by box_weight 5 (YOLOX's reg_weight).
    obj: BCE over every prior (target 1 at positives, 0 elsewhere), except priors in ignore
      regions that no box took.
    cls: BCE at positives against one-hot x IoU(prediction, box), so class confidence learns to
      track localisation quality (YOLOX's target); label_smoothing pulls the one-hot to 0.5.
    l1: |raw - encode_boxes(box)| at positives; 0 unless use_l1 (YOLOX turns it on for the
      last epochs without mosaic, to refine the boxes).
    Images without boxes contribute only to obj.
    """
    if iou_kind not in ("iou", "giou", "ciou"):
        raise ValueError(f"assign.anchor_free_loss: iou_kind={iou_kind!r} is unknown; "
                         f"use 'iou', 'giou' or 'ciou'")
    raw_box, cls, obj = _split_outputs(outputs, extra=1)
    _check_priors(raw_box, priors)
    obj = obj[..., 0]
    gt_boxes, gt_labels, gt_valid = _targets_on(targets, cls.device)
    pred_boxes = decode_boxes(raw_box, priors, "anchor_free")              # [B, N, 4] xyxy px

    # Assignment under no_grad, on detached predictions: targets must not move with the
    # weights (see simota_assign for why: the class target below is scaled by a.iou).
    with torch.no_grad():
        a = simota_assign(pred_boxes.detach(), cls.detach(), obj.detach(), priors.centers, priors.strides,
                          gt_boxes, gt_labels, gt_valid)
        gt_matched = _matched_boxes(gt_boxes, a, priors.boxes)            # [B, N, 4]
        labels = gt_labels.gather(1, a.gt_index.clamp(min=0)).clamp(min=0)  # [B, N]
        onehot = torch.zeros_like(cls).scatter_(2, labels.unsqueeze(-1), 1.0)
        if label_smoothing > 0:
            onehot = onehot * (1 - label_smoothing) + 0.5 * label_smoothing
        cls_target = onehot * a.iou.unsqueeze(-1)                         # [B, N, C]
    num_pos = _num_positives(a.positive)
    pos = a.positive                                                       # [B, N]

    # The box, class and L1 terms are computed at every prior and summed at the positives only
    # (see the top of the file). The IoU at a non-positive compares the prior's own box with
    # itself, so it is defined whatever that prior predicted.
    iou = box_iou(torch.where(pos.unsqueeze(-1), pred_boxes, gt_matched), gt_matched, aligned=True,
                  kind=iou_kind)                                           # [B, N]
    box_loss = _sum_at((1 - iou ** 2) if iou_kind == "iou" else (1 - iou), pos) / num_pos

    obj_bce = F.binary_cross_entropy_with_logits(obj, pos.to(obj.dtype), reduction="none")
    obj_loss = _sum_at(obj_bce, ~a.ignored) / num_pos

    cls_bce = F.binary_cross_entropy_with_logits(cls, cls_target, reduction="none")  # [B, N, C]
    cls_loss = _sum_at(cls_bce, pos) / num_pos

    if use_l1:
        with torch.no_grad():
            l1_target = encode_boxes(gt_matched, priors, "anchor_free")
        l1_loss = _sum_at((raw_box - l1_target).abs(), pos) / num_pos
    else:
        l1_loss = raw_box.new_zeros(())
    total = box_weight * box_loss + obj_weight * obj_loss + cls_weight * cls_loss + l1_weight * l1_loss
    return {"box": box_loss, "obj": obj_loss, "cls": cls_loss, "l1": l1_loss, "total": total}


def detection_loss(outputs, priors, targets, anchors_mode, use_l1=False):
    """The loss train.py calls: anchor_loss for "efficientdet", anchor_free_loss for "anchor_free".

    outputs: the model's raw list; priors: models.make_priors(...) for the same anchors_mode;
    targets: dict(boxes [B, M, 4] xyxy px, labels [B, M] (-1 ignore), valid [B, M]), on the
    outputs' device or on the CPU (train.py's choice: see the top of the file).
    Returns a dict of named scalar loss parts with "total" (the one to backpropagate).
    """
    if anchors_mode == "efficientdet":
        return anchor_loss(outputs, priors, targets)
    if anchors_mode == "anchor_free":
        return anchor_free_loss(outputs, priors, targets, use_l1=use_l1)
    raise ValueError(f"assign.detection_loss: anchors_mode={anchors_mode!r} is unknown; "
                     f"use 'efficientdet' or 'anchor_free'")
