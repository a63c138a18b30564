"""eval.py: pycocotools scoring on real data, decode, letterbox undo, the evaluation loop with an
oracle model, checkpoints, predict and the CLI's error messages. (NMS is in tests/test_nms.py.)"""
import argparse
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as ev
import models
from conftest import published_state, shared_path

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "coco_val2014_100")


# ---------------------------------------------------------------------------------------------
# Scoring results files
# ---------------------------------------------------------------------------------------------
def test_results_scoring_reproduces_pycocotools(tmp_path, capsys):
    stats_path = tmp_path / "stats.json"
    code = ev.main(["--results", os.path.join(FIXTURES, "fakebbox100_results.json"),
                    "-d", os.path.join(FIXTURES, "instances_val2014_100.json"), "--stats_json", str(stats_path)])
    assert code == 0
    with open(os.path.join(FIXTURES, "expected_stats_pycocotools.json")) as f:
        expected = json.load(f)
    got = json.loads(stats_path.read_text())
    assert list(got) == list(ev.STAT_KEYS)
    for key in ev.STAT_KEYS:
        assert abs(got[key] - expected[key]) < 1e-9, key
    printed = capsys.readouterr().out
    assert printed.count("Average Precision") == 6 and printed.count("Average Recall") == 6
    assert "category" in printed and "person" in printed  # the per-class table


def test_per_class_ap_equals_pycocotools_one_class_at_a_time():
    # per_class_ap reads one class's slice of the accumulated precision table; pycocotools run on
    # that class alone must give the same AP and AP50 (its stats[0] and stats[1]).
    import contextlib
    import io
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(os.path.join(FIXTURES, "instances_val2014_100.json"))
        dt = gt.loadRes(os.path.join(FIXTURES, "fakebbox100_results.json"))
        both = COCOeval(gt, dt, "bbox")
        both.evaluate()
        both.accumulate()
    table = ev.per_class_ap(both)
    names = {c["name"]: c["id"] for c in gt.dataset["categories"]}
    for name in ("person", "car", "dog"):
        one = COCOeval(gt, dt, "bbox")
        one.params.catIds = [names[name]]
        with contextlib.redirect_stdout(io.StringIO()):
            one.evaluate()
            one.accumulate()
            one.summarize()
        assert table[names[name]] == pytest.approx((one.stats[0], one.stats[1]), abs=1e-12), name
    assert table[names["person"]][0] > 0.1  # a class with real detections, not a -1 placeholder
    # The printed table: a class with no ground truth in these 100 images reads n/a, not -1.0000.
    empty = [c for c, (ap, _) in table.items() if ap < 0]
    assert empty
    rows = {int(line[24:30]): line for line in ev.format_per_class_table(both).splitlines()[1:]}
    assert rows[empty[0]].endswith(f"{'n/a':>9}{'n/a':>9}") and "-1.0000" not in ev.format_per_class_table(both)
    assert rows[names["person"]].endswith(f"{table[names['person']][0]:>9.4f}{table[names['person']][1]:>9.4f}")


def remapped_voc_results():
    """voc2007_100's detections with 0-based ids remapped to the ground truth's by file / class name."""
    with open(shared_path("voc2007_100", "instances_coco.json")) as f:
        gt = json.load(f)
    with open(shared_path("voc2007_100", "dets_coco_0based.json")) as f:
        dets = json.load(f)
    image_by_file = {im["file_name"]: im["id"] for im in gt["images"]}
    cat_by_name = {c["name"]: c["id"] for c in gt["categories"]}
    file_of = {im["id"]: im["file_name"] for im in dets["images"]}
    name_of = {c["id"]: c["name"] for c in dets["categories"]}
    results = [{"image_id": image_by_file[file_of[d["image_id"]]],
                "category_id": cat_by_name[name_of[d["category_id"]]],
                "bbox": d["bbox"], "score": d["score"]} for d in dets["annotations"]]
    return gt, results


def test_voc_detections_after_remap():
    gt, results = remapped_voc_results()
    stats = ev.evaluate_coco_results(results, gt, verbose=False)
    assert abs(stats["AP"] - 0.346958) < 1e-6 and abs(stats["AP50"] - 0.61003) < 1e-5


def test_results_in_dataset_layout_are_matched_by_names(tmp_path, capsys):
    # The 0-based export as it is (a dict of images, categories, scored annotations): matched to
    # the ground truth by file and category name, it scores the remapped numbers.
    gt_path, dets_path = shared_path("voc2007_100", "instances_coco.json"), shared_path("voc2007_100", "dets_coco_0based.json")
    stats = ev.score_results_file(dets_path, gt_path, verbose=False)
    assert abs(stats["AP"] - 0.346958) < 1e-6 and abs(stats["AP50"] - 0.61003) < 1e-5
    out = capsys.readouterr().out
    assert "452 detections matched to the ground truth by image file name and category name" in out
    # The export lists 98 of the ground truth's 100 images: the other 2 are scored, and said.
    assert "detections for 98 of the ground truth's 100 images; the other 2 are scored as images where" in out
    # A category the ground truth does not have: an error naming it, not a silently lower AP.
    with open(dets_path) as f:
        dets = json.load(f)
    dets["categories"][0]["name"] = "people"
    (tmp_path / "d.json").write_text(json.dumps(dets))
    assert ev.main(["--results", str(tmp_path / "d.json"), "-d", gt_path]) == 2
    assert "1 category names are not in the ground truth (e.g. ['people'])" in capsys.readouterr().err
    # An annotation whose image id is a list named no image; it used to fail in a dict lookup.
    dets["categories"][0]["name"] = "person"
    dets["annotations"][0]["image_id"] = [dets["annotations"][0]["image_id"]]
    (tmp_path / "d.json").write_text(json.dumps(dets))
    assert ev.main(["--results", str(tmp_path / "d.json"), "-d", gt_path]) == 2
    err = capsys.readouterr().err
    assert "names an image or category that its own 'images' / 'categories' do not list" in err
    assert "Traceback" not in err


def test_images_without_detections_count():
    gt, results = remapped_voc_results()
    half = sorted(im["id"] for im in gt["images"])[:50]
    partial = [r for r in results if r["image_id"] in half]
    everywhere = ev.evaluate_coco_results(partial, gt, verbose=False)
    only_detected = ev.evaluate_coco_results(partial, gt, image_ids=half, verbose=False)
    assert everywhere["AR100"] < only_detected["AR100"]  # the other 50 images' boxes are misses
    empty = ev.evaluate_coco_results([], gt, verbose=False)
    assert empty["AP"] == 0 and empty["AR100"] == 0


def test_unknown_image_ids_and_missing_files_are_clear(tmp_path, capsys):
    gt = os.path.join(FIXTURES, "instances_val2014_100.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 12345678, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    assert ev.main(["--results", str(bad), "-d", gt]) == 2
    err = capsys.readouterr().err
    assert "12345678" in err and "not in the ground truth" in err and "Traceback" not in err
    assert ev.main(["--results", str(bad), "-d", str(tmp_path / "nowhere.json")]) == 2
    assert "nowhere.json: no such file" in capsys.readouterr().err
    assert ev.main(["-m", "yolox_nano", "-d", str(tmp_path / "no_data")]) == 2
    assert "no_data: no such file or folder" in capsys.readouterr().err
    assert ev.main(["-m", "yolox_nano", "-d", gt, "--workers", "-1"]) == 2
    assert "--workers -1: give 0" in capsys.readouterr().err
    # ids that are lists, or ints and strings mixed, used to fail in Python's set / sort
    for ids, shown in (([[1]], "image_id [1]"), ([1, "a", 99999], "not in the ground truth (e.g. [")):
        bad.write_text(json.dumps([{"image_id": i, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}
                                   for i in ids]))
        assert ev.main(["--results", str(bad), "-d", gt]) == 2
        err = capsys.readouterr().err
        assert shown in err and "Traceback" not in err


def test_ground_truth_without_optional_keys_scores_as_coco_defines_them(tmp_path):
    # Exporters may leave out iscrowd, area and the category names; pycocotools needs the first two
    # (KeyError) and the per-class table the last. Filled with COCO's meaning, the numbers are those
    # of the full file (its areas are the boxes' w x h).
    gt, results = remapped_voc_results()
    for a in gt["annotations"]:
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3]) and a["iscrowd"] == 0
        del a["area"], a["iscrowd"]
    for c in gt["categories"]:
        del c["name"]
    for im in gt["images"]:  # scoring needs no image files, so no file names
        del im["file_name"]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    for r in results:  # ids written as floats: 1.0 is id 1, as pycocotools reads it
        r["image_id"] = float(r["image_id"])
    (tmp_path / "results.json").write_text(json.dumps(results))
    stats = ev.score_results_file(str(tmp_path / "results.json"), str(tmp_path / "gt.json"))
    assert abs(stats["AP"] - 0.346958) < 1e-6 and abs(stats["AP50"] - 0.61003) < 1e-5


# ---------------------------------------------------------------------------------------------
# Decode and letterbox undo
# ---------------------------------------------------------------------------------------------
def unflatten(flat, input_shape, strides, num_anchors):
    """[B, N, K] -> the model's per-level list [B, A, K, H_l, W_l] (the inverse of flatten_outputs)."""
    out, start = [], 0
    for s in strides:
        h, w = -(-input_shape[0] // s), -(-input_shape[1] // s)
        n = h * w * num_anchors
        level = flat[:, start:start + n].reshape(flat.shape[0], h, w, num_anchors, -1)
        out.append(level.permute(0, 3, 4, 1, 2))
        start += n
    return out


@pytest.mark.parametrize("anchors_mode", ["efficientdet", "anchor_free"])
def test_decode_inverts_encode(anchors_mode):
    g = torch.Generator().manual_seed(0)
    shape, strides, classes = (64, 96), (8, 16, 32), 3
    priors = models.make_priors(shape, strides, anchors_mode)
    n = len(priors)
    xy = torch.rand(2, n, 2, generator=g) * 90
    boxes = torch.cat([xy, xy + 2 + torch.rand(2, n, 2, generator=g) * 60], -1)
    logits = torch.randn(2, n, classes + (anchors_mode == "anchor_free"), generator=g)
    flat = torch.cat([models.encode_boxes(boxes, priors, anchors_mode), logits], -1)
    outputs = unflatten(flat, shape, strides, 9 if anchors_mode == "efficientdet" else 1)
    assert torch.equal(models.flatten_outputs(outputs), flat)
    got_boxes, scores = ev.decode_predictions(outputs, priors, anchors_mode)
    torch.testing.assert_close(got_boxes, boxes, atol=1e-3, rtol=1e-5)
    expected = logits[..., :classes].sigmoid()
    if anchors_mode == "anchor_free":
        expected = expected * logits[..., classes:].sigmoid()
    torch.testing.assert_close(scores, expected)


def voc_batch(max_side=None):
    ds = data.open_dataset(shared_path("voc2007_100", "instances_coco.json"), "val")
    loader = data.make_loader(ds, batch_size=4, shuffle=False, workers=0, seed=0, max_side=max_side)
    return next(iter(loader))


@pytest.mark.parametrize("max_side", [None, 200])  # 200: the worker shrinks images, scales != 1
def test_letterbox_undo(max_side):
    batch = voc_batch(max_side)
    assert (batch["scales"] < 1).any() == (max_side is not None)
    out = data.letterbox(batch, (320, 256))
    back = ev.boxes_to_original(out["boxes"], ev.eval_letterbox(batch, (320, 256))["matrices"])
    original = batch["boxes"] / batch["scales"].repeat(1, 2)[:, None, :]  # (x, y, x, y)
    valid = batch["valid"] & out["valid"]
    assert valid.sum() > 5
    assert (back[valid] - original[valid]).abs().max() < 1e-4


def test_centred_letterbox_pad():
    batch = voc_batch()
    out = ev.eval_letterbox(batch, (320, 320), letterbox_pad=64)
    assert out["images"].shape == (4, 3, 320, 320)
    m = out["matrices"]
    scale = 1 / m[:, 0, 0]  # output px per original px
    orig_hw = batch["sizes"].float()
    left, top = -m[:, 0, 2] * scale, -m[:, 1, 2] * scale  # where the original (0, 0) lands
    right, bottom = 320 - (left + orig_hw[:, 1] * scale), 320 - (top + orig_hw[:, 0] * scale)
    # integer offsets around a fractional picture size: centred to within 2 px
    assert ((left - right).abs() <= 2).all() and ((top - bottom).abs() <= 2).all()
    assert (torch.minimum(left, top) >= 32 - 1e-3).all()
    grey = torch.tensor(data.PAD_VALUE / 255)
    assert torch.allclose(out["images"][:, :, :, :31], grey)  # the left bar is pad
    # the round trip of a box through the matrices: output px -> original px
    corners = torch.stack([left, top, left + orig_hw[:, 1] * scale, top + orig_hw[:, 0] * scale], -1)[:, None]
    full = ev.boxes_to_original(corners, m)[:, 0]
    torch.testing.assert_close(full, torch.cat([torch.zeros(4, 2), orig_hw.flip(-1)], -1), atol=1e-3, rtol=0)


def test_clip_boxes():
    boxes = torch.tensor([[[-5.0, 2, 30, 50], [10, -1, 12, 5]]])
    clipped = ev.clip_boxes(boxes, torch.tensor([40.0]), torch.tensor([20.0]))
    assert clipped.tolist() == [[[0.0, 2, 20, 40], [10, 0, 12, 5]]]


# ---------------------------------------------------------------------------------------------
# The evaluation loop, end to end
# ---------------------------------------------------------------------------------------------
class Oracle(torch.nn.Module):
    """A stand-in Detector that outputs the ground truth of each batch as raw outputs: prior k of an
    image carries its k-th box, encoded, with a high class logit. A correct pipeline (letterbox,
    decode, NMS, undo, category ids, pycocotools) must then score AP = 1."""

    def __init__(self, dataset, batch_size, input_shape, anchors_mode):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.strides, self.anchors_mode = (8, 16, 32), anchors_mode
        self.num_anchors = 9 if anchors_mode == "efficientdet" else 1
        self.config = {"input_shape": input_shape}
        self.anchor_scale = models.ANCHOR_SCALE
        self.prior_table = models.make_priors(input_shape, self.strides, anchors_mode)
        gt = dataset.coco_gt()
        size = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
        label = {c: i for i, c in enumerate(dataset.cat_ids)}
        self.truth = {i: [] for i in dataset.image_ids}
        for a in gt["annotations"]:
            if not a["iscrowd"]:
                h, w = size[a["image_id"]]
                s = min(input_shape[0] / h, input_shape[1] / w)  # the top-left letterbox scale
                x, y, bw, bh = a["bbox"]
                self.truth[a["image_id"]].append(([x * s, y * s, (x + bw) * s, (y + bh) * s], label[a["category_id"]]))
        self.batches = [dataset.image_ids[i:i + batch_size] for i in range(0, len(dataset), batch_size)]
        self.num_classes, self.calls = len(dataset.cat_ids), 0

    priors = models.Detector.priors  # what eval.py asks a model for

    def forward(self, images):
        ids = self.batches[self.calls]
        self.calls += 1
        n = len(self.prior_table)
        extra = int(self.anchors_mode == "anchor_free")
        flat = torch.full((len(ids), n, 4 + self.num_classes + extra), -12.0)
        flat[..., :4] = 0
        for b, image_id in enumerate(ids):
            for k, (box, label) in enumerate(self.truth[image_id]):
                flat[b, k, :4] = models.encode_boxes(torch.tensor(box), self.prior_table, self.anchors_mode)[k]
                flat[b, k, 4 + label] = 12.0
                if extra:
                    flat[b, k, -1] = 12.0
        return unflatten(flat, self.config["input_shape"], self.strides, self.num_anchors)


@pytest.mark.parametrize("anchors_mode,nms,sparse_ids", [("anchor_free", "gaussian", True), ("efficientdet", "hard", False)])
def test_run_coco_evaluation_with_an_oracle(anchors_mode, nms, sparse_ids, tmp_path):
    json_path = shared_path("voc2007_100", "instances_coco.json")
    if sparse_ids:  # category ids 7, 9, ..., 45 instead of 1..20: labels must map back through cat_ids
        gt = json.loads(open(json_path).read())
        for item in gt["categories"] + gt["annotations"]:
            key = "id" if "name" in item else "category_id"
            item[key] = 2 * item[key] + 5
        (tmp_path / "sparse.json").write_text(json.dumps(gt))
        json_path = str(tmp_path / "sparse.json")
    ds = data.open_dataset(json_path, "val", images_dir=shared_path("voc2007_100", "images"))
    assert ds.cat_ids[:2] == ([7, 9] if sparse_ids else [1, 2])
    oracle = Oracle(ds, 25, (256, 256), anchors_mode)
    results_path, stats_path = tmp_path / "results.json", tmp_path / "stats.json"
    stats = ev.run_coco_evaluation(oracle, ds, nms=nms, batch_size=25, clip_bbox=True, verbose=False,
                                   results_path=str(results_path), stats_json=str(stats_path))
    assert oracle.calls == 4
    if nms == "hard":  # a few same-class ground-truth boxes overlap by IoU > 0.5: hard NMS drops one
        assert stats["AP"] > 0.99 and stats["AR100"] > 0.99
    else:
        assert stats["AP"] > 0.999 and stats["AR100"] > 0.999
    assert json.loads(stats_path.read_text()) == stats
    assert len(json.loads(results_path.read_text())) == (273 if nms == "gaussian" else pytest.approx(273, abs=5))


# ---------------------------------------------------------------------------------------------
# Checkpoints, predict, the CLI
# ---------------------------------------------------------------------------------------------
def write_checkpoint(path, det_header="yolox_nano", class_names=None):
    model = models.build_model(det_header, num_classes=20, input_shape=(128, 128))
    config = dict(model.config, class_names=class_names or [f"class{i}" for i in range(20)], cat_ids=list(range(1, 21)))
    torch.save({"config": config, "model": model.state_dict()}, path)
    return model


def test_load_model_and_wrong_architecture(tmp_path, capsys):
    path = str(tmp_path / "nano.pt")
    original = write_checkpoint(path)
    model, info = ev.load_model(path)
    assert model.config["det_header"] == "yolox_nano" and info["cat_ids"] == list(range(1, 21))
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    with pytest.raises(ev.EvalInputError, match=r"trained as det_header='yolox_nano'.*\(180 tensors missing, 360 "
                                                r"unexpected, 229 of another shape\)\. Drop --det_header"):
        ev.load_model(path, det_header="yolox_tiny")
    gt = os.path.join(FIXTURES, "instances_val2014_100.json")
    assert ev.main(["-m", path, "--det_header", "yolox_tiny", "-d", gt]) == 2
    err = capsys.readouterr().err
    assert "yolox_nano" in err and "Traceback" not in err
    assert ev.main(["-m", str(tmp_path / "missing.pt"), "-d", gt]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    # A run folder stands for its best.pt, else its last.pt (as train.py's --pretrained reads it).
    (tmp_path / "run").mkdir()
    assert ev.main(["-m", str(tmp_path / "run"), "-d", gt]) == 2
    assert f"-m {tmp_path / 'run'} is a folder without best.pt / last.pt" in capsys.readouterr().err
    open(tmp_path / "run" / "last.pt", "wb").write(open(path, "rb").read())
    assert ev._checkpoint_or_default(str(tmp_path / "run")) == str(tmp_path / "run" / "last.pt")
    open(tmp_path / "run" / "best.pt", "wb").write(open(path, "rb").read())
    assert ev._checkpoint_or_default(str(tmp_path / "run")) == str(tmp_path / "run" / "best.pt")
    with pytest.raises(ev.EvalInputError, match="--det_header yolox_s with the preset -m yolox_nano"):
        ev.load_model("yolox_nano", det_header="yolox_s")


def test_a_preset_name_builds_at_its_published_size():
    assert ev.load_model("yolox_s")[0].config["input_shape"] == (640, 640)
    assert ev.load_model("efficientdet_d1")[0].config["input_shape"] == (640, 640)
    assert ev.load_model("yolox_nano", input_shape=(128, 96))[0].config["input_shape"] == (128, 96)


def test_cli_eval_and_predict(tmp_path, capsys):
    voc = shared_path("voc2007_100", "instances_coco.json")
    path = str(tmp_path / "nano.pt")
    with open(voc) as f:  # trained on VOC's 20 classes, as the data has them
        write_checkpoint(path, class_names=[c["name"] for c in sorted(json.load(f)["categories"], key=lambda c: c["id"])])
    stats_path = tmp_path / "stats.json"
    assert ev.main(["-m", path, "-d", voc, "-b", "50", "--nms", "linear", "--nms_mode", "global",
                    "--nms_topk", "0", "--clip_bbox", "--stats_json", str(stats_path), "--device", "cpu"]) == 0
    assert list(json.loads(stats_path.read_text())) == list(ev.STAT_KEYS)
    images = sorted(os.listdir(shared_path("voc2007_100", "images")))[:2]
    out = tmp_path / "pictures"
    assert ev.main(["predict", "-m", path, *[shared_path("voc2007_100", "images", f) for f in images],
                    "-o", str(out), "--score_threshold", "0.2", "--letterbox_pad", "32", "--device", "cpu"]) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(predictions) == images
    # A JPEG's picture keeps its name and format.
    assert all(Image.open(out / f).format == "JPEG" for f in images)


def test_predict_draws_one_box_per_object_with_hard_nms(tmp_path, monkeypatch):
    # Box 1 overlaps box 0 at IoU 80 / 120 = 0.67. The evaluation's gaussian soft-NMS keeps it,
    # decayed to 0.85 exp(-0.67^2 / 0.5) = 0.35: above predict's 0.3, a duplicate on the picture.
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 2, 10, 12], [30, 30, 40, 40]]], dtype=torch.float32)
    scores = torch.tensor([[[0.9], [0.85], [0.8]]])
    kept = {}
    for method, iou in (("gaussian", 0.5), ("hard", 0.45)):
        _, s, _, n = ev.batched_nms(boxes, scores, method=method, mode="per_class", iou_or_sigma=iou,
                                    score_threshold=0.3, topk=5000, max_output_size=100)
        kept[method] = s[0, :int(n[0])].tolist()
    assert kept["gaussian"] == pytest.approx([0.9, 0.8, 0.85 * math.exp(-(80 / 120) ** 2 / 0.5)], abs=1e-5)
    assert kept["hard"] == pytest.approx([0.9, 0.8])
    # ... so predict draws with hard NMS at 0.45 (YOLOX's demo) unless told otherwise.
    path = str(tmp_path / "nano.pt")
    write_checkpoint(path)
    calls = []
    monkeypatch.setattr(ev, "predict", lambda *args, **kwargs: calls.append(kwargs) or {})
    image = shared_path("voc2007_100", "images", sorted(os.listdir(shared_path("voc2007_100", "images")))[0])
    assert ev.main(["predict", "-m", path, image, "-o", str(tmp_path / "p"), "--device", "cpu"]) == 0
    assert (calls[0]["nms"], calls[0]["nms_iou_or_sigma"]) == ("hard", 0.45)
    for method in ("gaussian", "linear"):  # soft-NMS asked for: the evaluation's 0.5
        assert ev.main(["predict", "-m", path, image, "-o", str(tmp_path / "p"), "--device", "cpu",
                        "--nms", method]) == 0
        assert (calls[-1]["nms"], calls[-1]["nms_iou_or_sigma"]) == (method, 0.5)


def write_small_coco(folder, cat_ids=range(1, 21), sizes=True):
    """Two 64 x 48 grey pictures with one box each, as a COCO json + images/ (20 classes, ids 1..20
    as write_checkpoint's model has); without `sizes` the json leaves out width and height."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    images = []
    for i in (1, 2):
        Image.new("RGB", (64, 48), (90, 90, 90)).save(os.path.join(folder, "images", f"{i}.jpg"))
        images.append(dict(id=i, file_name=f"{i}.jpg", **(dict(width=64, height=48) if sizes else {})))
    cat_ids = list(cat_ids)
    anns = [dict(id=i, image_id=i, category_id=cat_ids[i], bbox=[4, 4, 20, 16], area=320, iscrowd=0) for i in (1, 2)]
    path = os.path.join(folder, "ann.json")
    with open(path, "w") as f:
        json.dump(dict(images=images, annotations=anns,
                       categories=[dict(id=c, name=f"class{c - 1}") for c in cat_ids]), f)
    return path


def test_cli_defaults_to_the_default_run_and_its_training_data(tmp_path, monkeypatch, capsys):
    """`python eval.py --nms gaussian` as the card writes it: -m defaults to runs/train/best.pt
    (train.py's default --out) and -d to the data that checkpoint was trained on."""
    monkeypatch.chdir(tmp_path)
    small = write_small_coco(str(tmp_path / "small"))
    assert ev.main(["--nms", "gaussian"]) == 2
    err = capsys.readouterr().err
    assert "runs/train/best.pt" in err and "-m" in err and "Traceback" not in err
    os.makedirs("runs/other")
    write_checkpoint("runs/other/best.pt")
    assert ev.main(["--nms", "gaussian"]) == 2
    assert "found: runs/other/best.pt" in capsys.readouterr().err

    os.makedirs("runs/train")
    model = write_checkpoint("runs/train/best.pt")  # no train_config: nothing says which data
    assert ev.main(["--nms", "gaussian"]) == 2
    assert "records no training data" in capsys.readouterr().err
    checkpoint = torch.load("runs/train/best.pt", weights_only=False)
    checkpoint["train_config"] = {"data": "missing_folder"}
    torch.save(checkpoint, "runs/train/best.pt")
    assert ev.main(["--nms", "gaussian"]) == 2
    assert "trained on --data missing_folder" in capsys.readouterr().err

    checkpoint["train_config"] = {"data": small}
    torch.save(checkpoint, "runs/train/best.pt")
    seen = {}

    def spy(model_, dataset, **kwargs):
        seen.update(model=model_, dataset=dataset, nms=kwargs["nms"])

    monkeypatch.setattr(ev, "run_coco_evaluation", spy)
    assert ev.main(["--nms", "linear"]) == 0
    assert "training data, " + small + " (a single json, so these are its training images)" in capsys.readouterr().out
    assert seen["dataset"].source == small and seen["nms"] == "linear" and len(seen["dataset"]) == 2
    for key, value in model.state_dict().items():
        assert torch.equal(seen["model"].state_dict()[key], value)
    other = write_small_coco(str(tmp_path / "other"))
    assert ev.main(["-d", other, "--nms", "hard"]) == 0 and seen["dataset"].source == other  # -d given wins
    # --results mode has its own parser: -d is required, and a flag that would do nothing there
    # (even abbreviated) is refused, not silently ignored.
    for argv, message in ((["--results", "r.json"], "the following arguments are required: -d/--data"),
                          (["--results", "r.json", "-d", small, "--clip_bbox"], "unrecognized arguments: --clip_bbox"),
                          (["--results", "r.json", "-d", small, "--save", "x.json"], "unrecognized arguments: --save")):
        with pytest.raises(SystemExit) as exc:
            ev.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_categories_must_match_the_checkpoint(tmp_path, capsys):
    path = str(tmp_path / "nano.pt")
    write_checkpoint(path)  # 20 classes, ids 1..20
    shifted = write_small_coco(str(tmp_path / "shifted"), cat_ids=range(2, 22))  # same count, other ids
    assert ev.main(["-m", path, "-d", shifted, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "trained on 20 categories (1 class0, 2 class1, 3 class2, 4 class3, ...)" in err
    assert "has 20 categories (2 class1," in err and "Traceback" not in err
    fewer = write_small_coco(str(tmp_path / "fewer"), cat_ids=range(1, 6))
    # A preset (random weights) is built for the data's 5 classes; a model of 80 is refused.
    assert ev.main(["-m", "yolox_nano", "-d", fewer, "-i", "64", "--device", "cpu"]) == 0
    with pytest.raises(ev.EvalInputError, match="the model predicts 80 classes and .* has 5"):
        ev.run_coco_evaluation(models.build_model("yolox_nano", input_shape=(64, 64)), fewer, verbose=False)


def test_clip_bbox_with_a_json_that_has_no_image_sizes(tmp_path):
    # pycocotools needs no image size, and neither may the evaluation: --clip_bbox reads them
    # off the image files when the json leaves them out, and clips to the same box either way.
    torch.manual_seed(3)  # a random model that puts some of its 200 boxes outside the picture
    model = models.build_model("yolox_nano", num_classes=20, input_shape=(64, 64)).eval()
    def evaluate(name, sizes, clip):  # score threshold 0: the random model's 1e-4 scores all count
        ev.run_coco_evaluation(model, write_small_coco(str(tmp_path / name), sizes=sizes), clip_bbox=clip,
                               nms_score_threshold=0.0, verbose=False, results_path=str(tmp_path / f"{name}.json"))
        return json.loads((tmp_path / f"{name}.json").read_text())

    results = [evaluate("with", True, True), evaluate("without", False, True)]
    unclipped = evaluate("unclipped", False, False)
    assert results[0] == results[1] and len(unclipped) == 200
    # A box wholly outside the 64 x 48 picture (in the letterbox padding, say) clips to a line
    # and is left out.
    outside = [r for r in unclipped if r["bbox"][0] >= 64 or r["bbox"][1] >= 48
               or r["bbox"][0] + r["bbox"][2] <= 0 or r["bbox"][1] + r["bbox"][3] <= 0]
    assert outside  # so the leaving out below is tested
    assert len(results[0]) == 200 - len(outside)
    # The command line clips by default; --no_clip_bbox gives the unclipped results.
    ckpt = str(tmp_path / "m.pt")
    torch.save({"config": dict(model.config, class_names=[f"class{i}" for i in range(20)], cat_ids=list(range(1, 21))),
                "model": model.state_dict()}, ckpt)
    for flags, expected in [([], results[1]), (["--no_clip_bbox"], unclipped)]:
        assert ev.main(["-m", ckpt, "-d", str(tmp_path / "without" / "ann.json"), "--nms_score_threshold", "0", "--device", "cpu",
                        "--save_results", str(tmp_path / "cli.json"), *flags]) == 0
        assert json.loads((tmp_path / "cli.json").read_text()) == expected
    assert max(r["bbox"][1] + r["bbox"][3] for r in unclipped) > 48  # so the clipping below does something
    assert max(r["bbox"][0] + r["bbox"][2] for r in results[1]) <= 64 + 1e-3
    assert max(r["bbox"][1] + r["bbox"][3] for r in results[1]) <= 48 + 1e-3


@pytest.mark.parametrize("flags,message", [
    (["--device", "gpu"], "--device gpu: give cpu or cuda"),
    (["--nms_topk", "-5"], "--nms_topk -5"),
    (["--nms_score_threshold", "2"], "--nms_score_threshold 2.0: scores are in 0..1"),
    (["-b", "0"], "-b/--batch_size 0: give 1 or more"),
    (["-i", "100"], "-i/--input_shape 100 100: each side must be divisible by 32, the largest stride of yolox_nano (e.g. 96 or 128)"),
    (["-i", "abc"], "-i/--input_shape 'abc': give one size like 512, or H,W like 512,640"),
])
def test_cli_flag_errors_name_the_flag(tmp_path, capsys, flags, message):
    small = write_small_coco(str(tmp_path / "small"))
    assert ev.main(["-m", "yolox_nano", "-d", small, "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: ") and message in err and "Traceback" not in err


def test_cli_paths_and_results_entries_are_checked(tmp_path, capsys):
    small = write_small_coco(str(tmp_path / "small"))
    ckpt = str(tmp_path / "nano.pt")
    write_checkpoint(ckpt)
    os.makedirs(tmp_path / "folder")
    assert ev.main(["-m", ckpt, "-d", small, "--stats_json", str(tmp_path / "folder")]) == 2
    assert "--stats_json " + str(tmp_path / "folder") + " is a folder" in capsys.readouterr().err
    assert os.listdir(tmp_path / "folder") == []  # nothing half-written
    if not torch.cuda.is_available():
        assert ev.main(["-m", ckpt, "-d", small, "--device", "cuda"]) == 2
        assert "this torch sees no CUDA GPU; use --device cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's own error for a split that is not train / val
        ev.main(["-m", ckpt, "-d", small, "--split", "test"])
    # A detection with a 3-number bbox, then one with a NaN score: named, not a pycocotools IndexError.
    for bad, shown in (({"bbox": [1, 2, 3]}, "bbox [1, 2, 3]"), ({"score": float("nan")}, "bbox [4, 4, 20, 16] and score nan")):
        detection = dict({"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 16], "score": 0.9}, **bad)
        path = tmp_path / "results.json"
        path.write_text(json.dumps([{"image_id": 2, "category_id": 2, "bbox": [4, 4, 20, 16], "score": 0.8}, detection]))
        assert ev.main(["--results", str(path), "-d", small]) == 2
        err = capsys.readouterr().err
        assert f"detection 1 has {shown}" in err and "Traceback" not in err

    # predict: an -o that is a file, a missing input, two inputs of one name.
    image = os.path.join(tmp_path, "small", "images", "1.jpg")
    os.makedirs(tmp_path / "other")
    shutil.copy(image, tmp_path / "other" / "1.jpg")
    (tmp_path / "afile").write_text("x")
    cases = [(["-o", str(tmp_path / "afile"), image], "is a file: give a folder for the pictures"),
             (["-o", str(tmp_path / "afile" / "x"), image], f"-o {tmp_path / 'afile' / 'x'}: {tmp_path / 'afile'} is "
                                                            f"a file, so no folder can be made there; give another path"),
             (["-o", str(tmp_path / "p"), image, str(tmp_path / "nope.jpg")], "1 of the images does not exist"),
             (["-o", str(tmp_path / "p"), image, str(tmp_path / "other" / "1.jpg")], "share a file name")]
    for argv, message in cases:
        assert ev.main(["predict", "-m", ckpt, "--device", "cpu", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    assert ev.main(["predict", "-m", ckpt, "--device", "cpu", "-o", str(tmp_path / "q"), str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert "afile cannot be decoded (" in err and "replace it with a valid JPEG/PNG, or leave it out" in err
    assert "Traceback" not in err
    # Beside a good image, an undecodable one is skipped with a warning: the good one is drawn and listed.
    shutil.copy(tmp_path / "afile", tmp_path / "other" / "broken.jpg")
    assert ev.main(["predict", "-m", ckpt, "--device", "cpu", "-o", str(tmp_path / "q"), str(tmp_path / "other")]) == 0
    captured = capsys.readouterr()
    assert "warning: skipped 1 of 2 images that cannot be decoded, e.g. " in captured.err and "broken.jpg" in captured.err
    assert "wrote 1 picture and predictions.json" in captured.out
    assert list(json.loads((tmp_path / "q" / "predictions.json").read_text())) == ["1.jpg"]
    os.remove(tmp_path / "other" / "broken.jpg")
    # A phone photo stored 60 x 41 with EXIF orientation 6 is drawn upright, 41 x 60, as viewers show it.
    stored, exif = Image.new("RGB", (60, 41)), Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "other" / "phone.jpg", exif=exif)
    assert ev.main(["predict", "-m", ckpt, "--device", "cpu", "-o", str(tmp_path / "up"),
                    str(tmp_path / "other" / "phone.jpg")]) == 0
    assert Image.open(tmp_path / "up" / "phone.jpg").size == (41, 60)
    # The output folder is the input's own: its picture would overwrite the photo.
    assert ev.main(["predict", "-m", ckpt, "--device", "cpu", "-o", str(tmp_path / "other"),
                    str(tmp_path / "other" / "1.jpg")]) == 2
    assert "would be written over the image itself" in capsys.readouterr().err
    Image.new("RGB", (32, 32)).save(tmp_path / "other" / "3.bmp")  # 3.bmp -> 3.png: no clash
    assert ev.main(["predict", "-m", ckpt, "--device", "cpu", "-o", str(tmp_path / "other"),
                    str(tmp_path / "other" / "3.bmp")]) == 0
    png = tmp_path / "other" / "3.png"
    assert Image.open(png).format == "PNG"
    assert ev.main(["predict", "-m", ckpt, "--device", "cpu", "-o", str(tmp_path / "other"), str(png)]) == 2
    assert "would be written over the image itself" in capsys.readouterr().err
    # A folder stands for its images. A 128 x 16 picture is mostly letterbox padding at 128 x 128:
    # of the 100 detections kept, the ones in the padding clip to lines and are left out.
    Image.new("RGB", (128, 16), (90, 90, 90)).save(tmp_path / "small" / "images" / "wide.jpg")
    assert ev.main(["predict", "-m", ckpt, "--device", "cpu", "--score_threshold", "0", "-o", str(tmp_path / "f"),
                    str(tmp_path / "small" / "images")]) == 0
    predictions = json.loads((tmp_path / "f" / "predictions.json").read_text())
    assert sorted(predictions) == ["1.jpg", "2.jpg", "wide.jpg"] and 0 < len(predictions["wide.jpg"]) < 100
    assert all(d["box"][2] > d["box"][0] and d["box"][3] > d["box"][1] for d in predictions["wide.jpg"])
    # label is the model's 0..19; category_id the data's id (write_checkpoint's are 1..20)
    assert all(d["category_id"] == d["label"] + 1 for d in predictions["wide.jpg"])
    # -i as train.py writes it (H,W) works too.
    assert ev.main(["predict", "-m", ckpt, "--device", "cpu", "-i", "64,96", "-o", str(tmp_path / "p"), image]) == 0
    assert (tmp_path / "p" / "1.jpg").exists()


def test_progress_line_every_ten_seconds(capsys):
    import time
    now = time.time()
    assert ev._progress("evaluating", 5, 20, now - 1.0, now) == now  # a line 0 s ago: none now
    assert capsys.readouterr().out == ""
    assert ev._progress("evaluating", 50, 200, now - 10.0, now - 10.0) > now - 1
    line = capsys.readouterr().out
    assert line.startswith("evaluating: 50/200 images, 5.0 img/s, eta 30s"), line


def test_skipped_boxes_are_a_plain_warning_line(tmp_path, capsys):
    small = write_small_coco(str(tmp_path / "small"))
    with open(small) as f:
        gt = json.load(f)
    gt["annotations"][0]["bbox"] = [5000, 5000, 10, 10]  # far outside its 64 x 48 image
    with open(small, "w") as f:
        json.dump(gt, f)
    assert ev.main(["-m", "yolox_nano", "-d", small, "-i", "64", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("eval.py: warning: ")]
    assert len(lines) == 1 and "ann.json: skipped 1 bad boxes of 2 (" in lines[0]
    assert "UserWarning" not in err


def test_load_model_takes_the_ema_weights(tmp_path):
    # A training checkpoint holds the live weights and their EMA; the EMA is the one evaluated.
    path = str(tmp_path / "n.pt")
    write_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    torch.manual_seed(123)
    ckpt["ema"] = models.build_model("yolox_nano", num_classes=20, input_shape=(128, 128)).state_dict()
    torch.save(ckpt, path)
    model, _ = ev.load_model(path)
    for key, value in ckpt["ema"].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_predict_on_a_tall_image_leaves_out_the_boxes_in_the_padding(tmp_path):
    # 16 x 128: the letterbox pads on the right, so boxes there clip to vertical lines (x2 == x1).
    ckpt = str(tmp_path / "n.pt")
    write_checkpoint(ckpt)
    Image.new("RGB", (16, 128), (90, 90, 90)).save(tmp_path / "tall.jpg")
    assert ev.main(["predict", "-m", ckpt, "--device", "cpu", "--score_threshold", "0", "-o", str(tmp_path / "f"),
                    str(tmp_path / "tall.jpg")]) == 0
    boxes = json.loads((tmp_path / "f" / "predictions.json").read_text())["tall.jpg"]
    assert 0 < len(boxes) < 100 and all(d["box"][2] > d["box"][0] for d in boxes)


def test_predict_folder_inputs(tmp_path, capsys, monkeypatch):
    ckpt = str(tmp_path / "n.pt")
    write_checkpoint(ckpt)
    predict = ["predict", "-m", ckpt, "--device", "cpu"]
    # a.bmp and a.png would both draw a.png (a.jpg draws a.jpg: no clash)
    os.makedirs(tmp_path / "twins")
    Image.new("RGB", (32, 32)).save(tmp_path / "twins" / "a.jpg")
    Image.new("RGB", (32, 32)).save(tmp_path / "twins" / "a.bmp")
    Image.new("RGB", (32, 32)).save(tmp_path / "twins" / "a.png")
    assert ev.main(predict + ["-o", str(tmp_path / "o"), str(tmp_path / "twins")]) == 2
    assert "share a file name" in capsys.readouterr().err
    # an upper-case extension is an image too
    os.makedirs(tmp_path / "upper")
    Image.new("RGB", (32, 32)).save(tmp_path / "upper" / "B.JPG", format="JPEG")
    Image.new("RGB", (32, 32)).save(tmp_path / "upper" / "scan.tif")  # a TIFF is an image too (drawn as PNG)
    assert ev.main(predict + ["-o", str(tmp_path / "o"), str(tmp_path / "upper")]) == 0
    assert list(json.loads((tmp_path / "o" / "predictions.json").read_text())) == ["B.JPG", "scan.tif"]
    assert Image.open(tmp_path / "o" / "scan.png").format == "PNG"
    # a folder without images is refused, not an empty result
    os.makedirs(tmp_path / "notes")
    (tmp_path / "notes" / "notes.txt").write_text("x")
    assert ev.main(predict + ["-o", str(tmp_path / "o2"), str(tmp_path / "notes")]) == 2
    assert "no .jpg/.jpeg/.png/.bmp/.webp/.tif/.tiff image in" in capsys.readouterr().err
    # -o . with a relative input: the picture would overwrite the input
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    monkeypatch.chdir(tmp_path)
    assert ev.main(predict + ["-o", ".", "x.png"]) == 2
    assert "would be written over the image itself" in capsys.readouterr().err


def test_predict_letterboxes_to_the_given_input_shape(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "n.pt")
    write_checkpoint(ckpt)  # trained at 128 x 128
    Image.new("RGB", (32, 32)).save(tmp_path / "x.jpg")
    shapes, real = [], ev.eval_letterbox
    monkeypatch.setattr(ev, "eval_letterbox", lambda batch, shape, *a: shapes.append(tuple(shape)) or real(batch, shape, *a))
    assert ev.main(["predict", "-m", ckpt, "--device", "cpu", "-i", "64,96", "-o", str(tmp_path / "o"),
                    str(tmp_path / "x.jpg")]) == 0
    assert shapes == [(64, 96)]


def test_cli_evaluates_a_checkpoint_trained_on_the_shapes_set(tmp_path, monkeypatch):
    # train.py records the built-in set as "shapes", which is no path: eval.py must open it anyway.
    monkeypatch.chdir(tmp_path)
    small = write_small_coco(str(tmp_path / "small"))
    os.makedirs("runs/train")
    write_checkpoint("runs/train/best.pt")
    ckpt = torch.load("runs/train/best.pt", weights_only=False)
    ckpt["train_config"] = {"data": "shapes"}
    torch.save(ckpt, "runs/train/best.pt")
    opened, real_open = [], ev.open_dataset
    monkeypatch.setattr(ev, "open_dataset", lambda path, split: opened.append(path) or real_open(small, split))
    monkeypatch.setattr(ev, "run_coco_evaluation", lambda *a, **k: None)
    assert ev.main(["--nms", "hard"]) == 0 and opened == ["shapes"]


def test_boxes_to_original_under_a_flip_and_a_rotation():
    box = torch.tensor([[[10.0, 20.0, 30.0, 40.0]]])
    # Flip x -> 100 - x: the corners swap, the box is [70, 20, 90, 40].
    flip = torch.tensor([[[-1.0, 0.0, 100.0], [0.0, 1.0, 0.0]]])
    assert ev.boxes_to_original(box, flip).tolist() == [[[70.0, 20.0, 90.0, 40.0]]]
    # Rotation (x, y) -> (100 - y, x): corners (80, 10), (80, 30), (60, 10), (60, 30).
    rot = torch.tensor([[[0.0, -1.0, 100.0], [1.0, 0.0, 0.0]]])
    assert ev.boxes_to_original(box, rot).tolist() == [[[60.0, 10.0, 80.0, 30.0]]]


def test_categories_match_by_name_and_order_whatever_their_ids(tmp_path, capsys):
    # The checkpoint's classes are class0..class19 with COCO ids 1..20. The same names in the same
    # order under ids 0..19 (a YOLO export's numbering) are the same classes; another order is not.
    path = str(tmp_path / "nano.pt")
    write_checkpoint(path)
    gt_path = write_small_coco(str(tmp_path / "small"))
    gt = json.loads(open(gt_path).read())
    for c in gt["categories"]:
        c["id"] -= 1
    for a in gt["annotations"]:
        a["category_id"] -= 1
    open(gt_path, "w").write(json.dumps(gt))
    results = tmp_path / "results.json"
    argv = ["-m", path, "-d", gt_path, "--device", "cpu", "-i", "64", "--save_results", str(results),
            "--nms_score_threshold", "0", "--nms_topk", "-1", "--nms_max_output_size", "1000"]  # most classes show
    assert ev.main(argv) == 0
    ids = {r["category_id"] for r in json.loads(results.read_text())}
    assert 0 in ids and ids <= set(range(20))  # label 0 as this data's id 0, not the checkpoint's 1
    gt["categories"][0]["name"], gt["categories"][1]["name"] = "class1", "class0"
    open(gt_path, "w").write(json.dumps(gt))
    assert ev.main(argv) == 2
    assert "(the same classes in another order: #0 is class0 in the model, class1 in the data): evaluate on data " \
           "with the same categories" in capsys.readouterr().err
    # The checkpoint's own ids 1..20 with two names swapped (two YOLO sets both number 0..C-1,
    # whatever their classes): the ids agree, the classes do not. This used to run, scoring class0
    # detections as class1.
    for c in gt["categories"]:
        c["id"] += 1
    for a in gt["annotations"]:
        a["category_id"] += 1
    open(gt_path, "w").write(json.dumps(gt))
    assert ev.main(argv) == 2
    assert "evaluate on data with the same categories" in capsys.readouterr().err
    # A json that names no categories (names = ids) says nothing against the checkpoint's names.
    for c in gt["categories"]:
        del c["name"]
    open(gt_path, "w").write(json.dumps(gt))
    assert ev.main(argv) == 0
    capsys.readouterr()


def test_detections_to_coco_leaves_out_empty_and_nonfinite_boxes():
    # Row 1 clipped to a line (all in the padding), rows 2-3 overflowed: only row 0 is written.
    boxes = torch.tensor([[1.0, 2.0, 11.0, 7.0], [64.0, 5.0, 64.0, 9.0],
                          [float("nan"), 1.0, 5.0, 5.0], [0.0, 0.0, float("inf"), 5.0]])
    out = ev.detections_to_coco(boxes, torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0, 1, 0, 1]), 4,
                                image_id=7, cat_ids=[3, 5])
    assert out == [{"image_id": 7, "category_id": 3, "bbox": [1.0, 2.0, 10.0, 5.0], "score": 0.9}]


def test_evaluation_reports_nonfinite_boxes_instead_of_failing(tmp_path, capsys):
    # A model whose box offsets at one prior overflow to NaN while its class score there is
    # confident: the evaluation leaves those detections out and says how many, on each image.
    model = models.build_model("yolox_nano", num_classes=20, input_shape=(64, 64)).eval()

    class Overflowing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.strides, self.anchors_mode = model, model.strides, model.anchors_mode
            self.config, self.anchor_scale, self.num_classes = model.config, model.anchor_scale, model.num_classes

        priors = models.Detector.priors

        def forward(self, images):
            outputs = [o.clone() for o in self.inner(images)]
            outputs[0][:, 0, 0, 0, 0] = float("nan")   # x offset of prior 0
            outputs[0][:, 0, 4:, 0, 0] = 12.0          # every class, and objectness: score ~1
            outputs[0][:, 0, 4, 0, 1] = float("nan")   # class 0 of prior 1: a NaN score
            return outputs

    stats = ev.run_coco_evaluation(Overflowing(), write_small_coco(str(tmp_path / "small")), verbose=False,
                                   results_path=str(tmp_path / "r.json"))
    results = json.loads((tmp_path / "r.json").read_text())
    assert all(math.isfinite(v) for r in results for v in r["bbox"]) and math.isfinite(stats["AP"])
    # 2 images x 20 classes at prior 0 (per-class NMS keeps one per class)
    err = capsys.readouterr().err
    assert "warning: 40 detections had a NaN / inf box" in err
    assert "warning: 2 priors had a NaN score (the model's outputs overflowed)" in err  # 1 on each image


def test_predict_lines_grow_with_the_picture(tmp_path, monkeypatch):
    # One detection [10, 10, 100, 100] px drawn on a white 1280 x 960 photo: the outline is
    # round(1280 / 320) = 4 px wide (2 px on a small picture would vanish when it is viewed whole).
    path = str(tmp_path / "nano.pt")
    write_checkpoint(path)
    Image.new("RGB", (1280, 960), "white").save(tmp_path / "big.png")

    def one_box(boxes, scores, **kwargs):  # in letterbox px: 128 / 1280 = 0.1 of the original
        return (torch.tensor([[[1.0, 1.0, 10.0, 10.0]]]), torch.tensor([[0.9]]), torch.tensor([[0]]),
                torch.tensor([1]))
    monkeypatch.setattr(ev, "batched_nms", one_box)
    assert ev.main(["predict", "-m", path, str(tmp_path / "big.png"), "-o", str(tmp_path / "out"),
                    "--device", "cpu"]) == 0
    with Image.open(tmp_path / "out" / "big.png") as img:
        row = [img.getpixel((x, 60)) != (255, 255, 255) for x in range(6, 18)]  # across the left edge
    assert row == [False] * 4 + [True] * 4 + [False] * 4


def test_results_with_a_negative_width_are_refused(tmp_path, capsys):
    # One object, a true positive at 0.5 and a false positive at 0.9: AP 0.5. Written with a
    # negative width (an x1 y1 x2 y2 box read as x y w h), pycocotools ignored the false positive
    # and gave 1.0.
    small = write_small_coco(str(tmp_path / "small"))
    tp = {"image_id": 1, "category_id": 2, "bbox": [4, 4, 20, 16], "score": 0.5}
    path = tmp_path / "r.json"
    path.write_text(json.dumps([tp, dict(tp, bbox=[40, 30, 10, 10], score=0.9)]))
    stats = ev.score_results_file(str(path), small, verbose=False)
    # class 2: precision 0.5 at recall 1 -> 0.5; class 3 (image 2's object, never detected): 0
    assert stats["AP50"] == pytest.approx(0.25)
    path.write_text(json.dumps([tp, dict(tp, bbox=[40, 30, -10, 10], score=0.9)]))
    assert ev.main(["--results", str(path), "-d", small]) == 2
    err = capsys.readouterr().err
    assert "detection 1 has bbox [40, 30, -10, 10], a negative width or height" in err and "x2 - x1" in err


def test_dataset_layout_results_match_whole_file_names_first(tmp_path, capsys):
    # Two ground-truth images named x.jpg in folders a/ and b/, one box each.
    gt = {"images": [{"id": 1, "file_name": "a/x.jpg", "width": 64, "height": 48},
                     {"id": 2, "file_name": "b/x.jpg", "width": 64, "height": 48}],
          "categories": [{"id": 1, "name": "cat"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 16], "area": 320, "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 1, "bbox": [30, 20, 20, 16], "area": 320, "iscrowd": 0}]}
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    # A perfect export under its own ids (0, 1) and whole names: AP 1. Matched by base name
    # only, both images were image 2 and the AP was 0.25.
    export = {"images": [{"id": 0, "file_name": "a/x.jpg"}, {"id": 1, "file_name": "b/x.jpg"}],
              "categories": [{"id": 0, "name": "cat"}],
              "annotations": [{"image_id": 0, "category_id": 0, "bbox": [4, 4, 20, 16], "score": 0.9},
                              {"image_id": 1, "category_id": 0, "bbox": [30, 20, 20, 16], "score": 0.9}]}
    path = tmp_path / "r.json"

    def score(*names):
        """AP of the export with its two images named so, or the error's text (exit status 2)."""
        for im, name in zip(export["images"], names):
            im["file_name"] = name
        path.write_text(json.dumps(export))
        if ev.main(["--results", str(path), "-d", str(gt_path)]) == 0:
            capsys.readouterr()
            return ev.score_results_file(str(path), str(gt_path), verbose=False)["AP"]
        return capsys.readouterr().err

    assert score("a/x.jpg", "b/x.jpg") == pytest.approx(1.0)
    # Base names alone cannot tell the two apart: one clear error.
    assert "1 file names (e.g. ['x.jpg']) match several ground-truth images" in score("x.jpg", "b/x.jpg")
    # A base name that is unique still matches (an export that dropped the folders); folders
    # written from the export's own root too; another split's folder does not.
    gt["images"][1]["file_name"] = "b/y.jpg"
    gt_path.write_text(json.dumps(gt))
    assert score("a/x.jpg", "y.jpg") == pytest.approx(1.0)
    assert score("a/x.jpg", "/data/set/b/y.jpg") == pytest.approx(1.0)
    assert "1 file names are not in the ground truth (e.g. ['c/y.jpg'])" in score("a/x.jpg", "c/y.jpg")
    # Two ground-truth categories of one name: detections cannot be matched to them by name.
    gt["categories"].append({"id": 2, "name": "cat"})
    gt_path.write_text(json.dumps(gt))
    err = score("a/x.jpg", "b/y.jpg")
    assert "names 1 categories more than once (e.g. ['cat'])" in err


def test_unreadable_inputs_and_unwritable_outputs_are_named_before_any_work(tmp_path, capsys):
    small = write_small_coco(str(tmp_path / "small"))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "latin1.json").write_bytes(b'[{"image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "score": 0.5, '
                                            b'"note": "caf\xe9"}]')  # Latin-1, not UTF-8
    (tmp_path / "ok.json").write_text("[]")
    ckpt = str(tmp_path / "nano.pt")
    write_checkpoint(ckpt)
    cases = [(["--results", str(tmp_path), "-d", small], f"--results {tmp_path} is a folder: give a json file"),
             (["--results", str(tmp_path / "latin1.json"), "-d", small], "latin1.json: not UTF-8 text"),
             (["--results", str(tmp_path / "ok.json"), "-d", str(tmp_path / "latin1.json")],
              f"-d {tmp_path / 'latin1.json'}: not UTF-8 text"),
             (["--results", str(tmp_path / "latin1.json"), "-d", small, "--stats_json", str(tmp_path / "afile" / "s.json")],
              "afile is a file, so no folder can be made there"),
             (["-m", ckpt, "-d", small, "--save_results", str(tmp_path / "afile" / "deeper" / "r.json")],
              "afile is a file, so no folder can be made there"),
             (["-m", ckpt, "-d", small, "--nms", "hard", "--nms_iou_or_sigma", "1"],
              "--nms hard takes an IoU threshold below 1")]
    for argv, message in cases:
        assert ev.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert ev.main(["-m", ckpt, "-d", small, "--nms", "gaussian", "--nms_iou_or_sigma", "1.5", "--device", "cpu",
                    "-i", "64"]) == 0  # sigma, not a threshold: above 1 is allowed


def test_centred_letterbox_pad_offset_by_hand():
    # A 70 (h) x 35 (w) image into 64 x 64 with letterbox_pad 4: the inner resize is to 60 x 60,
    # scale 60 / 70 = 6/7, so the picture is 60 x 30 px. Centred: top (64 - 60) / 2 = 2,
    # left (64 - 30) / 2 = 17. In float32, 35 / (7/6) comes out as 30.0000019, so a plain ceil
    # would say 31 px and centre at left 16; the 1e-3 slack keeps it at 30 and 17.
    image = np.full((70, 35, 3), 200, np.uint8)
    batch = data._Collate(max_boxes=1)([(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 0, (1.0, 1.0))])
    out = ev.eval_letterbox(batch, (64, 64), letterbox_pad=4)
    m = out["matrices"][0]
    # original = (7/6) * (output - offset): the translation is -(7/6) * 17 in x, -(7/6) * 2 in y.
    torch.testing.assert_close(m, torch.tensor([[7 / 6, 0, -17 * 7 / 6], [0, 7 / 6, -2 * 7 / 6]]))
    grey = data.PAD_VALUE / 255
    # Columns 0..16 are pad, 17..46 the picture (200 / 255), 47..63 pad again: 17 px each side.
    row = out["images"][0, 0, 30]
    assert torch.allclose(row[:17], torch.tensor(grey)) and torch.allclose(row[47:], torch.tensor(grey))
    assert torch.allclose(row[18:46], torch.tensor(200 / 255))


def small_coco_with_coco_names(folder):
    """write_small_coco with COCO's first 20 category ids and their COCO names."""
    small = write_small_coco(str(folder), cat_ids=sorted(models.COCO_CLASSES)[:20])
    gt = json.loads(open(small).read())
    for c in gt["categories"]:
        c["name"] = models.COCO_CLASSES[c["id"]]
    open(small, "w").write(json.dumps(gt))
    return small


def effdet_file(path):
    """A file in effdet's efficientdet_d0 layout (names from the fixture, small random weights,
    BatchNorm at identity), as effdet publishes its COCO weights: a plain state dict."""
    state = published_state("effdet:efficientdet_d0", 0.1, 0.5)
    torch.save(state, path)
    return state


def test_an_effdet_checkpoint_is_evaluated_on_the_data_s_coco_ids(tmp_path, capsys):
    state = effdet_file(tmp_path / "d0.pth")
    # The class predictor keeps, per anchor, the slots of the data's ids: id 3 is slot 2, id 1 slot 0.
    model = ev.published_model("effdet", state, "d0.pth", [3, 1], input_shape=(128, 128))
    full = models.build_model("efficientdet_d0", num_classes=90, input_shape=(128, 128))
    full.load_state_dict(models.effdet_state_dict(state, full))
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        ours, theirs = model.eval()(x), full.eval()(x)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o[:, :, 4:], t[:, :, [4 + 2, 4 + 0]])
        torch.testing.assert_close(o[:, :, :4], t[:, :, :4])
    # The command line: -m the file, -d a COCO json with COCO's first 20 categories (ids and names).
    small = small_coco_with_coco_names(tmp_path / "small")
    assert ev.main(["-m", str(tmp_path / "d0.pth"), "-d", small, "--device", "cpu", "-i", "128"]) == 0
    out = capsys.readouterr().out
    assert "effdet EfficientDet weights, read as efficientdet_d0" in out and "TensorFlow's padding (tf_padding)" not in out
    assert ", PyTorch's padding (a tf_efficientdet_* file keeps that name: TensorFlow's padding)" in out
    # effdet's tf_efficientdet_d0 (the same tensors) by its file's name: TensorFlow's padding.
    tf_model = ev.published_model("effdet", state, "weights/tf_efficientdet_d0_34-f153e0cf.pth", [3, 1])
    assert tf_model.config["tf_padding"] and "with TensorFlow's padding (tf_padding) by its name" in capsys.readouterr().out
    advprop = ev.published_model("effdet", state, "tf_efficientdet_d0_ap-d0cdbd0a.pth", [3, 1])
    assert advprop.config["pixel_norm"] == "inception" and advprop.config["tf_padding"]
    with pytest.raises(ev.EvalInputError, match=r"holds effdet EfficientDet weights, not yolox_s's: give --det_header "
                                                r"efficientdet_d0, or leave it out$"):
        ev.published_model("effdet", state, "tf_efficientdet_d0.pth", [1], det_header="yolox_s")
    # Data that is not COCO's (VOC's "cat" is id 2, COCO's "bicycle"; an id past 90) and a file
    # that fits no preset: one clear error each.
    for ids, names, shown in (([1, 2], ["person", "unicorn"], "(2, 'unicorn')"), ([1, 95], None, "(95, '95')")):
        with pytest.raises(ev.EvalInputError, match=rf"this data has others \(e\.g\. \[{re.escape(shown)}\], id and name\)"):
            ev.published_model("effdet", state, "d0.pth", ids, names)
    # VOC's "cat" is its id 2 (COCO's bicycle): matched by name, it gets COCO's cat, id 17 (slot 16).
    voc = ev.published_model("effdet", state, "d0.pth", [1, 2], ["person", "cat"], input_shape=(128, 128))
    with torch.no_grad():
        ours = voc(x)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o[:, :, 4:], t[:, :, [4 + 0, 4 + 16]])
    with pytest.raises(ev.EvalInputError, match=r"does not fit --det_header efficientdet_d1: ours is"):
        ev.published_model("effdet", state, "d0.pth", [1], det_header="efficientdet_d1")
    assert ev.main(["-m", str(tmp_path / "d0.pth"), "--device", "cpu"]) == 2
    assert "holds effdet EfficientDet weights, which record no data: give -d" in capsys.readouterr().err
    # effdet's training checkpoint layout (flags as a Namespace, EMA weights under a "model." prefix).
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict_ema": {"model." + k: v for k, v in state.items()}},
               tmp_path / "train.pth.tar")
    kind, read = ev.read_published_checkpoint(str(tmp_path / "train.pth.tar"))
    assert kind == "effdet" and sorted(read) == sorted(state) and torch.equal(read["backbone.conv_stem.weight"], state["backbone.conv_stem.weight"])


def test_a_megvii_yolox_checkpoint_is_evaluated_and_drawn_with_coco_s_ids(tmp_path, capsys):
    state = published_state("megvii:yolox_nano", 0.1, 0.5)
    torch.save({"start_epoch": 300, "model": state}, tmp_path / "nano.pth")   # as Megvii publishes it
    assert ev.read_published_checkpoint(str(tmp_path / "nano.pth"))[0] == "megvii"
    # The class predictor keeps the slots of the data's ids (COCO's 3rd and 1st): slots 2 and 0.
    model = ev.published_model("megvii", state, "nano.pth", [3, 1], input_shape=(64, 64))
    assert model.config["det_header"] == "yolox_nano" and model.config["pixel_norm"] == "0-255"
    full = models.build_model("yolox_nano", input_shape=(64, 64), pixel_norm="0-255")
    full.load_state_dict(models.megvii_yolox_state_dict(state, full))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model(x), full.eval()(x)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o[:, :, 4:6], t[:, :, [4 + 2, 4 + 0]])
        torch.testing.assert_close(o[:, :, [0, 1, 2, 3, 6]], t[:, :, [0, 1, 2, 3, 84]])
    # The command line: -m the file, -d a COCO json with COCO's first 20 categories (ids and names).
    small = small_coco_with_coco_names(tmp_path / "small")
    assert ev.main(["-m", str(tmp_path / "nano.pth"), "-d", small, "--device", "cpu", "-i", "64"]) == 0
    assert "Megvii YOLOX weights, read as yolox_nano" in capsys.readouterr().out
    # The real VOC sample (its own ids, VOC's names): scored with COCO's slots for its 20 classes.
    assert ev.main(["-m", str(tmp_path / "nano.pth"), "-d", shared_path("voc2007_100", "instances_coco.json"),
                    "--device", "cpu", "-i", "64", "--stats_json", str(tmp_path / "voc.json")]) == 0
    assert "read as yolox_nano (megvii_yolox_state_dict), its class slots for 20 classes (person, cat, boat, ...), " \
           "with 0..255 pixels (pixel_norm 0-255) as Megvii's weights want" in capsys.readouterr().out and 0 <= json.loads((tmp_path / "voc.json").read_text())["AP"] <= 1
    # predict draws COCO's names without any data.
    picture = os.path.join(os.path.dirname(small), "images", "1.jpg")
    assert ev.main(["predict", "-m", str(tmp_path / "nano.pth"), picture, "-o", str(tmp_path / "drawn"), "-i", "64",
                    "--device", "cpu", "--score_threshold", "0.0001"]) == 0
    drawn = json.loads((tmp_path / "drawn" / "predictions.json").read_text())
    coco = sorted(models.COCO_CLASSES)  # label k is COCO's k-th category: 36 is id 41, "skateboard"
    assert drawn["1.jpg"] and all(d["name"] == models.COCO_CLASSES[coco[d["label"]]] for d in drawn["1.jpg"])
    assert all(d["category_id"] == coco[d["label"]] for d in drawn["1.jpg"])  # COCO's own id
    # Megvii's model trained on other data (20 slots), and a file of another size than --det_header.
    twenty = {k: v[:20] if k.startswith("head.cls_preds.") else v for k, v in state.items()}
    with pytest.raises(ev.EvalInputError, match=r"Megvii YOLOX weights with 20 class slots, not COCO's 80"):
        ev.published_model("megvii", twenty, "n.pth", [1, 2])
    with pytest.raises(ev.EvalInputError, match=r"does not fit --det_header yolox_s: the file's backbone.backbone."
                                                r"dark2.0.dconv.conv.weight is no tensor of this YOLOX"):
        ev.published_model("megvii", state, "n.pth", [1], det_header="yolox_s")


def test_a_checkpoint_s_input_settings_are_kept_and_said(tmp_path, capsys):
    # A run started from tf_efficientdet weights: its checkpoint rebuilds with TensorFlow's
    # padding (and says so); rebuilt as a YOLOX there is nothing to pad: one clear error.
    model = models.build_model("efficientdet_d0", num_classes=2, input_shape=(128, 128), tf_padding=True)
    torch.save({"config": dict(model.config, class_names=["a", "b"], cat_ids=[1, 2]), "model": model.state_dict()},
               tmp_path / "tf.pt")
    loaded, _ = ev.load_model(str(tmp_path / "tf.pt"))
    assert loaded.config["tf_padding"] is True and isinstance(loaded.backbone.stem.conv, models.Conv2dSame)
    assert "with TensorFlow's padding (tf_padding) as it was trained" in capsys.readouterr().out
    with pytest.raises(ev.EvalInputError, match=r"tf.pt as --det_header yolox_s: models.py: tf_padding changes an "
                                                r"EfficientNet backbone or a BiFPN"):
        ev.load_model(str(tmp_path / "tf.pt"), det_header="yolox_s")


def test_prediction_sheet_draws_the_kept_detections_over_the_truth(tmp_path, monkeypatch):
    # write_small_coco's two 64 x 48 grey pictures, letterboxed into 128 x 128 at scale 2 (rows
    # 96..127 are the grey 114 pad), each with its truth [4, 4, 24, 20] -> [8, 8, 48, 40]. The decoded
    # outputs are made up: per image a detection of 0.9, an overlapping one of 0.85 that hard NMS
    # at 0.45 removes (IoU 1440 / 1760) and one of 0.2, under the drawing threshold of 0.3.
    small = write_small_coco(str(tmp_path / "small"))
    dataset = data.open_dataset(small, "val")
    model = models.build_model("yolox_nano", num_classes=20, input_shape=(128, 128))
    boxes = torch.tensor([[60.0, 60, 100, 100], [60, 64, 100, 104], [0, 100, 20, 120]])
    scores = torch.zeros(3, 20)
    scores[0, 2], scores[1, 2], scores[2, 7] = 0.9, 0.85, 0.2

    def decoded(outputs, priors, mode):  # the same three boxes for every image of the batch
        b = len(outputs[0])
        return boxes.expand(b, 3, 4).clone(), scores.expand(b, 3, 20).clone()
    monkeypatch.setattr(ev, "decode_predictions", decoded)
    path = ev.prediction_sheet(model, dataset, str(tmp_path / "p.png"), count=8)
    assert model.training  # the mode it came in
    with Image.open(path) as im:
        assert im.size == (2 * 132, 132)  # count 8, two images
        for left in (2, 134):  # each picture 2 px in from its cell's corner
            px = lambda x, y: im.getpixel((left + x, 2 + y))
            assert px(8, 24) == px(48, 24) == px(20, 8) == px(20, 40) == data.TRUTH_LINE  # scaled truth
            assert px(9, 24) == px(47, 24) == data.TRUTH_SHADOW and px(10, 24) == (90, 90, 90)
            assert px(60, 80) == px(100, 80) == data.SHEET_PALETTE[2]  # the 0.9 detection
            assert px(80, 104) == px(80, 103) == (114, 114, 114)  # the suppressed one's bottom edge: pad
            assert px(0, 110) == px(10, 100) == (114, 114, 114)  # the 0.2 one: not drawn
            assert px(0, 127) == (40, 40, 40)  # the caption's tag ("1 detection >= 0.3")
        whole = np.asarray(im)
    # One image per forward pass: the same picture.
    with Image.open(ev.prediction_sheet(model, dataset, str(tmp_path / "b1.png"), batch_size=1)) as im:
        assert np.array_equal(np.asarray(im), whole)
    # An empty split draws nothing.
    empty = data.Dataset([], dataset.class_names, dataset.cat_ids, "empty")
    assert ev.prediction_sheet(model, empty, str(tmp_path / "e.png")) is None and not (tmp_path / "e.png").exists()


def test_predict_says_why_its_pictures_are_empty(tmp_path, capsys, monkeypatch):
    # A random model: every score is near the prior 0.01, far under 0.3. The pictures have no
    # box, and one line says so, with the best score there was.
    path = str(tmp_path / "nano.pt")
    write_checkpoint(path)
    image = shared_path("voc2007_100", "images", sorted(os.listdir(shared_path("voc2007_100", "images")))[0])
    seen = []
    real = ev.decode_predictions
    monkeypatch.setattr(ev, "decode_predictions", lambda *a: seen.append(real(*a)) or seen[-1])
    assert ev.main(["predict", "-m", path, image, "-o", str(tmp_path / "p"), "--device", "cpu"]) == 0
    best = float(seen[0][1].max())
    assert best < 0.3
    assert f"note: no detection scored 0.3 or more (the best score was {best:.3f}): give a lower --score_threshold" \
        in capsys.readouterr().err
    # with one above the threshold, nothing to say
    assert ev.main(["predict", "-m", path, image, "-o", str(tmp_path / "q"), "--device", "cpu",
                    "--score_threshold", f"{best / 2:.6f}"]) == 0
    assert "note: no detection" not in capsys.readouterr().err


def test_predict_takes_its_images_after_a_one_value_i(tmp_path):
    # -i takes one value (S or H,W), as train.py's: with two allowed it swallowed the image path and
    # argparse said the images were missing.
    path = str(tmp_path / "nano.pt")
    write_checkpoint(path)
    image = shared_path("voc2007_100", "images", sorted(os.listdir(shared_path("voc2007_100", "images")))[0])
    assert ev.main(["predict", "-m", path, "--device", "cpu", "-i", "64", image, "-o", str(tmp_path / "p")]) == 0
    assert os.path.exists(tmp_path / "p" / os.path.basename(image))


@pytest.mark.parametrize("argv,hint", [
    (["--use_bgr_input"], "--use_bgr_input is not a flag here: none is needed: the channel order follows the weights"),
    (["--checkpoint", "x.pth"], "--checkpoint is not a flag here: give -m to eval.py"),
    (["--use-ema"], "--use-ema is not a flag here: none is needed: a checkpoint's EMA weights are the ones evaluated"),
    (["predict", "--img-size", "64", "a.jpg", "-o", "o"], "--img-size is not a flag here: give -i/--input_shape"),
    (["--clip_bbox", "--no_clip_bbox"], "argument --no_clip_bbox: not allowed with argument --clip_bbox"),
    (["--model_path", "m.h5", "--data_name", "coco"], "--model_path is not a flag here: give -m/--model"),
    (["-m", "yolox_nano", "-i", "64", "64"], "-i takes one value: give H,W like 64,64"),
    (["predict", "-m", "yolox_nano", "--input_shape", "64", "96", "a.jpg", "-o", "o"],
     "--input_shape takes one value: give H,W like 64,96"),
])
def test_flags_of_other_tools_name_ours(argv, hint, capsys):
    with pytest.raises(SystemExit) as exc:
        ev.main(argv)
    assert exc.value.code == 2 and hint in capsys.readouterr().err


def test_kecams_nms_method_is_nms(tmp_path, monkeypatch):
    # keras_cv_attention_models' eval command lines say --nms_method: the same flag here.
    calls = []
    monkeypatch.setattr(ev, "run_coco_evaluation", lambda *a, **k: calls.append(k) or {})
    small = write_small_coco(str(tmp_path / "small"))
    assert ev.main(["-m", "yolox_nano", "-d", small, "-i", "64", "--device", "cpu", "--nms_method", "linear"]) == 0
    assert calls[0]["nms"] == "linear"
