"""Tests for models.py: shapes, gradients, priors, box coding, published sizes, errors.

Big networks are built on the "meta" device (shapes only, no memory, no arithmetic), so the
parameter table and the shape checks of every preset and backbone cost seconds.
"""
import json
import math
import os

import pytest
import torch

import data
import models
from conftest import shared_path

# Published parameter counts (EfficientDet with 90 classes, YOLOX with 80): effdet's
# tf_efficientdet_dN / automl and Megvii YOLOX, as also built by keras_cv_attention_models.
PUBLISHED_PARAMS = {
    "efficientdet_d0": 3880067, "efficientdet_d1": 6625898, "efficientdet_d2": 8097039,
    "efficientdet_d3": 12032296, "efficientdet_d4": 20723675, "efficientdet_d5": 33653315,
    "efficientdet_d6": 51871782, "efficientdet_d7": 51871782, "efficientdet_d7x": 77147166,
    "yolox_nano": 912159, "yolox_tiny": 5055855, "yolox_s": 8968255, "yolox_m": 25326495,
    "yolox_l": 54208895, "yolox_x": 99071455,
}

HEADS = ["efficientdet_d0", "yolox_nano"]
MODES = ["efficientdet", "anchor_free"]
BACKBONES = ["efficientnet_b0", "cspdarknet"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run tiny ops, where a second OpenMP thread only adds barrier waits (and on a
    busy 2-core machine a descheduled thread stalls every op); restore the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def level_sizes(h, w, strides):
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", HEADS)
def test_forward_shapes_and_backward(head, mode, backbone):
    torch.manual_seed(0)
    num_classes = 3
    model = models.build_model(head, backbone=backbone, anchors_mode=mode, num_classes=num_classes,
                               input_shape=(128, 128))
    a = 9 if mode == "efficientdet" else 1
    o = 1 if mode == "anchor_free" else 0
    assert (model.num_anchors, model.has_objectness, model.anchors_mode) == (a, bool(o), mode)
    assert model.strides == ((8, 16, 32, 64, 128) if head.startswith("efficientdet") else (8, 16, 32))
    assert hasattr(model.backbone, "channels")

    # Square input in training mode, with a backward pass.
    model.train()
    images = torch.rand(2, 3, 128, 128)
    outputs = model(images)
    assert [tuple(x.shape) for x in outputs] == [(2, a, 4 + num_classes + o, h, w)
                                                 for h, w in level_sizes(128, 128, model.strides)]
    loss = sum((x.float() ** 2).mean() for x in outputs)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0

    # Non-square input in eval mode; flattening lines up with the priors.
    model.eval()
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, 128, 192))
    assert [tuple(x.shape[-2:]) for x in outputs] == level_sizes(128, 192, model.strides)
    flat = models.flatten_outputs(outputs)
    priors = models.make_priors((128, 192), model.strides, mode)
    assert flat.shape == (1, len(priors), 4 + num_classes + o)
    assert torch.isfinite(flat).all()


def test_class_and_objectness_bias_prior():
    bias = -math.log((1 - 0.01) / 0.01)
    for head in HEADS:
        model = models.build_model(head, anchors_mode="anchor_free", num_classes=5).eval()
        with torch.no_grad():
            flat = models.flatten_outputs(model(torch.zeros(1, 3, 64, 64)))
        # Class and objectness logits start near the prior (sigmoid ~ 0.01).
        assert abs(torch.sigmoid(flat[..., 4:]).median().item() - 0.01) < 0.01
        if head.startswith("yolox"):
            assert torch.allclose(model.head.levels[0].cls_pred.bias, torch.full((5,), bias))
            assert torch.allclose(model.head.levels[0].obj_pred.bias, torch.full((1,), bias))
        else:
            assert torch.allclose(model.head.cls_pred.pointwise.bias, torch.full((5,), bias))
            assert model.head.box_pred.pointwise.bias[4].item() == pytest.approx(bias)


def test_config_rebuilds_the_same_model():
    model = models.build_model("yolox_nano", backbone="efficientnet_b0", anchors_mode="efficientdet",
                               num_classes=7, input_shape=(256, 320))
    assert model.config == dict(det_header="yolox_nano", backbone="efficientnet_b0",
                                anchors_mode="efficientdet", num_classes=7, input_shape=(256, 320),
                                anchor_scale=4.0, pixel_norm="imagenet", tf_padding=False)
    again = models.build_model(**model.config)
    assert again.load_state_dict(model.state_dict()) is not None
    assert models.build_model("efficientdet_d0").config["anchors_mode"] == "efficientdet"
    assert models.build_model("yolox_nano").config["anchors_mode"] == "anchor_free"
    # No input size: the preset's published one is recorded (eval.py evaluates at it), not 512.
    with torch.device("meta"):
        assert models.build_model("yolox_s").config["input_shape"] == (640, 640)
        assert models.build_model("efficientdet_d2").config["input_shape"] == (768, 768)


def test_parameter_counts_equal_published():
    for name, published in PUBLISHED_PARAMS.items():
        classes = 90 if name.startswith("efficientdet") else 80
        with torch.device("meta"):
            model = models.build_model(name, num_classes=classes)
        count = models.count_parameters(model)
        assert abs(count - published) <= 0.01 * published, f"{name}: {count} vs published {published}"
        assert count == published, f"{name}: {count} vs published {published} (within 1% but not equal)"


@pytest.mark.parametrize("name", models.PRESETS)
def test_every_preset_shapes_at_its_input_size(name):
    # On "meta": shapes flow through D7 at 1536 without computing anything.
    h, w = models.preset_input_shape(name)
    with torch.device("meta"):
        model = models.build_model(name, num_classes=4).eval()
        outputs = model(torch.zeros(1, 3, h, w))
    k = 4 + 4 + int(model.has_objectness)
    assert [tuple(x.shape) for x in outputs] == [(1, model.num_anchors, k, lh, lw)
                                                 for lh, lw in level_sizes(h, w, model.strides)]


@pytest.mark.parametrize("name", models.BACKBONES)
def test_every_backbone_gives_strides_8_16_32(name):
    with torch.device("meta"):
        body = models.build_backbone(name)
        feats = body(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 64 // s, 96 // s) for c, s in zip(body.channels, (8, 16, 32))]


def test_anchor_free_priors_hand_numbers():
    p = models.make_priors((64, 96), (8, 16), "anchor_free")
    assert len(p) == 8 * 12 + 4 * 6
    assert p.centers[:3].tolist() == [[4, 4], [12, 4], [20, 4]]           # x runs fastest
    assert p.centers[12].tolist() == [4, 12]                              # next row
    assert p.centers[96].tolist() == [8, 8]                               # first stride-16 prior
    assert p.centers[97].tolist() == [24, 8]
    assert p.centers[-1].tolist() == [88, 56]
    assert p.strides[95].item() == 8 and p.strides[96].item() == 16
    assert p.boxes[0].tolist() == [0, 0, 8, 8] and p.boxes[96].tolist() == [0, 0, 16, 16]
    assert p.centers.dtype == p.boxes.dtype == p.strides.dtype == torch.float32


def test_anchor_priors_hand_numbers():
    p = models.make_priors((32, 48), (8, 16), "efficientdet")
    assert len(p) == 9 * (4 * 6 + 2 * 3)
    # First location (x 4, y 4), stride 8: base size 4 * 8 = 32.
    assert p.boxes[0].tolist() == [-12, -12, 20, 20]                               # scale 1, ratio 1:1
    assert p.boxes[1].tolist() == pytest.approx([4 - 22.4, 4 - 11.2, 4 + 22.4, 4 + 11.2])  # 1.4 : 0.7
    assert p.boxes[2].tolist() == pytest.approx([4 - 11.2, 4 - 22.4, 4 + 11.2, 4 + 22.4])  # 0.7 : 1.4
    half = 16 * 2 ** (1 / 3)
    assert p.boxes[3].tolist() == pytest.approx([4 - half, 4 - half, 4 + half, 4 + half])  # scale 2^(1/3)
    assert (p.centers[:9] == torch.tensor([4.0, 4.0])).all()
    assert p.centers[9].tolist() == [12, 4]                   # next x, anchors innermost
    assert p.centers[9 * 6].tolist() == [4, 12]               # next row
    assert p.centers[9 * 24].tolist() == [8, 8]               # first stride-16 location
    assert p.boxes[9 * 24].tolist() == [-24, -24, 40, 40]     # base size 64
    assert torch.allclose((p.boxes[:, :2] + p.boxes[:, 2:]) / 2, p.centers)


def test_d7_anchors_are_five_strides_wide():
    # automl's anchor_scale: 5 for EfficientDet-D7 (4 for every other preset, D7x included).
    assert models.build_model("efficientdet_d7", num_classes=2, input_shape=(64, 64)).anchor_scale == 5.0
    assert models.build_model("efficientdet_d0", num_classes=2, input_shape=(64, 64)).anchor_scale == 4.0
    p = models.make_priors((32, 32), (8,), "efficientdet", anchor_scale=5.0)
    assert p.boxes[0].tolist() == [-16, -16, 24, 24]  # centre 4, half size 5 * 8 / 2 = 20
    # Detector.priors passes the model's own anchor size: D7's first anchor at 128 x 128 is
    # 5 strides of 8 wide around (4, 4).
    with torch.device("meta"):
        d7 = models.build_model("efficientdet_d7", num_classes=2, input_shape=(128, 128))
    assert d7.priors((128, 128)).boxes[0].tolist() == [-16, -16, 24, 24]


def test_flatten_order_matches_priors():
    # Fake outputs whose first three channels hold each location's own x, y and stride.
    strides, (h, w) = (8, 16, 32), (64, 96)
    outputs = []
    for s in strides:
        lh, lw = math.ceil(h / s), math.ceil(w / s)
        x = torch.zeros(2, 9, 5, lh, lw)
        x[:, :, 0] = ((torch.arange(lw) + 0.5) * s).view(1, 1, lw)
        x[:, :, 1] = ((torch.arange(lh) + 0.5) * s).view(1, lh, 1)
        x[:, :, 2] = s
        x[:, :, 3] = torch.arange(9.0).view(9, 1, 1)
        outputs.append(x)
    flat = models.flatten_outputs(outputs)
    p = models.make_priors((h, w), strides, "efficientdet")
    assert flat.shape == (2, len(p), 5)
    assert torch.equal(flat[0, :, :2], p.centers) and torch.equal(flat[1, :, 2], p.strides)
    assert torch.equal(flat[0, :, 3], torch.arange(9.0).repeat(len(p) // 9))
    # The anchor id also matches the prior's shape: anchor 1 is wide (1.4 : 0.7).
    wh = p.boxes[:, 2:] - p.boxes[:, :2]
    assert (wh[flat[0, :, 3] == 1, 0] > wh[flat[0, :, 3] == 1, 1]).all()


@pytest.mark.parametrize("mode", MODES)
def test_encode_decode_inverse(mode):
    g = torch.Generator().manual_seed(0)
    p = models.make_priors((128, 192), (8, 16, 32, 64, 128), mode)
    xy = torch.rand(2, len(p), 2, generator=g) * 150
    wh = torch.rand(2, len(p), 2, generator=g) * 120 + 1
    boxes = torch.cat([xy, xy + wh], -1)
    raw = models.encode_boxes(boxes, p, mode)
    assert raw.shape == boxes.shape
    assert torch.allclose(models.decode_boxes(raw, p, mode), boxes, atol=1e-3)
    # Zero offsets decode to the prior itself (its anchor, or its stride x stride cell).
    assert torch.allclose(models.decode_boxes(torch.zeros(len(p), 4), p, mode), p.boxes, atol=1e-4)


def test_decode_clamps_huge_sizes():
    p = models.make_priors((64, 64), (8,), "anchor_free")
    out = models.decode_boxes(torch.full((len(p), 4), 1e4), p, "anchor_free")
    assert torch.isfinite(out).all()


def test_unknown_names_give_clear_errors():
    with pytest.raises(ValueError, match="efficientdet_d0.*yolox_nano"):
        models.build_model("efficientdet_d9")
    with pytest.raises(ValueError, match="cspdarknet.*resnet50"):
        models.build_model("yolox_s", backbone="vgg16")
    with pytest.raises(ValueError, match="efficientdet, anchor_free"):
        models.build_model("yolox_s", anchors_mode="anchors")
    with pytest.raises(ValueError, match="anchor_free"):
        models.make_priors((64, 64), (8,), "retina")
    with pytest.raises(ValueError, match="multiples of 32"):
        models.build_model("yolox_nano")(torch.rand(1, 3, 100, 100))


def test_timm_backbone_needs_timm():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install timm"):
            models.build_model("yolox_s", backbone="timm:resnet18")
    else:
        with torch.device("meta"):
            model = models.build_model("yolox_nano", backbone="timm:resnet18")
        assert model.backbone.channels == [128, 256, 512]


PUBLISHED_INPUT = {
    "efficientdet_d0": 512, "efficientdet_d1": 640, "efficientdet_d2": 768, "efficientdet_d3": 896,
    "efficientdet_d4": 1024, "efficientdet_d5": 1280, "efficientdet_d6": 1280, "efficientdet_d7": 1536,
    "efficientdet_d7x": 1536,
    "yolox_nano": 416, "yolox_tiny": 416, "yolox_s": 640, "yolox_m": 640, "yolox_l": 640, "yolox_x": 640,
}


def test_preset_input_sizes_are_the_published_ones():
    assert set(PUBLISHED_INPUT) == set(models.PRESETS)
    for name, size in PUBLISHED_INPUT.items():
        assert models.preset_input_shape(name) == (size, size), name


@pytest.mark.parametrize("bad", [0, -1, 2.0, "3"])
def test_num_classes_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        models.build_model("yolox_nano", num_classes=bad)


@pytest.mark.parametrize("mode", ["efficientdet", "anchor_free"])
def test_decode_caps_a_box_at_250_strides(mode):
    # One stride-8 location. Anchor-free: size = exp(min(t, log 250)) * 8 = 2000 px.
    # Anchors: the octave-0 1:1 anchor is 32 px, size = exp(min(t, log 62.5)) * 32 = 2000 px.
    p = models.make_priors((8, 8), (8,), mode)
    raw = torch.tensor([[0.0, 0.0, 20.0, 20.0]]).expand(len(p), 4)
    out = models.decode_boxes(raw, p, mode)
    wh = out[0, 2:] - out[0, :2]
    assert wh.tolist() == pytest.approx([2000.0, 2000.0], rel=1e-5)
    # Below the cap nothing is clamped: t = log 50 -> 50 x the reference size.
    out = models.decode_boxes(torch.tensor([[0.0, 0.0, math.log(50), math.log(50)]]).expand(len(p), 4), p, mode)
    assert (out[0, 2] - out[0, 0]).item() == pytest.approx(50 * (8 if mode == "anchor_free" else 32), rel=1e-5)


def test_encode_of_a_degenerate_box_is_finite():
    # A zero-size box at the prior's centre (4, 4), stride 8: its size is floored at 1e-3 px.
    p = models.make_priors((8, 8), (8,), "anchor_free")
    raw = models.encode_boxes(torch.tensor([[4.0, 4.0, 4.0, 4.0]]), p, "anchor_free")
    assert torch.isfinite(raw).all()
    assert raw[0].tolist() == pytest.approx([0.0, 0.0, math.log(1e-3 / 8), math.log(1e-3 / 8)], rel=1e-5)


def test_spp_cascade_equals_pools_of_5_9_13():
    """The SPP computes its 9 and 13 pools as repeated 5x5 pools; they must equal the direct
    pools, bit for bit, including at the borders (a peak near a corner is clipped)."""
    torch.manual_seed(0)
    spp = models.SPP(8, 8).eval()
    seen = {}
    spp.conv2.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0]))
    x = torch.randn(2, 8, 11, 13)
    spp(x)
    hidden = spp.conv1(x)
    direct = [torch.nn.functional.max_pool2d(hidden, k, 1, k // 2) for k in (5, 9, 13)]
    assert torch.equal(seen["x"], torch.cat([hidden] + direct, 1))
    # By hand: one peak at (1, 2) in a 11 x 13 map of zeros; the 9x9 max spreads it 4 pixels
    # each way, clipped by the border: rows 0..5 (6 rows) x columns 0..6 (7 columns) = 42.
    peak = torch.zeros(1, 1, 11, 13)
    peak[0, 0, 1, 2] = 1
    p9 = torch.nn.functional.max_pool2d(torch.nn.functional.max_pool2d(peak, 5, 1, 2), 5, 1, 2)
    assert p9.sum().item() == 42


def test_largest_stride_agrees_with_the_built_models():
    # train.py checks -i against largest_stride before any model exists; it must say what the
    # built network's coarsest level is, for every preset (D7x has a P8: 256).
    with torch.device("meta"):
        for name in models.PRESETS:
            model = models.build_model(name, num_classes=2)
            assert models.largest_stride(name) == max(model.strides), name
    assert models.largest_stride("efficientdet_d7x") == 256 and models.largest_stride("yolox_s") == 32


def test_all_nine_anchors_of_the_first_location_by_hand():
    # Stride 8, first location centre (4, 4), base size 4 * 8 = 32, so half sizes are
    # 16 * 2^octave * (1, 1) | (1.4, 0.7) | (0.7, 1.4) for octaves 0, 1/3, 2/3 (scale-major).
    # The 2^(2/3) row (anchors 6..8) is the one the older hand-number test left unchecked.
    p = models.make_priors((32, 32), (8,), "efficientdet")
    expected = []
    for octave in (0.0, 1 / 3, 2 / 3):
        for rw, rh in ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4)):
            hw, hh = 16 * 2 ** octave * rw, 16 * 2 ** octave * rh
            expected.append([4 - hw, 4 - hh, 4 + hw, 4 + hh])
    torch.testing.assert_close(p.boxes[:9], torch.tensor(expected), atol=1e-4, rtol=0)
    # The 2^(2/3) row by hand: 16 * 1.587401 = 25.3984; x 1.4 = 35.5578, x 0.7 = 17.7789.
    assert p.boxes[6].tolist() == pytest.approx([-21.3984, -21.3984, 29.3984, 29.3984], abs=1e-3)
    assert p.boxes[7].tolist() == pytest.approx([-31.5578, -13.7789, 39.5578, 21.7789], abs=1e-3)
    assert p.boxes[8].tolist() == pytest.approx([-13.7789, -31.5578, 21.7789, 39.5578], abs=1e-3)


def test_focus_stem_channel_order_is_yolox():
    # Pixel (row y, col x) of colour c holds 100 c + 10 y + x. Focus must stack the 2 x 2 blocks as
    # YOLOX does: (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col),
    # 3 colours each, so at output (0, 0) channels 0, 3, 6, 9 read pixels (0,0), (1,0), (0,1), (1,1)
    # of colour 0 -> 0, 10, 1, 11; channel 4 is (1,0) of colour 1 -> 110. Swapping the middle two
    # groups would break loading Megvii weights while every shape stays the same.
    net = models.CSPDarknet(depth=0.33, width=0.125).eval()
    seen = {}
    net.stem.register_forward_pre_hook(lambda m, inputs: seen.update(x=inputs[0]))
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    image = (100 * torch.arange(3.0)[:, None, None] + 10 * y + x)[None]
    with torch.no_grad():
        net(image)
    stem_in = seen["x"]
    assert stem_in.shape == (1, 12, 16, 16)
    assert stem_in[0, [0, 3, 6, 9], 0, 0].tolist() == [0, 10, 1, 11]
    assert stem_in[0, 4, 0, 0].item() == 110
    # Output (1, 2) reads rows 2..3, cols 4..5: channel 6 is (row 2, col 5) of colour 0 = 25.
    assert stem_in[0, 6, 1, 2].item() == 25


# ---------------------------------------------------------------- ImageNet backbone weights
PUBLISHED_KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "published_state_dict_keys.json")
# Our backbone <- the classifier whose names and shapes the fixture holds.
IMAGENET_SOURCES = {"efficientnet_b0": "timm:efficientnet_b0", "efficientnet_b3": "timm:tf_efficientnet_b3",
                    "efficientnetv2_b0": "timm:tf_efficientnetv2_b0", "resnet50": "torchvision:resnet50"}


def numbered_state(keys):
    """A state dict with the fixture's names and shapes, tensor i filled with the number i."""
    return {name: torch.full(shape, float(i)) for i, (name, shape) in enumerate(keys)}


@pytest.mark.parametrize("ours", sorted(IMAGENET_SOURCES))
def test_imagenet_classifier_weights_line_up_with_our_backbones(ours):
    # BatchNorm's batch counters aside (older files leave them out), the file's k-th tensor lands
    # in our k-th, for every one of ours; what is left of the file is its classifier head only.
    with open(PUBLISHED_KEYS) as f:
        keys = json.load(f)[IMAGENET_SOURCES[ours]]
    backbone = models.build_backbone(ours)
    n = models.load_backbone_weights(backbone, numbered_state(keys))
    weights = [k for k, _ in keys if not k.endswith("num_batches_tracked")]
    own = [(k, v) for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert n == len(own)
    position = {name: i for i, (name, _) in enumerate(keys)}
    for (name, tensor), their_name in zip(own, weights):
        assert torch.all(tensor == position[their_name]), (name, their_name)
    assert {k.split(".")[0] for k in weights[n:]} in ({"conv_head", "bn2", "classifier"}, {"fc"})
    # A file without the counters (torchvision's older resnet50, say) loads the same weights.
    bare = {k: v for k, v in numbered_state(keys).items() if not k.endswith("num_batches_tracked")}
    assert models.load_backbone_weights(models.build_backbone(ours), bare) == n


def test_imagenet_weights_that_do_not_fit_are_named():
    with open(PUBLISHED_KEYS) as f:
        published = json.load(f)
    keys = published["timm:efficientnet_b0"]
    with pytest.raises(ValueError, match=r"tensor 0 does not fit: ours is stem.0.conv.weight \(64, 3, 7, 7\), the file's "
                                         r"is conv_stem.weight \(32, 3, 3, 3\)"):
        models.load_backbone_weights(models.build_backbone("resnet50"), numbered_state(keys))
    with pytest.raises(ValueError, match=r"it has 9 tensors, fewer than the backbone's 304"):
        models.load_backbone_weights(models.build_backbone("efficientnet_b0"), numbered_state(keys[:10]))
    # effdet's whole EfficientDet starts with this very backbone: its BiFPN after it is no
    # classifier head, and the file is refused rather than read as one.
    effdet = {k[len("backbone."):] if k.startswith("backbone.") else k: v
              for k, v in numbered_state(published["effdet:efficientdet_d0"]).items()}
    with pytest.raises(ValueError, match=r"after the backbone's 304 tensors it has 336 more \(fpn.resample.3"):
        models.load_backbone_weights(models.build_backbone("efficientnet_b0"), effdet)


def test_imagenet_classifier_features_come_out_equal():
    # With the weights of timm's efficientnet_b0 / torchvision's resnet50 (random here, with
    # BatchNorm statistics drawn away from 0 / 1), our backbone's three levels equal theirs once
    # their BatchNorm eps is ours (1e-3; see load_backbone_weights).
    timm = pytest.importorskip("timm", reason="needs timm (pip install -r requirements-bench.txt)")
    torchvision = pytest.importorskip("torchvision", reason="needs torchvision (pip install -r requirements-bench.txt)")
    from torchvision.models.feature_extraction import create_feature_extractor
    torch.manual_seed(0)
    x = torch.rand(2, 3, 96, 128)
    for ours, classifier, features in (
            ("efficientnet_b0", timm.create_model("efficientnet_b0", pretrained=False), None),
            ("resnet50", torchvision.models.resnet50(), ("layer2", "layer3", "layer4"))):
        for m in classifier.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eps = 1e-3
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
        classifier.eval()
        backbone = models.build_backbone(ours).eval()
        models.load_backbone_weights(backbone, classifier.state_dict())
        with torch.no_grad():
            if features is None:  # timm's own feature taps: strides 8, 16, 32
                tapped = timm.create_model("efficientnet_b0", pretrained=False, features_only=True, out_indices=(2, 3, 4))
                tapped.load_state_dict({k: v for k, v in classifier.state_dict().items() if k in tapped.state_dict()})
                for m in tapped.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.eps = 1e-3
                want = tapped.eval()(x)
            else:
                want = list(create_feature_extractor(classifier, {f: f for f in features})(x).values())
            got = backbone(x)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- effdet EfficientDet weights
def test_effdet_checkpoint_converts_onto_every_tensor_by_hand():
    # effdet's efficientdet_d0 names and shapes, tensor i filled with i: every one of our tensors
    # gets a value (strict load), the BiFPN by position, the head by name.
    with open(PUBLISHED_KEYS) as f:
        keys = json.load(f)["effdet:efficientdet_d0"]
    state = numbered_state(keys)
    position = {name: i for i, (name, _) in enumerate(keys)}
    model = models.build_model("efficientdet_d0", num_classes=90)
    converted = models.effdet_state_dict(state, model)
    model.load_state_dict(converted, strict=True)
    assert torch.all(converted["backbone.stem.conv.weight"] == position["backbone.conv_stem.weight"])
    assert torch.all(converted["neck.extra.conv.weight"] == position["fpn.resample.3.conv.conv.weight"])
    assert torch.all(converted["neck.extra.conv.bias"] == 0)  # effdet's conv before a BatchNorm has no bias
    # effdet's BatchNorm of repeat 1 at level 3 is our level 3, repeat 1.
    assert torch.all(converted["head.cls_bns.3.1.running_var"] == position["class_net.bn_rep.1.3.bn.running_var"])
    assert torch.all(converted["head.cls_convs.2.pointwise.bias"] == 0)
    # The box predictor's rows: effdet's anchor a writes (ty, tx, th, tw) in rows 4a .. 4a+3.
    bias = torch.arange(36.0)
    rows = models.effdet_state_dict(dict(state, **{"box_net.predict.conv_pw.bias": bias}), model)
    assert rows["head.box_pred.pointwise.bias"][:8].tolist() == [1, 0, 3, 2, 5, 4, 7, 6]
    # D1's backbone has a second block in its first stage (B1 is deeper): the first misfit is named.
    with pytest.raises(ValueError, match=r"ours is backbone.stages.0.1.block.0.conv.weight \(16, 1, 3, 3\), the "
                                         r"file's is backbone.blocks.1.0.conv_pw.weight \(96, 16, 1, 1\): it is another "
                                         r"EfficientDet size"):
        models.effdet_state_dict(state, models.build_model("efficientdet_d1", num_classes=90))


def test_effdet_efficientdet_d0_outputs_come_out_equal():
    # effdet's own efficientdet_d0 (random weights, BatchNorm statistics drawn away from 0 / 1, its
    # backbone's eps set to ours): every level's class and box outputs, and the anchors, agree.
    effdet = pytest.importorskip("effdet", reason="needs effdet (pip install -r requirements-bench.txt)")
    from effdet.anchors import Anchors
    from effdet.config import get_efficientdet_config
    torch.manual_seed(0)
    theirs = effdet.create_model("efficientdet_d0", pretrained=False, pretrained_backbone=False, num_classes=90)
    for m in theirs.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 1e-3
            m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    ours = models.build_model("efficientdet_d0", num_classes=90)
    ours.load_state_dict(models.effdet_state_dict(theirs.state_dict(), ours), strict=True)
    x = torch.rand(1, 3, 512, 512)  # effdet's model is built for its 512
    mean, std = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        cls_out, box_out = theirs.eval()((x - mean) / std)  # effdet takes normalised images
        outs = ours.eval()(x)
    for o, c, b in zip(outs, cls_out, box_out):
        n, a, _, h, w = o.shape
        torch.testing.assert_close(o[:, :, 4:], c.view(n, a, 90, h, w), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(o[:, :, :4], b.view(n, a, 4, h, w)[:, :, [1, 0, 3, 2]], atol=1e-5, rtol=1e-5)
    anchors = Anchors.from_config(get_efficientdet_config("efficientdet_d0")).boxes  # y1 x1 y2 x2
    torch.testing.assert_close(ours.priors((512, 512), device="cpu").boxes, anchors[:, [1, 0, 3, 2]].float(),
                               atol=1e-3, rtol=0)


# ---------------------------------------------------------------- Megvii YOLOX weights
@pytest.mark.parametrize("name", ["yolox_s", "yolox_nano"])
def test_megvii_checkpoint_converts_onto_every_tensor_by_hand(name):
    # Megvii's names and shapes (yolox 0.3.0), tensor i filled with i: every one of our tensors
    # gets its value from the tensor of the same layer (a strict load).
    with open(PUBLISHED_KEYS) as f:
        keys = json.load(f)["megvii:" + name]
    position = {k: i for i, (k, _) in enumerate(keys)}
    model = models.build_model(name, pixel_norm="0-255")
    converted = models.megvii_yolox_state_dict(numbered_state(keys), model)
    model.load_state_dict(converted, strict=True)
    for ours, theirs in (("backbone.dark3.1.blocks.0.conv1.conv.weight", "backbone.backbone.dark3.1.m.0.conv1.conv.weight"),
                         ("backbone.dark5.1.conv2.bn.running_var", "backbone.backbone.dark5.1.conv2.bn.running_var"),
                         ("neck.td4.conv1.bn.bias", "backbone.C3_p4.conv1.bn.bias"),
                         ("neck.down4.conv.weight" if name == "yolox_s" else "neck.down4.pconv.conv.weight",
                          "backbone.bu_conv1.conv.weight" if name == "yolox_s" else "backbone.bu_conv1.pconv.conv.weight"),
                         ("head.levels.1.stem.bn.weight", "head.stems.1.bn.weight"),
                         ("head.levels.2.reg_convs.1.bn.bias" if name == "yolox_s" else "head.levels.2.reg_convs.1.pconv.bn.bias",
                          "head.reg_convs.2.1.bn.bias" if name == "yolox_s" else "head.reg_convs.2.1.pconv.bn.bias"),
                         ("head.levels.2.cls_pred.weight", "head.cls_preds.2.weight"),
                         ("head.levels.0.obj_pred.bias", "head.obj_preds.0.bias")):
        assert torch.all(converted[ours] == position[theirs]), (ours, theirs)
    # The box biases move from the cell's corner to its centre: x and y - 0.5, w and h as they were.
    i = position["head.reg_preds.1.bias"]
    assert converted["head.levels.1.reg_pred.bias"].tolist() == [i - 0.5, i - 0.5, i, i]
    # The stem's 12 input channels, BGR in each of the 4 pixel phases, come out RGB.
    stem = dict(numbered_state(keys))
    stem["backbone.backbone.stem.conv.conv.weight"] = torch.arange(12.0).view(1, 12, 1, 1).expand(
        *[s for _, s in keys if _ == "backbone.backbone.stem.conv.conv.weight"][0]).clone()
    got = models.megvii_yolox_state_dict(stem, model)["backbone.stem.conv.weight"]
    assert got[0, :, 0, 0].tolist() == [2, 1, 0, 5, 4, 3, 8, 7, 6, 11, 10, 9]
    # Megvii's legacy weights (RGB, ImageNet's statistics) go onto an "imagenet" model unflipped.
    legacy = models.megvii_yolox_state_dict(stem, models.build_model(name))["backbone.stem.conv.weight"]
    assert legacy[0, :, 0, 0].tolist() == list(range(12))
    # COCO's ids 3, 1 and 90 are its 3rd, 1st and 80th categories: slots 2, 0, 79.
    three = models.megvii_yolox_state_dict(stem, models.build_model(name, num_classes=3, pixel_norm="0-255"),
                                           cat_ids=[3, 1, 90])
    bias = stem["head.cls_preds.0.bias"]
    assert three["head.levels.0.cls_pred.bias"].tolist() == [bias[2], bias[0], bias[79]]


def test_megvii_checkpoints_that_do_not_fit_are_named():
    with open(PUBLISHED_KEYS) as f:
        published = json.load(f)
    s = numbered_state(published["megvii:yolox_s"])
    with pytest.raises(ValueError, match=r"ours is backbone.stem.conv.weight \(24, 12, 3, 3\), the file's backbone.backbone."
                                         r"stem.conv.conv.weight is \(32, 12, 3, 3\): it is another YOLOX size"):
        models.megvii_yolox_state_dict(s, models.build_model("yolox_tiny"))
    with pytest.raises(ValueError, match=r"the file's backbone.backbone.dark2.0.dconv.conv.weight is no tensor of "
                                         r"this YOLOX"):
        models.megvii_yolox_state_dict(numbered_state(published["megvii:yolox_nano"]), models.build_model("yolox_s"))
    with pytest.raises(ValueError, match=r"the file has no backbone.dark2.1.blocks.1.conv1.conv.weight \(120 of our tensors missing\)"):
        models.megvii_yolox_state_dict(s, models.build_model("yolox_m"))
    # A YOLOX that Megvii's code trained on 20 classes has no COCO slots to pick from.
    twenty = {k: v[:20] if k.startswith("head.cls_preds.") else v for k, v in s.items()}
    models.megvii_yolox_state_dict(twenty, models.build_model("yolox_s", num_classes=20))  # as it is: fits
    with pytest.raises(ValueError, match=r"its class predictor has 20 slots, not COCO's 80"):
        models.megvii_yolox_state_dict(twenty, models.build_model("yolox_s", num_classes=2), cat_ids=[1, 2])
    with pytest.raises(ValueError, match=r"the data's ids start \[1, 95\], not all COCO's"):
        models.megvii_yolox_state_dict(s, models.build_model("yolox_s", num_classes=2), cat_ids=[1, 95])
    with pytest.raises(ValueError, match=r"the model's pixel_norm is 'inception'; Megvii's weights take 0..255"):
        models.megvii_yolox_state_dict(s, models.build_model("yolox_s", pixel_norm="inception"))
    with pytest.raises(ValueError, match=r"no tensor of this YOLOX \(ours would be None\)"):
        models.megvii_yolox_state_dict({"class_net.predict.conv_pw.bias": torch.zeros(1)}, models.build_model("yolox_s"))


def test_pixel_norm_is_part_of_the_model_config():
    # What the backbone is fed: "imagenet" (z - mean) / std, "0-255" 255 y. With z = x * std + mean
    # and y = x / 255 both feed it x.
    fed = []
    x = torch.randn(1, 3, 64, 64)
    mean, std = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    for pixel_norm, images in (("imagenet", x * std + mean), ("0-255", x / 255)):
        model = models.build_model("yolox_nano", num_classes=3, input_shape=(64, 64), pixel_norm=pixel_norm).eval()
        model.backbone.register_forward_pre_hook(lambda module, args: fed.append(args[0]))
        with torch.no_grad():
            model(images)
        again = models.build_model(**model.config)
        assert again.config["pixel_norm"] == pixel_norm and torch.equal(again.std, model.std)
    torch.testing.assert_close(fed[0], x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fed[1], x, atol=1e-5, rtol=1e-5)
    assert model.mean.flatten().tolist() == [0.0, 0.0, 0.0] and torch.allclose(model.std * 255, torch.ones(3, 1, 1))
    with pytest.raises(ValueError, match=r"unknown pixel_norm 'bgr'; valid ones: imagenet, 0-255"):
        models.build_model("yolox_nano", pixel_norm="bgr")


def test_megvii_yolox_outputs_come_out_equal():
    # Megvii's own yolox_s, yolox_tiny and yolox_nano (random weights, BatchNorm statistics drawn
    # away from 0 / 1): decoded boxes, objectness and class scores agree with ours on the converted weights.
    pytest.importorskip("yolox", reason="needs Megvii's yolox (see requirements-bench.txt)")
    from yolox.exp import get_exp
    torch.manual_seed(0)
    for name in ("yolox_s", "yolox_tiny", "yolox_nano"):
        theirs = get_exp(None, name.replace("_", "-")).get_model().eval()   # BatchNorm eps 1e-3, as ours
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.data.uniform_(-1, 1)
        ours = models.build_model(name, pixel_norm="0-255", input_shape=(256, 320)).eval()
        ours.load_state_dict(models.megvii_yolox_state_dict(theirs.state_dict(), ours), strict=True)
        x = torch.rand(2, 3, 256, 320)
        with torch.no_grad():
            want = theirs(x.flip(1) * 255)   # BGR pixels 0..255 -> [B, N, 85]: cx cy w h, obj, 80 classes
            raw = models.flatten_outputs(ours(x))
        boxes = models.decode_boxes(raw[..., :4], ours.priors((256, 320)), "anchor_free")
        torch.testing.assert_close(boxes, torch.cat([want[..., :2] - want[..., 2:4] / 2,
                                                     want[..., :2] + want[..., 2:4] / 2], -1), atol=2e-4, rtol=1e-5)
        torch.testing.assert_close(raw[..., 84].sigmoid(), want[..., 4], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(raw[..., 4:84].sigmoid(), want[..., 5:], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- TensorFlow's padding
def test_tf_same_padding_puts_the_odd_pixel_at_the_bottom_right():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # k 3, stride 2 on 4: 1 pixel in all, after the last row / column; k 5: 1 before, 2 after;
    # an odd side (5) needs 2: one each side, as k // 2 pads.
    assert models.pad_same(x, 3, 2).shape[-2:] == (5, 5) and models.pad_same(x, 3, 2)[0, 0, :4, :4].equal(x[0, 0])
    assert models.pad_same(x, 5, 2)[0, 0, 1:5, 1:5].equal(x[0, 0]) and models.pad_same(x, 5, 2).shape[-2:] == (7, 7)
    assert models.pad_same(torch.zeros(1, 1, 5, 5), 3, 2).shape[-2:] == (7, 7)
    # The BiFPN's 3x3 / stride-2 max-pool: window (0, 0) covers rows and columns 0..1 with k // 2
    # padding (max 5), 0..2 with TensorFlow's (max 10); padding never wins a max.
    assert models.downsample(x)[0, 0].tolist() == [[5, 7], [13, 15]]
    assert models.downsample(x, tf_same=True)[0, 0].tolist() == [[10, 11], [14, 15]]
    assert models.downsample(-1 - x, tf_same=True)[0, 0].tolist() == [[-1, -3], [-9, -11]]
    # A stride-2 conv of ones over ones counts the real pixels its window covers.
    conv = models.Conv2dSame(1, 1, 3, 2, 0, bias=False)
    torch.nn.init.ones_(conv.weight)
    assert conv(torch.ones(1, 1, 4, 4))[0, 0].tolist() == [[9, 6], [6, 4]]
    # Named by their files' paths (as given); AdvProp's take -1..1 pixels. Only where there is an
    # EfficientNet or a BiFPN to pad.
    assert models.named_settings("w/tf_efficientdet_d0_34-f153e0cf.pth") == ("imagenet", True)
    assert models.named_settings("models--timm--tf_efficientnet_b0.ns_jft_in1k/snapshots/1/pytorch_model.bin") == \
        ("imagenet", True)
    assert models.named_settings("tf_efficientdet_d0_ap-d0cdbd0a.pth") == ("inception", True)
    assert models.named_settings("models--timm--tf_efficientnet_b0.ap_in1k/x/pytorch_model.bin") == ("inception", True)
    assert models.named_settings("w/efficientdet_d0-f3276ba8.pth") == models.named_settings("ap.pth") == ("imagenet", False)
    with pytest.raises(ValueError, match=r"tf_padding changes an EfficientNet backbone or a BiFPN, and yolox_s"):
        models.build_model("yolox_s", tf_padding=True)


def test_tf_efficientdet_and_tf_efficientnet_outputs_come_out_equal_with_tf_padding():
    # effdet's tf_efficientdet_d0 and timm's tf_efficientnet_b3 (random weights, BatchNorm
    # statistics drawn away from 0 / 1; their eps is ours): equal with tf_padding, not without.
    effdet = pytest.importorskip("effdet", reason="needs effdet (pip install -r requirements-bench.txt)")
    timm = pytest.importorskip("timm", reason="needs timm (pip install -r requirements-bench.txt)")
    torch.manual_seed(0)

    def perturbed(m):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                assert bn.eps == 1e-3
                bn.running_mean.uniform_(-0.3, 0.3), bn.running_var.uniform_(0.5, 1.5)
                bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.2, 0.2)
        return m.eval()
    theirs = perturbed(effdet.create_model("tf_efficientdet_d0", pretrained=False, pretrained_backbone=False))
    x = torch.rand(1, 3, 512, 512)
    mean, std = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        cls_out, box_out = theirs((x - mean) / std)
        for tf_padding, close in ((True, True), (False, False)):
            ours = models.build_model("efficientdet_d0", num_classes=90, tf_padding=tf_padding).eval()
            ours.load_state_dict(models.effdet_state_dict(theirs.state_dict(), ours), strict=True)
            got = ours(x)
            assert all(torch.allclose(o[:, :, 4:], c.view(o[:, :, 4:].shape), atol=2e-5) for o, c in zip(got, cls_out)) == close
            assert all(torch.allclose(o[:, :, :4], b.view(o[:, :, :4].shape)[:, :, [1, 0, 3, 2]], atol=2e-5)
                       for o, b in zip(got, box_out)) == close
    for theirs_name, ours_name in (("tf_efficientnet_b3", "efficientnet_b3"), ("tf_efficientnetv2_b0", "efficientnetv2_b0")):
        classifier = perturbed(timm.create_model(theirs_name, pretrained=False))
        tapped = timm.create_model(theirs_name, pretrained=False, features_only=True, out_indices=(2, 3, 4))
        tapped.load_state_dict({k: v for k, v in classifier.state_dict().items() if k in tapped.state_dict()})
        backbone = models.build_backbone(ours_name, tf_padding=True).eval()
        models.load_backbone_weights(backbone, classifier.state_dict())
        x = torch.rand(2, 3, 100, 131)  # odd sides: TensorFlow pads those evenly
        with torch.no_grad():
            for a, b in zip(backbone(x), tapped.eval()(x)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_voc_and_coco_classes_get_coco_s_ids_by_name():
    # The real VOC 2007 sample, as a COCO json (ids 1..20 in its own order: 2 is "cat") and as a
    # YOLO folder (ids from 0): each class gets its COCO id by name, VOC's six other names included.
    want = {"person": 1, "cat": 17, "aeroplane": 5, "tvmonitor": 72, "diningtable": 67, "sofa": 63,
            "motorbike": 4, "pottedplant": 64, "bus": 6, "cow": 21}
    for ds in (data.open_dataset(shared_path("voc2007_100", "instances_coco.json"), "train"),
               data.open_dataset(shared_path("voc2007_100", "yolo"), "train",
                                 images_dir=shared_path("voc2007_100", "images"))):
        ids = models.coco_category_ids(ds.cat_ids, ds.class_names)
        assert len(ids) == 20 and len(set(ids)) == 20
        got = dict(zip(ds.class_names, ids))
        assert {name: got[name] for name in want} == want
    # COCO's own json: every id is its own; a json without names keeps ids that are COCO's.
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "coco_val2014_100", "instances_val2014_100.json")) as f:
        categories = json.load(f)["categories"]
    assert len(categories) == 80
    assert models.coco_category_ids([c["id"] for c in categories], [c["name"] for c in categories]) == \
        [c["id"] for c in categories]
    assert models.coco_category_ids([90, 1], None) == [90, 1] and models.coco_category_ids([12], None) is None
    assert models.coco_category_ids([0, 1], ["person", "unicorn"]) is None
    # Case counts: Open Images' "Mouse" is the animal. "_" reads as a space.
    assert models.coco_category_ids([0], ["Mouse"]) is None and models.coco_category_ids([0], [" mouse "]) == [74]
    assert models.coco_category_ids([0, 1], ["dining_table", "traffic_light"]) == [67, 10]
    # Two classes that are one COCO category would write each detection twice: refused.
    with pytest.raises(ValueError, match=r"the classes \['sofa', 'couch'\] are both COCO's 'couch'"):
        models.coco_category_ids([1, 2], ["sofa", "couch"])
    with pytest.raises(ValueError, match=r"2 category ids and 1 class names"):
        models.coco_category_ids([1, 2], ["person"])
    # partial (fine-tuning from a COCO model): a class COCO lacks is None in its place, None as a
    # whole only when none is COCO's; twins are still refused; data matched by id stays all or
    # nothing (ids 1 and 12: 12 is no COCO id, so 1 need not be COCO's person either).
    assert models.coco_category_ids([0, 1, 2], ["person", "unicorn", "tvmonitor"], partial=True) == [1, None, 72]
    assert models.coco_category_ids([0, 1], ["unicorn", "dragon"], partial=True) is None
    assert models.coco_category_ids([1, 12], None, partial=True) is None
    with pytest.raises(ValueError, match=r"the classes \['sofa', 'couch'\] are both COCO's 'couch'"):
        models.coco_category_ids([1, 2, 3], ["sofa", "couch", "unicorn"], partial=True)
    assert models.same_classes(["a", "b"], ["b", "a"]) == [1, 0] and models.same_classes(["a", "b"], ["b", "b"]) is None
    assert models.same_classes(["a", "b"], ["c", "a"]) == [None, 0]


# ---- BatchNorm + SiLU fused (bn_silu_kernels.cu) ----

def test_bn_silu_kernels_compile_with_nvcc(tmp_path):
    import shutil
    import subprocess
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: cannot check that bn_silu_kernels.cu compiles")
    subprocess.run([nvcc, "-c", models.BN_SILU_KERNEL_PATH, "-o", str(tmp_path / "bn.o")],
                   check=True, capture_output=True, timeout=120)
    assert (tmp_path / "bn.o").stat().st_size > 0


def test_bn_silu_grid_and_row_stride_by_hand():
    # C = 32 bf16: 4 vectors of 8 channels -> 4 threads across, 64 rows a block, one block across;
    # 132 multiprocessors x 8 blocks, or fewer when the rows run out (1000 rows / 64 -> 16).
    assert models._bn_silu_grid(10**6, 32, 8, 132) == ((1, 1056), (4, 64))
    assert models._bn_silu_grid(1000, 32, 8, 132) == ((1, 16), (4, 64))
    # C = 520 float32: 130 vectors -> 32 across, 5 blocks across (the last one 2 vectors full)
    assert models._bn_silu_grid(10**6, 520, 4, 132) == ((5, 212), (32, 8))
    # C = 48 fp16: 6 vectors -> 8 threads across (2 idle), 32 rows a block
    assert models._bn_silu_grid(40, 48, 8, 132) == ((1, 2), (8, 32))
    a = torch.zeros(2, 24, 3, 5).to(memory_format=torch.channels_last)
    b = torch.zeros(2, 16, 3, 5).to(memory_format=torch.channels_last)
    assert models._rows_stride(a) == 24
    both = torch.cat([a, b], dim=1)  # channels-last: a pixel's 40 channels side by side
    assert models._rows_stride(both[:, :24]) == 40 and models._rows_stride(both[:, 24:]) == 40
    assert models._rows_stride(torch.zeros(2, 24, 3, 5)) is None  # NCHW: a pixel's channels are apart
    assert models._rows_stride(a[:, :, :, 1:]) is None            # a column cut: rows at two strides


def test_fused_bn_silu_changes_nothing_off_cuda():
    """On the CPU the switch is a no-op (the kernels are CUDA's): the same outputs, and eval mode
    is BatchNorm2d's everywhere."""
    torch.manual_seed(0)
    plain = models.build_model("yolox_nano", num_classes=3, input_shape=(64, 64)).train()
    fused = models.use_fused_bn_silu(models.build_model("yolox_nano", num_classes=3, input_shape=(64, 64)))
    fused.load_state_dict(plain.state_dict())
    fused.train()
    assert sum(m.fused_bn_silu for m in fused.modules() if isinstance(m, models.ConvBnAct)) > 50
    x = torch.rand(2, 3, 64, 64)
    for a, b in zip(plain(x), fused(x)):
        assert torch.equal(a, b)
    bn = torch.nn.BatchNorm2d(8)
    assert not models.bn_silu_fits(torch.rand(2, 8, 4, 4).to(memory_format=torch.channels_last), bn, torch.nn.SiLU())


def _bn_silu_reference(x, w, b, gy, eps):
    """SiLU(BatchNorm2d(x)) in training mode and its gradients, in float64 on the CPU."""
    x, w, b, gy = (t.detach().double().cpu().requires_grad_(i < 3) for i, t in enumerate((x, w, b, gy)))
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    z = (x - mean) / torch.sqrt(var + eps) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    y = z * torch.sigmoid(z)
    y.backward(gy)
    m = x.numel() // x.shape[1]
    return y.detach(), x.grad, w.grad, b.grad, mean.flatten().detach(), var.flatten().detach() * m / (m - 1)


def _rel(a, ref):
    return ((a.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the fused kernel is CUDA's")
@pytest.mark.parametrize("before", [0, 4])
@pytest.mark.parametrize("shape,dtype,offset,tol", [
    ((4, 32, 20, 24), torch.bfloat16, 0.0, 1e-2),     # yolox_s-like, one block across
    ((64, 64, 40, 40), torch.bfloat16, 30.0, 1e-2),   # many rows a thread, a large mean
    ((2, 48, 7, 5), torch.float16, 0.0, 2e-3),        # idle threads across (6 vectors in 8)
    ((3, 520, 3, 3), torch.float32, 5.0, 1e-5),       # 5 blocks across, the last partly idle
    ((4, 64, 2, 2), torch.float32, 0.0, 1e-5),        # 16 rows: yolox_nano's last level at 64 px
    ((4, 16, 32, 32), torch.bfloat16, 0.0, 1e-2),     # 2 vectors across: yolox_nano's stem
])
def test_fused_bn_silu_matches_float64_and_batchnorm(shape, dtype, offset, tol, before):
    """Outputs, the three gradients and the running statistics against float64 by hand, and the
    running statistics and batch count against BatchNorm2d's own update; the incoming gradient is
    a channel slice of a concatenation (rows at a stride wider than C), as in the CSP blocks:
    after `before` channels of another tensor, which moves its start by 4 values (16 bytes of
    float32: read in place; 8 bytes of bf16 / fp16, a row stride no 16-byte load fits: copied)."""
    torch.manual_seed(0)
    n, c, h, w = shape
    dev = "cuda"
    x = (torch.randn(shape, device=dev) * 3 + offset).to(dtype).to(memory_format=torch.channels_last)
    bn = torch.nn.BatchNorm2d(c, eps=1e-3, momentum=0.03).to(dev)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    native = torch.nn.BatchNorm2d(c, eps=1e-3, momentum=0.03).to(dev)
    native.load_state_dict(bn.state_dict())
    start_mean, start_var = bn.running_mean.clone(), bn.running_var.clone()
    assert models.bn_silu_fits(x, bn, torch.nn.SiLU())
    xg = x.detach().requires_grad_()
    y = models.bn_silu_cuda(xg, bn)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    ahead = torch.zeros(n, before, h, w, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
    other = torch.zeros(n, 16, h, w, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
    g = torch.randn(n, before + c + 16, h, w, device=dev).to(dtype).to(memory_format=torch.channels_last)
    (torch.cat([ahead, y, other], dim=1).float() * g.float()).sum().backward()
    ref_y, ref_gx, ref_gw, ref_gb, ref_mean, ref_var = _bn_silu_reference(x, bn.weight, bn.bias,
                                                                          g[:, before:before + c], 1e-3)
    assert _rel(y, ref_y) < tol
    assert _rel(xg.grad, ref_gx) < tol * 3  # the gradient adds one more rounding of gz
    assert _rel(bn.weight.grad, ref_gw) < tol * 3 and _rel(bn.bias.grad, ref_gb) < tol * 3
    native(x.float())  # BatchNorm2d's own running update from the same values
    torch.testing.assert_close(bn.running_mean, native.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, native.running_var, rtol=1e-5, atol=1e-5)
    # by hand: running += 0.03 * (batch value - running), the variance unbiased
    torch.testing.assert_close(bn.running_mean.cpu().double(), 0.97 * start_mean.cpu().double() + 0.03 * ref_mean,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var.cpu().double(), 0.97 * start_var.cpu().double() + 0.03 * ref_var,
                               rtol=1e-4, atol=1e-5)
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the fused BN + SiLU kernel is CUDA's")
def test_fused_bn_silu_model_gives_batchnorm_s_outputs_and_gradients(monkeypatch):
    """A whole yolox_nano in training mode, float32, fused and as BatchNorm2d + SiLU, both against
    the same network in float64: the fused one's outputs, gradients (all parameters as one
    vector) and running statistics are as close to float64 as PyTorch's own float32 layers are.
    Not fused against native directly: a float32 rounding difference anywhere grows through 60
    BatchNorm backward passes (each subtracts means, which cancels digits) to 5e-4 in the stem's
    gradient even between two correct implementations (seen on an H200, TF32 off). TF32 is off:
    its 10-bit mantissa would swamp both float32 errors."""
    import copy
    calls, real = [], models.bn_silu_cuda
    monkeypatch.setattr(models, "bn_silu_cuda", lambda x, bn: calls.append(bn) or real(x, bn))
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        native = models.build_model("yolox_nano", num_classes=3, input_shape=(64, 64)).cuda().train()
        fused = models.use_fused_bn_silu(copy.deepcopy(native))
        exact = copy.deepcopy(native).double()  # BatchNorm2d + SiLU in float64: the reference
        x = torch.rand(4, 3, 64, 64, device="cuda")
        outputs = []
        for model in (exact, native, fused):
            out = model(x.double() if model is exact else x)
            sum((o.sin() * (o + 1)).mean() for o in out).backward()  # smooth, every output counts
            outputs.append(torch.cat([o.flatten() for o in out]))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    # every ConvBnAct of the fused copy went through the kernel (all are BN + SiLU in YOLOX), once
    fused_layers = [m.bn for m in fused.modules() if isinstance(m, models.ConvBnAct)]
    assert len(fused_layers) > 50 and sorted(map(id, calls)) == sorted(map(id, fused_layers))
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (exact, native, fused)]
    for what, (ref, torch32, ours) in (("outputs", outputs), ("gradients", grads)):
        ref = ref.cpu()
        assert _rel(ours, ref) <= 2 * _rel(torch32, ref) + 1e-6, what
        assert _rel(ours, ref) < 2e-3, what  # and small in itself: a wrong channel would be O(1)
    for (name, ref), a, b in zip(exact.named_buffers(), native.buffers(), fused.buffers()):
        if ref.dtype.is_floating_point:
            assert (b.double() - ref).abs().max() <= 2 * (a.double() - ref).abs().max() + 1e-6, name
        else:
            assert torch.equal(b, ref), name
