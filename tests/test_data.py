"""Tests for data.py: readers, the shapes set, the loader and the batched augmentation.

Numbers are checked against hand computation: corners moved by known matrices, crop-mode sizes,
mosaic quadrants, the exact letterbox inverse. Images are tiny so the file runs in seconds.
"""
import json
import math
import os
import shutil
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

import data
from conftest import shapes_with_a_bad_box, shared_path


def make_batch(images_hwc, boxes, labels, scales=None):
    """A loader-style batch from numpy images [H, W, 3] and per-image box / label lists."""
    items = [(img, np.asarray(b, np.float32).reshape(-1, 4), np.asarray(l, np.int64), i,
              (1.0, 1.0) if scales is None else tuple(np.broadcast_to(scales[i], 2).tolist()))
             for i, (img, b, l) in enumerate(zip(images_hwc, boxes, labels))]
    return data._Collate(max_boxes=8)(items)


def random_image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return data.make_shapes(str(tmp_path_factory.mktemp("shapes") / "set"), num_train=24, num_val=8, seed=3)


# ---------------------------------------------------------------- geometry, hand-computed
def test_known_affine_moves_corners():
    boxes = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 2.0, 2.0]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    scale_shift = torch.tensor([[[2.0, 0.0, 10.0], [0.0, 3.0, -5.0], [0, 0, 1]]])
    out, keep = data.transform_boxes(boxes, valid, scale_shift, (100, 100))
    # corners (1,2)->(12,1), (3,4)->(16,7); (0,0)->(10,-5) clipped to 0, (2,2)->(14,1)
    assert torch.allclose(out[0, 0], torch.tensor([12.0, 1.0, 16.0, 7.0]))
    assert keep.tolist() == [[True, False]]  # the second kept 1 px of height: too small, dropped
    c = math.cos(math.pi / 4)
    rot45 = torch.tensor([[[c, -c, 10.0], [c, c, 10.0], [0, 0, 1]]])
    out, keep = data.transform_boxes(boxes[:, 1:], valid[:, 1:], rot45, (100, 100))
    # (0,0)->(10,10), (2,0)->(10+1.414,10+1.414), (0,2)->(10-1.414,10+1.414), (2,2)->(10,10+2.828)
    r = math.sqrt(2)
    assert torch.allclose(out[0, 0], torch.tensor([10 - r, 10.0, 10 + r, 10 + 2 * r]), atol=1e-5)


def test_flip_twice_is_identity():
    rng = np.random.default_rng(0)
    batch = make_batch([random_image(rng, 12, 16)], [[[1, 2, 5, 9]]], [[0]])
    f = data.flip_matrices(torch.tensor([True]), 16)
    assert torch.equal(f @ f, torch.eye(3, dtype=torch.float64)[None])
    theta = data._to_theta(torch.linalg.inv(f), (12, 16), (12, 16))
    once = data.warp(batch["images"], theta, (12, 16)) + 114
    assert torch.allclose(once, batch["images"].float().flip(-1), atol=1e-3)  # pixel centres land on pixel centres
    twice = data.warp(once.round().byte(), theta, (12, 16)) + 114
    assert torch.allclose(twice, batch["images"].float(), atol=1e-3)
    b1, _ = data.transform_boxes(batch["boxes"], batch["valid"], f, (12, 16))
    assert torch.allclose(b1[0, 0], torch.tensor([11.0, 2.0, 15.0, 9.0]))
    b2, _ = data.transform_boxes(b1, batch["valid"], f, (12, 16))
    assert torch.allclose(b2[0, 0], batch["boxes"][0, 0])


def test_randaugment_ops_about_centre():
    ops = torch.tensor([[data.RANDAUGMENT_OPS.index("translate_x"), data.RANDAUGMENT_OPS.index("scale")]])
    m = data.randaugment_matrices(ops, torch.tensor([[1, -1]]), 10, (100, 200))
    # translate 0.45 * 200 = 90 px, then scale 1 - 0.5 = 0.5 about the centre (100, 50)
    point = m[0] @ torch.tensor([100.0, 50.0, 1.0], dtype=torch.float64)
    assert torch.allclose(point, torch.tensor([100 + 45.0, 50.0, 1.0], dtype=torch.float64))
    rotate = torch.tensor([[data.RANDAUGMENT_OPS.index("rotate")]])
    rot = data.randaugment_matrices(rotate, torch.tensor([[1]]), 30, (10, 10))
    assert abs(math.degrees(math.atan2(rot[0, 1, 0], rot[0, 0, 0])) - 90) < 1e-9  # 3 deg x 30


def test_each_geometric_op_matrix_by_hand():
    # Magnitude 10, sign +1, output 100 x 200 (centre c = (100, 50)): A about the centre is
    # [A | c - A c]. rotate 30 deg; shear_x 0.3 -> t = (-0.3 * 50, 0); shear_y 0.3 -> t = (0, -0.3 * 100);
    # translate 0.45 of the width / height; scale 1.5 -> t = c - 1.5 c = (-50, -25).
    cos, sin = math.cos(math.radians(30)), math.sin(math.radians(30))
    expected = {
        "rotate": [[cos, -sin, 100 - (cos * 100 - sin * 50)], [sin, cos, 50 - (sin * 100 + cos * 50)]],
        "shear_x": [[1, 0.3, -15], [0, 1, 0]],
        "shear_y": [[1, 0, 0], [0.3, 1, -30]],
        "translate_x": [[1, 0, 90], [0, 1, 0]],
        "translate_y": [[1, 0, 0], [0, 1, 45]],
        "scale": [[1.5, 0, -50], [0, 1.5, -25]],
    }
    ops = torch.tensor([[data.RANDAUGMENT_OPS.index(name)] for name in expected])
    m = data.randaugment_matrices(ops, torch.ones(len(expected), 1, dtype=torch.int64), 10, (100, 200))
    for i, (name, rows) in enumerate(expected.items()):
        assert torch.allclose(m[i, :2], torch.tensor(rows, dtype=torch.float64), atol=1e-9), name
    # sign -1 mirrors each op: translate_y -45, scale 0.5
    mirrored = data.randaugment_matrices(ops[-2:], -torch.ones(2, 1, dtype=torch.int64), 10, (100, 200))
    assert torch.allclose(mirrored[0, 1, 2], torch.tensor(-45.0, dtype=torch.float64))
    assert torch.allclose(mirrored[1, 0, 0], torch.tensor(0.5, dtype=torch.float64))


# ---------------------------------------------------------------- crop modes
def test_letterbox_size_boxes_and_exact_inverse():
    rng = np.random.default_rng(1)
    batch = make_batch([random_image(rng, 100, 200), random_image(rng, 50, 40)],
                       [[[0, 0, 200, 100], [20.5, 10.25, 60.75, 90.5]], [[4, 8, 36, 48]]], [[0, 1], [2]])
    out = data.letterbox(batch, (64, 64))
    assert out["images"].shape == (2, 3, 64, 64) and out["images"].dtype == torch.float32
    # image 0: scale min(64/100, 64/200) = 0.32, top-left; image 1: scale min(64/50, 64/40) = 1.28
    assert torch.allclose(out["boxes"][0, 0], torch.tensor([0.0, 0.0, 64.0, 32.0]))
    assert torch.allclose(out["boxes"][1, 0], torch.tensor([5.12, 10.24, 46.08, 61.44]))
    assert torch.allclose(out["images"][0, :, 33:], torch.full((3, 31, 64), 114 / 255))  # grey bar below
    for i in range(2):  # matrices undo the letterbox to 1e-4 px
        v = out["valid"][i]
        b = out["boxes"][i, v].reshape(-1, 2, 2)
        back = torch.einsum("ij,nkj->nki", out["matrices"][i, :, :2], b) + out["matrices"][i, :, 2]
        assert (back.reshape(-1, 4) - batch["boxes"][i, v]).abs().max() < 1e-4


@pytest.mark.parametrize("scale, corner", [((0.5, 0.5), (100.0, 60.0)), ((0.5, 0.25), (100.0, 120.0))])
def test_matrices_reach_original_pixels_when_worker_shrank(scale, corner):
    # canvas corner (50, 30) / (x, y) scale; the y scale differs from the x one when rounding the
    # shrunk height to whole pixels did (a thin image, say)
    rng = np.random.default_rng(2)
    batch = make_batch([random_image(rng, 50, 100)], [[[10, 10, 50, 30]]], [[0]], scales=[scale])
    out = data.letterbox(batch, (100, 100))
    back = out["matrices"][0] @ torch.tensor([out["boxes"][0, 0, 2], out["boxes"][0, 0, 3], 1.0])
    assert torch.allclose(back, torch.tensor(corner), atol=1e-4)


@pytest.mark.parametrize("mode", [0.5, 1.0, 2.5])
def test_crop_modes_size_and_clipping(mode):
    rng = np.random.default_rng(3)
    batch = make_batch([random_image(rng, 60, 90), random_image(rng, 80, 40)],
                       [[[0, 0, 90, 60], [30, 20, 60, 40]], [[0, 0, 40, 80]]], [[0, 1], [2]])
    for seed in range(5):
        out = data.augment(batch, (48, 64), mode, 0, 2, 0, torch.Generator().manual_seed(seed), hsv=None, flip_prob=0)
        assert out["images"].shape == (2, 3, 48, 64)
        b = out["boxes"][out["valid"]]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 64).all() and (b[:, 3] <= 48).all()
        whole = out["boxes"][0, 0]
        if mode == 1.0:  # short side covers the target: the whole-image box fills the output
            assert torch.allclose(whole, torch.tensor([0.0, 0.0, 64.0, 48.0]), atol=1e-4)
        if mode > 1:  # random scale: the image is f x the letterbox size, f in [0.1, mode]
            s = (out["matrices"][0, 0, 0]) ** -1 / min(48 / 60, 64 / 90)
            assert 0.1 - 1e-6 <= s <= mode + 1e-6
            assert out["valid"][0, 0] == (whole[2] - whole[0] >= 2)


def test_crop_mode_draws_stay_in_their_ranges():
    # 400 draws of one 100 x 150 (h x w) image into 64 x 96. The source rectangle each matrix
    # shows is (x0, y0) = -t / s, size = output / s.
    sizes = torch.tensor([[100, 150]]).repeat(400, 1)
    m = data.crop_matrices(sizes, (64, 96), 0.6, torch.Generator().manual_seed(0))
    sx, sy, tx, ty = m[:, 0, 0], m[:, 1, 1], m[:, 0, 2], m[:, 1, 2]
    cw, ch, x0, y0 = 96 / sx, 64 / sy, -tx / sx, -ty / sy
    assert (x0 >= -1e-9).all() and (y0 >= -1e-9).all() and (x0 + cw <= 150 + 1e-9).all() and (y0 + ch <= 100 + 1e-9).all()
    free = (cw < 150 - 1e-6) & (ch < 100 - 1e-6)  # neither side clamped to the image
    area, aspect = cw * ch / (100 * 150), (cw / ch) / (96 / 64)
    assert free.sum() > 200
    assert (area[free] >= 0.6 - 1e-9).all() and (area[free] <= 1 + 1e-9).all()
    assert (aspect[free] >= 3 / 4 - 1e-9).all() and (aspect[free] <= 4 / 3 + 1e-9).all()
    assert area[free].min() < 0.65 and area[free].max() > 0.95  # the draws do cover the range
    # Mode 2.5: scale f in [0.1, 2.5] x the letterbox scale, offset uniform between 0 and the room.
    m = data.crop_matrices(sizes, (64, 96), 2.5, torch.Generator().manual_seed(1))
    f = m[:, 0, 0] / min(64 / 100, 96 / 150)
    room_x, room_y = 96 - m[:, 0, 0] * 150, 64 - m[:, 1, 1] * 100
    assert (f >= 0.1 - 1e-9).all() and (f <= 2.5 + 1e-9).all() and f.min() < 0.3 and f.max() > 2.2
    for t, room in ((m[:, 0, 2], room_x), (m[:, 1, 2], room_y)):
        assert (t >= torch.minimum(room, torch.zeros(())) - 1e-9).all() and (t <= torch.maximum(room, torch.zeros(())) + 1e-9).all()
    assert (m[:, 0, 2].abs() > 1).float().mean() > 0.9  # offsets are drawn, not left at 0


# ---------------------------------------------------------------- mosaic
def test_mosaic_quadrants_and_scale():
    b, h, w = 4, 40, 60
    images = torch.arange(b, dtype=torch.float32)[:, None, None, None].expand(b, 3, h, w).clone()  # image i is all i
    boxes = torch.tensor([[0.0, 0.0, 60.0, 40.0]]).repeat(b, 1, 1)  # each image: one box over all of it
    labels, valid = torch.arange(b)[:, None], torch.ones(b, 1, dtype=torch.bool)
    g = torch.Generator().manual_seed(5)
    out, ob, ol, ov = data.mosaic(images, boxes, labels, valid, g)
    g = torch.Generator().manual_seed(5)
    u = torch.rand(2, generator=g)
    cy, cx = round(h * (0.25 + 0.5 * float(u[0]))), round(w * (0.25 + 0.5 * float(u[1])))
    quads = torch.tensor([[0, 0, cx, cy], [cx, 0, w, cy], [0, cy, cx, h], [cx, cy, w, h]], dtype=torch.float32)
    sources = []
    # M = 1 box per image, up to 4 per mosaic: the width grows to the most survivors of an output
    assert ob.shape == (b, int(ov.sum(1).max()), 4) and ob.shape[1] > 1
    pad = torch.zeros(b, 3, dtype=torch.bool)  # M = 4 slots, one real box: room for all 4 quadrants' boxes
    out2, ob2, ol2, ov2 = data.mosaic(images, boxes.repeat(1, 4, 1), labels.repeat(1, 4), torch.cat([valid, pad], 1),
                                      torch.Generator().manual_seed(5), min_area_kept=0.0)  # keep even small corners
    for i in range(b):
        assert ov2[i].all()
        # each quadrant holds exactly its quadrant-sized box, at scale 1, from the image shown there
        assert torch.equal(ob2[i], quads)
        for q, (x0, y0, x1, y1) in enumerate(quads.int().tolist()):
            shown = out2[i, :, y0:y1, x0:x1]
            assert (shown == ol2[i, q].float()).all()
            sources.append(int(ol2[i, q]))
    assert sorted(sources) == sorted(list(range(b)) * 4)  # every image used 4 times
    assert all(sorted(ol2[:, q].tolist()) == list(range(b)) for q in range(4))  # once per quadrant


def test_mosaic_filters_boxes_cut_away():
    images = torch.zeros(2, 3, 40, 40)
    # a 4x4 box in the top-left corner survives only where the top-left quadrant shows it
    boxes = torch.tensor([[[1.0, 1.0, 5.0, 5.0]], [[35.0, 35.0, 39.0, 39.0]]])
    out, ob, ol, ov = data.mosaic(images, boxes, torch.tensor([[0], [1]]), torch.ones(2, 1, dtype=torch.bool),
                                  torch.Generator().manual_seed(0))
    kept = ob[ov]
    assert len(kept) == 2  # one top-left box and one bottom-right box among the two outputs
    assert sorted(kept[:, 0].tolist()) == [1.0, 35.0]


def test_mosaic_keeps_every_surviving_box_beyond_m():
    # Image q holds its M = 3 boxes inside quadrant q's region (split at (20, 20) of 40 x 40);
    # output 0 shows quadrant q of image q, so all 12 boxes survive there. Keeping only M of them
    # left 9 objects in the pixels unlabelled.
    regions = [(0, 20, 0, 20), (0, 20, 20, 40), (20, 40, 0, 20), (20, 40, 20, 40)]  # (y0, y1, x0, x1)
    corner = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]])  # (x, y) of each quadrant
    small = torch.tensor([[2.0, 2, 6, 6], [8, 8, 12, 12], [13, 2, 18, 9]])
    boxes = small[None] + corner.repeat(1, 2)[:, None, :]  # [4, 3, 4]
    labels = torch.arange(12).reshape(4, 3)
    src = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0]])
    ob, ol, ov = data.mosaic_boxes(boxes, labels, torch.ones(4, 3, dtype=torch.bool), (regions, src))
    assert ob.shape == (4, 12, 4) and ov.sum(1).tolist() == [12, 0, 0, 0]
    assert torch.equal(ob[0], boxes.reshape(12, 4)) and ol[0].tolist() == list(range(12))


def test_region_warp_matches_full_warp():
    rng = np.random.default_rng(6)
    batch = make_batch([random_image(rng, 30, 40), random_image(rng, 36, 24)], [[], []], [[], []])
    inv = torch.linalg.inv(data.randaugment_matrices(torch.tensor([[1], [2]]), torch.tensor([[1], [-1]]), 8, (32, 32))
                           @ data.crop_matrices(batch["sizes"], (32, 32), 0, None))
    full = data.warp(batch["images"], data._to_theta(inv, (36, 40), (32, 32)), (32, 32))
    part = data.warp_region(batch["images"], inv, (5, 20, 3, 17), torch.tensor([1, 0]))
    assert torch.allclose(part, full[[1, 0], :, 5:20, 3:17], atol=1e-3)  # crop-first changes nothing


def test_augment_mosaic_equals_quadrants_of_plain_augment():
    rng = np.random.default_rng(7)
    batch = make_batch([random_image(rng, 40, 50) for _ in range(4)], [[[2, 2, 30, 30]]] * 4, [[0]] * 4)
    kw = dict(input_shape=(32, 32), random_crop_mode=1.0, magnitude=0, num_layers=2, hsv=None)
    plain = data.augment(batch, mosaic_mix_prob=0, generator=torch.Generator().manual_seed(3), **kw)["images"]
    mixed = data.augment(batch, mosaic_mix_prob=1, generator=torch.Generator().manual_seed(3), **kw)["images"]
    # the crop / flip draws come first, so both runs warp each image the same way; every quadrant of a
    # mosaic must then be the same region of exactly one plain output, each image once per quadrant
    g = torch.Generator().manual_seed(3)
    data.crop_matrices(batch["sizes"], (32, 32), 1.0, g), torch.rand(4, generator=g)  # replay augment's draws
    torch.randint(0, len(data.RANDAUGMENT_OPS), (4, 2), generator=g), torch.randint(0, 2, (4, 2), generator=g)
    torch.rand(1, generator=g)
    regions, src = data.mosaic_plan(4, 32, 32, g)
    for i in range(4):
        for q, (y0, y1, x0, x1) in enumerate(regions):
            assert torch.allclose(mixed[i, :, y0:y1, x0:x1], plain[src[i, q], :, y0:y1, x0:x1], atol=1e-5)


def test_augment_with_mosaic_keeps_boxes_inside():
    rng = np.random.default_rng(4)
    batch = make_batch([random_image(rng, 50, 70) for _ in range(4)],
                       [[[5, 5, 60, 40], [10, 10, 12, 40]]] * 4, [[0, -1]] * 4)
    out = data.augment(batch, (32, 32), 1.0, 6, 2, 1.0, torch.Generator().manual_seed(0))
    b = out["boxes"][out["valid"]]
    assert len(b) > 0 and b.min() >= 0 and b[:, 2:].max() <= 32
    assert ((b[:, 2:] - b[:, :2]) >= 2).all()
    assert set(out["labels"][out["valid"]].tolist()) <= {0, -1}


# ---------------------------------------------------------------- filtering, colour, determinism
def test_boxes_never_leave_and_degenerate_dropped():
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.5, 30.0], [90.0, 90.0, 99.0, 99.0],
                           [10.0, 10.0, 12.5, 50.0], [20.0, 20.0, 40.0, 40.0]]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    shift = torch.tensor([[[1.0, 0.0, -8.0], [0.0, 1.0, 0.0], [0, 0, 1]]])
    out, keep = data.transform_boxes(boxes, valid, shift, (64, 64))
    # box 0 keeps 2 of 10 px (20% of its area: kept at 0.15, dropped at 0.25); 1 is 0.5 px wide; 2 is outside;
    # 3 is 2.5 x 40 px (aspect 16, kept); 4 moves whole
    assert keep.tolist() == [[True, False, False, True, True]]
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 0.0, 2.0, 10.0]))
    assert torch.allclose(out[0, 4], torch.tensor([12.0, 20.0, 32.0, 40.0]))
    assert out[~keep].abs().sum() == 0
    _, keep = data.transform_boxes(boxes, valid, shift, (64, 64), min_area_kept=0.25)
    assert keep[0, 0].item() is False
    thin = torch.tensor([[[0.0, 0.0, 2.0, 50.0]]])
    assert not data.transform_boxes(thin, valid[:, :1], torch.eye(3)[None], (64, 64))[1].any()  # aspect 25 > 20


def test_magnitude_zero_changes_nothing():
    rng = np.random.default_rng(5)
    batch = make_batch([random_image(rng, 30, 40), random_image(rng, 20, 20)], [[[1, 1, 30, 20]], [[2, 2, 10, 10]]],
                       [[0], [1]])
    ref = data.letterbox(batch, (32, 32))
    out = data.augment(batch, (32, 32), 0, 0, 2, 0, torch.Generator().manual_seed(9), hsv=None, flip_prob=0)
    for k in ("images", "boxes", "valid", "matrices"):
        assert torch.equal(out[k], ref[k])


def test_colour_ops_numbers():
    x = torch.tensor([0.0, 0.2, 0.4, 1.0]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    eq = data._equalize(x.clone())
    assert torch.allclose(eq[0, 0].flatten(), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    ac = data._autocontrast(x[..., :1, :] * 0.5 + 0.25)  # 0.25..0.35 stretched to 0..1
    assert torch.allclose(ac[0, 0].flatten(), torch.tensor([0.0, 1.0]))
    assert torch.allclose(data._solarize(torch.tensor([0.2, 0.5, 0.7]), 0.5), torch.tensor([0.2, 0.5, 0.3]))
    flat = torch.full((1, 3, 4, 4), 0.25)
    flat[0, :, 1, 1] = 1.0  # one bright pixel: blurred it spreads 1/13 of the difference to each neighbour
    blurred = data._sharpness(flat, torch.tensor([0.0]))
    assert abs(float(blurred[0, 0, 1, 1]) - (0.25 * 8 + 5 * 1.0) / 13) < 1e-6
    assert abs(float(blurred[0, 0, 0, 0]) - (0.25 * 12 + 1.0) / 13) < 1e-6
    assert torch.allclose(data._sharpness(flat, torch.tensor([1.0])), flat)
    m = data.hsv_matrices((0.0, 0.0, 0.0), torch.Generator().manual_seed(0), 2)
    assert torch.allclose(m, torch.eye(3, dtype=torch.float64).expand(2, 3, 3), atol=1e-12)
    grey = data._blend_matrices(torch.tensor([True]), torch.tensor([0.0], dtype=torch.float64))[0]
    red = torch.tensor([1.0, 0, 0], dtype=torch.float64)
    assert torch.allclose(grey @ red, torch.full((3,), 0.299, dtype=torch.float64))


def test_posterize_solarize_and_hsv_gains_by_hand():
    # Magnitude 10: posterize keeps 8 - 4 = 4 bits (steps of 16 / 255), solarize inverts from
    # 1 - 0.9 = 0.1 up. Image 0 draws posterize, image 1 solarize, image 2 neither: unchanged.
    v = torch.tensor([0.05, 0.3, 0.62, 0.9], dtype=torch.float64).reshape(1, 1, 2, 2).expand(3, 3, 2, 2)
    ops = torch.tensor([[data.RANDAUGMENT_OPS.index(name)] for name in ("posterize", "solarize", "identity")])
    identity = (torch.eye(3, dtype=torch.float64).repeat(3, 1, 1), torch.zeros(3, 3, dtype=torch.float64),
                torch.zeros(3, 3, 3, dtype=torch.float64))
    out = data._colour_chunk(torch.empty(3, 3, 2, 2), (v * 255 - 114).float(), identity, ops,
                             torch.ones(3, 1, dtype=torch.float64), 10)
    flat = v[0, 0].flatten()
    assert torch.allclose(out[0, 0].flatten().double(), torch.floor(flat * 255 / 16) * 16 / 255, atol=1e-6)
    assert torch.allclose(out[1, 0].flatten().double(), torch.tensor([0.05, 0.7, 0.38, 0.1], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(out[2, 0].flatten().double(), flat, atol=1e-6)
    # HSV: the draws u in [-1, 1) replayed; value scales every channel by 1 + 0.3 u, saturation
    # scales the distance from the grey level by 1 + 0.5 u and keeps the grey level itself.
    u = torch.rand(2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1
    value = data.hsv_matrices((0.0, 0.0, 0.3), torch.Generator().manual_seed(4), 2)
    assert torch.allclose(value, (1 + 0.3 * u[:, 2])[:, None, None] * torch.eye(3, dtype=torch.float64), atol=1e-12)
    sat = data.hsv_matrices((0.0, 0.5, 0.0), torch.Generator().manual_seed(4), 2)
    red = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    grey = float(data._GREY @ red)
    for i in range(2):
        moved = sat[i] @ red
        assert abs(float(data._GREY @ moved) - grey) < 1e-9
        assert torch.allclose(moved - grey, (1 + 0.5 * u[i, 1]) * (red - grey), atol=1e-9)


def test_letterbox_pads_with_grey_beyond_each_image(shapes_dir):
    # A real loader batch mixes image sizes, so each smaller image sits in a canvas padded by the
    # collate; after the letterbox everything right of / below an image's own pixels is grey 114,
    # whether it was read from the canvas padding or from beyond the canvas.
    ds = data.open_dataset(shapes_dir, "train")
    batch = next(iter(data.make_loader(ds, 8, shuffle=False, workers=0, seed=0)))
    assert len({tuple(s) for s in batch["sizes"].tolist()}) > 1  # sizes differ within the batch
    out = data.letterbox(batch, (256, 256))
    grey = torch.tensor(114 / 255)
    for i, (h, w) in enumerate(batch["sizes"].tolist()):
        s = min(256 / h, 256 / w)
        x_end, y_end = math.ceil(w * s) + 1, math.ceil(h * s) + 1
        assert torch.allclose(out["images"][i, :, :, x_end:], grey) and torch.allclose(out["images"][i, :, y_end:], grey)


def test_randaugment_strength_on_a_uniform_grey_batch():
    # 64 uniform images of the pad grey g = 114 / 255, one RandAugment op each at magnitude 6: the
    # geometric ops and contrast, colour, sharpness, solarize (threshold 1 - 0.54 > g) and
    # autocontrast leave g; brightness scales it by 1 +- 0.09 x 6; posterize keeps 8 - 2 bits
    # (steps of 4 / 255: 112 / 255); equalize leaves a one-value image as it is, as PIL's does.
    # Nothing else may appear.
    b, g = 64, 114 / 255
    batch = dict(images=torch.full((b, 3, 40, 40), 114, dtype=torch.uint8), sizes=torch.tensor([[40, 40]] * b),
                 boxes=torch.zeros(b, 1, 4), labels=torch.zeros(b, 1, dtype=torch.long),
                 valid=torch.zeros(b, 1, dtype=torch.bool), image_ids=torch.arange(b), scales=torch.ones(b, 2))
    out = data.augment(batch, (32, 32), random_crop_mode=0, magnitude=6, num_layers=1, mosaic_mix_prob=0,
                       generator=torch.Generator().manual_seed(0), hsv=None)["images"]
    values = out.amin((1, 2, 3))
    assert torch.allclose(values, out.amax((1, 2, 3)), atol=1e-6)  # each image stays uniform
    allowed = torch.tensor([g, g * 1.54, g * 0.46, 112 / 255])
    nearest = (values[:, None] - allowed[None]).abs().min(1)
    assert (nearest.values < 1e-5).all(), values[nearest.values >= 1e-5]
    assert {1, 2} <= set(nearest.indices.tolist())  # brightness was drawn both ways


def test_contrast_and_brightness_fold_into_one_affine_map():
    ops = torch.tensor([[data.RANDAUGMENT_OPS.index("brightness"), data.RANDAUGMENT_OPS.index("contrast")]])
    factors = torch.tensor([[0.5, 0.2]], dtype=torch.float64)
    a, c, d = data.colour_affine(ops, factors, None, None)
    v = torch.tensor([[0.2, 0.4, 0.8], [0.6, 0.6, 0.6]], dtype=torch.float64).T.reshape(1, 3, 1, 2)  # 2 pixels
    mean = v.mean((2, 3))[0]
    warped = (v * 255 - 114).float()
    out = data._colour_into(torch.empty(1, 3, 1, 2), warped, a, c, d)
    # by hand: brightness 0.5 -> v/2; contrast 0.2 blends towards the mean grey of v/2
    grey = 0.5 * float(data._GREY @ mean)
    expect = 0.2 * v / 2 + 0.8 * grey
    assert torch.allclose(out.double(), expect, atol=1e-5)


def test_same_seed_same_batch(shapes_dir):
    ds = data.open_dataset(shapes_dir, "train")
    outs = []
    for workers in (0, 2, 2):
        it = iter(data.make_loader(ds, 4, True, workers, seed=7))
        batch = next(it)
        outs.append(data.augment(batch, (64, 64), 1.0, 6, 2, 0.5, torch.Generator().manual_seed(1)))
    for other in outs[1:]:
        for k in outs[0]:
            assert torch.equal(outs[0][k], other[k]), k
    other_seed = next(iter(data.make_loader(ds, 4, True, 0, seed=8)))
    assert not torch.equal(other_seed["image_ids"], next(iter(data.make_loader(ds, 4, True, 0, seed=7)))["image_ids"])


# ---------------------------------------------------------------- readers and the shapes set
def test_shapes_set(shapes_dir, tmp_path):
    ds = data.open_dataset(shapes_dir, "train")
    assert len(ds) == 24 and ds.class_names == data.SHAPE_NAMES and ds.cat_ids == [1, 3, 5, 7, 9, 11]
    item = ds[0]
    assert item["image"].dtype == np.uint8 and item["image"].ndim == 3 and 256 <= item["image"].shape[1] <= 384
    assert item["boxes"].dtype == np.float32 and item["labels"].dtype == np.int64
    gt = ds.coco_gt()
    assert {a["category_id"] for a in gt["annotations"]} <= {1, 3, 5, 7, 9, 11}
    # deterministic: a second build with the same seed is byte-identical
    again = data.make_shapes(str(tmp_path / "again"), num_train=24, num_val=8, seed=3)
    for rel in ("annotations/instances_train.json", "train/000005.jpg", "val/000003.jpg"):
        with open(os.path.join(shapes_dir, rel), "rb") as a, open(os.path.join(again, rel), "rb") as b:
            assert a.read() == b.read(), rel
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".shapes-")]  # no temp folder left behind


def test_worker_downscale_records_scale(shapes_dir):
    ds = data.open_dataset(shapes_dir, "val")
    full = ds.load(0)
    small = ds.load(0, max_side=128)
    h, w = full[0].shape[:2]
    assert max(small[0].shape[:2]) == 128 and small[4] == (small[0].shape[1] / w, small[0].shape[0] / h)
    assert np.allclose(small[1], full[1] * np.array(small[4] * 2))
    batch = next(iter(data.make_loader(ds, 2, False, 0, 0, max_side=128)))
    assert torch.equal(batch["scales"][0], torch.tensor(small[4])) and max(batch["images"].shape[-2:]) == 128


def test_crowd_regions_never_targets(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    Image.new("RGB", (40, 30)).save(img_dir / "a.jpg")
    coco = dict(images=[dict(id=7, file_name="a.jpg", width=40, height=30)],
                annotations=[dict(id=1, image_id=7, category_id=4, bbox=[1, 2, 10, 10], iscrowd=0),
                             dict(id=2, image_id=7, category_id=9, bbox=[15, 5, 20, 20], iscrowd=1)],
                categories=[dict(id=9, name="b"), dict(id=4, name="a")])
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    ds = data.open_dataset(str(tmp_path / "ann.json"), "val")
    assert ds.cat_ids == [4, 9] and ds.class_names == ["a", "b"]
    item = ds[0]
    assert item["labels"].tolist() == [0, -1] and item["image_id"] == 7
    assert np.allclose(item["boxes"], [[1, 2, 11, 12], [15, 5, 35, 25]])
    batch = next(iter(data.make_loader(ds, 1, False, 0, 0)))
    out = data.augment(batch, (32, 32), 1.0, 3, 2, 0, torch.Generator().manual_seed(0))
    assert (out["labels"][out["valid"]] != 1).all()  # the crowd stays -1, never becomes class "b"


def test_coco_and_yolo_agree_on_voc():
    coco = data.open_dataset(shared_path("voc2007_100", "instances_coco.json"), "train")
    yolo = data.open_dataset(shared_path("voc2007_100", "yolo"), "train",
                             images_dir=shared_path("voc2007_100", "images"))
    assert len(coco) == len(yolo) == 100
    assert sum(len(r["boxes"]) for r in coco.records) == sum(len(r["boxes"]) for r in yolo.records) == 273
    by_file = {os.path.basename(r["file"]): r for r in yolo.records}
    for r in coco.records:
        y = by_file[os.path.basename(r["file"])]
        names_c = sorted(zip([coco.class_names[i] for i in r["labels"]], r["boxes"].round().tolist()))
        names_y = sorted(zip([yolo.class_names[i] for i in y["labels"]], y["boxes"].round().tolist()))
        assert names_c == names_y
        order_c, order_y = np.lexsort(r["boxes"].round().T), np.lexsort(y["boxes"].round().T)
        assert np.abs(r["boxes"][order_c] - y["boxes"][order_y]).max(initial=0) < 0.6  # 6-decimal normalisation
    image = coco[0]["image"]
    assert image.shape[2] == 3 and image.dtype == np.uint8
    # The darknet export has a train split alone: read as val, it says these are the training images.
    with pytest.warns(UserWarning, match=r"yolo has no val split: its obj_train_data/ labels serve as val, so an AP "
                                         r"is measured on the training images"):
        val = data.open_dataset(shared_path("voc2007_100", "yolo"), "val", images_dir=shared_path("voc2007_100", "images"))
    assert val.files == yolo.files


# ---------------------------------------------------------------- bad input
def write_coco(tmp_path, annotations, images=None):
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    Image.new("RGB", (40, 30)).save(img_dir / "a.jpg")
    coco = dict(images=[dict(id=1, file_name="a.jpg", width=40, height=30)] if images is None else images,
                annotations=annotations, categories=[dict(id=1, name="x")])
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    return str(path)


def test_bad_inputs(tmp_path):
    path = write_coco(tmp_path, [])
    ds = data.open_dataset(path, "train")
    assert len(ds[0]["boxes"]) == 0  # an image without annotations is a background image
    os.remove(tmp_path / "images" / "a.jpg")
    with pytest.raises(data.DataLoadError, match="a.jpg is missing"):
        ds[0]
    (tmp_path / "images" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="a.jpg cannot be decoded"):
        ds[0]
    (tmp_path / "bad.json").write_text("{broken")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        data.open_dataset(str(tmp_path / "bad.json"), "train")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json is not a COCO instances file"):
        data.open_dataset(str(tmp_path / "list.json"), "train")
    with pytest.raises(ValueError, match="no images"):
        data.open_dataset(write_coco(tmp_path, [], images=[]), "train")
    # A string image id (pycocotools takes them, the loader's int64 ids do not): refused when the
    # data opens, not as a traceback from a DataLoader worker; a float 2.0 is the whole number 2.
    named = [dict(id="img_1", file_name="a.jpg", width=40, height=30)]
    with pytest.raises(ValueError, match='image id "img_1" is not a whole number: number the images 1, 2, 3'):
        data.open_dataset(write_coco(tmp_path, [], images=named), "train")
    assert data.open_dataset(write_coco(tmp_path, [], images=[dict(named[0], id=2.0)]), "train").image_ids == [2]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.open_dataset(str(tmp_path / "nowhere"), "train")
    with pytest.raises(ValueError, match="empty split"):
        (tmp_path / "yolo" / "labels").mkdir(parents=True)
        (tmp_path / "yolo" / "obj.names").write_text("x\n")
        data.open_dataset(str(tmp_path / "yolo"), "train")


def test_coco_download_layout_opens_as_is(shapes_dir, tmp_path):
    # COCO's own names: annotations/instances_val2017.json beside val2017/ (as YOLOX expects).
    root = tmp_path / "coco"
    shutil.copytree(shapes_dir, root)
    os.rename(root / "annotations" / "instances_val.json", root / "annotations" / "instances_val2017.json")
    os.rename(root / "val", root / "val2017")
    ds = data.open_dataset(str(root), "val")
    reference = data.open_dataset(shapes_dir, "val")
    assert len(ds) == len(reference) == 8
    assert np.array_equal(ds[3]["image"], reference[3]["image"]) and np.allclose(ds[3]["boxes"], reference[3]["boxes"])
    with pytest.raises(FileNotFoundError, match="instances_train2017.json, instances_train2014.json; found instances_val2017.json"):
        os.remove(root / "annotations" / "instances_train.json")
        data.open_dataset(str(root), "train")
    # A json without the annotations/ folder around it: the error names the file to give instead.
    os.rename(root / "annotations" / "instances_val2017.json", root / "instances_val2017.json")
    shutil.rmtree(root / "annotations")
    with pytest.raises(FileNotFoundError, match="holds instances_val2017.json: point to the annotation json itself"):
        data.open_dataset(str(root), "val")
    # ... and given so, it finds its images in val2017/ beside it.
    assert data.open_dataset(str(root / "instances_val2017.json"), "val").files[0] == str(root / "val2017" / "000000.jpg")


def test_a_json_file_is_one_split_whichever_is_asked(shapes_dir):
    # train/ and val/ of the shapes set hold files of the same names: the train json's images must
    # come from train/ even when the val split is asked for, or its boxes would sit on other pictures.
    one = os.path.join(shapes_dir, "annotations", "instances_train.json")
    as_train, as_val = data.open_dataset(one, "train"), data.open_dataset(one, "val")
    assert as_val.files == as_train.files and len(as_val) == 24
    assert as_val.files[0] == os.path.join(shapes_dir, "train", "000000.jpg")
    folder_val = data.open_dataset(shapes_dir, "val")
    assert folder_val.files[0] == os.path.join(shapes_dir, "val", "000000.jpg") and len(folder_val) == 8


def test_bad_boxes_counted_warning(tmp_path):
    anns = [dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 5, 5], iscrowd=0),
            dict(id=2, image_id=1, category_id=1, bbox=[float("nan"), 1, 5, 5], iscrowd=0),
            dict(id=3, image_id=1, category_id=1, bbox=[1, 1, -3, 5], iscrowd=0),
            dict(id=4, image_id=1, category_id=1, bbox=[500, 1, 5, 5], iscrowd=0),
            dict(id=5, image_id=1, category_id=1, bbox=[38, 1, 5, 5], iscrowd=0)]  # 3 px outside: clipped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.open_dataset(write_coco(tmp_path, anns), "train")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "ann.json: skipped 3 bad boxes of 5 (" in messages[0]
    assert "every box" not in messages[0]
    assert "annotation 2 bbox [nan, 1, 5, 5]; annotation 3 bbox [1, 1, -3, 5]; annotation 4 bbox [500, 1, 5, 5]" \
        in messages[0]  # as written in the json (x, y, w, h), not as the xyxy they became
    assert np.allclose(ds[0]["boxes"], [[1, 1, 6, 6], [38, 1, 40, 6]])
    # The evaluation's ground truth leaves the skipped boxes out too (the kept one that was
    # clipped for training keeps its own coordinates there, as pycocotools scores it).
    assert [a["id"] for a in ds.coco_gt()["annotations"]] == [1, 5]
    assert ds.coco_gt()["annotations"][1]["bbox"] == [38, 1, 5, 5]



def write_yolo(tmp_path, labels, names="a\nb\n", size=(40, 30)):
    """A YOLO folder: obj.names, labels/<stem>.txt with the given text, images/<stem>.jpg of `size`."""
    root = tmp_path / "yolo"
    (root / "labels").mkdir(parents=True)
    (root / "images").mkdir()
    if names is not None:
        (root / "obj.names").write_text(names)
    for stem, text in labels.items():
        (root / "labels" / f"{stem}.txt").write_text(text)
        Image.new("RGB", size).save(root / "images" / f"{stem}.jpg")
    return root


def test_yolo_lines_must_hold_5_numbers(tmp_path):
    # 5 lines of 4 numbers are 20 numbers: reshaped to 5 columns they made 4 wrong boxes, silently.
    root = write_yolo(tmp_path, {"a": "0.5 0.5 0.2 0.2\n" * 5})
    with pytest.raises(ValueError, match=r"a\.txt:1 has 4 numbers, expected 5: class cx cy w h \(normalized 0\.\.1\)"):
        data.read_yolo(str(root))
    # 6 numbers (a confidence column), the first line fine, the second not
    (root / "labels" / "a.txt").write_text("1 0.5 0.5 0.2 0.2\n" + "1 0.5 0.5 0.2 0.2 0.9\n" * 4)
    with pytest.raises(ValueError, match=r"a\.txt:2 has 6 numbers, expected 5"):
        data.read_yolo(str(root))
    (root / "labels" / "a.txt").write_text("1 0.5 0.5 0.2 oops\n")
    with pytest.raises(ValueError, match=r"a\.txt:1 is not numbers \('1 0\.5 0\.5 0\.2 oops'\), expected 5"):
        data.read_yolo(str(root))
    # blank lines are skipped, every other line is one box; an empty file is a background image
    (root / "labels" / "a.txt").write_text("\n1 0.5 0.5 0.25 0.2\n\n0 0.25 0.5 0.5 1\n\n")
    (root / "labels" / "b.txt").write_text("")
    Image.new("RGB", (40, 30)).save(root / "images" / "b.jpg")
    ds = data.read_yolo(str(root))
    assert np.allclose(ds[0]["boxes"], [[15, 12, 25, 18], [0, 0, 20, 30]]) and ds[0]["labels"].tolist() == [1, 0]
    assert ds[1]["boxes"].shape == (0, 4)
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ValueError, match=r"a\.txt:2: class 2 is outside 0\.\.1"):
        data.read_yolo(str(root))


def test_yolo_pixel_labels_give_one_warning_for_the_split(tmp_path):
    # Labels written in pixels of the 40 x 30 images: every box is far outside once taken as
    # normalized. Three files, one warning, naming the cause and showing the numbers as written.
    root = write_yolo(tmp_path, {"a": "0 20 15 10 8\n", "b": "1 10 10 4 4\n0 30 20 6 6\n", "c": ""})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.read_yolo(str(root))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "skipped 3 bad boxes of 3 (NaN, non-positive size or far outside the image); that is every box: " \
        "no usable box is left in this split. " in messages[0]
    assert "YOLO coordinates must be normalized to 0..1 (these look like pixels): divide cx and w by the image " \
        "width, cy and h by its height. E.g. " in messages[0]
    assert "a.txt:1 cx cy w h = 20 15 10 8; " in messages[0] and "b.txt:2 cx cy w h = 30 20 6 6" in messages[0]
    assert len(ds) == 3 and sum(len(ds[i]["boxes"]) for i in range(3)) == 0  # allowed: train.py checks
    # a normalized file with one NaN box: counted, but not blamed on pixels
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n0 nan 0.5 0.2 0.2\n")
    (root / "labels" / "b.txt").write_text("")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.read_yolo(str(root))
    assert len(caught) == 1 and "skipped 1 bad boxes of 2 (" in str(caught[0].message)
    assert "a.txt:2 cx cy w h = nan 0.5 0.2 0.2" in str(caught[0].message)
    assert "pixels" not in str(caught[0].message)


def test_yolo_image_that_is_not_an_image(tmp_path):
    root = write_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    (root / "images" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"image .*a\.jpg cannot be read .*: replace it with a valid JPEG/PNG or "
                                         r"remove it and its label .*a\.txt"):
        data.read_yolo(str(root))


def test_yolo_label_without_image_says_what_to_do(tmp_path):
    root = write_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    os.remove(root / "images" / "a.jpg")
    with pytest.raises(FileNotFoundError) as e:
        data.read_yolo(str(root))
    assert "no image a.jpg/.png in" in str(e.value) and "images_dir" not in str(e.value)
    assert str(e.value).endswith("put the image in one of those folders, or remove the label file")


def test_coco_annotation_without_a_bbox_of_4_numbers(tmp_path):
    good = dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 5, 5])
    with pytest.raises(ValueError, match=r"ann\.json: annotation 7 has no bbox of 4 numbers \[x, y, w, h\]: fix or "
                                         r"remove it \(it has no bbox\)"):
        data.read_coco(write_coco(tmp_path, [good, dict(id=7, image_id=1, category_id=1)]))
    with pytest.raises(ValueError, match=r"annotation 8 has no bbox of 4 numbers \[x, y, w, h\]: fix or remove it "
                                         r"\(it has bbox \[1, 2, 3\]\)"):
        data.read_coco(write_coco(tmp_path, [good, dict(id=8, image_id=1, category_id=1, bbox=[1, 2, 3])]))


def test_coco_every_image_must_be_on_disk(tmp_path):
    images = [dict(id=i, file_name=name, width=40, height=30) for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg"], 1)]
    path = write_coco(tmp_path, [], images=images)  # only a.jpg is written
    with pytest.raises(FileNotFoundError, match=r"ann\.json: 2 of its 3 images are missing from .*images, e\.g\. "
                                                r"b\.jpg, c\.jpg: restore them, or remove them \(and their "
                                                r"annotations\) from the json"):
        data.read_coco(path)
    # The first image missing: the folder is still found from the others, and the error is the same kind.
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "b.jpg")
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "c.jpg")
    os.remove(tmp_path / "images" / "a.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 of its 3 images is missing from .*images, e\.g\. a\.jpg: restore"):
        data.read_coco(path)
    # No width / height in the json and no file either: the same clear message, not a bare errno.
    path = write_coco(tmp_path, [], images=[dict(id=1, file_name="a.jpg"), dict(id=2, file_name="gone.jpg")])
    with pytest.raises(FileNotFoundError, match=r"1 of its 2 images is missing from .*images, e\.g\. gone\.jpg"):
        data.read_coco(path)
    # No image found in any candidate folder: the fix is to move the images, there is no flag for it.
    shutil.rmtree(tmp_path / "images")
    with pytest.raises(FileNotFoundError) as e:
        data.read_coco(path)
    assert "cannot find image a.jpg in any of" in str(e.value) and "images_dir" not in str(e.value)
    assert str(e.value).endswith("put the images in one of those folders")


@pytest.mark.parametrize("yaml_text", [
    "path: .\ntrain: images/train\nnames: ['person', \"car\"]\n",  # one line (Roboflow)
    "path: .\nnc: 2\nnames:\n  0: person\n  1: car\n\ndownload: no\n",  # numbered block (Ultralytics)
    "# classes\nnames:\n- person\n- 'car'  # second\nnc: 2\n",  # list block, at the key's own level
    "names:\n    - person\n    - car\ntrain: images\n",  # list block, indented
    "names: {0: person, 1: 'car'}\n",  # flow mapping
    "nc: 2\nnames: ['person',\n        'car']  # YOLOv5's VOC.yaml style\n",  # a flow list over two lines
])
def test_yolo_names_from_data_yaml(tmp_path, yaml_text):
    root = write_yolo(tmp_path, {"a": "1 0.5 0.5 0.2 0.2\n"}, names=None)
    (root / "data.yaml").write_text(yaml_text)
    ds = data.open_dataset(str(root), "train")
    assert ds.class_names == ["person", "car"] and ds[0]["labels"].tolist() == [1]


def test_yolo_names_the_way_editors_and_exports_write_them(tmp_path):
    # A byte-order mark (Windows editors) must not stick to the first name or the first class.
    root = write_yolo(tmp_path, {"a": "\ufeff1 0.5 0.5 0.2 0.2\n"}, names="\ufeffperson\ncar\n")
    ds = data.open_dataset(str(root), "train")
    assert ds.class_names == ["person", "car"] and ds[0]["labels"].tolist() == [1]
    os.remove(root / "obj.names")
    # Quoted names keep their commas and #; a `names:` nested under another key is not the one.
    (root / "data.yaml").write_text("\ufeffdownload:\n  names: [wrong]\nnames: ['traffic light, red', \"no. #1\"]  # two\n")
    assert data.open_dataset(str(root), "train").class_names == ["traffic light, red", "no. #1"]
    (root / "data.yaml").write_text("names:\n  - 'a #1'  # first\n  - b\n")
    assert data.open_dataset(str(root), "train").class_names == ["a #1", "b"]
    (root / "data.yaml").write_text("names: []\n")
    with pytest.raises(ValueError, match=r"data\.yaml lists no class names"):
        data.open_dataset(str(root), "train")


@pytest.mark.parametrize("yaml_text,names", [
    ("\ufeffnames: [person, car]\n", ["person", "car"]),  # the mark right before the key
    ("names: [c#, f#]\n", ["c#", "f#"]),  # only " #" starts a comment
    ("names: [person, car, ]\n", ["person", "car"]),  # a trailing comma adds no class
])
def test_yolo_names_edge_cases(tmp_path, yaml_text, names):
    root = write_yolo(tmp_path, {"a": "1 0.5 0.5 0.2 0.2\n"}, names=None)
    (root / "data.yaml").write_bytes(yaml_text.encode("utf-8"))
    assert data.open_dataset(str(root), "train").class_names == names


def test_yolo_names_mixing_list_and_numbered_forms_is_an_error(tmp_path):
    root = write_yolo(tmp_path, {"a": "1 0.5 0.5 0.2 0.2\n"}, names=None)
    (root / "data.yaml").write_text("names:\n  - person\n  1: car\n")
    with pytest.raises(ValueError, match="mixes forms"):
        data.open_dataset(str(root), "train")


def test_yolo_negative_class_is_an_error_not_an_ignore_region(tmp_path):
    # Label -1 means "crowd, ignore" inside this project: a -1 in a label file must not become one.
    root = write_yolo(tmp_path, {"a": "-1 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(ValueError, match=r"a\.txt:1: class -1 is outside 0\.\.1"):
        data.read_yolo(str(root))


@pytest.mark.parametrize("bbox", [[1, 1, 5, 5, 0.9], ["1", 1, 5, 5]])
def test_coco_bbox_must_be_4_numbers(tmp_path, bbox):
    anns = [dict(id=i, image_id=1, category_id=1, bbox=bbox) for i in range(1, 5)]
    with pytest.raises(ValueError, match="annotation 1 has no bbox of 4 numbers"):
        data.read_coco(write_coco(tmp_path, anns))


@pytest.mark.parametrize("bad", [[1, 1, 0, 5], [1, 100, 5, 5]])  # zero width; below the 40 x 30 image
def test_coco_bad_box_is_skipped_with_one_warning(tmp_path, bad):
    anns = [dict(id=1, image_id=1, category_id=1, bbox=bad), dict(id=2, image_id=1, category_id=1, bbox=[1, 1, 5, 5])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.read_coco(write_coco(tmp_path, anns))
    assert len(caught) == 1 and "skipped 1 bad boxes of 2" in str(caught[0].message)
    assert np.allclose(ds[0]["boxes"], [[1, 1, 6, 6]])


def test_coco_box_over_the_bottom_edge_is_clipped_to_the_height(tmp_path):
    ds = data.read_coco(write_coco(tmp_path, [dict(id=1, image_id=1, category_id=1, bbox=[1, 28, 5, 5])]))
    assert np.allclose(ds[0]["boxes"], [[1, 28, 6, 30]])  # 28 + 5 = 33 > 30


def test_loader_skips_whole_batches(tmp_path):
    # A resumed epoch skips the batches already trained on: with batch 4, skipping 1 batch is 4 images.
    data.make_shapes(str(tmp_path / "s"), num_train=12, num_val=2, seed=1)
    ds = data.open_dataset(str(tmp_path / "s"), "train")
    full = [b["image_ids"].tolist() for b in data.make_loader(ds, 4, True, 0, seed=5)]
    skipped = [b["image_ids"].tolist() for b in data.make_loader(ds, 4, True, 0, seed=5, skip_batches=1)]
    assert len(full) == 3 and skipped == full[1:]


def test_yolo_roboflow_layout_with_a_valid_split(tmp_path):
    # Roboflow's export: train/images + train/labels, valid/images + valid/labels, data.yaml.
    root = tmp_path / "rf"
    for split, text in (("train", "0 0.5 0.5 0.5 0.5\n"), ("valid", "1 0.25 0.25 0.5 0.5\n")):
        (root / split / "labels").mkdir(parents=True)
        (root / split / "images").mkdir()
        (root / split / "labels" / f"{split}0.txt").write_text(text)
        Image.new("RGB", (40, 20)).save(root / split / "images" / f"{split}0.jpg")
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 2\nnames: ['a', 'b']\n")
    train, val = data.open_dataset(str(root), "train"), data.open_dataset(str(root), "val")
    assert train.files == [str(root / "train" / "images" / "train0.jpg")]
    assert val.files == [str(root / "valid" / "images" / "valid0.jpg")]
    assert np.allclose(train[0]["boxes"], [[10, 5, 30, 15]]) and val[0]["labels"].tolist() == [1]
    assert np.allclose(val[0]["boxes"], [[0, 0, 20, 10]])


def test_yolo_class_must_be_a_whole_number(tmp_path):
    for text, shown in (("1.7 0.5 0.5 0.2 0.2\n", "1.7"), ("nan 0.5 0.5 0.2 0.2\n", "nan")):
        root = write_yolo(tmp_path / shown, {"a": text})
        with pytest.raises(ValueError, match=rf"a\.txt:1: class {shown} is not a whole number"):
            data.read_yolo(str(root))


def test_yolo_data_yaml_errors(tmp_path):
    root = write_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"}, names=None)
    (root / "data.yaml").write_text("names:\n  0: person\n  2: car\n")
    with pytest.raises(ValueError, match=r"data\.yaml:1: `names:` is empty, mixes forms, or is not numbered 0, 1, 2"):
        data.open_dataset(str(root), "train")
    (root / "data.yaml").write_text("train: images\nnc: 2\n")
    with pytest.raises(ValueError, match=r"data\.yaml has no `names:` line: add the class names in label order, "
                                         r"write it as `names: \[a, b\]`"):
        data.open_dataset(str(root), "train")
    # the yaml file itself given instead of its folder
    with pytest.raises(ValueError, match=r"data\.yaml is a yaml file: give the dataset folder that holds data\.yaml "
                                         r"\(.*yolo\), not the yaml file"):
        data.open_dataset(str(root / "data.yaml"), "train")

def test_cli(shapes_dir, tmp_path, capsys):
    png = tmp_path / "b.png"
    assert data.main(["show", "--data", shapes_dir, "--batch_size", "4", "--input_shape", "64", "-o", str(png)]) == 0
    with Image.open(png) as im:
        assert im.size == (4 * 68, 68)  # 4 columns of 64 px + 4 px gaps
    assert data.main(["show", "--data", shapes_dir, "--batch_size", "4", "-i", "64,32", "-o", str(png)]) == 0
    with Image.open(png) as im:
        assert im.size == (4 * 36, 68)  # H,W as train.py's -i: 64 high, 32 wide
    assert data.main(["show", "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err



def test_cli_show_flags_checked_with_their_names(shapes_dir, tmp_path, capsys):
    for flags, message in ((["--input_shape", "0"], "error: -i/--input_shape '0': give one size like 256, or H,W"),
                           (["-i", "64,x"], "error: -i/--input_shape '64,x': give one size like 256, or H,W"),
                           (["--batch_size", "0"], "error: --batch_size 0: give 1 or more"),
                           (["-o", str(tmp_path / "b.gif")], "cannot tell the picture format from '.gif': end the "
                                                              "name with .png or .jpg")):
        assert data.main(["show", "-d", shapes_dir] + flags) == 2
        assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_cli_show_output_paths(shapes_dir, tmp_path, capsys):
    # -d / -i as in train.py and eval.py; a missing folder is made; the extension picks the format
    deep = tmp_path / "new" / "dir" / "b.png"
    assert data.main(["show", "-d", shapes_dir, "--batch_size", "2", "-i", "32", "-o", str(deep)]) == 0
    jpg = tmp_path / "b.jpg"
    assert data.main(["show", "-d", shapes_dir, "--batch_size", "2", "-i", "32", "-o", str(jpg)]) == 0
    with Image.open(deep) as png_im, Image.open(jpg) as jpg_im:
        assert (png_im.format, png_im.size) == ("PNG", (2 * 36, 36))
        assert (jpg_im.format, jpg_im.size) == ("JPEG", (2 * 36, 36))
    # -o naming a folder: one clear error, and nothing left behind
    capsys.readouterr()
    assert data.main(["show", "-d", shapes_dir, "--batch_size", "2", "-i", "32", "-o", str(tmp_path / "new")]) == 2
    assert f"-o {tmp_path / 'new'} is a folder: give a file name" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["b.jpg", "new"] and os.listdir(tmp_path / "new") == ["dir"]


def test_cli_shapes_needs_both_splits(tmp_path, capsys):
    out = tmp_path / "s"
    assert data.main(["shapes", "--out", str(out), "--num_train", "2", "--num_val", "0"]) == 2
    assert "needs at least 1 train and 1 val image, got --num_train 2 --num_val 0" in capsys.readouterr().err
    assert not out.exists()

class _CopiesToDevice(torch.utils._python_dispatch.TorchDispatchMode):
    """Records, for each copy of a CPU tensor onto another device, whether it was non-blocking."""

    def __init__(self):
        super().__init__()
        self.non_blocking = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_to_copy" and args[0].device.type == "cpu" and kwargs.get("device", args[0].device).type != "cpu":
            self.non_blocking.append(bool(kwargs.get("non_blocking", False)))
        if name == "copy_" and args[1].device.type == "cpu" and args[0].device.type != "cpu":
            self.non_blocking.append(bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


def test_augment_never_waits_for_the_device(shapes_dir):
    # On a GPU, reading a pixel-derived value on the CPU, or a plain (blocking) copy of a CPU
    # tensor onto the GPU, makes the CPU wait for the GPU's queue. Images on PyTorch's "meta"
    # device have shapes but no values, so any read of them raises here, and the spy sees every
    # copy onto the device; the targets stay on the CPU, as train.py keeps them. Four seeds x 8
    # images x 3 layers draw every RandAugment op (contrast's mean colour included), with and
    # without mosaic (and MixUp with it).
    ds = data.open_dataset(shapes_dir, "train")
    batch = next(iter(data.make_loader(ds, 8, shuffle=False, workers=0, seed=0)))
    batch["images"] = batch["images"].to("meta")
    spy = _CopiesToDevice()
    for seed in range(4):
        for mosaic in (0.0, 1.0):
            with spy:
                out = data.augment(dict(batch), (96, 96), random_crop_mode=1.0, magnitude=9, num_layers=3,
                                   mosaic_mix_prob=mosaic, generator=torch.Generator().manual_seed(seed),
                                   mixup_prob=mosaic)
            assert out["images"].device.type == "meta" and out["images"].shape == (8, 3, 96, 96)
            assert out["boxes"].device.type == "cpu" and out["valid"].any()
    assert len(spy.non_blocking) > 50 and all(spy.non_blocking)


def test_augment_ahead_on_a_cpu_is_the_plain_loop():
    # No thread and nothing ahead on a CPU: item k + 1's work starts only after item k was used,
    # so a run there stays one thread, step after step (what resume equality relies on).
    log = []

    def work(k):
        log.append(f"work {k}")
        return k * 10

    for out in data.augment_ahead(iter(range(3)), work, "cpu"):
        log.append(f"use {out}")
    assert log == ["work 0", "use 0", "work 1", "use 10", "work 2", "use 20"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the second stream and thread are for one")
def test_augment_ahead_on_a_gpu_gives_the_plain_loop_s_batches_without_waiting(shapes_dir):
    # The same generator draws, in the same order, from the second thread: the same pixels and
    # boxes as the plain loop, batch by batch, with the next batch augmented (in another thread)
    # before this one is used, and no wait for the GPU anywhere (sync debug mode "error"; the
    # consumer's arithmetic on each batch reads the pixels on the training stream).
    ds = data.open_dataset(shapes_dir, "train")
    raws = list(data.make_loader(ds, 4, shuffle=False, workers=0, seed=0, pin_memory=True))[:4]
    threads, log = set(), []

    def work(raw, gen):
        threads.add(threading.get_ident())
        log.append("work")
        raw = dict(raw, images=raw["images"].to("cuda", non_blocking=True))
        return data.augment(raw, (96, 96), random_crop_mode=1.0, magnitude=9, mosaic_mix_prob=0.5, generator=gen)

    gen = torch.Generator().manual_seed(0)
    plain = [work(r, gen) for r in raws]
    gen, log[:], threads = torch.Generator().manual_seed(0), [], set()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ahead = []
        for out in data.augment_ahead(iter(raws), lambda r: work(r, gen), "cuda"):
            time.sleep(0.2 if not ahead else 0)  # time for batch 2's work to start, if it runs ahead
            log.append("use")
            ahead.append(dict(out, images=out["images"] * 2))  # a kernel on the training stream
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert threads and threading.get_ident() not in threads
    assert log[:3] == ["work", "work", "use"]  # batch 2 augmented before batch 1 is used
    for p, a in zip(plain, ahead):
        assert torch.equal(p["images"] * 2, a["images"])
        assert torch.equal(p["boxes"], a["boxes"]) and torch.equal(p["valid"], a["valid"])


def test_augmented_pixels_and_boxes_agree():
    # The same matrix must move the pixels and the boxes. Each image is grey (114) with one white
    # rectangle, its box; after augmenting, the pixels that differ from the background (a corner
    # outside the box, as grey as the padding) must span the output box, within 2 px of interpolation and
    # sharpening. Every crop mode, flips, and RandAugment at magnitude 9 (rotate, shear, ...; the
    # colour ops keep white and grey apart), over several seeds.
    b, hc, wc = 4, 120, 160
    images = torch.full((b, 3, hc, wc), 114, dtype=torch.uint8)
    rects = [(20, 30, 70, 90), (80, 10, 150, 60), (40, 50, 100, 110), (10, 60, 60, 115)]  # x0, y0, x1, y1
    boxes = torch.zeros(b, 2, 4)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        images[i, :, y0:y1, x0:x1] = 255
        boxes[i, 0] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
    batch = dict(images=images, sizes=torch.tensor([[hc, wc]] * b), boxes=boxes,
                 labels=torch.tensor([[0, -1]] * b), valid=torch.tensor([[True, False]] * b),
                 image_ids=torch.arange(b), scales=torch.ones(b, 2))
    checked = 0
    for seed in range(6):
        for mode in (0.0, 0.6, 1.0, 2.5):
            out = data.augment(dict(batch), (96, 128), random_crop_mode=mode, magnitude=9, num_layers=2,
                               mosaic_mix_prob=0.0, generator=torch.Generator().manual_seed(seed), hsv=None)
            for i in range(b):
                if not out["valid"][i, 0]:
                    continue  # the crop cut the rectangle away, or left too little of it
                img, (x0, y0, x1, y1) = out["images"][i], out["boxes"][i, 0].tolist()
                h, w = img.shape[1:]
                outside = [(y, x) for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1))
                           if not (x0 - 2 <= x <= x1 + 2 and y0 - 2 <= y <= y1 + 2)]
                if not outside:
                    continue  # the rectangle fills the picture: no background to compare with
                y, x = outside[0]
                changed = (img - img[:, y:y + 1, x:x + 1]).abs().sum(0) > 0.05
                ys, xs = torch.nonzero(changed, as_tuple=True)
                seen = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
                if 0.5 < x0 and 0.5 < y0 and x1 < w - 0.5 and y1 < h - 0.5:
                    assert torch.allclose(seen, out["boxes"][i, 0], atol=2.0), (seed, mode, i, seen, out["boxes"][i, 0])
                    checked += 1
                else:  # cut by the border: a rotated corner outside still widens the box, not the pixels
                    assert seen[0] >= x0 - 2 and seen[1] >= y0 - 2 and seen[2] <= x1 + 2 and seen[3] <= y1 + 2
    assert checked > 30


def test_show_prints_skipped_boxes_as_a_plain_warning_line(shapes_dir, tmp_path, capsys):
    shapes = shapes_with_a_bad_box(shapes_dir, tmp_path / "shapes")
    assert data.main(["show", "-d", shapes, "--batch_size", "2", "-i", "32", "-o", str(tmp_path / "b.png")]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("data.py: warning: ")]
    assert len(lines) == 1 and "skipped 1 bad boxes of" in lines[0]
    assert "UserWarning" not in err


def _replay(seed, b):
    return torch.rand(b, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_random_resized_crop_draws_replayed():
    # Mode 0.6, one 100 x 150 (h x w) image into 64 x 96: the area fraction is 0.6 + 0.4 u0, the
    # crop's w / h is exp(log 3/4 + u1 log 16/9) x 96/64, and the crop's offsets are u2 and u3 of
    # the free room in x and in y.
    b = 400
    sizes = torch.tensor([[100, 150]]).repeat(b, 1)
    m = data.crop_matrices(sizes, (64, 96), 0.6, torch.Generator().manual_seed(0))
    u = _replay(0, b)
    sx, sy, tx, ty = m[:, 0, 0], m[:, 1, 1], m[:, 0, 2], m[:, 1, 2]
    cw, ch, x0, y0 = 96 / sx, 64 / sy, -tx / sx, -ty / sy
    free = (cw < 150 - 1e-6) & (ch < 100 - 1e-6)
    assert free.sum() > 200
    ratio = (cw / ch) / 1.5
    torch.testing.assert_close(ratio[free], torch.exp(math.log(3 / 4) + u[free, 1] * math.log(16 / 9)))
    torch.testing.assert_close((cw * ch / 15000)[free], 0.6 + 0.4 * u[free, 0])
    assert ratio[free].min() < 0.8 and ratio[free].max() > 1.25     # the whole 3/4 .. 4/3 range
    torch.testing.assert_close(x0[free], u[free, 2] * (150 - cw[free]))
    torch.testing.assert_close(y0[free], u[free, 3] * (100 - ch[free]))


def test_random_scale_offsets_replayed():
    # Mode 2.5: s = letterbox scale (0.64) x (0.1 + 2.4 u0); tx = u2 (96 - 150 s), ty = u3 (64 - 100 s).
    b = 50
    sizes = torch.tensor([[100, 150]]).repeat(b, 1)
    m = data.crop_matrices(sizes, (64, 96), 2.5, torch.Generator().manual_seed(1))
    u = _replay(1, b)
    s = 0.64 * (0.1 + 2.4 * u[:, 0])
    torch.testing.assert_close(m[:, 0, 0], s)
    torch.testing.assert_close(m[:, 0, 2], u[:, 2] * (96 - 150 * s))
    torch.testing.assert_close(m[:, 1, 2], u[:, 3] * (64 - 100 * s))
    # YOLOX nano / tiny: mode 1.5 with a floor of 0.5, s = 0.64 x (0.5 + 1.0 u0): 0.32 .. 0.96.
    m = data.crop_matrices(sizes, (64, 96), 1.5, torch.Generator().manual_seed(1), scale_min=0.5)
    s = 0.64 * (0.5 + 1.0 * u[:, 0])
    torch.testing.assert_close(m[:, 0, 0], s)
    assert m[:, 0, 0].min() >= 0.32 - 1e-9 and m[:, 0, 0].max() <= 0.96 + 1e-9


def test_random_scale_floor_is_checked():
    data.check_augment_args(1.5, 6, 2, 0.5, scale_min=1.5)  # a fixed factor is allowed
    with pytest.raises(ValueError, match=r"--random_scale_min 0\.0: give a factor above 0"):
        data.check_augment_args(2.0, 6, 2, 0.5, scale_min=0.0)
    with pytest.raises(ValueError, match=r"--random_scale_min 2\.5 is above --random_crop_mode 2\.0"):
        data.check_augment_args(2.0, 6, 2, 0.5, scale_min=2.5)
    data.check_augment_args(1.0, 6, 2, 0.5, scale_min=2.5)  # modes <= 1 do not scale: the floor is unused


def test_flip_mirrors_in_output_pixels():
    # A 20 x 40 (h x w) image letterboxed to 32 x 64 (scale 1.6) and always flipped: box
    # [0, 0, 10, 10] -> [0, 0, 16, 16] -> mirrored about the output width 64 -> [48, 0, 64, 16].
    rng = np.random.default_rng(0)
    batch = make_batch([rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)], [[[0, 0, 10, 10]]], [[0]])
    out = data.augment(batch, (32, 64), random_crop_mode=0, magnitude=0, num_layers=0, mosaic_mix_prob=0,
                       generator=torch.Generator().manual_seed(0), hsv=None, flip_prob=1.0)
    assert out["valid"][0, 0]
    assert out["boxes"][0, 0].tolist() == pytest.approx([48.0, 0.0, 64.0, 16.0], abs=1e-4)


def test_hue_rotates_the_chroma_plane_by_a_fraction_of_a_turn():
    # Hue gain 0.1: the angle is u0 x 0.1 x 2 pi, the rotation of (I, Q) in YIQ; Y is kept.
    u = torch.rand(3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1
    m = data.hsv_matrices((0.1, 0.0, 0.0), torch.Generator().manual_seed(4), 3)
    yiq = data._YIQ
    for i in range(3):
        t = float(u[i, 0]) * 0.1 * 2 * math.pi
        expected = torch.tensor([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]],
                                dtype=torch.float64)
        torch.testing.assert_close(yiq @ m[i] @ torch.linalg.inv(yiq), expected, atol=1e-9, rtol=0)


def test_two_contrasts_compose():
    # Contrast 0.5 then 0.2 on the same image: v -> 0.5 v + 0.5 g(m), whose mean grey is still
    # g(m) (the grey weights sum to 1); then 0.2 of that + 0.8 g(m) = 0.1 v + 0.9 g(m).
    c = data.RANDAUGMENT_OPS.index("contrast")
    a, cc, d = data.colour_affine(torch.tensor([[c, c]]), torch.tensor([[0.5, 0.2]], dtype=torch.float64), None, None)
    v = torch.tensor([[0.2, 0.4, 0.8], [0.6, 0.6, 0.6]], dtype=torch.float64).T.reshape(1, 3, 1, 2)
    grey = float(data._GREY @ v.mean((2, 3))[0])
    out = data._colour_into(torch.empty(1, 3, 1, 2), (v * 255 - 114).float(), a, cc, d)
    assert torch.allclose(out.double(), 0.1 * v + 0.9 * grey, atol=1e-5)


def test_solarize_inverts_from_the_threshold_up():
    out = data._solarize(torch.tensor([0.24, 0.25, 0.26]), 0.25)
    assert out.tolist() == pytest.approx([0.24, 0.75, 0.74])


def test_box_filters_are_inclusive_at_their_limits():
    valid = torch.ones(1, 3, dtype=torch.bool)
    # Aspect exactly 1:20 is kept, 1:20.5 is not.
    boxes = torch.tensor([[[0.0, 0.0, 2.0, 40.0], [10.0, 0.0, 12.0, 41.0], [20.0, 0.0, 22.0, 30.0]]])
    _, keep = data.transform_boxes(boxes, valid, torch.eye(3)[None], (64, 64))
    assert keep.tolist() == [[True, False, True]]
    # Shifted left by 7.5, box [0, 10]^2 keeps 2.5 x 10 = 25% of its area: kept at min_area_kept 0.25.
    shift = torch.tensor([[[1.0, 0.0, -7.5], [0.0, 1.0, 0.0], [0, 0, 1]]])
    out, keep = data.transform_boxes(torch.tensor([[[0.0, 0.0, 10.0, 10.0]]]), valid[:, :1], shift, (64, 64),
                                     min_area_kept=0.25)
    assert keep.tolist() == [[True]] and out[0, 0].tolist() == [0.0, 0.0, 2.5, 10.0]


def test_posterize_bits_round_the_magnitude():
    # Magnitude 4: keep 8 - round(1.6) = 6 bits (steps of 4 / 255): 0.62 * 255 = 158.1 -> 156.
    ops = torch.tensor([[data.RANDAUGMENT_OPS.index("posterize")]])
    identity = (torch.eye(3, dtype=torch.float64)[None], torch.zeros(1, 3, dtype=torch.float64),
                torch.zeros(1, 3, 3, dtype=torch.float64))
    v = torch.full((1, 3, 1, 1), 0.62)
    out = data._colour_chunk(torch.empty(1, 3, 1, 1), v * 255 - 114, identity, ops,
                             torch.ones(1, 1, dtype=torch.float64), 4)
    assert out.flatten().tolist() == pytest.approx([156 / 255] * 3, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Pixels and files as they come from cameras and exporters
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("magnitude", [1, 4, 10])
def test_posterize_matches_pil_on_every_8_bit_level(magnitude):
    # Every level 0..255 through the colour stage's posterize against PIL's on uint8. Flooring the
    # float32 value without rounding it to the grid first dropped 90 of the 256 levels by one at
    # magnitude 1 (8 bits kept: posterize must change nothing there).
    levels = torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    ops = torch.tensor([[data.RANDAUGMENT_OPS.index("posterize")]])
    identity = (torch.eye(3, dtype=torch.float64)[None], torch.zeros(1, 3, dtype=torch.float64),
                torch.zeros(1, 3, 3, dtype=torch.float64))
    out = data._colour_chunk(torch.empty(1, 3, 16, 16), levels - 114, identity, ops,
                             torch.ones(1, 1, dtype=torch.float64), magnitude)
    bits = 8 - round(magnitude * 0.4)
    pil = ImageOps.posterize(Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)), bits)
    assert torch.equal(torch.round(out[0, 0] * 255).to(torch.uint8), torch.from_numpy(np.array(pil)))


def test_magnitude_beyond_randaugment_scale_is_refused():
    data.check_augment_args(1.0, 10, 2, 0.5)  # the strongest RandAugment
    with pytest.raises(ValueError, match=r"--magnitude 10\.5: give 0 to 10"):
        data.check_augment_args(1.0, 10.5, 2, 0.5)


def test_a_box_clipped_to_zero_size_is_dropped_with_the_warning(tmp_path):
    # 100 x 80 image: cx 1.03, w 0.04 is x 101..105, inside the 10% margin, so it used to be
    # clipped to 100..100 and kept: an area-0 ground truth that pycocotools counts as a miss.
    root = write_yolo(tmp_path, {"a": "0 1.03 0.5 0.04 0.2\n0 0.5 0.5 0.2 0.2\n"}, size=(100, 80))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.read_yolo(str(root))
    assert len(caught) == 1 and "skipped 1 bad boxes of 2 (" in str(caught[0].message)
    assert np.allclose(ds[0]["boxes"], [[40, 32, 60, 48]])
    assert [a["area"] for a in ds.coco_gt()["annotations"]] == [320.0]


def test_16_bit_greyscale_png_keeps_its_top_8_bits(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    Image.fromarray(values).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    image, scale = data.decode_image(str(tmp_path / "g.png"))  # convert("RGB") alone: 99.6% white
    assert image.shape == (64, 64, 3) and scale == (1.0, 1.0)
    assert np.array_equal(image[..., 0], values >> 8) and np.array_equal(image[..., 2], values >> 8)


def test_float_tiff_in_0_to_1_is_scaled_to_8_bits(tmp_path):
    values = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    image, _ = data.decode_image(str(tmp_path / "f.tif"))  # convert("RGB") alone: 0 or 1 of 255, black
    assert image[..., 1].tolist() == [[0, 64], [128, 255]]


def _phone_photo(path, stored_wh=(60, 41)):
    """A JPEG stored 60 wide x 41 high with EXIF orientation 6 (shown turned 90 degrees clockwise:
    upright it is 41 x 60), white over stored x 0..20, y 0..10, black elsewhere. Turning (x, y)
    clockwise maps it to (41 - y, x): upright x 31..41, y 0..20."""
    stored = np.zeros((stored_wh[1], stored_wh[0], 3), np.uint8)
    stored[:10, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, quality=100, exif=exif)


def test_exif_orientation_yolo_labels_refer_to_the_upright_picture(tmp_path):
    root = write_yolo(tmp_path, {"a": f"0 {36 / 41} {10 / 60} {10 / 41} {20 / 60}\n"})
    _phone_photo(root / "images" / "a.jpg")
    ds = data.read_yolo(str(root))
    assert (ds.records[0]["width"], ds.records[0]["height"]) == (41, 60)
    assert np.allclose(ds[0]["boxes"], [[31, 0, 41, 20]], atol=1e-4)
    image = ds[0]["image"]
    assert image.shape == (60, 41, 3)
    assert image[1:19, 32:40].min() > 200 and image[22:, :].max() < 60 and image[:, :29].max() < 60
    # Shrunk by a worker: stored 60 x 41 -> 30 x 20 (41 / 2 rounds to 20), i.e. x 1/2 and y 20/41 as
    # stored; upright the two swap, and the box follows each axis with its own factor.
    small, boxes, _, _, scale = ds.load(0, max_side=30)
    assert small.shape == (30, 20, 3) and scale == (20 / 41, 0.5)
    assert np.allclose(boxes, [[31 * 20 / 41, 0, 20, 10]], atol=1e-4)


@pytest.mark.parametrize("json_size, expect_hw", [((41, 60), (60, 41)), ((60, 41), (41, 60))])
def test_exif_orientation_coco_size_says_which_way_up_the_boxes_are(tmp_path, json_size, expect_hw):
    # A json whose width / height are the upright picture's gets it upright; one that gives the
    # stored size was drawn on the stored pixels, which then stay as stored.
    (tmp_path / "images").mkdir()
    _phone_photo(tmp_path / "images" / "a.jpg")
    coco = dict(images=[dict(id=1, file_name="a.jpg", width=json_size[0], height=json_size[1])],
                annotations=[dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 5, 5], iscrowd=0, area=25)],
                categories=[dict(id=1, name="x")])
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    ds = data.read_coco(str(tmp_path / "instances.json"), str(tmp_path / "images"))
    assert ds[0]["image"].shape[:2] == expect_hw


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["images"][0].pop("file_name"), r"an entry of 'images' has no 'file_name' \(\{\"id\": 1"),
    (lambda c: c["categories"][0].pop("id"), r"an entry of 'categories' has no 'id'"),
    (lambda c: c.update(images={"1": c["images"][0]}), r"'images' is not a list of objects"),
])
def test_coco_json_entries_without_their_keys_are_named(tmp_path, edit, message):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    coco = dict(images=[dict(id=1, file_name="a.jpg", width=40, height=30)],
                annotations=[dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 5, 5])],
                categories=[dict(id=1, name="x")])
    edit(coco)
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=message):
        data.read_coco(str(tmp_path / "instances.json"))


def test_coco_json_without_the_optional_keys_gets_coco_defaults(tmp_path):
    # iscrowd, area and a category's name are optional to the reader; pycocotools and the per-class
    # table read them, so the ground truth handed on gets COCO's meaning for each one.
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    coco = dict(images=[dict(id=1, file_name="a.jpg", width=40, height=30)],
                annotations=[dict(id=1, image_id=1, category_id=7, bbox=[1, 1, 5, 4])],
                categories=[dict(id=7)])
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    gt = data.read_coco(str(tmp_path / "instances.json")).coco_gt()
    assert gt["annotations"][0]["iscrowd"] == 0 and gt["annotations"][0]["area"] == 20
    assert gt["categories"][0]["name"] == "7"


def test_yolo_upper_case_extensions_and_labelimg_classes_txt(tmp_path):
    # A camera's a.JPG is found (Linux file names are case-sensitive), and LabelImg's classes.txt
    # beside the label files names the classes instead of being read as the label file of "classes".
    root = write_yolo(tmp_path, {"a": "1 0.5 0.5 0.5 0.5\n"}, names=None)
    os.rename(root / "images" / "a.jpg", root / "images" / "a.JPG")
    (root / "labels" / "classes.txt").write_text("cat\ndog\n")
    ds = data.read_yolo(str(root))
    assert ds.class_names == ["cat", "dog"] and len(ds) == 1 and ds.files[0].endswith("a.JPG")
    assert ds[0]["labels"].tolist() == [1]


def test_yolo_images_without_a_label_file_are_background_images_of_their_own_split(tmp_path):
    root = tmp_path / "yolo"
    (root / "labels" / "train").mkdir(parents=True)
    (root / "images" / "train").mkdir(parents=True)
    (root / "obj.names").write_text("a\n")
    (root / "labels" / "train" / "b.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    for stem in ("a", "b", "c"):
        Image.new("RGB", (40, 30)).save(root / "images" / "train" / f"{stem}.jpg")
    ds = data.read_yolo(str(root))  # Ultralytics' layout: a.jpg and c.jpg have no txt
    assert [os.path.basename(f) for f in ds.files] == ["a.jpg", "b.jpg", "c.jpg"] and ds.image_ids == [0, 1, 2]
    assert [len(ds[i]["boxes"]) for i in range(3)] == [0, 1, 0]
    assert len(ds.coco_gt()["images"]) == 3  # so their false positives count in the AP
    # One images/ folder for every split: an image without a txt belongs to no split we can name.
    shutil.move(str(root / "images" / "train"), str(root / "shared"))
    shutil.rmtree(root / "images")
    shutil.move(str(root / "shared"), str(root / "images"))
    (root / "labels" / "val").mkdir()
    (root / "labels" / "val" / "c.txt").write_text("")
    assert [os.path.basename(f) for f in data.read_yolo(str(root)).files] == ["b.jpg"]
    assert [os.path.basename(f) for f in data.read_yolo(str(root), "val").files] == ["c.jpg"]
    # images/ beside a labels/ without splits: the whole folder is the one split.
    shutil.rmtree(root / "labels" / "val")
    shutil.move(str(root / "labels" / "train" / "b.txt"), str(root / "labels" / "b.txt"))
    (root / "labels" / "train").rmdir()
    assert [os.path.basename(f) for f in data.read_yolo(str(root)).files] == ["a.jpg", "b.jpg", "c.jpg"]


def test_roboflow_coco_export_and_a_train_only_coco_folder(shapes_dir, tmp_path):
    # Roboflow: train/ and valid/, each with _annotations.coco.json among its images.
    rf = tmp_path / "rf"
    for split, folder in (("train", "train"), ("val", "valid")):
        shutil.copytree(os.path.join(shapes_dir, split), rf / folder)
        shutil.copy(os.path.join(shapes_dir, "annotations", f"instances_{split}.json"),
                    rf / folder / "_annotations.coco.json")
    for split, folder in (("train", "train"), ("val", "valid")):
        ds, want = data.open_dataset(str(rf), split), data.open_dataset(shapes_dir, split)
        assert [os.path.basename(f) for f in ds.files] == [os.path.basename(f) for f in want.files]
        assert all(os.path.dirname(f) == str(rf / folder) for f in ds.files) and len(ds) == len(want)
    # With no val split, the train split serves as val (as one json does; train.py says so).
    shutil.rmtree(rf / "valid")
    with pytest.warns(UserWarning, match="has no val split: its train split serves as val, so an AP is measured on "
                                         "the training images"):
        assert data.open_dataset(str(rf), "val").files == data.open_dataset(str(rf), "train").files
    coco = tmp_path / "coco"
    shutil.copytree(os.path.join(shapes_dir, "train"), coco / "train2017")
    (coco / "annotations").mkdir()
    shutil.copy(os.path.join(shapes_dir, "annotations", "instances_train.json"),
                coco / "annotations" / "instances_train2017.json")
    with pytest.warns(UserWarning, match="has no val split"):
        val = data.open_dataset(str(coco), "val")
    assert len(val) == 24 and val.files == data.open_dataset(str(coco), "train").files


def test_the_annotations_folder_given_for_the_dataset_names_its_parent(shapes_dir):
    with pytest.raises(FileNotFoundError, match=r"annotations is the annotations folder of a COCO dataset: give the "
                                                r"dataset folder above it, .*set, or one json in it"):
        data.open_dataset(os.path.join(shapes_dir, "annotations"), "train")


def test_ultralytics_data_yaml_names_the_split_folders(tmp_path):
    # coco128's layout: images/train2017 + labels/train2017, named by data.yaml under a `path:`
    # written for Ultralytics' own datasets folder (not there from here).
    root = tmp_path / "coco128"
    for split, stems in (("train2017", "ab"), ("val2017", "c")):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for stem in stems:
            Image.new("RGB", (40, 30)).save(root / "images" / split / f"{stem}.jpg")
            (root / "labels" / split / f"{stem}.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("path: ../datasets/coco128\ntrain: images/train2017\nval: images/val2017\n"
                                    "names:\n  0: person\n  1: bicycle\n")
    train_set, val_set = data.open_dataset(str(root), "train"), data.open_dataset(str(root), "val")
    assert [os.path.basename(f) for f in train_set.files] == ["a.jpg", "b.jpg"]
    assert [os.path.basename(f) for f in val_set.files] == ["c.jpg"] and val_set.class_names == ["person", "bicycle"]
    assert np.allclose(val_set[0]["boxes"], [[10, 7.5, 30, 22.5]]) and val_set[0]["labels"].tolist() == [1]


def test_data_yaml_file_lists_name_the_split_images(tmp_path):
    # Ultralytics' autosplit: all images in images/, labels in labels/, and data.yaml's
    # `train: autosplit_train.txt` / `val: autosplit_val.txt` list the images of each split
    # ("./images/a.jpg", relative to the txt file's folder). A split is exactly its list.
    root = write_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": "0 0.25 0.5 0.5 0.2\n", "c": ""}, names=None)
    (root / "autosplit_train.txt").write_text("./images/a.jpg\n./images/c.jpg\n")
    (root / "autosplit_val.txt").write_text(f"{root / 'images' / 'b.jpg'}\n")  # an absolute line
    (root / "data.yaml").write_text("path: .\ntrain: autosplit_train.txt\nval: autosplit_val.txt\nnames: [x]\n")
    train_set, val_set = data.open_dataset(str(root), "train"), data.open_dataset(str(root), "val")
    assert [os.path.basename(f) for f in train_set.files] == ["a.jpg", "c.jpg"]
    assert [os.path.basename(f) for f in val_set.files] == ["b.jpg"] and val_set.class_names == ["x"]
    w, h = Image.open(val_set.files[0]).size
    assert np.allclose(val_set[0]["boxes"], [[0, 0.4 * h, 0.5 * w, 0.6 * h]])
    assert len(train_set[1]["boxes"]) == 0  # c.txt is empty: a background image
    # A listed image that is missing, and a list that is not there: errors naming them.
    (root / "autosplit_val.txt").write_text("./images/nope.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"autosplit_val\.txt: 1 of its 1 images is missing, e\.g\. "
                                                r"\./images/nope\.jpg"):
        data.open_dataset(str(root), "val")
    os.remove(root / "autosplit_val.txt")
    with pytest.raises(FileNotFoundError, match=r"'val: autosplit_val\.txt' names a file list that is not there"):
        data.open_dataset(str(root), "val")


def test_data_yaml_folder_lists_are_refused(tmp_path):
    # `train: [images/a, images/b]`, in either YAML form: read as the folder layouts, the split
    # would silently be other images than the yaml names, so the yaml's line is refused instead.
    root = write_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"}, names=None)
    (root / "data.yaml").write_text("train: [images/a, images/b]\nnames: [x]\n")
    with pytest.raises(ValueError, match=r"'train: \[images/a, images/b\]' is a list of folders"):
        data.open_dataset(str(root), "train")
    (root / "data.yaml").write_text("train:\n  - images/a\n  - images/b\nnames: [x]\n")
    with pytest.raises(ValueError, match=r"'train: \[images/a, images/b\]' is a list of folders"):
        data.open_dataset(str(root), "train")
    # A list of one folder is that folder, in either form.
    for text in ("train: [images]\nnames: [x]\n", "train:\n  - images\nnames: [x]\n"):
        (root / "data.yaml").write_text(text)
        assert [os.path.basename(f) for f in data.open_dataset(str(root), "train").files] == ["a.jpg"]


def test_data_yaml_file_list_edge_cases(tmp_path):
    root = write_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": "0 0.5 0.5 0.2 0.2\n"}, names=None)
    Image.new("RGB", (40, 30)).save(root / "images" / "nolabel.jpg")
    # Listed twice: read once. Listed without a label file: a background image, with a warning.
    (root / "t.txt").write_text("./images/a.jpg\n./images/a.jpg\n./images/nolabel.jpg\n")
    (root / "v.txt").write_text("./images/b.jpg\n")
    (root / "data.yaml").write_text("train: t.txt\nval: v.txt\nnames: [x]\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.open_dataset(str(root), "train")
    assert [os.path.basename(f) for f in ds.files] == ["a.jpg", "nolabel.jpg"] and len(ds[1]["boxes"]) == 0
    assert len(caught) == 1 and "1 of the 2 train images data.yaml lists have no label file" in str(caught[0].message)
    # A train list without val: the folder layouts would make val of every image, train's among them.
    (root / "data.yaml").write_text("train: t.txt\nnames: [x]\n")
    with pytest.raises(ValueError, match=r"'train: t\.txt' lists the training images but no 'val:' is given"):
        data.open_dataset(str(root), "val")


# ---- review fixes (session 9) ----------------------------------------------------------------
def test_augment_without_a_generator_draws_anew_each_call():
    # It used a fresh generator seeded 0 on every call: the same crop, flip and mosaic coin each
    # step. Now torch's global generator: two calls differ, and torch.manual_seed replays them.
    rng = np.random.default_rng(0)
    batch = make_batch([random_image(rng, 60, 80) for _ in range(4)], [[[5, 5, 40, 30]]] * 4, [[0]] * 4)
    torch.manual_seed(1)
    first = data.augment(batch, (64, 64), random_crop_mode=0.5, magnitude=6)
    second = data.augment(batch, (64, 64), random_crop_mode=0.5, magnitude=6)
    assert not torch.equal(first["boxes"], second["boxes"])
    torch.manual_seed(1)
    assert torch.equal(data.augment(batch, (64, 64), random_crop_mode=0.5, magnitude=6)["boxes"], first["boxes"])


def test_a_batch_keeps_every_box_past_max_boxes():
    # 150 boxes in one image, max_boxes 100: the 50 left out stayed in the pixels as background.
    boxes = np.array([[i % 15 * 6, i // 15 * 6, i % 15 * 6 + 5, i // 15 * 6 + 5] for i in range(150)], np.float32)
    items = [(np.zeros((90, 90, 3), np.uint8), boxes, np.arange(150) % 3, 1, (1.0, 1.0)),
             (np.zeros((40, 40, 3), np.uint8), boxes[:2], np.array([0, 1]), 2, (1.0, 1.0))]
    batch = data._Collate(max_boxes=100)(items)
    assert batch["boxes"].shape == (2, 150, 4) and batch["valid"].sum(1).tolist() == [150, 2]
    assert torch.equal(batch["boxes"][0], torch.from_numpy(boxes))
    assert data._Collate(max_boxes=100)(items[1:])["boxes"].shape == (1, 100, 4)  # fewer: padded to max_boxes


def test_mosaic_min_area_is_of_the_whole_moved_box(monkeypatch):
    # The crop moves box [0, 0, 100, 100] 80 px left: 20% of it is in the 100 x 100 output. The
    # mosaic splits at (20, 20): the top-left quadrant then shows [0, 0, 20, 20], 4% of the box,
    # under min_area_kept 0.15, and the bottom-left [0, 20, 20, 100], 16%. Cut twice (first to the
    # output, then to the quadrant) the 4% piece was kept: 20 x 20 is 20% of the 20 x 100 left.
    shift = torch.tensor([[[1.0, 0, -80], [0, 1, 0], [0, 0, 1]]], dtype=torch.float64)
    monkeypatch.setattr(data, "crop_matrices", lambda sizes, shape, mode, gen, scale_min: shift.clone())
    regions = [(0, 20, 0, 20), (0, 20, 20, 100), (20, 100, 0, 20), (20, 100, 20, 100)]
    monkeypatch.setattr(data, "mosaic_plan", lambda b, h, w, gen: (regions, torch.zeros(1, 4, dtype=torch.int64)))
    batch = make_batch([np.zeros((100, 200, 3), np.uint8)], [[[0, 0, 100, 100]]], [[0]])
    out = data.augment(batch, (100, 100), magnitude=0, mosaic_mix_prob=1.0, flip_prob=0.0, hsv=None,
                       generator=torch.Generator().manual_seed(0))
    assert out["boxes"][out["valid"]].tolist() == [[0.0, 20.0, 20.0, 100.0]]


def test_random_resized_crop_keeps_its_aspect_on_a_panorama():
    # A 100 x 1000 (h x w) strip into 64 x 64: a crop of the drawn area would be taller than the
    # image. It used to be clamped to the height alone, squashing x by 2-3.7x; now the crop
    # shrinks whole, so its x / y scales stay within the drawn 3/4 .. 4/3.
    sizes = torch.tensor([[100, 1000]]).repeat(500, 1)
    m = data.crop_matrices(sizes, (64, 64), 0.5, torch.Generator().manual_seed(0))
    ratio = m[:, 1, 1] / m[:, 0, 0]  # (y scale) / (x scale) = crop w / crop h for a square target
    assert ratio.min() >= 3 / 4 - 1e-9 and ratio.max() <= 4 / 3 + 1e-9
    crop_h, crop_w = 64 / m[:, 1, 1], 64 / m[:, 0, 0]
    assert crop_h.max() <= 100 + 1e-9 and crop_w.max() <= 1000 + 1e-9


def test_coco_annotations_that_name_no_image(tmp_path):
    image = [dict(id=1, file_name="a.jpg", width=40, height=30)]
    ann = dict(id=7, image_id="1", category_id=1, bbox=[2, 2, 10, 10])  # "1", the image is 1
    with pytest.raises(ValueError, match=r'none of its 1 annotations names an image of .images. \(annotation 7 '
                                         r'has image_id "1", the images have ids like 1\)'):
        data.open_dataset(write_coco(tmp_path, [ann], images=image), "train")
    # Some of them: a warning with the count, and they leave the evaluation's ground truth too.
    good = dict(ann, id=8, image_id=1)
    with pytest.warns(UserWarning, match="skipped 1 of its 2 annotations that name no image"):
        ds = data.open_dataset(write_coco(tmp_path, [ann, good], images=image), "train")
    assert ds[0]["boxes"].tolist() == [[2, 2, 12, 12]]
    assert [a["id"] for a in ds.coco_gt()["annotations"]] == [8]


def test_coco_duplicate_image_ids_are_refused(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "b.jpg")
    images = [dict(id=1, file_name="a.jpg", width=40, height=30), dict(id=1, file_name="b.jpg", width=40, height=30)]
    path = write_coco(tmp_path, [], images=images)
    with pytest.raises(ValueError, match="images a.jpg and b.jpg both have id 1: give each image its own id"):
        data.open_dataset(path, "train")


def test_an_image_of_another_size_than_its_json_says(tmp_path):
    # Resized after labelling: its boxes would land at the wrong place, without a word.
    path = write_coco(tmp_path, [dict(id=1, image_id=1, category_id=1, bbox=[2, 2, 10, 10])],
                      images=[dict(id=1, file_name="a.jpg", width=80, height=60)])
    ds = data.open_dataset(path, "train")
    with pytest.raises(data.DataLoadError, match=r"a\.jpg is 40x30 but the annotations say 80x60 \(width x height\)"):
        ds[0]


def test_huge_image_is_a_clear_error(tmp_path, monkeypatch):
    # PIL refuses images over ~179 megapixels with its own exception class, not an OSError.
    write_coco(tmp_path, [])  # images/a.jpg, 40 x 30
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40 x 30 is over twice that: PIL raises
    with pytest.raises(data.DataLoadError, match=r"a\.jpg is too large to decode .*cut it into tiles"):
        data.decode_image(str(tmp_path / "images" / "a.jpg"))
    with pytest.raises(ValueError, match=r"a\.jpg is too large to decode .*cut it into tiles"):
        data._image_size(str(tmp_path / "images" / "a.jpg"), "remove it")


def test_yolo_names_file_not_utf8_names_the_file(tmp_path):
    root = write_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"}, names=None)
    (root / "obj.names").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"obj\.names is not UTF-8 text .*save it as UTF-8"):
        data.open_dataset(str(root), "train")


def test_yolo_segmentation_polygon_is_read_as_its_box(tmp_path):
    # Ultralytics' -seg labels: class x1 y1 x2 y2 x3 y3 ...; its enclosing box, in a 40 x 30 image:
    # x 0.1..0.5 -> 4..20 px, y 0.2..0.6 -> 6..18 px.
    root = write_yolo(tmp_path, {"a": "1 0.1 0.2 0.5 0.2 0.5 0.6 0.1 0.6\n0 0.5 0.5 0.5 0.5\n"})
    ds = data.open_dataset(str(root), "train")
    np.testing.assert_allclose(ds[0]["boxes"], [[4, 6, 20, 18], [10, 7.5, 30, 22.5]], atol=1e-4)
    assert ds[0]["labels"].tolist() == [1, 0]


def test_yolo_box_with_numbers_in_0_1_is_clipped_not_dropped(tmp_path):
    # In a 40 x 30 image, cx 0.03 w 0.3 gives x -4.8 .. 7.2 px: 12% of the width outside, past
    # the 10% "far outside" margin, yet every number is in 0..1, YOLO's own rule (Ultralytics
    # clips such a box). Kept and clipped to x 0 .. 7.2; a centre outside 0..1 is still dropped.
    root = write_yolo(tmp_path, {"a": "0 0.03 0.5 0.3 0.2\n1 1.2 0.5 0.2 0.2\n"})
    with pytest.warns(UserWarning, match="skipped 1 bad boxes of 2"):
        ds = data.open_dataset(str(root), "train")
    np.testing.assert_allclose(ds[0]["boxes"], [[0, 12, 7.2, 18]], atol=1e-4)
    assert ds[0]["labels"].tolist() == [0]


# ---------------------------------------------------------------- MixUp
def test_mixup_blends_each_image_with_its_partner_and_keeps_both_boxes():
    # Three flat images 0.0, 0.3, 0.9 with one box each. k is drawn first (1 or 2), then who mixes.
    images = torch.tensor([0.0, 0.3, 0.9])[:, None, None, None].expand(3, 3, 4, 4).clone()
    boxes = torch.tensor([[[0.0, 0, 1, 1]], [[1.0, 1, 2, 2]], [[2.0, 2, 3, 3]]])
    labels, valid = torch.tensor([[0], [1], [2]]), torch.ones(3, 1, dtype=torch.bool)
    g = torch.Generator().manual_seed(5)
    k = [1, 2][int(torch.randint(0, 2, (1,), generator=g))]
    mixed = torch.rand(3, generator=g) < 0.5
    assert 0 < int(mixed.sum()) < 3  # seed 5 mixes some images and not others: both branches are seen
    x, b, l, v = data.mixup_images(images, boxes, labels, valid, 0.5, torch.Generator().manual_seed(5))
    values = [0.0, 0.3, 0.9]
    for i in range(3):
        p = (i + k) % 3
        expected = 0.5 * (values[i] + values[p]) if mixed[i] else values[i]
        assert torch.allclose(x[i], torch.full((3, 4, 4), expected))
        assert b[i].tolist() == [boxes[i, 0].tolist(), boxes[p, 0].tolist()] and l[i].tolist() == [i, p]
        assert v[i].tolist() == [True, bool(mixed[i])]  # the partner's box counts only where mixed
    # Two images could only be mixed with each other (k = 1 = B/2): two identical outputs. They
    # come back as they were, as does a single image.
    for n in (1, 2):
        x, b, l, v = data.mixup_images(images[:n], boxes[:n], labels[:n], valid[:n], 1.0, torch.Generator())
        assert x is images[:n] or torch.equal(x, images[:n])
        assert b.shape == (n, 1, 4) and v.all()


def test_mixup_never_pairs_two_outputs_with_each_other():
    # Batch 4: k = 2 would mix 0 with 2 and 2 with 0. Over 50 seeds every output stays distinct
    # and k is 1 or 3, each drawn.
    images = torch.tensor([0.0, 0.2, 0.5, 0.9])[:, None, None, None].expand(4, 3, 2, 2).clone()
    boxes, labels, valid = torch.zeros(4, 1, 4), torch.arange(4)[:, None], torch.ones(4, 1, dtype=torch.bool)
    ks = set()
    for seed in range(50):
        x, _, l, _ = data.mixup_images(images, boxes, labels, valid, 1.0, torch.Generator().manual_seed(seed))
        assert len({round(float(v), 4) for v in x[:, 0, 0, 0]}) == 4
        ks.add(int(l[0, 1]))  # image 0's partner is image k
    assert ks == {1, 3}


def test_augment_mixup_is_the_blend_of_the_unmixed_outputs():
    # MixUp draws last, so the same seed gives the same crops and colours with and without it.
    rng = np.random.default_rng(0)
    batch = make_batch([random_image(rng, 40, 60), random_image(rng, 50, 30), random_image(rng, 30, 30)],
                       [[[5, 5, 20, 30]], [[2, 3, 25, 40]], [[4, 4, 20, 20]]], [[1], [2], [3]])
    kw = dict(random_crop_mode=1.0, magnitude=6, num_layers=2, mosaic_mix_prob=0)
    plain = data.augment(dict(batch), (32, 32), generator=torch.Generator().manual_seed(3), **kw)
    mixed = data.augment(dict(batch), (32, 32), generator=torch.Generator().manual_seed(3), mixup_prob=1.0, **kw)
    m = plain["boxes"].shape[1]
    k = int(mixed["labels"][0, m]) - 1  # image 0's partner is image k (labels 1, 2, 3)
    partner = (torch.arange(3) + k) % 3
    assert k in (1, 2) and mixed["labels"][:, m].tolist() == (partner + 1).tolist()
    torch.testing.assert_close(mixed["images"], 0.5 * (plain["images"] + plain["images"][partner]))
    torch.testing.assert_close(mixed["boxes"][:, m:], plain["boxes"][partner])
    assert torch.equal(mixed["valid"][:, m:], plain["valid"][partner])
    with pytest.raises(ValueError, match=r"--mixup_prob 1\.5: a probability"):
        data.check_augment_args(1.0, 6, 2, 0.5, mixup_prob=1.5)


def test_yolo_full_width_box_is_framed_and_clipped(tmp_path):
    # "0 0.02 0.5 1.0 0.2" in a 40 x 30 image: w = 1.0 exactly, the edge of YOLO's inclusive 0..1
    # rule. x = 0.8 - 20 .. 0.8 + 20 = -19.2 .. 20.8 px reaches far past the 10% margin, but every
    # number is in 0..1, so the box is clipped to x 0 .. 20.8 (y 15 -+ 3 = 12 .. 18), not dropped.
    root = tmp_path / "yolo"
    (root / "labels").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "obj.names").write_text("a\n")
    (root / "labels" / "a.txt").write_text("0 0.02 0.5 1.0 0.2\n")
    Image.new("RGB", (40, 30)).save(root / "images" / "a.jpg")
    ds = data.open_dataset(str(root), "train")
    np.testing.assert_allclose(ds[0]["boxes"], [[0, 12, 20.8, 18]], atol=1e-4)
    assert ds[0]["labels"].tolist() == [0]


def test_show_batch_sample_draws_detections_over_the_ground_truth(tmp_path):
    # One grey (128) 60 x 60 picture. Truth [5, 5, 50, 50]: a white line with a black one inside it.
    # Detection [20, 30, 40, 45] of label 1: a 2-px outline in label 1's colour, its tag filled with
    # that colour above the box's top-left corner; the second detection slot is not valid and must
    # not be drawn. A caption: a dark tag at the bottom-left. The sheet puts the picture 2 px in.
    batch = dict(images=torch.full((1, 3, 60, 60), 128 / 255), boxes=torch.tensor([[[20.0, 30, 40, 45], [44, 5, 56, 15]]]),
                 labels=torch.tensor([[1, 2]]), valid=torch.tensor([[True, False]]), scores=torch.tensor([[0.87, 0.5]]))
    truth = (torch.tensor([[[5.0, 5, 50, 50]]]), torch.tensor([[True]]))
    path = data.show_batch_sample(batch, str(tmp_path / "d.png"), class_names=["a", "b", "c"], truth=truth,
                                  captions=["1 detection"])
    grey = (128, 128, 128)
    with Image.open(path) as im:
        assert im.size == (64, 64)
        px = lambda x, y: im.getpixel((x + 2, y + 2))
        assert px(5, 40) == px(50, 40) == data.TRUTH_LINE and px(6, 40) == px(49, 40) == data.TRUTH_SHADOW
        assert px(7, 40) == grey  # two lines wide
        assert px(20, 40) == px(21, 40) == px(40, 40) == data.SHEET_PALETTE[1]  # the detection, 2 px wide
        assert px(22, 40) == grey
        assert px(20, 29) == data.SHEET_PALETTE[1] and px(20, 31) == data.SHEET_PALETTE[1]  # tag above, then the line
        assert px(53, 10) == px(44, 10) == grey  # the invalid slot: nothing
        assert px(0, 59) == (40, 40, 40)  # the caption's tag
        with_scores = np.asarray(im)
    # Without scores the same boxes are drawn with the bare class name: the text differs.
    del batch["scores"]
    with Image.open(data.show_batch_sample(batch, str(tmp_path / "n.png"), ["a", "b", "c"], truth=truth)) as im:
        assert (np.asarray(im) != with_scores).any(-1).sum() > 10
    # A label the names do not reach (a model of more classes than the data names) shows its number.
    with Image.open(data.show_batch_sample(batch, str(tmp_path / "u.png"), ["a"], truth=truth)) as unnamed, \
            Image.open(data.show_batch_sample(batch, str(tmp_path / "l.png"), None, truth=truth)) as numbered:
        assert np.array_equal(np.asarray(unnamed), np.asarray(numbered))


def test_show_batch_sample_without_freetype_draws_a_label_number_for_a_non_latin_name(tmp_path, monkeypatch):
    # PIL's bitmap font (the default of a Pillow without FreeType) cannot encode "ネコ" and raises
    # UnicodeEncodeError: the label's number is drawn instead.
    monkeypatch.setattr(ImageDraw.ImageDraw, "getfont", lambda self: ImageFont.load_default_imagefont())
    batch = dict(images=torch.zeros(1, 3, 40, 40), boxes=torch.tensor([[[10.0, 20, 30, 30]]]),
                 labels=torch.tensor([[0]]), valid=torch.tensor([[True]]))
    with Image.open(data.show_batch_sample(batch, str(tmp_path / "k.png"), ["ネコ"])) as cat, \
            Image.open(data.show_batch_sample(batch, str(tmp_path / "n.png"), None)) as numbered, \
            Image.open(data.show_batch_sample(batch, str(tmp_path / "c.png"), ["cat"])) as latin:
        assert np.array_equal(np.asarray(cat), np.asarray(numbered))
        assert not np.array_equal(np.asarray(latin), np.asarray(numbered))  # the font does draw Latin-1 names


def test_a_pascal_voc_folder_is_named_as_such(tmp_path):
    # VOCdevkit/VOC2007's layout: Annotations/*.xml beside JPEGImages/. Not read here: one line
    # saying what it is and what to do, rather than "no YOLO label files".
    voc = tmp_path / "VOC2007"
    os.makedirs(voc / "Annotations")
    os.makedirs(voc / "JPEGImages")
    (voc / "Annotations" / "000001.xml").write_text("<annotation></annotation>")
    Image.new("RGB", (8, 8)).save(voc / "JPEGImages" / "000001.jpg")
    with pytest.raises(FileNotFoundError, match=r"VOC2007 looks like Pascal VOC \(xml annotations in .*Annotations\), "
                                                r"which is not read here: convert it to a COCO json or YOLO txt"):
        data.open_dataset(str(voc), "train")
    # xml files beside the images, no labels/: the same
    flat = tmp_path / "flat"
    os.makedirs(flat)
    (flat / "a.xml").write_text("<annotation></annotation>")
    with pytest.raises(FileNotFoundError, match="flat looks like Pascal VOC"):
        data.open_dataset(str(flat), "train")


def test_equalize_leaves_a_flat_channel_as_it_is():
    # PIL's equalize leaves a one-value channel unchanged; the stretch would send it to 0. A
    # channel with two values goes to 0 and 1 (the lower value's bin starts the cdf).
    x = torch.full((1, 3, 4, 4), 0.5)
    x[0, 2, :2] = 0.2
    out = data._equalize(x.clone())
    assert torch.equal(out[0, :2], x[0, :2])
    assert set(out[0, 2].unique().tolist()) == {0.0, 1.0}


def test_a_yolo_set_that_kept_its_voc_xml_reads_as_yolo(tmp_path):
    # Converted to YOLO in place (Roboflow's train/labels layout: no labels/ at the top), the xml
    # files still there: the labels decide, not the xml.
    root = tmp_path / "converted"
    for d in ("Annotations", "train/images", "train/labels"):
        os.makedirs(root / d)
    (root / "Annotations" / "a.xml").write_text("<annotation></annotation>")
    Image.new("RGB", (20, 10)).save(root / "train" / "images" / "a.jpg")
    (root / "train" / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.4\n")
    (root / "classes.txt").write_text("cat\n")
    ds = data.open_dataset(str(root), "train")
    assert ds.records[0]["boxes"].tolist() == [[5.0, 3.0, 15.0, 7.0]]
