"""eval.py: from raw model outputs to COCO AP, plus the `python eval.py` command line.

Where this file sits in the flow
--------------------------------
    model -> raw outputs -> decode_predictions -> batched_nms -> boxes_to_original (undo the
    letterbox) -> COCO results json -> evaluate_coco_results (pycocotools) -> the 12 numbers

The model returns raw logits and raw box offsets in training and in evaluation alike (see
models.py); everything that turns them into detections lives here, in reading order:

1. decode_predictions: box offsets + priors -> xyxy pixels of the letterboxed input;
   class logits (x objectness for anchor-free heads) -> scores in 0..1.
2. batched_nms: the NMS with the knobs that moved EfficientDet-D0 from 0.326 to 0.343 AP
   (score threshold 0.001, gaussian soft-NMS, per_class mode, top-k 5000 before NMS).
   On CUDA tensors the greedy part runs as the hand-written kernel in nms_kernels.cu (through
   cupy, imported only then); on the CPU the same algorithm runs in plain vectorized torch.
3. eval_letterbox (data.letterbox, optionally centred) and boxes_to_original: its `matrices` map
   output pixels back to the original image, so boxes are scored in the pixels the ground truth
   is written in; then clip_boxes puts them inside the image (the last of the 0.343 knobs, on by
   default), and detections_to_coco writes them as COCO [x, y, w, h] with category ids.
4. evaluate_coco_results: pycocotools over EVERY image of the split: an image without any
   detection still counts (dropping those, as keras_cv_attention_models did, inflates AP).
5. run_coco_evaluation: the whole loop over a dataset, the call train.py makes every epoch.
6. load_model / predict / main: checkpoints, pictures of predictions, the CLI.

What COCO AP rewards, and so why those knobs help: for each class and each IoU threshold
0.50, 0.55, ..., 0.95, the detections are ranked by score and AP is the area under the
precision-recall curve; the 12 numbers average that (AP), take it at one threshold (AP50,
AP75) or by object size, and AR is the share of objects found at all. A low-score detection
ranked below the good ones can only add recall, never take precision from those above it:
hence the score threshold of 0.001 rather than a "confident" 0.3. Soft-NMS lowers the score of
a box overlapping a better one instead of deleting it, so the second person in a crowd
survives, further down the ranking. Per-class NMS stops a box of one class from suppressing
another class's. COCO's rule is 100 detections per image, so the NMS keeps the best 100 of
each image (pycocotools alone would not hold a file to it: its maxDets cuts at 100 per image
AND class, so a file with more per image can score higher than the rule allows). "The seed"
in comments is keras_cv_attention_models (kecam), whose COCO README this project reimplements.

    python eval.py --nms gaussian         # runs/train/best.pt, on the val split of its training data
    python eval.py -m runs/yolox_s/last.pt -d /data/coco --nms gaussian --nms_mode per_class
    python eval.py -m efficientdet_d0.pth -d instances_val2017.json   # effdet's weights, on COCO
    python eval.py -m yolox_s.pth -d instances_val2017.json --nms hard --nms_iou_or_sigma 0.65 \
        --nms_topk 0 --nms_score_threshold 0.01   # Megvii's weights, post-processed as Megvii's eval does
    python eval.py --results results.json -d instances_val2017.json --stats_json stats.json
    python eval.py predict -m runs/yolox_s/last.pt img1.jpg img2.jpg -o predictions/
"""
import argparse
import collections
import contextlib
import functools
import glob
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data import (IMAGE_EXTENSIONS, PAD_VALUE, DataLoadError, batches, check_coco_json, decode_image,
                  default_workers, draw_label, is_key, letterbox, make_loader, open_dataset, plain_warnings,
                  show_batch_sample)
from models import (COCO_CLASSES, PRESETS, PUBLISHED, build_model, check_input_shape, coco_category_ids, decode_boxes,
                    flatten_outputs, named_settings, parse_input_shape, published_kind, published_preset,
                    read_checkpoint, unwrap_state_dict)

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_PATH = os.path.join(HERE, "nms_kernels.cu")

# The 12 numbers of COCOeval.summarize(), in its order (the keys of --stats_json).
STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
NMS_METHODS = ("hard", "gaussian", "linear")  # index = the method code of nms_kernels.cu
NMS_THREADS = 256  # threads per block: compiled into the kernel (-DNMS_THREADS), and each launch uses as many
NMS_MODES = ("global", "per_class")
# What -m means when it is left out: the best checkpoint of train.py's default run folder (--out
# runs/train), relative to where the command runs, as train.py's --out is.
DEFAULT_CHECKPOINT = os.path.join("runs", "train", "best.pt")


class EvalInputError(ValueError):
    """Bad input from the user (a file, a flag): the CLI prints the message without a traceback."""


# ---------------------------------------------------------------------------------------------
# 1. Decode
# ---------------------------------------------------------------------------------------------
def decode_predictions(outputs, priors, anchors_mode):
    """Raw head outputs -> boxes and per-class scores.

    outputs: the model's list of L levels [B, A, 4 + C + O, H_l, W_l], or the flattened
        [B, N, 4 + C + O] (models.flatten_outputs); channel order [box 4 | class C | obj O],
        O = 1 for anchors_mode "anchor_free" (YOLOX has objectness), else 0.
    priors: models.Priors for the input shape, N rows in the same (level, y, x, anchor) order.
    Returns boxes [B, N, 4] xyxy pixels of the model input, scores [B, N, C] float32 in 0..1,
        score = sigmoid(class) * sigmoid(objectness) where there is objectness.
    """
    flat = flatten_outputs(outputs) if isinstance(outputs, (list, tuple)) else outputs
    flat = flat.float()  # AMP outputs come in half precision; NMS and AP want float32
    has_objectness = anchors_mode == "anchor_free"
    num_classes = flat.shape[-1] - 4 - int(has_objectness)
    boxes = decode_boxes(flat[..., :4], priors, anchors_mode)
    scores = flat[..., 4:4 + num_classes].sigmoid()
    if has_objectness:
        scores = scores * flat[..., 4 + num_classes:].sigmoid()
    return boxes, scores


# ---------------------------------------------------------------------------------------------
# 2. NMS
# ---------------------------------------------------------------------------------------------
# The algorithm, defined once for the kernel and the CPU twin alike:
#   candidates: the (prior, class) pairs with score >= score_threshold;
#   topk > 0:   keep the topk best pairs of each image (ties: lower prior, then lower class);
#   topk == 0:  keep only the best class of each prior (then the threshold); topk == -1: all;
#   groups:     mode "global" -> one group per image (classes suppress each other),
#               mode "per_class" -> one group per (image, class);
#   greedy, inside every group: pick the best alive score, record it, decay the others by their
#               IoU with the pick (hard: drop IoU > thr; gaussian: score *= exp(-IoU^2 / sigma);
#               linear: score *= 1 - IoU where IoU > thr), drop scores below score_threshold;
#               at most max_output_size picks per group;
#   merge:      per image, the best max_output_size picks over all its groups.
# Ties anywhere go to the lower index, so the kernel and the twin pick the same boxes.
# sigma is the paper's (Bodla et al. 2017) and effdet's: exp(-IoU^2 / sigma). TensorFlow's
# soft_nms_sigma is another parameterisation, exp(-0.5 IoU^2 / sigma_tf), so sigma here is
# 2 x sigma_tf: automl's sigma_tf = 0.5 is sigma 1.0 here. keras_cv_attention_models' eval hands
# TensorFlow its iou_or_sigma / 2, so its sigma means ours, and the seed's 0.5 is the default here.


def _box_iou_one_to_many(box, boxes, areas):
    """IoU of one box per group with every box of that group.

    box [G, 4] xyxy, boxes [G, K, 4] xyxy, areas [G, K] -> [G, K]. The operations are in the
    order of box_iou in nms_kernels.cu, so both sides compute the same float32 value.
    """
    x1, y1, x2, y2 = (box[:, i:i + 1] for i in range(4))  # each [G, 1]
    iw = (torch.minimum(x2, boxes[..., 2]) - torch.maximum(x1, boxes[..., 0])).clamp(min=0)
    ih = (torch.minimum(y2, boxes[..., 3]) - torch.maximum(y1, boxes[..., 1])).clamp(min=0)
    inter = iw * ih
    union = (x2 - x1) * (y2 - y1) + areas - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))


def _greedy_nms_torch(scores, boxes, method, iou_or_sigma, score_threshold, max_output_size):
    """The greedy part of NMS for all groups at once, in torch (the twin of nms_greedy_kernel).

    scores [G, K] float32 (-inf = padding), boxes [G, K, 4] xyxy.
    Returns keep_pos [G, max_output_size] int64 (position in the group, -1 = none) and
    keep_score [G, max_output_size] float32 (the score when picked, 0 = none).

    Why a Python loop remains: pick i + 1 depends on the scores that pick i decayed, so the
    picks of one group are sequential by nature. Everything else is a tensor op over all groups
    (all images and classes) together, so the loop runs at most max_output_size times, however
    many images, classes and candidates there are.
    """
    neg_inf = torch.tensor(float("-inf"), device=scores.device)
    s = torch.where(scores >= score_threshold, scores, neg_inf)  # a fresh tensor: safe to write
    num_groups, k = s.shape
    keep_pos = torch.full((num_groups, max_output_size), -1, dtype=torch.long, device=s.device)
    keep_score = torch.zeros((num_groups, max_output_size), dtype=s.dtype, device=s.device)
    rows = torch.arange(num_groups, device=s.device)
    areas = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # [G, K]
    for step in range(min(max_output_size, k)):
        pos = s.argmax(dim=1)                     # [G] the first maximum: ties -> lower position
        best = s[rows, pos]                       # [G]
        alive = best > neg_inf                    # groups that still have a candidate
        if not bool(alive.any()):
            break
        keep_pos[:, step] = torch.where(alive, pos, -1)
        keep_score[:, step] = torch.where(alive, best, torch.zeros_like(best))
        s[rows, pos] = neg_inf                    # the pick leaves the pool
        iou = _box_iou_one_to_many(boxes[rows, pos], boxes, areas)  # [G, K]
        if method == "hard":
            decayed = torch.where(iou > iou_or_sigma, neg_inf, s)
        elif method == "gaussian":
            decayed = s * torch.exp(-(iou * iou) / iou_or_sigma)
        else:  # linear
            decayed = torch.where(iou > iou_or_sigma, s * (1.0 - iou), s)
        # Dead slots stay -inf (never multiply -inf by a factor that may be 0).
        s = torch.where((s > neg_inf) & (decayed >= score_threshold), decayed, neg_inf)
    return keep_pos, keep_score


@functools.lru_cache(maxsize=None)
def _nms_cuda_function(device_index):
    """Compile nms_kernels.cu with NVRTC once per device (cupy caches the binary on disk too)."""
    import cupy  # only here: CPU machines never need cupy

    with open(KERNEL_PATH) as f:
        source = f.read()
    with cupy.cuda.Device(device_index):
        # --fmad=false: no fused multiply-add, so IoU rounds exactly like the CPU twin.
        module = cupy.RawModule(code=source, options=("--fmad=false", f"-DNMS_THREADS={NMS_THREADS}"))
        return module.get_function("nms_greedy_kernel")


def _greedy_nms_cuda(scores, boxes, method, iou_or_sigma, score_threshold, max_output_size):
    """The greedy part on a CUDA device: one launch of nms_greedy_kernel, one block per group.

    Same arguments and results as _greedy_nms_torch (keep_pos comes back as int64).
    """
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError("NMS on CUDA tensors needs cupy: pip install cupy-cuda12x "
                           "(or move the tensors to the CPU to use the torch twin)") from e
    device = scores.device
    work = scores.detach().float().contiguous().clone()  # the kernel overwrites its scores
    boxes = boxes.detach().float().contiguous()
    num_groups, k = work.shape
    keep_pos = torch.empty((num_groups, max_output_size), dtype=torch.int32, device=device)
    keep_score = torch.empty((num_groups, max_output_size), dtype=torch.float32, device=device)
    function = _nms_cuda_function(device.index)
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
        function((num_groups,), (NMS_THREADS,),
                 (cupy.asarray(work), cupy.asarray(boxes), cupy.asarray(keep_pos),
                  cupy.asarray(keep_score), np.int32(k), np.int32(max_output_size),
                  np.float32(score_threshold), np.float32(iou_or_sigma),
                  np.int32(NMS_METHODS.index(method))))
    return keep_pos.long(), keep_score


def _select_candidates(scores, score_threshold, topk):
    """The (prior, class) pairs that enter NMS.

    scores [B, N, C] -> image, prior, label, score: four [M] tensors, ordered by image, then by
    score descending (ties: lower prior, then lower class).
    """
    b, n, c = scores.shape
    # A NaN score (overflowed outputs) never enters NMS. Left in, topk ranks NaN above every
    # number, so `kth` (below) is NaN and `flat >= kth` drops every pair of that image.
    scores = scores.nan_to_num(nan=-1.0)
    if topk == 0:  # one class per prior: its best
        flat, best_label = scores.max(dim=2)            # [B, N]
    else:
        flat = scores.reshape(b, n * c)                  # pair index = prior * C + class
    keep = flat >= score_threshold
    if 0 < topk < flat.shape[1]:
        # A cheap pre-cut: torch.topk finds each image's k-th best score; only pairs at or above
        # it can be among the top k. (Which of several tied pairs wins is settled by the stable
        # sort below, not by topk, whose order among ties is unspecified.)
        kth = flat.topk(topk, dim=1, sorted=False).values.amin(dim=1, keepdim=True)  # [B, 1]
        keep &= flat >= kth
    image, index = keep.nonzero(as_tuple=True)
    score = flat[image, index]
    # Rank inside each image: sort by score (stable keeps the lower index first on a tie), then
    # stably by image, so each image's pairs stay in score order.
    order = torch.sort(score, descending=True, stable=True).indices
    order = order[torch.sort(image[order], stable=True).indices]
    image, index, score = image[order], index[order], score[order]
    if topk > 0:
        per_image = torch.bincount(image, minlength=b)
        start = torch.cumsum(per_image, 0) - per_image
        rank = torch.arange(len(image), device=image.device) - start[image]
        keep = rank < topk
        image, index, score = image[keep], index[keep], score[keep]
    if topk == 0:
        prior, label = index, best_label[image, index]
    else:
        prior, label = index // c, index % c
    return image, prior, label, score


def batched_nms(boxes, scores, method="gaussian", mode="per_class", iou_or_sigma=0.5,
                score_threshold=0.001, topk=5000, max_output_size=100, use_kernel=None):
    """Hard or soft NMS over a batch, global or per class (the algorithm is described above).

    boxes [B, N, 4] xyxy (one box per prior, shared by its classes), scores [B, N, C] in 0..1.
    method: "hard" | "gaussian" | "linear"; mode: "global" | "per_class";
    iou_or_sigma: the IoU threshold for hard / linear, sigma for gaussian;
    topk: pairs kept per image before NMS (-1 all, 0 the best class of each prior);
    use_kernel: None = the CUDA kernel on CUDA tensors, the torch twin otherwise; False forces
        the twin (for benchmarks and tests on a GPU); True requires CUDA tensors.
    Returns boxes [B, max_output_size, 4], scores [B, max_output_size], labels [B, max_output_size]
        int64 (-1 = empty slot) and counts [B] int64; each image's detections come first, best first.
    """
    if method not in NMS_METHODS:
        raise ValueError(f"NMS method {method!r}: choose one of {', '.join(NMS_METHODS)}")
    if mode not in NMS_MODES:
        raise ValueError(f"NMS mode {mode!r}: choose one of {', '.join(NMS_MODES)}")
    if method == "gaussian" and not iou_or_sigma > 0:
        raise ValueError(f"gaussian NMS needs sigma > 0 (--nms_iou_or_sigma), got {iou_or_sigma}")
    if max_output_size < 1 or topk < -1:
        raise ValueError(f"max_output_size must be >= 1 and topk >= -1, got {max_output_size}, {topk}")
    if boxes.dim() != 3 or scores.dim() != 3 or boxes.shape[:2] != scores.shape[:2] or boxes.shape[2] != 4:
        raise ValueError(f"batched_nms wants boxes [B, N, 4] and scores [B, N, C], got "
                         f"{tuple(boxes.shape)} and {tuple(scores.shape)}")
    if use_kernel is None:
        use_kernel = boxes.is_cuda
    if use_kernel and not boxes.is_cuda:
        raise ValueError("use_kernel=True needs CUDA tensors")
    b, _, c = scores.shape
    device = boxes.device
    boxes, scores = boxes.float(), scores.float()
    out_boxes = torch.zeros((b, max_output_size, 4), dtype=torch.float32, device=device)
    out_scores = torch.zeros((b, max_output_size), dtype=torch.float32, device=device)
    out_labels = torch.full((b, max_output_size), -1, dtype=torch.long, device=device)

    # Candidates, then groups: one group per image (global) or per (image, class) (per_class).
    image, prior, label, score = _select_candidates(scores, score_threshold, topk)
    if len(image) == 0:
        return out_boxes, out_scores, out_labels, torch.zeros(b, dtype=torch.long, device=device)
    group_key = image if mode == "global" else image * c + label
    order = torch.sort(group_key, stable=True).indices      # keeps the score order in a group
    _, group, sizes = torch.unique_consecutive(group_key[order], return_inverse=True, return_counts=True)
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(len(order), device=device) - starts[group]  # position in the group
    num_groups, k = len(sizes), int(sizes.max())

    # Pad every group to K = the largest group's size: a [G, K] layout lets one tensor op (or one kernel block per
    # group) treat all groups at once. Padding has score -inf, which never gets picked.
    candidate = torch.full((num_groups, k), -1, dtype=torch.long, device=device)
    candidate[group, slot] = order
    pad_scores = torch.full((num_groups, k), float("-inf"), device=device)
    pad_scores[group, slot] = score[order]
    pad_boxes = torch.zeros((num_groups, k, 4), device=device)
    pad_boxes[group, slot] = boxes[image[order], prior[order]]

    greedy = _greedy_nms_cuda if use_kernel else _greedy_nms_torch
    keep_pos, keep_score = greedy(pad_scores, pad_boxes, method, float(iou_or_sigma),
                                  float(score_threshold), int(max_output_size))

    # Merge: the picks of all groups of an image, best first (ties: lower group, earlier pick).
    pick_group, pick_step = (keep_pos >= 0).nonzero(as_tuple=True)
    picked = candidate[pick_group, keep_pos[pick_group, pick_step]]  # index into the candidates
    pick_score = keep_score[pick_group, pick_step]
    pick_image = image[picked]
    order = torch.sort(pick_score, descending=True, stable=True).indices
    order = order[torch.sort(pick_image[order], stable=True).indices]
    picked, pick_score, pick_image = picked[order], pick_score[order], pick_image[order]
    per_image = torch.bincount(pick_image, minlength=b)
    rank = torch.arange(len(picked), device=device) - (torch.cumsum(per_image, 0) - per_image)[pick_image]
    keep = rank < max_output_size
    picked, img, rank = picked[keep], pick_image[keep], rank[keep]
    out_boxes[img, rank] = boxes[image[picked], prior[picked]]
    out_scores[img, rank] = pick_score[keep]
    out_labels[img, rank] = label[picked]
    return out_boxes, out_scores, out_labels, per_image.clamp(max=max_output_size)


# ---------------------------------------------------------------------------------------------
# 3. The eval letterbox and its undo
# ---------------------------------------------------------------------------------------------
def eval_letterbox(batch, input_shape, resize_method="bilinear", letterbox_pad=-1):
    """data.letterbox, optionally centred the way the seed's --letterbox_pad does it.

    batch: make_loader's dict; input_shape (H, W); resize_method: bilinear | bicubic | nearest.
    letterbox_pad -1: the aspect-preserving resize sits at the top-left (data.letterbox as is);
    letterbox_pad >= 0: resize into (H - pad, W - pad), then centre that picture in (H, W).
    Returns a dict whose images float32 [B, 3, H, W] 0..1 and matrices float32 [B, 2, 3] (output
    px -> original px) are the only keys to rely on (with letterbox_pad -1 it is data.letterbox's
    whole dict); the matrices account for the centring, so boxes_to_original needs nothing else.
    """
    h, w = int(input_shape[0]), int(input_shape[1])
    if letterbox_pad < 0:
        return letterbox(batch, (h, w), mode=resize_method)
    if letterbox_pad >= min(h, w):
        raise EvalInputError(f"--letterbox_pad {letterbox_pad} leaves no room in input {h}x{w}")
    inner = letterbox(batch, (h - letterbox_pad, w - letterbox_pad), mode=resize_method)
    m = inner["matrices"]  # [B, 2, 3]: original px per output px in m[:, 0, 0] and m[:, 1, 1]
    # The loader's `sizes` are of the decoded canvas, which a worker may have shrunk by `scales`;
    # the matrices map to original pixels, so the original size is the one to divide.
    original_hw = batch["sizes"].to(m) / batch["scales"].to(m).flip(-1)  # [B, 2] (h, w); scales are (x, y)
    # The picture's extent in output pixels, rounded up; the - 1e-3 keeps a float that lands a
    # hair above a whole number (100.00001) from rounding up to one pixel more.
    content_hw = torch.ceil(original_hw / torch.stack([m[:, 1, 1], m[:, 0, 0]], -1) - 1e-3).long()
    content_hw = torch.minimum(content_hw, torch.tensor([h - letterbox_pad, w - letterbox_pad], device=m.device))
    offset = torch.div(torch.tensor([h, w], device=m.device) - content_hw, 2, rounding_mode="floor")  # [B, 2] (y, x)
    images = torch.full((len(m), 3, h, w), PAD_VALUE / 255, device=inner["images"].device)
    for i, ((ch, cw), (oy, ox)) in enumerate(zip(content_hw.tolist(), offset.tolist())):
        images[i, :, oy:oy + ch, ox:ox + cw] = inner["images"][i, :, :ch, :cw]  # B small copies
    # original = A @ (p - offset) + t  ->  the translation becomes t - A @ offset
    shift = offset.flip(-1).to(m)[:, :, None]  # [B, 2, 1] (x, y)
    matrices = torch.cat([m[:, :, :2], m[:, :, 2:] - m[:, :, :2] @ shift], dim=-1)
    return dict(images=images, matrices=matrices)


def boxes_to_original(boxes, matrices):
    """Map boxes from model-input pixels to original-image pixels.

    boxes [B, K, 4] xyxy output px; matrices [B, 2, 3] (data.letterbox) mapping an output pixel
    coordinate (x, y, 1) to the original image. All four corners are mapped and the box around
    them is taken, so a flip or a rotation in the matrix would be handled too.
    Returns [B, K, 4] xyxy original px.
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    corners = torch.stack([torch.stack([x1, y1], -1), torch.stack([x2, y1], -1),
                           torch.stack([x1, y2], -1), torch.stack([x2, y2], -1)], dim=2)  # [B, K, 4, 2]
    m = matrices.to(boxes)
    mapped = corners @ m[:, None, :, :2].transpose(-1, -2) + m[:, None, None, :, 2]    # [B, K, 4, 2]
    return torch.cat([mapped.amin(dim=2), mapped.amax(dim=2)], dim=-1)


def clip_boxes(boxes, heights, widths):
    """Clip boxes [B, K, 4] xyxy to each image: heights, widths [B] in the same pixels."""
    limit = torch.stack([widths, heights, widths, heights], dim=-1).to(boxes)[:, None, :]  # [B, 1, 4]
    return torch.minimum(boxes.clamp(min=0), limit)


# ---------------------------------------------------------------------------------------------
# 3b. The COCO results json, and the file helpers that sections 4-6 share
# ---------------------------------------------------------------------------------------------
def detections_to_coco(boxes, scores, labels, count, image_id, cat_ids):
    """One image's detections -> COCO results dicts (bbox as [x, y, w, h] pixels).

    boxes [K, 4] xyxy original px, scores [K], labels [K] contiguous, count = valid rows.
    cat_ids maps a contiguous label to its COCO category id.
    Left out: boxes of zero area (a box lying wholly in the letterbox padding clips to a line:
    it can match no object) and boxes that are not finite (the model's outputs overflowed;
    run_coco_evaluation counts those and says so).
    """
    boxes, scores, labels = boxes[:count].tolist(), scores[:count].tolist(), labels[:count].tolist()
    return [{"image_id": int(image_id), "category_id": int(cat_ids[label]),
             "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
             "score": round(score, 6)}
            for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels)
            if all(map(math.isfinite, (x1, y1, x2, y2))) and x2 > x1 and y2 > y1]


def _progress(what, done, total, t0, last_line, every=10.0):
    """A line every `every` seconds, so a long run is not silent and a short one prints nothing.
    Returns the time of the last line."""
    now = time.time()
    if now - last_line < every:
        return last_line
    rate = done / max(now - t0, 1e-9)
    print(f"{what}: {done}/{total} images, {rate:.1f} img/s, eta {(total - done) / max(rate, 1e-9):.0f}s", flush=True)
    return now


def check_output_path(flag, path):
    """Refuse an output file that could not be written, before the work that fills it (an
    evaluation can take an hour): a folder given as the file, or a file where a folder must be."""
    if os.path.isdir(path):
        raise EvalInputError(f"{flag} {path} is a folder: give a file name like "
                             f"{os.path.join(path, flag.lstrip('-') + '.json')}")
    _check_can_make(flag, path, os.path.dirname(os.path.abspath(path)))  # the folders write_json_atomic makes


def check_output_folder(flag, path, what):
    """Refuse an output folder that could not be made or written, before any work: a file given
    as the folder, a file where one of its parent folders must be, or no write permission.
    what: what the folder is for, for the message ("the run", "the pictures")."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise EvalInputError(f"{flag} {path} is a file: give a folder for {what} (it is made if missing)")
    _check_can_make(flag, path, os.path.abspath(path))  # the folders os.makedirs makes


def _check_can_make(flag, path, folder):
    """`folder` (for the output `path` of `flag`) can be made and written: its nearest existing
    ancestor is a folder, not a file, and this user may write in it."""
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise EvalInputError(f"{flag} {path}: {folder} is a file, so no folder can be made there; give another path")
    if not os.access(folder, os.W_OK):
        raise EvalInputError(f"{flag} {path}: {folder} is not writable; give another path")


def read_json(path, flag):
    """json.load with one clear error naming the flag and file (not a folder, not UTF-8, not json)."""
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise EvalInputError(f"{flag} {path} {what}: give a json file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise EvalInputError(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start}); json files are "
                             f"UTF-8: re-save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{flag} {path}: not valid json ({e})") from None
    except OSError as e:
        raise EvalInputError(f"{flag} {path}: cannot be read ({e.strerror})") from None


def write_json_atomic(obj, path):
    """Write json to a temporary name beside `path`, then rename: no half-written files, and no
    temporary one left behind if the rename fails."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------
# 4. pycocotools
# ---------------------------------------------------------------------------------------------
def _quiet_coco(dataset):
    """A pycocotools COCO object from a dict, without its index-building chatter."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def check_results(results, coco_gt, source="results"):
    """Raise EvalInputError unless results is a list of {image_id, category_id, bbox [x, y, w, h]
    (finite, w and h >= 0), score (finite)} naming images and categories of coco_gt."""
    if not isinstance(results, list):
        raise EvalInputError(f"{source}: a COCO results file is a json list of detections "
                             f"(image_id, category_id, bbox, score), got {type(results).__name__}")
    image_ids = {im["id"] for im in coco_gt["images"]}
    cat_ids = {c["id"] for c in coco_gt["categories"]}
    not_dicts = [i for i, r in enumerate(results) if not isinstance(r, dict)]
    if not_dicts:
        raise EvalInputError(f"{source}: detection {not_dicts[0]} is not a json object "
                             f"{{image_id, category_id, bbox, score}} ({len(not_dicts)} such)")
    for key in ("image_id", "category_id", "bbox", "score"):
        missing = sum(1 for r in results if key not in r)
        if missing:
            raise EvalInputError(f"{source}: {missing} detections have no {key!r}")
    # pycocotools would fail deep inside on a short bbox, and a NaN would quietly sort somewhere.
    for i, r in enumerate(results):
        box, score = r["bbox"], r["score"]
        numbers = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if not numbers or not all(math.isfinite(v) for v in box) or not (
                isinstance(score, (int, float)) and math.isfinite(score)):
            raise EvalInputError(f"{source}: detection {i} has bbox {box} and score {score}: a bbox is 4 "
                                 f"finite numbers [x, y, w, h] in pixels and a score one finite number")
        # pycocotools gives such a box a negative area and then ignores it when unmatched: a false
        # positive that no longer counts, and the AP goes up. Usually the boxes are [x1, y1, x2, y2].
        if box[2] < 0 or box[3] < 0:
            raise EvalInputError(f"{source}: detection {i} has bbox {box}, a negative width or height: COCO boxes "
                                 f"are [x, y, w, h]; boxes as [x1, y1, x2, y2] need w = x2 - x1, h = y2 - y1")
    for key, known, what in (("image_id", image_ids, "image ids"), ("category_id", cat_ids, "category ids")):
        odd = next((r[key] for r in results if isinstance(r[key], bool) or not (isinstance(r[key], (int, str)) or (
            isinstance(r[key], float) and r[key].is_integer()))), None)  # 1.0 is id 1, as pycocotools reads it
        if odd is not None:
            raise EvalInputError(f"{source}: a detection has {key} {json.dumps(odd)[:40]}: ids are whole numbers "
                                 f"(or strings), as in the ground truth")
        unknown = sorted({r[key] for r in results} - known, key=str)  # str: ints and strings may mix
        if unknown:
            raise EvalInputError(
                f"{source}: {len(unknown)} {what} are not in the ground truth (e.g. {unknown[:5]}); "
                f"the results belong to another split or dataset, or their ids were not remapped")


def evaluate_coco_results(results, coco_gt, image_ids=None, class_names=None, verbose=True,
                          source="results"):
    """Score COCO detection results with pycocotools.

    results: list of {"image_id", "category_id", "bbox" [x, y, w, h] px, "score"};
    coco_gt: the ground truth dict (images, annotations, categories);
    image_ids: the images to evaluate, default every image of coco_gt: an image without any
        detection counts (its ground truth boxes are misses).
    class_names: {category id: name} for the per-class table (default: coco_gt's names).
    verbose: print the 12-line AP / AR block and a per-class AP table.
    Returns {"AP": ..., ..., "ARl": ...} (the keys of STAT_KEYS) as Python floats.
    """
    check_results(results, coco_gt, source)
    gt = _quiet_coco(coco_gt)
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes([dict(r) for r in results])  # loadRes adds keys: give it copies
    else:  # pycocotools cannot load an empty list: an empty results set scores 0
        dt = _quiet_coco({"images": coco_gt["images"], "categories": coco_gt["categories"],
                          "annotations": []})
    evaluator = COCOeval(gt, dt, "bbox")
    evaluator.params.imgIds = sorted(gt.getImgIds()) if image_ids is None else sorted(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    stats = {key: float(value) for key, value in zip(STAT_KEYS, evaluator.stats)}
    if verbose:
        print(summary.getvalue(), end="")
        print(format_per_class_table(evaluator, class_names))
    return stats


def per_class_ap(evaluator):
    """{category id: (AP, AP50)} from an accumulated COCOeval; -1 where a class has no ground truth.

    precision is [T iou thresholds, R recall points, K classes, A areas, M max dets];
    area "all" is index 0 and maxDets 100 the last index, as summarize() uses them.
    """
    precision = evaluator.eval["precision"]
    out = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = []
        for p in (precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]):  # all IoUs, IoU 0.5
            p = p[p > -1]
            values.append(float(p.mean()) if p.size else -1.0)
        out[cat_id] = tuple(values)
    return out


def format_per_class_table(evaluator, class_names=None):
    """The per-class AP table as text: one row per category id; "n/a" for a class with no ground
    truth in these images (pycocotools' -1, which would read as a score)."""
    names = {c["id"]: c["name"] for c in evaluator.cocoGt.dataset["categories"]}
    if class_names is not None:  # {category id: name} from the dataset
        names.update(class_names)

    def shown(value):
        return f"{value:>9.4f}" if value >= 0 else f"{'n/a':>9}"
    lines = [f"{'category':<24}{'id':>6}{'AP':>9}{'AP50':>9}"]
    for cat_id, (ap, ap50) in per_class_ap(evaluator).items():
        lines.append(f"{str(names.get(cat_id, cat_id))[:23]:<24}{cat_id:>6}{shown(ap)}{shown(ap50)}")
    return "\n".join(lines)


def load_ground_truth(data, split="val"):
    """The COCO ground-truth dict for a json file, a dataset folder, or a Dataset."""
    if not isinstance(data, str):
        return data.coco_gt()
    if not os.path.exists(data) and data != "shapes":
        raise EvalInputError(f"-d {data}: no such file or folder; give a COCO json, a COCO or YOLO "
                             f"dataset folder, or 'shapes'")
    if data.endswith(".json"):
        gt = read_json(data, "-d")
        check_coco_json(gt, data, need_files=False)  # a clear error for a broken entry; COCO's defaults
        return gt
    return open_dataset(data, split).coco_gt()


def _path_parts(name):
    """'./a\\b/x.jpg' -> ('a', 'b', 'x.jpg'): a file name's folders, however it was written."""
    return tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def remap_by_names(exported, coco_gt, source):
    """Detections another tool exported in COCO's dataset layout (a dict of images, categories
    and annotations with a score, under its own ids: 0-based, say) -> a results list under the
    ground truth's ids, matched by image file name and category name, the only keys two exports
    of the same data share. Raises EvalInputError naming what does not match."""
    if not all(isinstance(exported.get(k), list) for k in ("images", "categories", "annotations")):
        raise EvalInputError(f"{source}: a COCO results file is a json list of detections (image_id, category_id, "
                             f"bbox, score), or a dict of 'images', 'categories' and scored 'annotations'")
    # An image is found by its whole file_name, else by a name that ends the other's path:
    # "x.jpg" or "/data/coco/val/x.jpg" for "val/x.jpg" (an export may drop the folders, or
    # write them from its own root), never "train/x.jpg" for "val/x.jpg" (another split). A
    # name that fits several ground-truth images (a/x.jpg and b/x.jpg for "x.jpg") is an error:
    # it would pour both images' detections into one.
    gt_full = {str(im.get("file_name", "")): im["id"] for im in coco_gt["images"]}
    gt_base = collections.defaultdict(list)  # base name -> [(path parts, id)]
    for name, image_id in gt_full.items():
        gt_base[os.path.basename(name)].append((_path_parts(name), image_id))
    gt_cats = collections.defaultdict(list)
    for c in coco_gt["categories"]:
        gt_cats[str(c.get("name"))].append(c["id"])
    twice = sorted(name for name, ids in gt_cats.items() if len(ids) > 1)
    if twice:
        raise EvalInputError(f"{source}: the ground truth names {len(twice)} categories more than once (e.g. "
                             f"{twice[:3]}), so detections cannot be matched to them by name: give a results list "
                             f"with the ground truth's category ids")
    try:
        file_of = {im["id"]: str(im["file_name"]) for im in exported["images"]}
        name_of = {c["id"]: str(c["name"]) for c in exported["categories"]}
    except (KeyError, TypeError):
        raise EvalInputError(f"{source}: its images need 'id' and 'file_name', its categories 'id' and 'name', "
                             f"to be matched to the ground truth's") from None
    gt_image_of, unknown, ambiguous = {}, [], []
    for image_id, name in file_of.items():
        parts = _path_parts(name)
        ids = [gt_full[name]] if name in gt_full else [
            i for gt_parts, i in gt_base.get(os.path.basename(name), [])
            if gt_parts[-len(parts):] == parts or parts[-len(gt_parts):] == gt_parts]
        if len(ids) == 1:
            gt_image_of[image_id] = ids[0]
        else:
            (ambiguous if ids else unknown).append(name)
    unknown_cats = sorted(set(name_of.values()) - set(gt_cats))
    for what, names in (("file names", sorted(unknown)), ("category names", unknown_cats)):
        if names:
            raise EvalInputError(f"{source}: {len(names)} {what} are not in the ground truth (e.g. {names[:3]}): "
                                 f"the results belong to another split or dataset")
    if ambiguous:
        raise EvalInputError(f"{source}: {len(ambiguous)} file names (e.g. {sorted(ambiguous)[:3]}) match several "
                             f"ground-truth images in different folders: export the file names with their folders, "
                             f"as the ground truth has them")
    results = []
    for a in exported["annotations"]:
        if not isinstance(a, dict) or not is_key(a.get("image_id"), file_of) or not is_key(
                a.get("category_id"), name_of):
            raise EvalInputError(f"{source}: annotation {json.dumps(a)[:80]} names an image or category that its "
                                 f"own 'images' / 'categories' do not list")
        results.append(dict(a, image_id=gt_image_of[a["image_id"]], category_id=gt_cats[name_of[a["category_id"]]][0]))
    return results


def score_results_file(results_path, data, split="val", stats_json=None, verbose=True):
    """`python eval.py --results FILE -d GT`: score a COCO results json; returns the 12 numbers.
    FILE is a results list, or a dict in COCO's dataset layout with scored annotations, matched
    to the ground truth by file and category names (remap_by_names)."""
    results = read_json(results_path, "--results")
    coco_gt = load_ground_truth(data, split)
    if isinstance(results, dict):
        results = remap_by_names(results, coco_gt, results_path)
        print(f"--results {results_path}: {len(results)} detections matched to the ground truth by image file "
              f"name and category name")
    # pycocotools scores every image of the ground truth, so a file made on part of the split
    # scores low without a word: say how many images it covers.
    check_results(results, coco_gt, results_path)  # before reading image ids out of it
    covered, total = len({r["image_id"] for r in results}), len(coco_gt["images"])
    if covered < total:
        print(f"--results {results_path}: detections for {covered} of the ground truth's {total} images; the "
              f"other {total - covered} are scored as images where nothing was found (each object a miss). If the "
              f"file was made on part of the split, give -d a ground truth of that part")
    stats = evaluate_coco_results(results, coco_gt, verbose=verbose, source=results_path)
    if stats_json:
        write_json_atomic(stats, stats_json)
    return stats


# ---------------------------------------------------------------------------------------------
# 5. The evaluation loop
# ---------------------------------------------------------------------------------------------
def run_coco_evaluation(model, data, nms_score_threshold=0.001, nms="gaussian", nms_mode="per_class",
                        nms_topk=5000, batch_size=8, nms_iou_or_sigma=0.5, nms_max_output_size=100,
                        clip_bbox=True, input_shape=None, resize_method="bilinear", letterbox_pad=-1,
                        split="val", workers=0, results_path=None, stats_json=None,
                        verbose=True):
    """Evaluate `model` on every image of a split and return the 12 COCO numbers.

    model: a models.Detector (its device is used; its train/eval mode is restored afterwards);
    data: a Dataset from data.open_dataset, or a path / "shapes" opened with `split`;
    input_shape: (H, W) of the letterbox, default model.config["input_shape"];
    resize_method / letterbox_pad: how the image is resized and placed (see eval_letterbox);
    clip_bbox: clip the boxes to the image after undoing the letterbox (the seed's 0.343 recipe
    does; a box cannot extend past the picture it describes);
    results_path: also write the COCO results json there; stats_json: write the 12 numbers.
    Returns {"AP": ..., "AP50": ..., ..., "ARl": ...}.
    """
    if isinstance(data, str):
        if not os.path.exists(data) and data != "shapes":
            raise EvalInputError(f"-d {data}: no such file or folder; give a COCO json, a COCO or "
                                 f"YOLO dataset folder, or 'shapes'")
        dataset = open_dataset(data, split)
    else:
        dataset = data
    if input_shape is None:
        input_shape = tuple(model.config["input_shape"])
    input_shape = (int(input_shape[0]), int(input_shape[1]))
    device = next(model.parameters()).device
    priors = model.priors(input_shape, device=device)
    if model.num_classes != len(dataset.cat_ids):  # label k is read as dataset.cat_ids[k] below
        raise EvalInputError(f"the model predicts {model.num_classes} classes and {dataset.source} has "
                             f"{len(dataset.cat_ids)}: evaluate on the data the model was trained on")
    coco_gt = dataset.coco_gt()
    # From the records, which read a size missing from the json off the image file itself.
    image_sizes = {r["image_id"]: (r["height"], r["width"]) for r in dataset.records}
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, workers=workers, seed=0,
                         drop_last=False, pin_memory=device.type == "cuda")

    was_training = model.training
    model.eval()
    results = []
    done, t0 = 0, time.time()
    last_line = t0
    nonfinite = 0  # detections whose box is NaN / inf: left out (detections_to_coco), reported
    nan_scores = 0  # priors with a NaN score: never candidates (_select_candidates), reported
    try:
        with torch.inference_mode():
            for batch in batches(loader):  # an unreadable image: one DataLoadError line
                # Only the pixels go to the device; sizes and ids stay where the CPU reads them.
                batch["images"] = batch["images"].to(device, non_blocking=True)
                letterboxed = eval_letterbox(batch, input_shape, resize_method, letterbox_pad)
                boxes, scores = decode_predictions(model(letterboxed["images"]), priors, model.anchors_mode)
                nan_scores = nan_scores + torch.isnan(scores).any(-1).sum()  # read once, at the end
                boxes, scores, labels, counts = batched_nms(
                    boxes, scores, method=nms, mode=nms_mode, iou_or_sigma=nms_iou_or_sigma,
                    score_threshold=nms_score_threshold, topk=nms_topk, max_output_size=nms_max_output_size)
                boxes = boxes_to_original(boxes, letterboxed["matrices"])
                image_ids = batch["image_ids"].tolist()
                if clip_bbox:
                    # Clipping would turn an inf corner into the image's edge: such boxes stay NaN,
                    # so they are counted and left out like the NaN ones.
                    overflowed = ~torch.isfinite(boxes).all(-1, keepdim=True)
                    hw = torch.tensor([image_sizes[i] for i in image_ids], dtype=torch.float32, device=device)
                    boxes = clip_boxes(boxes, hw[:, 0], hw[:, 1]).masked_fill(overflowed, float("nan"))
                boxes, scores, labels, counts = boxes.cpu(), scores.cpu(), labels.cpu(), counts.tolist()
                nonfinite += sum(int((~torch.isfinite(boxes[i, :n]).all(-1)).sum()) for i, n in enumerate(counts))
                for i, image_id in enumerate(image_ids):
                    results += detections_to_coco(boxes[i], scores[i], labels[i], counts[i], image_id,
                                                  dataset.cat_ids)
                done += len(image_ids)
                last_line = _progress("evaluating", done, len(dataset), t0, last_line)
    finally:
        model.train(was_training)
    if nonfinite:
        print(f"warning: {nonfinite} detections had a NaN / inf box (the model's outputs overflowed) "
              f"and were left out of the evaluation", file=sys.stderr)
    if int(nan_scores):
        print(f"warning: {int(nan_scores)} priors had a NaN score (the model's outputs overflowed) and "
              f"were left out of the evaluation", file=sys.stderr)
    if results_path:
        write_json_atomic(results, results_path)
    stats = evaluate_coco_results(results, coco_gt, image_ids=dataset.image_ids,
                                  class_names=dict(zip(dataset.cat_ids, dataset.class_names)), verbose=verbose)
    if stats_json:
        write_json_atomic(stats, stats_json)
    return stats


# ---------------------------------------------------------------------------------------------
# 6. Checkpoints, pictures, command line
# ---------------------------------------------------------------------------------------------
def _check_preset_name(name):
    """-m that is not a file must be a preset name; a path is a checkpoint that is not there."""
    if os.sep in name or name.endswith((".pt", ".pth")):
        raise EvalInputError(f"-m {name}: no such checkpoint file")
    if name not in PRESETS:
        raise EvalInputError(f"-m {name}: neither a checkpoint file nor a preset ({', '.join(PRESETS)})")


def read_published_checkpoint(path):
    """(kind, state dict) of a published checkpoint file: "effdet" for an effdet EfficientDet (a
    plain state dict, as effdet publishes them, or a training checkpoint's EMA / plain one),
    "megvii" for a Megvii YOLOX ({"model": state dict, ...}); (None, None) for any other file.
    Every -m file passes through here first, so the file is mapped, not read: a plaindet
    checkpoint (with its optimizer state, hundreds of MB) is then read once, by load_model.
    Files in torch's older, unmappable format are read."""
    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except Exception:
        return None, None  # unreadable: load_model says what is wrong with it
    if not isinstance(checkpoint, dict) or "config" in checkpoint:
        return None, None
    state = unwrap_state_dict(checkpoint.get("model") if isinstance(checkpoint.get("model"), dict) else checkpoint)
    kind = published_kind(state)
    return (kind, state) if kind else (None, None)


def published_model(kind, state, path, cat_ids, class_names=None, det_header=None, input_shape=None, device="cpu"):
    """An effdet EfficientDet or a Megvii YOLOX (their COCO weights, say; kind as
    read_published_checkpoint) as our model, for a dataset's categories: the class predictor keeps
    the slots of the data's classes (models.effdet_state_dict / megvii_yolox_state_dict), so COCO's
    80 categories read exactly as the original scores them. Every class of the data must be one
    of COCO's, matched by name (models.coco_category_ids: COCO's names, VOC's, or COCO ids where
    the data names no class), whatever its id: VOC's "cat" is its id 2, COCO's 17.
    The preset is the first of the kind whose tensors fit (effdet's d6 and d7 share every tensor
    and differ in input size and anchors: --det_header says which). Megvii's weights take 0..255
    pixels (pixel_norm "0-255"); effdet's tf_efficientdet_* files get TensorFlow's padding, and
    its AdvProp ones -1..1 pixels, as their names say (models.named_settings)."""
    spec = PUBLISHED[kind]
    if det_header and det_header not in spec["presets"]:
        fits = published_preset(state, kind)  # the one it is, for the fix (a few builds on the meta device)
        raise EvalInputError(f"-m {path} holds {spec['name']} weights, not {det_header}'s: " +
                             (f"give --det_header {fits}, or leave it out" if fits else
                              f"--det_header must be one of {', '.join(spec['presets'])}"))
    pixel_norm, tf_padding = (spec["pixel_norm"], False) if kind == "megvii" else named_settings(path)
    if spec["slots_key"] not in state:
        raise EvalInputError(f"-m {path}: {spec['name']} weights without {spec['slots_key']} (" +
                             ("a resdet, say, without separable convs in its head" if kind == "effdet" else
                              "another head layout") + "), which this converter does not know")
    slots = state[spec["slots_key"]].numel() // spec["anchors"]
    if slots != spec["slots"]:
        raise EvalInputError(f"-m {path}: {spec['name']} weights with {slots} class slots, not COCO's {spec['slots']} "
                             f"({spec['ids']}): it was trained on other data, whose slots this converter cannot "
                             f"match to this data's ids")
    try:
        coco_ids = coco_category_ids(cat_ids, class_names)
    except ValueError as e:  # two classes of the data are one COCO category
        raise EvalInputError(f"-m {path}: {e}") from None
    if coco_ids is None:
        names = class_names if class_names is not None else [str(c) for c in cat_ids]
        odd = [(c, n) for c, n in zip(cat_ids, names) if coco_category_ids([c], [n]) is None][:3]
        raise EvalInputError(f"-m {path}: {spec['name']} weights score COCO's 80 categories, and this data has "
                             f"others (e.g. {odd}, id and name): evaluate it on data whose classes are COCO's (by "
                             f"name: COCO's or VOC's)")
    preset = det_header or published_preset(state, kind)  # the first preset its tensors fit
    if preset is None:
        raise EvalInputError(f"-m {path}: no preset fits its tensors ({', '.join(spec['presets'])} were tried)")
    if preset == "efficientdet_d6" and not det_header:
        raise EvalInputError(f"-m {path}: effdet's d6 and d7 share every tensor (d7 runs at 1536 with larger "
                             f"anchors): give --det_header efficientdet_d6 or efficientdet_d7")
    model = build_model(preset, num_classes=len(cat_ids), pixel_norm=pixel_norm, tf_padding=tf_padding,
                        input_shape=None if input_shape is None else tuple(input_shape))
    try:
        model.load_state_dict(spec["convert"](state, model, coco_ids))
    except (ValueError, RuntimeError) as e:
        if not det_header:  # the preset that its tensors fit, yet its head is of another layout
            raise EvalInputError(f"-m {path}: its tensors do not fit {preset}'s: {e}") from None
        fits = published_preset(state, kind)
        raise EvalInputError(f"-m {path} does not fit --det_header {det_header}: {e}" +
                             (f" (it is {fits}'s: give --det_header {fits}, or leave it out)" if fits else "")) from None
    names = [str(n) for n in (class_names if class_names is not None else cat_ids)]
    print(f"-m {path}: {spec['name']} weights, read as {preset} ({spec['convert'].__name__}), its class slots for "
          f"{len(cat_ids)} classes ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" +
          describe_settings(model.config, "as Megvii's weights want" if kind == "megvii" else "by its name") +
          ("" if kind == "megvii" or tf_padding else ", PyTorch's padding (a tf_efficientdet_* file keeps that "
                                                     "name: TensorFlow's padding)"))
    return model.to(device).eval()


def describe_settings(config, why):
    """The words ", with 0..255 pixels (pixel_norm 0-255) <why>" naming a model config's pixel_norm
    and tf_padding where they are not the defaults (its weights came from elsewhere), else ""."""
    said = {"0-255": "0..255 pixels", "inception": "pixels scaled to -1..1"}
    parts = ([f"{said[config['pixel_norm']]} (pixel_norm {config['pixel_norm']})"] if config.get("pixel_norm") in said
             else []) + (["TensorFlow's padding (tf_padding)"] if config.get("tf_padding") else [])
    return f", with {' and '.join(parts)} {why}" if parts else ""


def load_model(path_or_preset, det_header=None, num_classes=None, input_shape=None, device="cpu"):
    """A Detector in eval mode from a train.py checkpoint or a preset name.

    path_or_preset: a checkpoint file ({"config", "model", optionally "ema"}: the EMA weights
        are preferred) or a preset name for models.build_model (random weights);
    det_header: build this preset instead of the checkpoint's own (the weights must fit it);
    num_classes, input_shape: override the preset's (for a preset name) or the checkpoint's
        input shape (num_classes must match the checkpoint's weights).
    Returns (model, info) where info = {"class_names": [...] or None, "cat_ids": [...] or None,
    "data": the --data the checkpoint was trained on, or None}.
    """
    if not os.path.isfile(path_or_preset):
        _check_preset_name(path_or_preset)
        if det_header is not None and det_header != path_or_preset:
            raise EvalInputError(f"--det_header {det_header} with the preset -m {path_or_preset}: give the preset "
                                 f"you want as -m (--det_header rebuilds a checkpoint as another preset)")
        # input_shape None = the preset's published size (yolox_s 640, efficientdet_d0 512, ...)
        config = {"det_header": path_or_preset, "num_classes": num_classes or 80,
                  "input_shape": None if input_shape is None else tuple(input_shape)}
        model = build_model(**config)
        return model.to(device).eval(), {"class_names": None, "cat_ids": None, "data": None}

    try:
        checkpoint = read_checkpoint(path_or_preset)  # weights_only: a download cannot run code while it loads
    except Exception as e:  # truncated download, a file of another program: say which file
        raise EvalInputError(f"-m {path_or_preset}: not a readable checkpoint ({type(e).__name__}: {e}); a download "
                             f"cut short? fetch it again, or give a last.pt / best.pt written by train.py, an effdet "
                             f"or Megvii .pth, or a preset name") from None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "model" not in checkpoint:
        raise EvalInputError(f"-m {path_or_preset}: not a plaindet checkpoint (a dict with 'config' "
                             f"and 'model', as train.py writes)")
    saved = dict(checkpoint["config"])
    info = {"class_names": saved.pop("class_names", None), "cat_ids": saved.pop("cat_ids", None),
            "data": (checkpoint.get("train_config") or {}).get("data")}
    config = dict(saved)
    if det_header is not None and det_header != saved.get("det_header"):
        config = {"det_header": det_header, "num_classes": saved.get("num_classes", 80),
                  "pixel_norm": saved.get("pixel_norm", "imagenet"), "tf_padding": saved.get("tf_padding", False)}
    if num_classes is not None:
        config["num_classes"] = num_classes
    if input_shape is not None:
        config["input_shape"] = tuple(input_shape)
    try:
        model = build_model(**config)
    except ValueError as e:  # e.g. tf_padding carried to a --det_header with nothing to pad
        raise EvalInputError(f"-m {path_or_preset} as --det_header {config['det_header']}: {e}") from None
    if describe_settings(config, ""):
        print(f"-m {path_or_preset}: a model{describe_settings(config, 'as it was trained')}")
    state = checkpoint.get("ema") or checkpoint["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError:
        # torch's own text lists every tensor; counting them says enough
        own = model.state_dict()
        missing, extra = len(set(own) - set(state)), len(set(state) - set(own))
        shapes = sum(1 for k in set(own) & set(state) if own[k].shape != state[k].shape)
        raise EvalInputError(
            f"-m {path_or_preset}: the checkpoint was trained as det_header={saved.get('det_header')!r} "
            f"(backbone={saved.get('backbone')!r}, anchors_mode={saved.get('anchors_mode')!r}, "
            f"num_classes={saved.get('num_classes')}); its weights do not fit the model built as "
            f"det_header={config.get('det_header')!r}, num_classes={config.get('num_classes')} "
            f"({missing} tensors missing, {extra} unexpected, {shapes} of another shape). Drop --det_header "
            f"to use the checkpoint's own") from None
    return model.to(device).eval(), info


def predict(model, image_paths, out_dir, class_names=None, score_threshold=0.3, nms="hard",
            nms_mode="per_class", nms_iou_or_sigma=0.45, nms_topk=5000, max_output_size=100,
            input_shape=None, resize_method="bilinear", letterbox_pad=-1, cat_ids=None):
    """Detect objects in image files; draw each in OUT (see picture_name) and write OUT/predictions.json.

    An image that cannot be decoded is skipped with a warning, as YOLOX's demo does: one bad
    file in a folder of photos should not cost the pictures of all the others.
    Returns {file name: [{"box": [x1, y1, x2, y2] px, "score", "label", "name"}, ...]}, the
    skipped images left out; with cat_ids (the data's COCO category id of each label), each
    detection also has its "category_id" (label is the model's contiguous 0..C-1).
    """
    from PIL import Image, ImageDraw, ImageFont

    if input_shape is None:
        input_shape = tuple(model.config["input_shape"])
    device = next(model.parameters()).device
    priors = model.priors(input_shape, device=device)
    os.makedirs(out_dir, exist_ok=True)
    all_predictions, skipped = {}, []
    best = 0.0  # the best score seen before NMS: what to say when nothing reaches score_threshold
    model.eval()
    t0 = last_line = time.time()
    for done, path in enumerate(image_paths, 1):
        try:  # upright (a phone photo's EXIF turn applied), 16-bit greyscale scaled: as in training
            array, _ = decode_image(path, fix="leave it out")
        except DataLoadError as e:
            skipped.append(str(e))
            continue
        image = Image.fromarray(array)
        pixels = torch.from_numpy(array).permute(2, 0, 1)[None].to(device)  # [1, 3, H, W]
        h, w = pixels.shape[-2:]
        # A one-image batch in make_loader's layout (one padding box: no ground truth here);
        # only the pixels on the device, as in the evaluation loop.
        batch = {"images": pixels, "sizes": torch.tensor([[h, w]]), "boxes": torch.zeros((1, 1, 4)),
                 "labels": torch.full((1, 1), -1, dtype=torch.long), "valid": torch.zeros((1, 1), dtype=torch.bool),
                 "image_ids": torch.zeros(1, dtype=torch.long), "scales": torch.ones(1, 2)}
        with torch.inference_mode():
            letterboxed = eval_letterbox(batch, tuple(input_shape), resize_method, letterbox_pad)
            boxes, scores = decode_predictions(model(letterboxed["images"]), priors, model.anchors_mode)
            best = max(best, float(scores.nan_to_num(0.0).max()))
            boxes, scores, labels, counts = batched_nms(
                boxes, scores, method=nms, mode=nms_mode, iou_or_sigma=nms_iou_or_sigma,
                score_threshold=score_threshold, topk=nms_topk, max_output_size=max_output_size)
            boxes = clip_boxes(boxes_to_original(boxes, letterboxed["matrices"]),
                               torch.tensor([float(h)], device=device), torch.tensor([float(w)], device=device))
        n = int(counts[0])
        detections = []
        draw = ImageDraw.Draw(image)
        # Lines and labels grow with the picture: a 4000-px photo is seen scaled down, where
        # 2-px boxes and the 11-px default font would all but vanish.
        thick = max(2, round(max(h, w) / 320))
        try:
            font = ImageFont.load_default(size=max(11, round(max(h, w) / 60)))
        except (TypeError, OSError, ImportError):  # Pillow before 10.1, or without FreeType: the bitmap font
            font = ImageFont.load_default()
        for box, score, label in zip(boxes[0, :n].tolist(), scores[0, :n].tolist(), labels[0, :n].tolist()):
            if box[2] <= box[0] or box[3] <= box[1]:  # a box in the letterbox padding, clipped to a line
                continue
            name = class_names[label] if class_names and label < len(class_names) else str(label)
            detection = {"box": [round(v, 2) for v in box], "score": round(score, 4), "label": label, "name": name}
            if cat_ids:
                detection["category_id"] = int(cat_ids[label])
            detections.append(detection)
            # A colour per class from its label, so the same class keeps its colour across images.
            colour = tuple(int(v) for v in (np.array([37, 91, 173]) * (label + 1)) % 255)
            draw.rectangle(box, outline=colour, width=thick)
            draw_label(draw, box, f"{name} {score:.2f}", colour, font=font, fallback=f"{label} {score:.2f}")
        name = picture_name(path)
        tmp = os.path.join(out_dir, f".tmp.{name}")  # the extension tells PIL the format
        image.save(tmp, quality=90)  # quality is read by JPEG only; PNG is lossless
        os.replace(tmp, os.path.join(out_dir, name))
        all_predictions[os.path.basename(path)] = detections
        last_line = _progress("predicting", done, len(image_paths), t0, last_line)
    if skipped and not all_predictions:  # nothing to show: an error, not an empty result
        raise EvalInputError(skipped[0] if len(skipped) == 1 else f"none of the {len(skipped)} images can be "
                             f"decoded, e.g. {skipped[0]}")
    write_json_atomic(all_predictions, os.path.join(out_dir, "predictions.json"))
    if not any(all_predictions.values()):  # pictures without a box: say why, or they look broken
        print(f"note: no detection scored {score_threshold:g} or more (the best score was {best:.3f}): give a lower "
              f"--score_threshold to see the model's best guesses", file=sys.stderr)
    if skipped:
        print(f"warning: skipped {len(skipped)} of {len(image_paths)} images that cannot be decoded, e.g. "
              f"{skipped[0]}", file=sys.stderr)
    return all_predictions


def prediction_sheet(model, dataset, path, count=8, score_threshold=0.3, input_shape=None, batch_size=8):
    """One picture (PNG) of the model's detections on the first `count` images of `dataset`, each
    letterboxed as the evaluation sees it: detections scoring at least score_threshold after hard
    NMS at IoU 0.45 (as predict draws them), coloured by class with their scores, over the ground
    truth in thin white-and-black lines, with a caption of how many there are (or, for none, the
    best score before NMS). train.py draws one after each evaluation, always of the same images, so
    a run can be watched learning (and a class that is never found, or boxes that sit off their
    objects, are seen at a glance). batch_size: images per forward pass (the evaluation's).
    Returns the path, or None when dataset has no image."""
    n = min(count, len(dataset))
    if n == 0:
        return None
    if input_shape is None:
        input_shape = tuple(model.config["input_shape"])
    device = next(model.parameters()).device
    priors = model.priors(input_shape, device=device)
    loader = make_loader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size, shuffle=False,
                         workers=0, seed=0)
    pictures = collections.defaultdict(list)  # the sheet's parts, one entry per batch
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches(loader):
                batch["images"] = batch["images"].to(device)
                letterboxed = letterbox(batch, input_shape)  # also moves the ground truth into its pixels
                boxes, scores = decode_predictions(model(letterboxed["images"]), priors, model.anchors_mode)
                decoded_best = scores.nan_to_num(0.0).flatten(1).amax(1).cpu()  # [b] best score before NMS
                boxes, scores, labels, counts = batched_nms(
                    boxes, scores, method="hard", mode="per_class", iou_or_sigma=0.45,
                    score_threshold=score_threshold, topk=5000, max_output_size=100)
                boxes = boxes.cpu()
                # The first counts[i] slots are detections; a box that overflowed (an early, unstable
                # epoch) is left off the picture, as it is out of the evaluation, and the rest are
                # held near the frame.
                kept = (torch.arange(boxes.shape[1])[None] < counts.cpu()[:, None]) & torch.isfinite(boxes).all(-1)
                pictures["best"].append(decoded_best)
                pictures["images"].append(letterboxed["images"].cpu())
                pictures["boxes"].append(boxes.nan_to_num(0.0).clamp(-4 * max(input_shape), 4 * max(input_shape)))
                pictures["labels"].append(labels.cpu())
                pictures["valid"].append(kept)
                pictures["scores"].append(scores.cpu())
                pictures["truth_boxes"].append(letterboxed["boxes"])
                pictures["truth_valid"].append(letterboxed["valid"])
    finally:
        model.train(was_training)
    # Batches may differ in their number of truth boxes (the loader pads each to its own most):
    # one [n, M] pair for the sheet, padded with invalid slots.
    truth = (torch.zeros(n, max(t.shape[1] for t in pictures["truth_boxes"]), 4),)
    truth += (torch.zeros(truth[0].shape[:2], dtype=torch.bool),)
    row = 0
    for t, v in zip(pictures.pop("truth_boxes"), pictures.pop("truth_valid")):
        truth[0][row:row + len(t), :t.shape[1]], truth[1][row:row + len(t), :t.shape[1]] = t, v
        row += len(t)
    best = torch.cat(pictures.pop("best")).tolist()
    detections = {k: torch.cat(v) for k, v in pictures.items()}
    # A line per picture, so that an empty one reads as a model not yet sure of anything (and by
    # how much), not as a drawing that failed.
    counts = detections["valid"].sum(1).tolist()
    captions = [f"{c} detection{'s' if c != 1 else ''} >= {score_threshold:g}" if c else
                f"none >= {score_threshold:g} (best {b:.2f})" for c, b in zip(counts, best)]
    return show_batch_sample(detections, path, dataset.class_names, max_images=n, truth=truth, captions=captions)


def picture_name(path):
    """The file name predict draws an input's picture under: a JPEG keeps its name and stays a
    JPEG (a photo as PNG is about 6x the bytes); any other image becomes <name>.png."""
    base = os.path.basename(path)
    stem, ext = os.path.splitext(base)
    return base if ext.lower() in (".jpg", ".jpeg") else stem + ".png"


# Flags of the tools people come from (effdet's train.py / validate.py, keras_cv_attention_models'
# COCO scripts, Megvii's tools/train.py), with what to give here instead. argparse alone would say
# "unrecognized arguments", or, for --lr, list the six flags it could be short for.
FOREIGN_FLAGS = {
    "--model": "give --det_header (a preset) to train.py, -m (a checkpoint) to eval.py",
    "--img-size": "give -i/--input_shape", "--img_size": "give -i/--input_shape",
    "--batch-size": "give -b/--batch_size",
    "--initial-checkpoint": "give --pretrained (weights) or --resume (a whole training state)",
    "--checkpoint": "give -m to eval.py; --pretrained (weights) or --resume (a training state) to train.py",
    "--dataset": "give -d/--data (a COCO json or folder, a YOLO folder, or 'shapes')",
    "--output": "give --out", "-j": "give --workers",
    "--num-classes": "none is needed: the classes are read from the data",
    "--num_classes": "none is needed: the classes are read from the data",
    "--model-ema": "give --ema_decay (0.9998 by default; 0 turns the EMA off)",
    "--use-ema": "none is needed: a checkpoint's EMA weights are the ones evaluated when it has them",
    "--warmup-epochs": "give --lr_warmup_steps (epochs)",
    "--sched": "give --lr_decay_steps: one number for a cosine ending at that epoch, a list for step decay",
    "--lr": "give --lr_base_512, the rate for a total batch of 512 (your lr x 512 / your total batch)",
    "--fp16": "give --amp fp16", "-n": "give --det_header (yolox_s for Megvii's -n yolox-s)",
    "-f": "give flags: the YOLOX recipe is YOLOX_RECIPE at the top of train.py",
    "--exp_file": "give flags: the YOLOX recipe is YOLOX_RECIPE at the top of train.py",
    "--amp": "none is needed: eval.py runs in float32 (train.py takes --amp)",
    "--use_bgr_input": "none is needed: the channel order follows the weights (a Megvii file's BGR stem is "
                       "flipped as it loads)",
    "--use_anchor_free_mode": "none is needed: eval.py reads the prior mode from the checkpoint (train.py takes it)",
    "--anchors_mode": "give --use_anchor_free_mode or --use_anchors_mode to train.py; eval.py reads it from the "
                      "checkpoint",
    "--use_yolor_anchors_mode": "YOLOR's anchors are not built here: anchors are EfficientDet's, or anchor-free",
    "--model_path": "give -m/--model", "--data_name": "give -d/--data",
    "--save_json": "give --save_results", "-s": "give --save_results (a COCO results json)",
    "--rescale_mode": "none is needed: the pixel scaling follows the weights (their pixel_norm)",
    "--anchor_scale": "none is needed: the checkpoint's config has its anchors",
    "--aspect_ratios": "none is needed: the checkpoint's config has its anchors",
    "--num_scales": "none is needed: the checkpoint's config has its anchors",
}


def check_foreign_flags(parser, argv):
    """Before parser.parse_args(argv): a flag of FOREIGN_FLAGS that this parser does not have
    is one argparse error naming what to give instead (exit 2, as argparse's own)."""
    own = {name for action in parser._actions for name in action.option_strings}
    for token in argv:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if name in FOREIGN_FLAGS and name not in own:
            parser.error(f"{name} is not a flag here: {FOREIGN_FLAGS[name]}")


def _check_one_input_shape(parser, argv):
    """-i takes one value since predict's image paths follow it; "-i 64 64" (this file's old
    form) would otherwise read the second 64 as an image, or as an unknown argument."""
    for i, token in enumerate(argv[:-2]):
        if token in ("-i", "--input_shape") and argv[i + 2].isdigit():
            parser.error(f"{token} takes one value: give H,W like {argv[i + 1]},{argv[i + 2]}")


def _add_common_flags(parser):
    """Flags shared by evaluation and predict: model, preprocessing and NMS."""
    parser.add_argument("-m", "--model", default=None,
                        help=f"train.py checkpoint, an effdet EfficientDet or Megvii YOLOX .pth (COCO's classes), or "
                             f"a preset name (random weights); default {DEFAULT_CHECKPOINT}, the best.pt of train.py's "
                             f"default --out")
    parser.add_argument("--det_header", default=None, help="build this preset instead of the checkpoint's")
    # One value, as train.py's -i: a second one would swallow predict's first image path.
    parser.add_argument("-i", "--input_shape", default=None,
                        help="S, or H,W, of the letterbox (default: the model's)")
    parser.add_argument("--resize_method", default="bilinear", choices=("bilinear", "bicubic", "nearest"),
                        help="sampling of the letterbox resize")
    parser.add_argument("--disable_antialias", action="store_true",
                        help="accepted, as keras_cv_attention_models' eval command lines give it (its "
                             "--nms_method is --nms here; its other usual flags get a pointer to ours); changes "
                             "nothing: the letterbox resamples with grid_sample, which never antialiases")
    parser.add_argument("--letterbox_pad", type=int, default=-1,
                        help="-1: image at the top-left of the input; >= 0: resize into input - pad and "
                             "centre it (pad / 2 grey pixels or more on each side)")
    parser.add_argument("--nms", "--nms_method", default="gaussian", choices=NMS_METHODS,  # kecam: --nms_method
                        help="hard NMS, or soft-NMS decaying overlapping scores (gaussian / linear)")
    parser.add_argument("--nms_mode", default="per_class", choices=NMS_MODES,
                        help="per_class: boxes only suppress boxes of their class; global: any box")
    parser.add_argument("--nms_iou_or_sigma", type=float, default=0.5,
                        help="IoU threshold for hard / linear NMS, sigma for gaussian")
    parser.add_argument("--nms_topk", type=int, default=5000,
                        help="(prior, class) pairs kept per image before NMS; -1 all, 0 one class per prior, "
                             "its best (the meanings keras_cv_attention_models' eval gives them). -1 is slow "
                             "on the CPU: every pair over the score threshold (up to tens of thousands at 0.001) goes "
                             "through NMS")
    parser.add_argument("--nms_max_output_size", type=int, default=100, help="detections kept per image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (the NMS kernel) or cpu (its torch twin); default cuda when there is one")


def _checkpoint_or_default(model):
    """-m as given, or (left out) train.py's default run's best.pt: after `python train.py ...`
    with no --out, `python eval.py --nms gaussian` scores that run on its own val split."""
    if model is not None and os.path.isdir(model):  # a run folder stands for its best.pt (else last.pt), as in train.py
        found = next((os.path.join(model, n) for n in ("best.pt", "last.pt") if os.path.isfile(os.path.join(model, n))),
                     None)
        if found is None:
            raise EvalInputError(f"-m {model} is a folder without best.pt / last.pt: give a checkpoint file")
        return found
    if model is not None:
        return model
    if os.path.isfile(DEFAULT_CHECKPOINT):
        return DEFAULT_CHECKPOINT
    found = sorted(glob.glob(os.path.join("runs", "*", "best.pt")))
    hint = f" (found: {', '.join(found[:5])})" if found else ""
    raise EvalInputError(f"-m not given and {DEFAULT_CHECKPOINT}, the best.pt of train.py's default --out, does "
                         f"not exist here{hint}: give -m CHECKPOINT (or a preset name), or train first")


def _few(categories, n=4):
    """{id: name} as 'N categories (1 person, 2 bicycle, ...)' for an error message."""
    shown = ", ".join(f"{k} {v}" for k, v in list(categories.items())[:n])
    return f"{len(categories)} categories ({shown}{', ...' if len(categories) > n else ''})"


def class_difference(model_side, data_side, n=4):
    """What differs between two class lists (names, or ids), for an error message: the classes
    on one side only, or, for the same classes, the first place where their order differs."""
    def listed(items):
        return ", ".join(map(str, items[:n])) + (f" and {len(items) - n} more" if len(items) > n else "")
    only_model = [c for c in model_side if c not in data_side]
    only_data = [c for c in data_side if c not in model_side]
    if only_model or only_data:
        return "; ".join(([f"only the model's: {listed(only_model)}"] if only_model else []) +
                         ([f"only the data's: {listed(only_data)}"] if only_data else []))
    moved = [i for i, (a, b) in enumerate(zip(model_side, data_side)) if a != b]
    if moved:
        return f"the same classes in another order: #{moved[0]} is {model_side[moved[0]]} in the model, " \
               f"{data_side[moved[0]]} in the data"
    return f"the same classes, listed {len(model_side)} and {len(data_side)} times"  # a name given twice


def _input_shape(values):
    """-i as given: "S", "H,W" or "HxW" (as train.py takes it) -> (H, W), or None."""
    if values is None:
        return None
    try:
        return parse_input_shape(values)
    except ValueError as e:
        raise EvalInputError(f"-i/--input_shape {e}") from None


def _check_common_flags(args):
    """The model, preprocessing and NMS flags evaluation and predict share, checked before any
    work starts, each error naming its flag (a torch error later would name none)."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise EvalInputError(f"--device {args.device}: give cpu or cuda (cuda:1 for the second GPU)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalInputError(f"--device {args.device}: this torch sees no CUDA GPU; use --device cpu")
    if args.nms_topk < -1:
        raise EvalInputError(f"--nms_topk {args.nms_topk}: give -1 (all pairs), 0 (one class per prior) or more")
    if args.nms_max_output_size < 1:
        raise EvalInputError(f"--nms_max_output_size {args.nms_max_output_size}: give 1 or more")
    if not args.nms_iou_or_sigma > 0:
        raise EvalInputError(f"--nms_iou_or_sigma {args.nms_iou_or_sigma}: give a value above 0, like 0.5")
    if args.nms in ("hard", "linear") and args.nms_iou_or_sigma >= 1:
        # No IoU exceeds 1: the NMS would suppress nothing, and the AP would quietly drop.
        raise EvalInputError(f"--nms_iou_or_sigma {args.nms_iou_or_sigma}: --nms {args.nms} takes an IoU "
                             f"threshold below 1, like 0.5 (a value of 1 or more suppresses nothing)")


def _check_score_threshold(flag, value):
    if not 0 <= value < 1:
        raise EvalInputError(f"{flag} {value}: scores are in 0..1; give a threshold in [0, 1), like 0.001")


def _check_stride(model, input_shape):
    try:
        check_input_shape(input_shape or model.config["input_shape"], model.config["det_header"])
    except ValueError as e:
        h, w = input_shape or model.config["input_shape"]
        raise EvalInputError(f"-i/--input_shape {h} {w}: {e}") from None


def _predict_main(argv):
    """`python eval.py predict -m CHECKPOINT IMAGES... -o FOLDER`."""
    parser = argparse.ArgumentParser(prog="eval.py predict", description="Draw detections on images.")
    _add_common_flags(parser)
    # Pictures are for people: hard NMS leaves one box per object (0.45, as in YOLOX's README demo command). The
    # evaluation's soft-NMS keeps overlapping boxes with decayed scores, which helps AP's ranking
    # but would draw a duplicate wherever a decayed score stays above --score_threshold.
    parser.set_defaults(nms="hard", nms_iou_or_sigma=None)  # None: 0.45 for hard, the evaluation's 0.5 else
    parser.add_argument("images", nargs="+", help="image files, or folders of them")
    parser.add_argument("-o", "--out", required=True,
                        help="output folder (made if missing): a picture per image, named as the image "
                             "(JPEGs stay JPEG, others become .png), and predictions.json")
    parser.add_argument("--score_threshold", type=float, default=0.3,
                        help="draw (and list in predictions.json) detections scoring this or more")
    check_foreign_flags(parser, argv)
    _check_one_input_shape(parser, argv)
    args = parser.parse_args(argv)
    if args.nms_iou_or_sigma is None:
        args.nms_iou_or_sigma = 0.45 if args.nms == "hard" else 0.5
    _check_common_flags(args)
    _check_score_threshold("--score_threshold", args.score_threshold)
    check_output_folder("-o", args.out, "the pictures")
    images = []
    for f in args.images:  # a folder stands for the images in it
        if os.path.isdir(f):
            images += sorted(os.path.join(f, n) for n in os.listdir(f) if n.lower().endswith(IMAGE_EXTENSIONS))
        else:
            images.append(f)
    missing = [f for f in images if not os.path.isfile(f)]
    if missing:
        raise EvalInputError(f"{len(missing)} of the images {'does' if len(missing) == 1 else 'do'} not exist, "
                             f"e.g. {missing[0]}")
    if not images:
        raise EvalInputError(f"no {'/'.join(IMAGE_EXTENSIONS)} image in {', '.join(args.images)}")
    # Outputs are named after the inputs (x.jpg -> OUT/x.jpg, x.bmp -> OUT/x.png): two inputs of
    # one picture name would overwrite each other's picture, and an input in OUT would be drawn over.
    names = [picture_name(f) for f in images]
    twins = sorted({f for f, name in zip(images, names) if names.count(name) > 1})
    if twins:
        raise EvalInputError(f"{', '.join(twins[:4])}: these inputs share a file name, and their "
                             f"pictures would overwrite each other in {args.out}; predict them in separate runs")
    outputs = {os.path.realpath(os.path.join(args.out, name)) for name in names}
    clobbered = [f for f in images if os.path.realpath(f) in outputs]
    if clobbered:
        raise EvalInputError(f"-o {args.out}: the picture of {clobbered[0]} would be written over the image "
                             f"itself; give another output folder")
    model_path = _checkpoint_or_default(args.model)
    kind, published = read_published_checkpoint(model_path) if os.path.isfile(model_path) else (None, None)
    if kind is not None:  # effdet's or Megvii's COCO weights: COCO's 80 categories, by name
        coco = sorted(COCO_CLASSES)
        model = published_model(kind, published, model_path, coco, [COCO_CLASSES[c] for c in coco], args.det_header,
                                _input_shape(args.input_shape), args.device)
        info = {"class_names": [COCO_CLASSES[c] for c in coco], "cat_ids": coco}
    else:
        model, info = load_model(model_path, det_header=args.det_header, input_shape=_input_shape(args.input_shape),
                                 device=args.device)
    _check_stride(model, _input_shape(args.input_shape))
    drawn = predict(model, images, args.out, class_names=info["class_names"],
            score_threshold=args.score_threshold, nms=args.nms, nms_mode=args.nms_mode,
            nms_iou_or_sigma=args.nms_iou_or_sigma, nms_topk=args.nms_topk,
            max_output_size=args.nms_max_output_size, resize_method=args.resize_method,
            letterbox_pad=args.letterbox_pad, cat_ids=info.get("cat_ids"))
    print(f"wrote {len(drawn)} picture{'s' if len(drawn) != 1 else ''} and predictions.json to {args.out}")


def _results_main(argv):
    """`python eval.py --results RESULTS.json -d GROUND_TRUTH`: its own parser, so a model, NMS or
    loader flag, which would do nothing here, is refused by argparse instead of ignored."""
    parser = argparse.ArgumentParser(prog="eval.py --results", description="COCO AP of a results json.")
    parser.add_argument("--results", required=True, help="COCO results json: [{image_id, category_id, bbox, score}], "
                        "or a COCO dataset-layout dict with scored annotations (matched by file and category names)")
    parser.add_argument("-d", "--data", required=True, help="the COCO json (or dataset folder) of its images")
    parser.add_argument("--split", default="val", choices=("train", "val"), help="the split of a dataset folder")
    parser.add_argument("--stats_json", default=None, help="write the 12 numbers here")
    args = parser.parse_args(argv)
    if args.stats_json:
        check_output_path("--stats_json", args.stats_json)
    score_results_file(args.results, args.data, args.split, args.stats_json)


def _evaluate_main(argv):
    """`python eval.py [-m CHECKPOINT] [-d DATA] --nms gaussian ...`: COCO AP of a model."""
    parser = argparse.ArgumentParser(
        prog="eval.py", description="COCO AP of a model, or (with --results) of a results json.",
        epilog="`python eval.py --results R.json -d GT -h`: score a results file. "
               "`python eval.py predict -h`: draw detections on images.")
    parser.add_argument("-d", "--data", default=None,
                        help="COCO json, COCO / YOLO dataset folder, or 'shapes' (default: the "
                             "data the -m checkpoint was trained on; needed with a preset)")
    parser.add_argument("--split", default="val", choices=("train", "val"), help="the split of a dataset folder")
    parser.add_argument("--stats_json", default=None, help="write the 12 numbers here")
    parser.add_argument("--save_results", default=None, help="write the COCO results json here")
    parser.add_argument("-b", "--batch_size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--nms_score_threshold", type=float, default=0.001,
                        help="drop (prior, class) scores below this before NMS (0.001 for COCO AP)")
    clip = parser.add_mutually_exclusive_group()  # both at once would leave the last one silently
    clip.add_argument("--clip_bbox", action="store_true", default=True,
                      help="clip boxes to the original image (the default, as in the 0.343 recipe)")
    clip.add_argument("--no_clip_bbox", dest="clip_bbox", action="store_false",
                      help="leave boxes unclipped: they may reach past the image's edges")
    parser.add_argument("--workers", type=int, default=None,
                        help="decode workers (default: 2 on CPU; on a GPU this machine's cores, at most 8)")
    _add_common_flags(parser)
    check_foreign_flags(parser, argv)
    _check_one_input_shape(parser, argv)
    args = parser.parse_args(argv)
    _check_common_flags(args)
    _check_score_threshold("--nms_score_threshold", args.nms_score_threshold)
    if args.batch_size < 1:
        raise EvalInputError(f"-b/--batch_size {args.batch_size}: give 1 or more")
    if args.workers is not None and args.workers < 0:
        raise EvalInputError(f"--workers {args.workers}: give 0 (decode in the main process) or more")
    for flag in ("stats_json", "save_results"):
        if getattr(args, flag):
            check_output_path(f"--{flag}", getattr(args, flag))
    if args.data is not None and not os.path.exists(args.data) and args.data != "shapes":
        raise EvalInputError(f"-d {args.data}: no such file or folder; give a COCO json, a COCO or "
                             f"YOLO dataset folder, or 'shapes'")

    model_path = _checkpoint_or_default(args.model)
    input_shape = _input_shape(args.input_shape)
    kind, published = read_published_checkpoint(model_path) if os.path.isfile(model_path) else (None, None)
    if kind is not None:  # effdet's or Megvii's weights: built for the data's COCO category ids
        if args.data is None:
            raise EvalInputError(f"-m {model_path} holds {PUBLISHED[kind]['name']} weights, which record no data: give "
                                 f"-d (data whose classes are COCO's)")
        data_path, dataset = args.data, open_dataset(args.data, args.split)
        model = published_model(kind, published, model_path, dataset.cat_ids, dataset.class_names, args.det_header,
                                input_shape, args.device)
        info = {"class_names": None, "cat_ids": None, "data": None}  # its classes are the data's, by id
    elif os.path.isfile(model_path):  # a checkpoint: its model, then its data unless -d is given
        model, info = load_model(model_path, det_header=args.det_header, input_shape=input_shape, device=args.device)
        data_path = args.data
        if data_path is None:  # the checkpoint's own training data, split --split
            data_path = info["data"]
            if data_path is None:
                raise EvalInputError(f"-m {model_path}: it records no training data (an old checkpoint); give -d "
                                     f"(a COCO json, a COCO / YOLO folder, or 'shapes')")
            if not os.path.exists(data_path) and data_path != "shapes":
                raise EvalInputError(f"-m {model_path} was trained on --data {data_path}, which is not there "
                                     f"from here; give -d")
            one_json = os.path.isfile(data_path)  # a json is one split: train and val are the same images
            print(f"evaluating {model_path} on the {args.split} split of its training data, {data_path}" +
                  (" (a single json, so these are its training images)" if one_json else ""))
        dataset = open_dataset(data_path, args.split)
    else:  # a preset name (random weights): built for the classes of the data
        _check_preset_name(model_path)  # before the data opens, which may take a while
        if args.data is None:
            raise EvalInputError(f"-m {model_path}: a preset name records no data; give -d (a COCO json, "
                                 f"a COCO / YOLO folder, or 'shapes')")
        data_path, dataset = args.data, open_dataset(args.data, args.split)
        model, info = load_model(model_path, det_header=args.det_header, input_shape=input_shape, device=args.device,
                                 num_classes=len(dataset.cat_ids))
    _check_stride(model, input_shape)
    # Labels are positions in the category list: another list (or order) would score every
    # detection as some other class, and the AP would be silently wrong. Where both sides name
    # their classes, the names decide: the same names in the same order are the same classes
    # under other ids (a YOLO export numbers from 0, COCO's from 1; label k is then written with
    # this data's id k, detections_to_coco), and other names under the same ids are other
    # classes (two YOLO sets both number 0..C-1). Names that are only the ids written out (a json
    # without category names) say nothing, and the ids decide.
    def named(names, ids):
        return names is not None and list(names) != [str(i) for i in ids]
    if info["cat_ids"] is not None:  # None: a preset (random weights, built for this data) or a bare checkpoint
        if named(info["class_names"], info["cat_ids"]) and named(dataset.class_names, dataset.cat_ids):
            model_side, data_side = list(info["class_names"]), dataset.class_names
        else:
            model_side, data_side = list(info["cat_ids"]), dataset.cat_ids
        if model_side != data_side:
            trained = dict(zip(info["cat_ids"], info["class_names"] or info["cat_ids"]))
            here = dict(zip(dataset.cat_ids, dataset.class_names))
            raise EvalInputError(f"-m {model_path} was trained on {_few(trained)} and {data_path} has "
                                 f"{_few(here)} ({class_difference(model_side, data_side)}): evaluate on data "
                                 f"with the same categories")
    run_coco_evaluation(model, dataset, nms_score_threshold=args.nms_score_threshold, nms=args.nms,
                        nms_mode=args.nms_mode, nms_topk=args.nms_topk, batch_size=args.batch_size,
                        nms_iou_or_sigma=args.nms_iou_or_sigma, nms_max_output_size=args.nms_max_output_size,
                        clip_bbox=args.clip_bbox, input_shape=input_shape,
                        resize_method=args.resize_method, letterbox_pad=args.letterbox_pad, split=args.split,
                        workers=default_workers() if args.workers is None else args.workers,
                        results_path=args.save_results, stats_json=args.stats_json)


def main(argv=None):
    """The command line; returns the exit code (2 with one clear message for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with plain_warnings("eval.py"):  # the readers' skipped boxes, as one line each
            if argv[:1] == ["predict"]:
                _predict_main(argv[1:])
            elif "--results" in argv or any(a.startswith("--results=") for a in argv):
                _results_main(argv)
            else:
                _evaluate_main(argv)
        return 0
    except (ValueError, OSError) as e:  # EvalInputError, the data / models checks, a file that cannot be read
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
