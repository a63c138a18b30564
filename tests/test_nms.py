"""NMS of eval.py: the vectorized torch twin against plain loop references written here, and the
CUDA kernel (nms_kernels.cu) against the twin where a GPU is present."""
import math
import os
import shutil
import subprocess

import pytest
import torch

import eval as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_batch(seed, batch=2, priors=60, classes=4, low=0.0):
    """Boxes in clusters (so they overlap) and scores in [low, 1): boxes [B, N, 4], scores [B, N, C]."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 5, 2, generator=g) * 200                       # 5 clusters per image
    which = torch.randint(0, 5, (batch, priors), generator=g)
    xy = torch.gather(centres, 1, which[..., None].expand(-1, -1, 2)) + torch.randn(batch, priors, 2, generator=g) * 8
    wh = 20 + torch.rand(batch, priors, 2, generator=g) * 40
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=-1)
    scores = low + (1 - low) * torch.rand(batch, priors, classes, generator=g)
    return boxes, scores


def iou(a, b):
    """IoU of two xyxy boxes given as lists (plain Python floats)."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def candidates(boxes, scores, score_threshold, topk):
    """One image's candidate (score, prior, class) triples, best first, by loops."""
    out = []
    for n, row in enumerate(scores.tolist()):
        if topk == 0:
            c = max(range(len(row)), key=lambda j: (row[j], -j))  # best class, lower on a tie
            pairs = [(row[c], n, c)]
        else:
            pairs = [(s, n, c) for c, s in enumerate(row)]
        out += [p for p in pairs if p[0] >= score_threshold]
    out.sort(key=lambda t: (-t[0], t[1], t[2]))
    return out[:topk] if topk > 0 else out


def loop_nms(boxes, scores, method, mode, iou_or_sigma, score_threshold, topk, max_output_size):
    """The reference: per image, per group, the greedy soft-NMS loop one candidate at a time.

    Returns per image a list of (box, score, label), best first.
    """
    result = []
    for b in range(boxes.shape[0]):
        groups = {}
        for s, n, c in candidates(boxes[b], scores[b], score_threshold, topk):
            groups.setdefault(0 if mode == "global" else c, []).append([s, boxes[b, n].tolist(), c])
        picks = []
        for key in sorted(groups):
            pool = groups[key]
            for step in range(max_output_size):
                if not pool:
                    break
                best = max(range(len(pool)), key=lambda i: (pool[i][0], -i))
                s, box, c = pool.pop(best)
                picks.append((-s, key, step, box, c))
                survivors = []
                for cand in pool:
                    o = iou(box, cand[1])
                    if method == "hard":
                        if o > iou_or_sigma:
                            continue
                    elif method == "gaussian":
                        cand[0] *= math.exp(-o * o / iou_or_sigma)
                    elif o > iou_or_sigma:
                        cand[0] *= 1 - o
                    if cand[0] >= score_threshold:
                        survivors.append(cand)
                pool = survivors
        picks.sort()
        result.append([(box, -neg, c) for neg, _, _, box, c in picks[:max_output_size]])
    return result


def classic_hard_nms(boxes, scores, mode, iou_threshold, score_threshold, max_output_size):
    """The textbook hard NMS: walk the candidates best first, keep one unless a kept box of its
    group overlaps it by more than the threshold."""
    result = []
    for b in range(boxes.shape[0]):
        kept = []
        for s, n, c in candidates(boxes[b], scores[b], score_threshold, -1):
            box = boxes[b, n].tolist()
            if all(iou(box, kbox) <= iou_threshold for kbox, _, kc in kept if mode == "global" or kc == c):
                kept.append((box, s, c))
        result.append(kept[:max_output_size])
    return result


def assert_same(out, expected, atol=1e-4):
    boxes, scores, labels, counts = out
    for b, dets in enumerate(expected):
        assert int(counts[b]) == len(dets), f"image {b}: {int(counts[b])} detections, expected {len(dets)}"
        n = len(dets)
        if n:
            torch.testing.assert_close(boxes[b, :n], torch.tensor([d[0] for d in dets]), atol=atol, rtol=0)
            torch.testing.assert_close(scores[b, :n], torch.tensor([d[1] for d in dets]), atol=atol, rtol=1e-4)
            assert labels[b, :n].tolist() == [d[2] for d in dets]
        assert (labels[b, n:] == -1).all() and (scores[b, n:] == 0).all()


@pytest.mark.parametrize("method,iou_or_sigma", [("hard", 0.5), ("gaussian", 0.5), ("linear", 0.3)])
@pytest.mark.parametrize("mode", ["global", "per_class"])
@pytest.mark.parametrize("topk", [-1, 0, 40])
def test_twin_matches_loop_reference(method, iou_or_sigma, mode, topk):
    boxes, scores = random_batch(seed=100 * ev.NMS_METHODS.index(method) + 10 * len(mode) + topk + 1)
    # A cap that binds (25) and one that does not (300 > the 240 pairs of an image).
    cap = 300 if topk == -1 else 25
    out = ev.batched_nms(boxes, scores, method=method, mode=mode, iou_or_sigma=iou_or_sigma,
                         score_threshold=0.05, topk=topk, max_output_size=cap)
    assert [t.shape for t in out] == [(2, cap, 4), (2, cap), (2, cap), (2,)]
    assert_same(out, loop_nms(boxes, scores, method, mode, iou_or_sigma, 0.05, topk, cap))


@pytest.mark.parametrize("mode", ["global", "per_class"])
def test_hard_matches_classic_nms(mode):
    boxes, scores = random_batch(seed=7, batch=3, priors=80, classes=3)
    out = ev.batched_nms(boxes, scores, method="hard", mode=mode, iou_or_sigma=0.45,
                         score_threshold=0.2, topk=-1, max_output_size=40)
    assert_same(out, classic_hard_nms(boxes, scores, mode, 0.45, 0.2, 40))


def test_hand_computed_soft_nms():
    # Two boxes of one class overlapping with IoU 1/3 and a far one of another class.
    boxes = torch.tensor([[[0.0, 0, 20, 10], [10, 0, 30, 10], [100, 100, 110, 110]]])
    scores = torch.tensor([[[0.9, 0.0], [0.8, 0.0], [0.0, 0.7]]])
    out = ev.batched_nms(boxes, scores, method="gaussian", mode="per_class", iou_or_sigma=0.5,
                         score_threshold=0.01, topk=-1, max_output_size=10)
    expected = [0.9, 0.7, 0.8 * math.exp(-(1 / 3) ** 2 / 0.5)]
    assert out[3].tolist() == [3]
    torch.testing.assert_close(out[1][0, :3], torch.tensor(expected))
    assert out[2][0, :3].tolist() == [0, 1, 0]
    # Global hard NMS at 0.3 drops the second box; linear at 0.3 scales it by 1 - 1/3.
    hard = ev.batched_nms(boxes, scores, method="hard", mode="global", iou_or_sigma=0.3, topk=-1)
    assert hard[3].tolist() == [2]
    linear = ev.batched_nms(boxes, scores, method="linear", mode="global", iou_or_sigma=0.3, topk=-1)
    torch.testing.assert_close(linear[1][0, 2], torch.tensor(0.8 * (2 / 3)))


def test_empty_and_max_output():
    boxes, scores = random_batch(seed=3)
    out = ev.batched_nms(boxes, scores * 0, score_threshold=0.001)
    assert out[3].tolist() == [0, 0] and (out[2] == -1).all()
    out = ev.batched_nms(boxes, scores, method="gaussian", max_output_size=5, score_threshold=0.0)
    assert out[3].tolist() == [5, 5]
    assert (out[1][:, :-1] >= out[1][:, 1:]).all()  # best first


def test_bad_arguments_are_clear():
    boxes, scores = random_batch(seed=1)
    with pytest.raises(ValueError, match="NMS method"):
        ev.batched_nms(boxes, scores, method="soft")
    with pytest.raises(ValueError, match="NMS mode"):
        ev.batched_nms(boxes, scores, mode="per_image")


def test_kernel_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: cannot check that nms_kernels.cu compiles")
    subprocess.run([nvcc, "-c", os.path.join(ROOT, "nms_kernels.cu"), "-o", str(tmp_path / "nms.o")],
                   check=True, capture_output=True, timeout=120)
    assert (tmp_path / "nms.o").stat().st_size > 0


@pytest.mark.parametrize("method,iou_or_sigma", [("hard", 0.5), ("gaussian", 0.5), ("linear", 0.3)])
@pytest.mark.parametrize("mode", ["global", "per_class"])
def test_kernel_matches_twin(method, iou_or_sigma, mode):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: the kernel-vs-twin check runs only on a CUDA machine")
    pytest.importorskip("cupy", reason="cupy is not installed: pip install cupy-cuda12x to run the kernel")
    for seed, (batch, priors, classes, topk) in enumerate([(2, 60, 4, -1), (4, 700, 20, 2000), (8, 3000, 80, 5000)]):
        boxes, scores = random_batch(seed, batch, priors, classes)
        kwargs = dict(method=method, mode=mode, iou_or_sigma=iou_or_sigma, score_threshold=0.001,
                      topk=topk, max_output_size=100)
        cpu = ev.batched_nms(boxes, scores, **kwargs)
        gpu = ev.batched_nms(boxes.cuda(), scores.cuda(), **kwargs)
        assert gpu[0].is_cuda
        for a, b in zip(cpu, gpu):
            torch.testing.assert_close(b.cpu(), a, atol=1e-5, rtol=1e-5)
        twin_on_gpu = ev.batched_nms(boxes.cuda(), scores.cuda(), use_kernel=False, **kwargs)
        for a, b in zip(cpu, twin_on_gpu):
            torch.testing.assert_close(b.cpu(), a, atol=1e-5, rtol=1e-5)


def test_a_score_exactly_at_the_threshold_is_kept():
    # Two far-apart boxes, scores 0.9 and exactly the threshold 0.25: both survive selection and
    # the decay step (IoU 0 leaves 0.25 as it is, and 0.25 >= 0.25).
    boxes = torch.tensor([[[0.0, 0, 10, 10], [100, 100, 110, 110]]])
    scores = torch.tensor([[[0.9], [0.25]]])
    image, prior, label, score = ev._select_candidates(scores, 0.25, -1)
    assert prior.tolist() == [0, 1] and score.tolist() == [pytest.approx(0.9), 0.25]
    for method in ev.NMS_METHODS:
        out = ev.batched_nms(boxes, scores, method=method, score_threshold=0.25, topk=-1)
        assert out[3].tolist() == [2], method
        assert out[1][0, :2].tolist() == [pytest.approx(0.9), 0.25], method


def test_iou_exactly_at_the_threshold_is_not_suppressed():
    # [0,20]x[0,10] and [0,10]x[0,10]: IoU 100 / 200 = 0.5 exactly. Hard and linear NMS act only
    # on IoU > threshold, so at 0.5 the second box keeps its score 0.8.
    boxes = torch.tensor([[[0.0, 0, 20, 10], [0, 0, 10, 10]]])
    scores = torch.tensor([[[0.9], [0.8]]])
    for method in ("hard", "linear"):
        out = ev.batched_nms(boxes, scores, method=method, iou_or_sigma=0.5, score_threshold=0.01, topk=-1)
        assert out[3].tolist() == [2], method
        assert out[1][0, :2].tolist() == [pytest.approx(0.9), pytest.approx(0.8)], method
    # Just under it (0.49) both act: hard drops the box, linear scales it by 1 - 0.5.
    hard = ev.batched_nms(boxes, scores, method="hard", iou_or_sigma=0.49, topk=-1)
    assert hard[3].tolist() == [1]
    linear = ev.batched_nms(boxes, scores, method="linear", iou_or_sigma=0.49, topk=-1)
    assert linear[1][0, 1].item() == pytest.approx(0.4)


def test_topk_keeps_exactly_k_pairs_when_scores_tie():
    # Five disjoint boxes all scored 0.5 (a saturated head ties a lot): topk 2 keeps exactly
    # two pairs, the lower priors first.
    boxes = torch.tensor([[[20.0 * i, 0, 20 * i + 10, 10] for i in range(5)]])
    scores = torch.full((1, 5, 1), 0.5)
    image, prior, label, score = ev._select_candidates(scores, 0.1, 2)
    assert prior.tolist() == [0, 1]
    out = ev.batched_nms(boxes, scores, method="hard", topk=2, score_threshold=0.1)
    assert out[3].tolist() == [2]
    assert out[0][0, :2].tolist() == [[0.0, 0, 10, 10], [20.0, 0, 30, 10]]


def test_a_nan_score_is_left_out_not_every_pair_of_its_image():
    # topk ranks NaN above every number, so the k-th best score became NaN and the pre-cut
    # "score >= k-th" dropped all 600 pairs of the image. Now the NaN pair alone stays out.
    scores = torch.rand(1, 200, 3, generator=torch.Generator().manual_seed(0))
    scores[0, 5, 1] = float("nan")
    image, prior, label, score = ev._select_candidates(scores, 0.001, 100)
    assert len(score) == 100 and not torch.isnan(score).any()
    assert score[0] == scores.nan_to_num(-1).max() and (prior * 3 + label != 5 * 3 + 1).all()


def test_gaussian_nms_of_two_empty_boxes_keeps_both():
    # Two zero-area boxes (points) of one class: their union is 0, and the IoU of an empty union
    # is defined as 0 (the kernel's rule too). Gaussian decay is then exp(-0 / sigma) = 1, so the
    # second keeps its 0.8. An unguarded 0 / 0 would make it NaN and silently drop the box.
    boxes = torch.tensor([[[5.0, 5, 5, 5], [5.0, 5, 5, 5]]])
    scores = torch.tensor([[[0.9], [0.8]]])
    out = ev.batched_nms(boxes, scores, method="gaussian", iou_or_sigma=0.5, score_threshold=0.01, topk=-1)
    assert out[3].tolist() == [2]
    assert out[1][0, :2].tolist() == [pytest.approx(0.9), pytest.approx(0.8)]
