"""Tests for assign.py: box IoU, both assigners on hand-made grids, the loss values against
hand computation, the stop-gradient around the assignment, and a tiny detector that overfits.

Expected values are worked out in the comments beside each case (pencil-and-paper numbers,
not outputs of the code under test).
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import assign  # noqa: E402
import models  # noqa: E402
from assign import assign_max_iou, box_ioa, box_iou, simota_assign  # noqa: E402


def targets(boxes, labels, valid=None):
    """Padded targets from nested lists: boxes [B][M][4], labels [B][M]."""
    boxes = torch.tensor(boxes, dtype=torch.float32)
    labels = torch.tensor(labels, dtype=torch.int64)
    valid = labels > -2 if valid is None else torch.tensor(valid)
    return boxes, labels, valid


def grid_priors(size, stride):
    """One level of grid-point priors (row-major): centers [N, 2], strides [N], cells [N, 4]."""
    n = size // stride
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    centers = torch.stack([(xs + 0.5) * stride, (ys + 0.5) * stride], -1).reshape(-1, 2).float()
    strides = torch.full((n * n,), float(stride))
    return centers, strides, torch.cat([centers - stride / 2, centers + stride / 2], -1)


# ---------------------------------------------------------------------------------------------
# Box geometry
# ---------------------------------------------------------------------------------------------

def test_box_iou_giou_ciou_by_hand():
    a = torch.tensor([[0., 0., 2., 2.]])
    b = torch.tensor([[1., 1., 3., 3.], [0., 0., 2., 2.], [5., 5., 6., 6.]])
    # [0,2]^2 vs [1,3]^2: intersection 1, union 4 + 4 - 1 = 7.
    iou = box_iou(a, b)
    assert iou.shape == (1, 3)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 1.0, 0.0]]), atol=1e-6)
    # GIoU: enclosing box [0,3]^2 = 9, so 1/7 - (9 - 7)/9.
    giou = box_iou(a, b[:1], aligned=True, kind="giou")
    assert math.isclose(float(giou), 1 / 7 - 2 / 9, abs_tol=1e-6)
    # CIoU: centres (1,1) and (2,2): squared distance 2 over squared diagonal 9 + 9; same aspect.
    ciou = box_iou(a, b[:1], aligned=True, kind="ciou")
    assert math.isclose(float(ciou), 1 / 7 - 2 / 18, abs_tol=1e-6)
    # Batched pairwise: [B, N, 4] x [B, M, 4] -> [B, N, M].
    assert box_iou(a.expand(2, 1, 4), b.expand(2, 3, 4)).shape == (2, 1, 3)
    # IoA: the share of a inside b; [0,2]^2 is a quarter inside [1,3]^2.
    assert torch.allclose(box_ioa(a, b[:1]), torch.tensor([[0.25]]))
    with pytest.raises(ValueError, match="kind"):
        box_iou(a, b, kind="diou")


# ---------------------------------------------------------------------------------------------
# Max-IoU (anchors)
# ---------------------------------------------------------------------------------------------

def test_max_iou_thresholds_forced_best_and_crowd():
    anchors = torch.tensor([
        [0, 0, 10, 10],        # 0: IoU 1 with box 0                       -> positive
        [0, 0, 10, 12],        # 1: 100 / 120 = 0.83                        -> positive
        [0, 0, 10, 22],        # 2: 100 / 220 = 0.45, below 0.5             -> negative (0.4 band: ignored)
        [0, 0, 10, 30],        # 3: 100 / 300 = 0.33                        -> negative
        [50, 50, 60, 60],      # 4: matches only the padding slot           -> negative
        [100, 100, 120, 120],  # 5: 400 / 1600 = 0.25 with box 1, its best  -> forced positive
        [100, 100, 110, 110],  # 6: 100 / 1600 = 0.06                       -> negative
        [210, 210, 230, 230],  # 7: fully inside the crowd region (IoA 1)   -> ignored
        [290, 290, 310, 310],  # 8: a quarter inside the crowd (IoA 0.25)   -> negative
    ], dtype=torch.float32)
    boxes, labels, valid = targets(
        [[[0, 0, 10, 10], [100, 100, 140, 140], [200, 200, 300, 300], [50, 50, 60, 60]],
         [[0, 0, 0, 0]] * 4],
        [[3, 1, -1, 2], [0, 0, 0, 0]],
        [[True, True, True, False], [False] * 4])
    a = assign_max_iou(anchors, boxes, labels, valid)
    assert a.positive[0].tolist() == [True, True, False, False, False, True, False, False, False]
    assert a.ignored[0].tolist() == [False, False, False, False, False, False, False, True, False]
    assert a.gt_index[0].tolist() == [0, 0, -1, -1, -1, 1, -1, -1, -1]
    assert math.isclose(float(a.iou[0, 1]), 100 / 120, rel_tol=1e-5)
    assert math.isclose(float(a.iou[0, 5]), 0.25, rel_tol=1e-5)
    # RetinaNet's band: anchor 2 (IoU 0.45) is ignored instead; nothing else changes.
    band = assign_max_iou(anchors, boxes, labels, valid, neg_iou=0.4)
    assert band.ignored[0].tolist() == [False, False, True, False, False, False, False, True, False]
    assert torch.equal(band.positive, a.positive) and torch.equal(band.gt_index, a.gt_index)
    # The second image holds only padding: everything is background.
    assert not a.positive[1].any() and not a.ignored[1].any()
    assert (a.gt_index[1] == -1).all()


def test_max_iou_forced_anchor_shared_by_two_boxes():
    # Both boxes have anchor 0 as their best (anchor 1 overlaps neither); it goes to the one it
    # overlaps more: box 1 (IoU 200 / 400 = 0.5) over box 0 (100 / 400 = 0.25).
    anchors = torch.tensor([[0, 0, 20, 20], [30, 0, 40, 10]], dtype=torch.float32)
    boxes, labels, valid = targets([[[0, 0, 10, 10], [0, 0, 20, 10]]], [[0, 1]])
    a = assign_max_iou(anchors, boxes, labels, valid)
    assert a.positive[0].tolist() == [True, False]
    assert a.gt_index[0].tolist() == [1, -1]


def test_max_iou_forced_anchor_reports_the_iou_of_its_own_box():
    # Anchor 1 [0,12]^2 is box A's best (IoU 24 / 168 = 0.143; anchor 0 misses A) but overlaps
    # box B [0,10]^2 more (100 / 144 = 0.694). B keeps anchor 0 (IoU 1), so anchor 1 is forced
    # onto A, and its iou is A's 0.143, the box it learns, not B's 0.694.
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 12, 12]], dtype=torch.float32)
    boxes, labels, valid = targets([[[0, 0, 10, 10], [10, 0, 14, 12]]], [[0, 1]])
    a = assign_max_iou(anchors, boxes, labels, valid)
    assert a.gt_index[0].tolist() == [0, 1]
    assert a.iou[0].tolist() == pytest.approx([1.0, 24 / 168], rel=1e-5)


def test_simota_leaves_out_empty_boxes():
    # A zero-width box [5, 5, 5, 15] (class 0) next to a real one: no prior learns it (its centre
    # region would otherwise hand it priors at the 1e5 penalty). Max-IoU needs no such rule: an
    # empty box has IoU 0 with every anchor.
    boxes, labels, valid = targets([[[5, 5, 5, 15], [20, 20, 30, 30]]], [[0, 1]])
    centers, strides, _ = grid_priors(32, 8)
    N = centers.shape[0]
    pred = torch.tensor(FAR).repeat(1, N, 1)
    s = simota_assign(pred, torch.zeros(1, N, 2), None, centers, strides, boxes, labels, valid)
    assert set(s.gt_index[0][s.positive[0]].tolist()) == {1} and not s.ignored.any()


def test_max_iou_no_boxes_at_all():
    anchors = torch.tensor([[0, 0, 10, 10]], dtype=torch.float32)
    a = assign_max_iou(anchors, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long),
                       torch.zeros(2, 0, dtype=torch.bool))
    assert a.positive.shape == (2, 1) and not a.positive.any() and (a.gt_index == -1).all()


# ---------------------------------------------------------------------------------------------
# SimOTA (anchor-free)
# ---------------------------------------------------------------------------------------------

FAR = [1000.0, 1000.0, 1001.0, 1001.0]   # a prediction overlapping nothing


def test_simota_dynamic_k_takes_the_cheapest():
    # 64 x 64 image, stride 8: an 8 x 8 grid with centres 4, 12, ..., 60.
    centers, strides, _ = grid_priors(64, 8)
    N = centers.shape[0]
    # Box [8, 40]^2 (area 1024, class 0). Its 16 inner priors (centres 12..36) are inside both
    # the box and its centre region (|d| < 2.5 * 8 = 20 from (24, 24)).
    boxes, labels, valid = targets([[[8, 8, 40, 40]]], [[0]])
    pred = torch.tensor(FAR).repeat(1, N, 1)
    at = lambda x, y: (y - 4) // 8 * 8 + (x - 4) // 8     # noqa: E731  prior index of a centre
    pred[0, at(20, 20)] = torch.tensor([8, 8, 40, 40])    # IoU 1
    pred[0, at(28, 28)] = torch.tensor([8, 8, 40, 40])    # IoU 1
    pred[0, at(12, 12)] = torch.tensor([8, 8, 40, 27.2])  # IoU 32 * 19.2 / 1024 = 0.6
    pred[0, at(36, 36)] = torch.tensor([8, 8, 40, 24])    # IoU 0.5
    # Top-10 IoUs sum to 1 + 1 + 0.6 + 0.5 = 3.1 -> k = 3: the three cheapest (highest IoU,
    # the class cost being equal everywhere) are positive, the 0.5 one is not.
    a = simota_assign(pred, torch.zeros(1, N, 2), torch.zeros(1, N), centers, strides, boxes, labels, valid)
    assert sorted(a.positive[0].nonzero().flatten().tolist()) == sorted([at(20, 20), at(28, 28), at(12, 12)])
    assert (a.gt_index[0][a.positive[0]] == 0).all() and (a.gt_index[0][~a.positive[0]] == -1).all()
    assert math.isclose(float(a.iou[0, at(12, 12)]), 0.6, rel_tol=1e-4)


def test_simota_prefers_priors_inside_both_regions():
    # A tall box [0, 64] x [24, 40]: centre (32, 32), radius 20. Prior (4, 28) is inside the box
    # but outside the centre region (|dx| = 28): it pays the 1e5 outside cost, so even with a
    # perfect prediction it loses to prior (28, 28) predicting IoU 0.5 only (k = 1: 1 + 0.5).
    centers, strides, _ = grid_priors(64, 8)
    N = centers.shape[0]
    boxes, labels, valid = targets([[[0, 24, 64, 40]]], [[1]])
    pred = torch.tensor(FAR).repeat(1, N, 1)
    pred[0, 3 * 8 + 0] = torch.tensor([0, 24, 64, 40])    # centre (4, 28): IoU 1, outside
    pred[0, 3 * 8 + 3] = torch.tensor([0, 24, 32, 40])    # centre (28, 28): IoU 0.5, inside both
    a = simota_assign(pred, torch.zeros(1, N, 2), None, centers, strides, boxes, labels, valid)
    assert a.positive[0].nonzero().flatten().tolist() == [3 * 8 + 3]


def test_simota_class_cost_is_the_bce_of_sqrt_cls_times_obj():
    # One prior predicting [0,8]^2, two boxes both want it: A = [0,8]^2 (class 0, IoU 1) and
    # B = [0,8]x[0,16.4] (class 1, IoU 64 / 131.2 = 0.4878). cost_A - cost_B = logit(p_1) -
    # logit(p_0) - 3 ln(1 / 0.4878), i.e. class part - 2.154, with p_c = sqrt(sigmoid(cls_c) x
    # sigmoid(obj)) and class logits (-2, 2):
    #   obj 0: p = (0.2441, 0.6636), class part 1.810 -> A is cheaper (-0.34);
    #   obj 3: p = (0.3370, 0.9160), class part 3.066 -> B is cheaper (+0.91).
    # (Without the sqrt, obj 0 would give 2.519 and hand the prior to B; without obj, both the same.)
    centers, strides = torch.tensor([[4.0, 4.0]]), torch.tensor([8.0])
    boxes, labels, valid = targets([[[0, 0, 8, 8], [0, 0, 8, 16.4]]], [[0, 1]])
    for obj, owner in ((0.0, 0), (3.0, 1)):
        a = simota_assign(torch.tensor([[[0.0, 0.0, 8.0, 8.0]]]), torch.tensor([[[-2.0, 2.0]]]),
                          torch.tensor([[obj]]), centers, strides, boxes, labels, valid)
        assert a.positive.tolist() == [[True]] and a.gt_index.tolist() == [[owner]], obj


@pytest.mark.parametrize("cls_prior_logits, owner", [((0.0, 0.0), 0), ((-10.0, 10.0), 1)])
def test_simota_conflict_goes_to_the_cheapest_box(cls_prior_logits, owner):
    # Two boxes, class 0 [8, 40]^2 and class 1 [16, 48]^2; only prior P (centre (28, 28), inside
    # both) predicts something: exactly box 0, so IoU 1 with box 0 and 576 / 1472 = 0.39 with
    # box 1. Each box has k = 1 (1 and floor(0.39) -> 1) and both take P (every other prior
    # costs 3 * -log(1e-8) = 55 more). P goes to the cheaper pair:
    #  * equal class logits: both class costs are equal, IoU cost 0 vs 3 * -log(0.39) = 2.8 -> box 0;
    #  * logits (-10, 10), objectness 0.5: p = sqrt(sigmoid(l) * 0.5) = (0.0047, 0.707);
    #    class cost box 0 = -log 0.0047 - log(1 - 0.707) = 6.58, box 1 = -log(1 - 0.0047)
    #    - log 0.707 = 0.35, plus 2.8 = 3.17 -> box 1. Box 0 then keeps no prior (as in YOLOX).
    centers, strides, _ = grid_priors(64, 8)
    N = centers.shape[0]
    P = 3 * 8 + 3
    boxes, labels, valid = targets([[[8, 8, 40, 40], [16, 16, 48, 48]]], [[0, 1]])
    pred = torch.tensor(FAR).repeat(1, N, 1)
    pred[0, P] = torch.tensor([8, 8, 40, 40])
    cls = torch.zeros(1, N, 2)
    cls[0, P] = torch.tensor(cls_prior_logits)
    a = simota_assign(pred, cls, torch.zeros(1, N), centers, strides, boxes, labels, valid)
    assert a.positive[0].nonzero().flatten().tolist() == [P]
    assert int(a.gt_index[0, P]) == owner


def test_simota_crowd_region_and_padding():
    centers, strides, _ = grid_priors(64, 8)
    N = centers.shape[0]
    # Image 0: a real box (class 0) and a crowd region [40, 64] x [0, 24] whose 3 x 3 priors
    # (centres 44, 52, 60 by 4, 12, 20) are ignored; a padded slot that must never match.
    # Image 1: padding only -> no positives, nothing ignored.
    boxes, labels, valid = targets(
        [[[8, 8, 40, 40], [40, 0, 64, 24], [0, 0, 64, 64]], [[0, 0, 64, 64]] * 3],
        [[0, -1, 0], [0, 0, 0]],
        [[True, True, False], [False] * 3])
    pred = torch.tensor([8.0, 8.0, 40.0, 40.0]).repeat(2, N, 1)   # every prior predicts box 0
    a = simota_assign(pred, torch.zeros(2, N, 2), torch.zeros(2, N), centers, strides, boxes, labels, valid)
    crowd = sorted((y - 4) // 8 * 8 + (x - 4) // 8 for x in (44, 52, 60) for y in (4, 12, 20))
    assert sorted(a.ignored[0].nonzero().flatten().tolist()) == crowd
    assert set(a.gt_index[0].unique().tolist()) == {-1, 0}           # never the crowd or the padding
    # k = 10 here (ten IoUs of 1): the positives all sit inside box 0.
    assert int(a.positive[0].sum()) == 10
    assert not a.positive[1].any() and not a.ignored[1].any()


def test_simota_batched_equals_one_image_at_a_time():
    # The batch dimension is only bookkeeping: each image alone gives the same answer.
    g = torch.Generator().manual_seed(0)
    centers, strides, _ = grid_priors(128, 16)
    N, C = centers.shape[0], 5
    wh = torch.rand(3, 6, 2, generator=g) * 60 + 8
    xy = torch.rand(3, 6, 2, generator=g) * (128 - wh)
    boxes = torch.cat([xy, xy + wh], -1)
    labels = torch.randint(-1, C, (3, 6), generator=g)
    valid = torch.rand(3, 6, generator=g) > 0.3
    c = centers + torch.randn(3, N, 2, generator=g) * 8
    s = torch.rand(3, N, 2, generator=g) * 50 + 4
    pred = torch.cat([c - s / 2, c + s / 2], -1)
    cls, obj = torch.randn(3, N, C, generator=g), torch.randn(3, N, generator=g)
    full = simota_assign(pred, cls, obj, centers, strides, boxes, labels, valid)
    for b in range(3):
        one = simota_assign(pred[b:b + 1], cls[b:b + 1], obj[b:b + 1], centers, strides,
                            boxes[b:b + 1], labels[b:b + 1], valid[b:b + 1])
        for field in ("positive", "ignored", "gt_index", "iou"):
            assert torch.equal(getattr(full, field)[b], getattr(one, field)[0]), field


# ---------------------------------------------------------------------------------------------
# Losses against hand computation
# ---------------------------------------------------------------------------------------------

def _bce(logit, target):
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def _focal(logit, target, alpha=0.25, gamma=1.5):
    p = 1 / (1 + math.exp(-logit))
    p_t = p if target == 1 else 1 - p
    return (alpha if target == 1 else 1 - alpha) * (1 - p_t) ** gamma * _bce(logit, target)


def _huber(x, delta=0.1):
    return 0.5 * x * x if abs(x) <= delta else delta * (abs(x) - 0.5 * delta)


def test_ciou_gradient_treats_the_aspect_weight_as_a_constant():
    # As in the CIoU paper, alpha = v / (1 - IoU + v) is a weight, not a path for the gradient.
    # Written out here with alpha detached, for a prediction [1, 2, 7, 5] against [0, 0, 6, 8].
    pred = torch.tensor([1.0, 2.0, 7.0, 5.0], dtype=torch.float64, requires_grad=True)
    gt = torch.tensor([0.0, 0.0, 6.0, 8.0], dtype=torch.float64)
    grad = torch.autograd.grad(box_iou(pred, gt, aligned=True, kind="ciou"), pred)[0]

    ref = pred.detach().clone().requires_grad_(True)
    inter = (torch.minimum(ref[2], gt[2]) - torch.maximum(ref[0], gt[0])) * (torch.minimum(ref[3], gt[3]) - torch.maximum(ref[1], gt[1]))
    union = (ref[2] - ref[0]) * (ref[3] - ref[1]) + 48 - inter
    iou = inter / union
    diag2 = (torch.maximum(ref[2], gt[2]) - torch.minimum(ref[0], gt[0])) ** 2 + \
        (torch.maximum(ref[3], gt[3]) - torch.minimum(ref[1], gt[1])) ** 2
    centre2 = ((ref[0] + ref[2]) / 2 - 3) ** 2 + ((ref[1] + ref[3]) / 2 - 4) ** 2
    v = 4 / math.pi ** 2 * (math.atan(6 / 8) - torch.atan((ref[2] - ref[0]) / (ref[3] - ref[1]))) ** 2
    alpha = (v / (1 - iou + v)).detach()
    expected = torch.autograd.grad(iou - centre2 / diag2 - alpha * v, ref)[0]
    assert torch.allclose(grad, expected, atol=1e-6)


def test_focal_label_smoothing_softens_only_the_bce_target():
    # Smoothing 0.2 moves the BCE targets to 0.9 / 0.1; alpha and (1 - p_t)^gamma still use the
    # hard 1 / 0 (the modulating factor measures how wrong the prediction is, not the target).
    logits, hard = torch.tensor([0.7, -0.3]), torch.tensor([1.0, 0.0])
    out = assign.sigmoid_focal_loss(logits, hard, label_smoothing=0.2)
    p = 1 / (1 + math.exp(-0.7)), 1 / (1 + math.exp(0.3))
    expected = [0.25 * (1 - p[0]) ** 1.5 * _bce(0.7, 0.9), 0.75 * p[1] ** 1.5 * _bce(-0.3, 0.1)]
    assert torch.allclose(out, torch.tensor(expected), rtol=1e-5)


def _anchor_loss_case():
    """Three anchors, two classes. Anchor 0 [0,10]^2 vs box [0,10]x[0,12] (class 1): IoU 0.83 ->
    positive; anchor 1 far away -> negative; anchor 2 [0,10]x[0,26]: IoU 120 / 260 = 0.46 ->
    negative by default, ignored with RetinaNet's neg_iou=0.4 (then its large class loss must
    not count). Box target of anchor 0: centre (5, 6) vs (5, 5), size (10, 12) vs (10, 10):
    (0, 0.1, 0, log 1.2). Returns raw, priors, targets."""
    anchors = torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 26]], dtype=torch.float32)
    priors = models.Priors((anchors[:, :2] + anchors[:, 2:]) / 2, torch.full((3,), 8.0), anchors)
    raw = torch.tensor([[[0.05, 0.0, 0.0, 0.3, 0.5, -1.0],
                         [0.0, 0.0, 0.0, 0.0, -2.0, 1.0],
                         [0.0, 0.0, 0.0, 0.0, 3.0, 3.0]]])
    boxes, labels, valid = targets([[[0, 0, 10, 12]]], [[1]])
    return raw, priors, dict(boxes=boxes, labels=labels, valid=valid)


def test_anchor_loss_by_hand():
    raw, priors, tgt = _anchor_loss_case()
    out = assign.anchor_loss(raw, priors, tgt, neg_iou=0.4)  # anchor 2 ignored
    cls = _focal(0.5, 0) + _focal(-1.0, 1) + _focal(-2.0, 0) + _focal(1.0, 0)
    box = (_huber(0.05) + _huber(0.0 - 0.1) + _huber(0.0) + _huber(0.3 - math.log(1.2))) / 4
    assert math.isclose(float(out["cls"]), cls, rel_tol=1e-5)
    assert math.isclose(float(out["box"]), box, rel_tol=1e-4)
    assert math.isclose(float(out["total"]), cls + 50 * box, rel_tol=1e-4)
    # effdet's rule (the default): anchor 2 is background, its two classes at logit 3 count.
    default = assign.anchor_loss(raw, priors, tgt)
    assert math.isclose(float(default["cls"]), cls + 2 * _focal(3.0, 0), rel_tol=1e-5)
    assert math.isclose(float(default["box"]), box, rel_tol=1e-4)
    # The same numbers through the model's list-of-levels layout [B, A, 4 + C, H, W].
    levels = [raw.permute(0, 2, 1).reshape(1, 1, 6, 1, 3)]
    assert math.isclose(float(assign.anchor_loss(levels, priors, tgt, neg_iou=0.4)["total"]), cls + 50 * box,
                        rel_tol=1e-4)


def test_anchor_loss_two_boxes_by_hand():
    # Two boxes of different classes, one positive anchor each (IoU 100 / 120 = 0.83), two
    # negatives: each positive takes its own box's class and offsets, and both parts are divided
    # by the 2 positives. A: [0,10]x[0,12] class 1 on anchor 0 -> (0, 0.1, 0, log 1.2);
    # B: [50,62]x[50,60] class 0 on anchor 1 (centre (55, 55)) -> (0.1, 0, log 1.2, 0).
    anchors = torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110], [200, 200, 210, 210]],
                           dtype=torch.float32)
    priors = models.Priors((anchors[:, :2] + anchors[:, 2:]) / 2, torch.full((4,), 8.0), anchors)
    raw = torch.tensor([[[0.05, 0.0, 0.0, 0.3, 0.5, -1.0],
                         [0.1, -0.2, 0.4, 0.0, 0.7, 0.2],
                         [0.0, 0.0, 0.0, 0.0, -2.0, 1.0],
                         [0.0, 0.0, 0.0, 0.0, 0.3, -0.3]]])
    boxes, labels, valid = targets([[[0, 0, 10, 12], [50, 50, 62, 60]]], [[1, 0]])
    out = assign.anchor_loss(raw, priors, dict(boxes=boxes, labels=labels, valid=valid))
    cls = (_focal(0.5, 0) + _focal(-1.0, 1) + _focal(0.7, 1) + _focal(0.2, 0)
           + _focal(-2.0, 0) + _focal(1.0, 0) + _focal(0.3, 0) + _focal(-0.3, 0)) / 2
    box = (_huber(0.05) + _huber(-0.1) + _huber(0.0) + _huber(0.3 - math.log(1.2))
           + _huber(0.0) + _huber(-0.2) + _huber(0.4 - math.log(1.2)) + _huber(0.0)) / (4 * 2)
    assert math.isclose(float(out["cls"]), cls, rel_tol=1e-5)
    assert math.isclose(float(out["box"]), box, rel_tol=1e-4)
    # A crowd region over box A (IoA of anchor 0 in it: 1): anchor 0 stays positive, not ignored,
    # and the crowd is never a target: the same numbers.
    boxes, labels, valid = targets([[[0, 0, 10, 12], [50, 50, 62, 60], [0, 0, 10, 12]]], [[1, 0, -1]])
    crowd = assign.anchor_loss(raw, priors, dict(boxes=boxes, labels=labels, valid=valid))
    assert math.isclose(float(crowd["cls"]), cls, rel_tol=1e-5) and math.isclose(float(crowd["box"]), box, rel_tol=1e-4)


def _anchor_free_case():
    """2 x 2 grid at stride 8 (centres 4 and 12), one box [0, 16]^2 of class 1, two classes.
    Prior 0 predicts [0,16] x [0,12] (IoU 0.75), the others [0, 8]^2 (IoU 0.25 each):
    k = floor(0.75 + 3 * 0.25) = 1 and prior 0 is the cheapest -> the one positive."""
    centers, strides, cells = grid_priors(16, 8)
    priors = models.Priors(centers, strides, cells)
    # Raw (tx, ty, tw, th): centre = prior + t * 8, size = exp(t) * 8.
    box = torch.tensor([[0.5, 0.25, math.log(2), math.log(1.5)],     # (8, 6), 16 x 12
                        [-1.0, 0.0, 0.0, 0.0],                        # (4, 4), 8 x 8
                        [0.0, -1.0, 0.0, 0.0],
                        [-1.0, -1.0, 0.0, 0.0]])
    cls = torch.tensor([[0.3, -0.4], [0.1, 0.2], [-0.5, 0.0], [0.0, 0.7]])
    obj = torch.tensor([[1.0], [-1.0], [0.5], [-2.0]])
    raw = torch.cat([box, cls, obj], -1)[None]
    boxes, labels, valid = targets([[[0, 0, 16, 16]]], [[1]])
    return raw, priors, dict(boxes=boxes, labels=labels, valid=valid)


def test_anchor_free_loss_by_hand():
    raw, priors, tgt = _anchor_free_case()
    out = assign.anchor_free_loss(raw, priors, tgt, use_l1=True)
    box = 1 - 0.75 ** 2
    obj = _bce(1.0, 1) + _bce(-1.0, 0) + _bce(0.5, 0) + _bce(-2.0, 0)
    cls = _bce(0.3, 0.0) + _bce(-0.4, 0.75)                 # one-hot of class 1 x IoU 0.75
    # L1 against encode([0,16]^2) at prior 0 = (0.5, 0.5, log 2, log 2).
    l1 = abs(0.25 - 0.5) + abs(math.log(1.5) - math.log(2))
    assert math.isclose(float(out["box"]), box, rel_tol=1e-5)
    assert math.isclose(float(out["obj"]), obj, rel_tol=1e-5)
    assert math.isclose(float(out["cls"]), cls, rel_tol=1e-5)
    assert math.isclose(float(out["l1"]), l1, rel_tol=1e-5)
    assert math.isclose(float(out["total"]), 5 * box + obj + cls + l1, rel_tol=1e-5)
    assert float(assign.anchor_free_loss(raw, priors, tgt)["l1"]) == 0.0       # off by default

    # GIoU: the prediction lies inside the box, so the enclosing box is the box: GIoU = IoU.
    giou = assign.anchor_free_loss(raw, priors, tgt, iou_kind="giou")["box"]
    assert math.isclose(float(giou), 1 - 0.75, rel_tol=1e-5)
    # CIoU: centres (8, 6) and (8, 8), enclosing diagonal^2 = 2 * 16^2; aspect 16/12 vs 1.
    v = 4 / math.pi ** 2 * (math.atan(1.0) - math.atan(16 / 12)) ** 2
    ciou = 0.75 - 4 / 512 - v / (1 - 0.75 + v) * v
    out = assign.anchor_free_loss(raw, priors, tgt, iou_kind="ciou")["box"]
    assert math.isclose(float(out), 1 - ciou, rel_tol=1e-5)


def test_anchor_free_crowd_region_mutes_objectness_of_the_priors_no_box_took():
    # A crowd region over the whole 16 x 16 image: prior 0 is still the box's positive (and keeps
    # its objectness term); priors 1-3 sit in the crowd with no box: no objectness loss there.
    raw, priors, tgt = _anchor_free_case()
    boxes, labels, valid = targets([[[0, 0, 16, 16], [0, 0, 16, 16]]], [[1, -1]])
    out = assign.anchor_free_loss(raw, priors, dict(boxes=boxes, labels=labels, valid=valid))
    plain = assign.anchor_free_loss(raw, priors, tgt)
    assert math.isclose(float(out["obj"]), _bce(1.0, 1), rel_tol=1e-5)
    assert math.isclose(float(out["box"]), float(plain["box"]), rel_tol=1e-6)
    assert math.isclose(float(out["cls"]), float(plain["cls"]), rel_tol=1e-6)


def test_anchor_free_loss_without_boxes_is_objectness_only():
    raw, priors, tgt = _anchor_free_case()
    tgt = dict(tgt, valid=torch.zeros(1, 1, dtype=torch.bool))
    out = assign.anchor_free_loss(raw, priors, tgt, use_l1=True)
    obj = _bce(1.0, 0) + _bce(-1.0, 0) + _bce(0.5, 0) + _bce(-2.0, 0)    # divided by max(0, 1)
    assert float(out["box"]) == 0 and float(out["cls"]) == 0 and float(out["l1"]) == 0
    assert math.isclose(float(out["total"]), obj, rel_tol=1e-5)


def test_detection_loss_dispatch_and_errors():
    raw, priors, tgt = _anchor_free_case()
    assert set(assign.detection_loss(raw, priors, tgt, "anchor_free")) == {"box", "obj", "cls", "l1", "total"}
    with pytest.raises(ValueError, match="anchors_mode"):
        assign.detection_loss(raw, priors, tgt, "yolo")
    with pytest.raises(ValueError, match="priors"):
        assign.anchor_free_loss(raw[:, :3], priors, tgt)


def test_positives_are_averaged_over_ddp_ranks(monkeypatch):
    # Under DDP every loss is divided by the mean number of positives over the ranks. A stand-in
    # for a 2-process group: the other rank has 3 positives, so the all-reduce adds 3.
    import torch.distributed as dist
    raw, priors, tgt = _anchor_free_case()
    alone = assign.anchor_free_loss(raw, priors, tgt)["total"]
    seen = []

    def all_reduce(t):
        seen.append(float(t))
        t.add_(3.0)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    grouped = assign.anchor_free_loss(raw, priors, tgt)["total"]
    n = seen[0]                                    # this rank's positives
    assert n >= 1 and len(seen) == 1
    torch.testing.assert_close(grouped, alone * n / ((n + 3) / 2))


# ---------------------------------------------------------------------------------------------
# No gradient through the assignment
# ---------------------------------------------------------------------------------------------

def test_assignment_carries_no_gradient(monkeypatch):
    raw, priors, tgt = _anchor_free_case()
    raw = raw.clone().requires_grad_(True)
    pred = models.decode_boxes(raw[..., :4], priors, "anchor_free")
    a = simota_assign(pred, raw[..., 4:6], raw[..., 6], priors.centers, priors.strides,
                      tgt["boxes"], tgt["labels"], tgt["valid"])
    assert not any(t.requires_grad for t in a)
    fixed = assign_max_iou(priors.boxes, tgt["boxes"], tgt["labels"], tgt["valid"])
    assert not any(t.requires_grad for t in fixed)

    # The gradient of the loss equals the gradient with the assignment frozen as a constant:
    # nothing flows back through the choice of positives or the IoU-scaled class target.
    grad = torch.autograd.grad(assign.anchor_free_loss(raw, priors, tgt, use_l1=True)["total"], raw)[0]
    frozen = simota_assign(pred.detach(), raw[..., 4:6].detach(), raw[..., 6].detach(), priors.centers,
                           priors.strides, tgt["boxes"], tgt["labels"], tgt["valid"])
    monkeypatch.setattr(assign, "simota_assign", lambda *args, **kwargs: frozen)
    grad_frozen = torch.autograd.grad(assign.anchor_free_loss(raw, priors, tgt, use_l1=True)["total"], raw)[0]
    assert torch.equal(grad, grad_frozen)
    # And the IoU target really is a constant: the class gradient at the positive is
    # sigmoid(logit) - target with target = 0.75 * one-hot, nothing more.
    expected = torch.sigmoid(torch.tensor([0.3, -0.4])) - torch.tensor([0.0, 0.75])
    assert torch.allclose(grad[0, 0, 4:6], expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# A tiny detector overfits four images
# ---------------------------------------------------------------------------------------------

def _four_images(size, num_classes):
    """Four images of flat coloured rectangles (colour = class) and their padded targets."""
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(4, 3, size, size)
    boxes, labels = torch.zeros(4, 3, 4), torch.full((4, 3), -1)
    valid = torch.zeros(4, 3, dtype=torch.bool)
    for b in range(4):
        for j in range(1 + b % 3):
            w, h = (int(v) for v in torch.randint(size // 4, 3 * size // 4, (2,), generator=g))
            x = int(torch.randint(0, size - w + 1, (1,), generator=g))
            y = int(torch.randint(0, size - h + 1, (1,), generator=g))
            c = int(torch.randint(0, num_classes, (1,), generator=g))
            images[b, c, y:y + h, x:x + w] = 1.0
            boxes[b, j] = torch.tensor([x, y, x + w, y + h], dtype=torch.float32)
            labels[b, j], valid[b, j] = c, True
    return images, dict(boxes=boxes, labels=labels, valid=valid)


@pytest.mark.parametrize("anchors_mode", ["anchor_free", "efficientdet"])
def test_tiny_detector_overfits(anchors_mode):
    size, steps = 64, 300
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # 64 px maps: thread hand-offs cost more than they save
    try:
        torch.manual_seed(0)
        model = models.build_model("yolox_nano", anchors_mode=anchors_mode, num_classes=3,
                                   input_shape=(size, size))
        priors = models.make_priors((size, size), model.strides, anchors_mode)
        images, tgt = _four_images(size, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        model.train()
        first = None
        for step in range(steps):
            losses = assign.detection_loss(model(images), priors, tgt, anchors_mode)
            opt.zero_grad()
            losses["total"].backward()
            opt.step()
            total = float(losses["total"].detach())
            first = total if first is None else first
            if total <= 0.1 * first:
                break
        assert total <= 0.1 * first, f"{anchors_mode}: loss {first:.3f} -> {total:.3f} after {step + 1} steps"
    finally:
        torch.set_num_threads(threads)


class _ValueReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records each op that hands a tensor's values to the CPU (on a GPU, a wait for its queue)."""
    READS = ("nonzero", "_local_scalar_dense", "masked_select", "is_nonzero", "equal", "_unique2", "unique_dim")

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if name in self.READS or bool_index:
            self.reads.append((name, tuple(args[0].shape), args[0].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["anchor_free", "efficientdet"])
def test_losses_read_nothing_back_but_the_valid_mask(mode):
    # On a GPU, every value the CPU reads makes it wait for the GPU's queue. The loss and its
    # backward may read one thing: the [B, M] valid mask, to count the boxes (train.py keeps
    # that mask on the CPU, so even that read costs nothing). A boolean-mask index (which needs
    # the number of positives), .item(), or F.one_hot's range check would show up here.
    torch.manual_seed(0)
    model = models.build_model("yolox_nano", anchors_mode=mode, num_classes=3, input_shape=(64, 64))
    priors = models.make_priors((64, 64), model.strides, model.anchors_mode, anchor_scale=model.anchor_scale)
    outputs = [o.float() for o in model(torch.rand(2, 3, 64, 64))]
    boxes, labels, valid = targets([[[4, 4, 30, 36], [20, 24, 60, 56], [0, 0, 0, 0]],
                                    [[2, 2, 20, 16], [0, 0, 0, 0], [0, 0, 0, 0]]],
                                   [[0, 2, -1], [1, -1, -1]], [[True, True, False], [True, False, False]])
    spy = _ValueReads()
    with spy:
        losses = assign.detection_loss(outputs, priors, dict(boxes=boxes, labels=labels, valid=valid), mode,
                                       use_l1=True)
        losses["total"].backward()
    assert spy.reads == [("nonzero", (2, 3), torch.bool)]
    assert all(torch.isfinite(v) for v in losses.values())


def test_an_inf_output_at_a_non_positive_prior_leaves_the_losses_finite():
    # The box, class and L1 terms are summed at the positives with a where: an inf predicted at a
    # prior no box took (bf16 overflow, say) must not turn into inf * 0 = NaN, in value or gradient.
    priors = models.make_priors((64, 64), (8, 16, 32), "anchor_free")
    n = priors.centers.shape[0]                      # 64 + 16 + 4 = 84 priors
    flat = torch.zeros(1, n, 4 + 2 + 1)              # [box 4 | 2 classes | obj]
    flat[0, -1, 4] = float("inf")                    # class logit of the bottom-right stride-32 prior
    flat[0, -1, 2] = float("inf")                    # and its raw log-width
    flat.requires_grad_(True)
    boxes, labels, valid = targets([[[4, 4, 20, 20]]], [[0]])   # top-left: far from that prior
    losses = assign.anchor_free_loss(flat, priors, dict(boxes=boxes, labels=labels, valid=valid), use_l1=True)
    for name in ("box", "cls", "l1"):
        assert math.isfinite(losses[name].item()), name
    (losses["box"] + losses["cls"] + losses["l1"]).backward()
    assert torch.isfinite(flat.grad).all()
    assert flat.grad[0, -1, :6].abs().sum() == 0     # that prior gets no gradient from these terms


@pytest.mark.parametrize("mode, channels", [("anchor_free", 4 + 2 + 1), ("efficientdet", 4 + 2)])
def test_a_batch_padded_to_no_box_slot_equals_one_with_only_padding(mode, channels):
    # Targets [B, 0, 4]: the gathers of the assigned boxes used to read slot 0 of an empty
    # dimension (an IndexError here, a device assert on a GPU). It is the all-background batch.
    priors = models.make_priors((64, 64), (8, 16, 32), mode)
    flat = torch.randn(2, priors.centers.shape[0], channels, generator=torch.Generator().manual_seed(0))
    empty = dict(boxes=torch.zeros(2, 0, 4), labels=torch.zeros(2, 0, dtype=torch.long),
                 valid=torch.zeros(2, 0, dtype=torch.bool))
    padding = dict(boxes=torch.zeros(2, 1, 4), labels=torch.full((2, 1), -1), valid=torch.zeros(2, 1, dtype=torch.bool))
    got, want = assign.detection_loss(flat, priors, empty, mode), assign.detection_loss(flat, priors, padding, mode)
    assert want["total"] > 0 and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("mode, channels", [("anchor_free", 4 + 2 + 1), ("efficientdet", 4 + 2)])
def test_losses_of_bf16_outputs_are_computed_in_float32(mode, channels):
    # Outputs handed over in bf16 (outside autocast, say): the losses upcast them first. In bf16
    # arithmetic the anchor-free objectness BCE of these logits came out 3.05 instead of 3.45.
    priors = models.make_priors((64, 64), (8, 16, 32), mode)
    flat = (torch.randn(2, priors.centers.shape[0], channels, generator=torch.Generator().manual_seed(0)) - 4.6)
    flat = flat.bfloat16()
    boxes, labels, valid = targets([[[4, 4, 30, 30]], [[20, 10, 60, 50]]], [[0], [1]])
    t = dict(boxes=boxes, labels=labels, valid=valid)
    got, want = assign.detection_loss(flat, priors, t, mode), assign.detection_loss(flat.float(), priors, t, mode)
    assert all(got[k].dtype == torch.float32 and torch.allclose(got[k], want[k], rtol=1e-6) for k in want)


def test_max_iou_thresholds_are_inclusive():
    # Box [0,10]^2 (class 0) and a crowd region [100,200]^2.
    anchors = torch.tensor([
        [0, 0, 10, 10],        # 0: IoU 1, the box's best anchor        -> positive (forced anyway)
        [0, 0, 10, 20],        # 1: IoU 100 / 200 = 0.5 exactly           -> positive (IoU >= 0.5)
        [0, 0, 10, 25],        # 2: IoU 100 / 250 = 0.4 exactly           -> ignored (band 0.4 <= IoU < 0.5)
        [0, 0, 10, 26],        # 3: IoU 100 / 260 = 0.385                 -> background
        [80, 100, 120, 140],   # 4: half inside the crowd (IoA 0.5 exactly) -> ignored
        [70, 100, 110, 140],   # 5: a quarter inside the crowd (IoA 0.25) -> background
    ], dtype=torch.float32)
    boxes, labels, valid = targets([[[0, 0, 10, 10], [100, 100, 200, 200]], [[0, 0, 0, 0]] * 2],
                                   [[0, -1], [0, 0]], [[True, True], [False, False]])
    a = assign_max_iou(anchors, boxes, labels, valid, neg_iou=0.4)
    assert a.positive[0].tolist() == [True, True, False, False, False, False]
    assert a.ignored[0].tolist() == [False, False, True, False, True, False]
    assert a.gt_index[0].tolist() == [0, 0, -1, -1, -1, -1]
    # The IoU behind the decision is never below 0: a crowd never matches (its IoU is masked
    # to -1 inside) and an image with no box at all has nothing to match (-inf inside).
    assert a.iou[0].tolist() == pytest.approx([1.0, 0.5, 0.4, 100 / 260, 0.0, 0.0], abs=1e-6)
    assert a.iou[1].tolist() == [0.0] * 6


def test_simota_crowd_covers_priors_strictly_inside_only():
    # Crowd region [4, 20]^2 on the 8-px grid (centres 4, 12, 20, ...): centres 4 and 20 lie on
    # its edges, so only the prior at (12, 12) (index 9) is inside it and ignored. A real box
    # far away keeps the assignment going.
    centers, strides, _ = grid_priors(64, 8)
    N = centers.shape[0]
    boxes, labels, valid = targets([[[40, 40, 64, 64], [4, 4, 20, 20]]], [[0, -1]])
    pred = torch.tensor(FAR).repeat(1, N, 1)
    a = simota_assign(pred, torch.zeros(1, N, 1), torch.zeros(1, N), centers, strides, boxes, labels, valid)
    assert a.ignored[0].nonzero().flatten().tolist() == [9]


def test_simota_centre_region_boundary_is_outside():
    # Wide box [0, 48] x [24, 40], centre (24, 32), centre radius 2.5 x 8 = 20. Prior (4, 28)
    # (index 24) is in the box with |dx| = 20 exactly: outside the centre region, so it pays the
    # outside cost and its perfect prediction (IoU 1) loses to prior (28, 28) (index 27), inside
    # both and predicting IoU 0.5. k = floor(1 + 0.5) = 1.
    centers, strides, _ = grid_priors(64, 8)
    N = centers.shape[0]
    boxes, labels, valid = targets([[[0, 24, 48, 40]]], [[0]])
    pred = torch.tensor(FAR).repeat(1, N, 1)
    pred[0, 24] = torch.tensor([0, 24, 48, 40])
    pred[0, 27] = torch.tensor([0, 24, 24, 40])
    a = simota_assign(pred, torch.zeros(1, N, 1), None, centers, strides, boxes, labels, valid)
    assert a.positive[0].nonzero().flatten().tolist() == [27]
    assert float(a.iou[0, 27]) == pytest.approx(0.5, rel=1e-5)


def test_anchor_free_label_smoothing_pulls_the_one_hot_to_half():
    # Smoothing 0.2: one-hot (0, 1) -> (0.1, 0.9), then x IoU 0.75 -> (0.075, 0.675).
    raw, priors, tgt = _anchor_free_case()
    out = assign.anchor_free_loss(raw, priors, tgt, label_smoothing=0.2)
    assert float(out["cls"]) == pytest.approx(_bce(0.3, 0.075) + _bce(-0.4, 0.675), rel=1e-5)


def test_anchor_loss_label_smoothing_by_hand():
    # BCE targets 1 -> 0.9 and 0 -> 0.1; alpha and the modulating factor keep the hard 0 / 1.
    raw, priors, tgt = _anchor_loss_case()
    out = assign.anchor_loss(raw, priors, tgt, label_smoothing=0.2)

    def focal(logit, target):
        p = 1 / (1 + math.exp(-logit))
        p_t = p if target == 1 else 1 - p
        return (0.25 if target == 1 else 0.75) * (1 - p_t) ** 1.5 * _bce(logit, 0.9 if target == 1 else 0.1)
    cls = focal(0.5, 0) + focal(-1.0, 1) + focal(-2.0, 0) + focal(1.0, 0) + 2 * focal(3.0, 0)  # anchor 2: background
    assert float(out["cls"]) == pytest.approx(cls, rel=1e-5)
    assert float(assign.anchor_loss(raw, priors, tgt)["cls"]) == pytest.approx(
        _focal(0.5, 0) + _focal(-1.0, 1) + _focal(-2.0, 0) + _focal(1.0, 0) + 2 * _focal(3.0, 0), rel=1e-5)


def test_anchor_box_loss_ignores_offsets_at_background_anchors():
    # Large raw offsets at the background anchor 1 and the ignored anchor 2 change nothing: the
    # Huber term is summed at the positive anchor 0 only (target (0, 0.1, 0, log 1.2)).
    raw, priors, tgt = _anchor_loss_case()
    raw = raw.clone()
    raw[0, 1, :4] = torch.tensor([0.7, -0.5, 1.0, 2.0])
    raw[0, 2, :4] = torch.tensor([-0.3, 0.4, 0.2, -1.0])
    box = (_huber(0.05) + _huber(-0.1) + _huber(0.0) + _huber(0.3 - math.log(1.2))) / 4
    assert float(assign.anchor_loss(raw, priors, tgt)["box"]) == pytest.approx(box, rel=1e-4)
