"""data.py: the first stage of plaindet, from files on disk to augmented batches.

Where it sits in the flow:

    Dataset (COCO json / YOLO txt / built-in shapes set)
      -> make_loader: DataLoader workers decode JPEGs with PIL and pad each batch into one canvas
      -> augment: on the batch's device, one affine warp per image (crop mode x flip x RandAugment
         geometry), mosaic, colour, MixUp; boxes follow the same matrices
      -> model / losses (train.py), or letterbox -> model -> eval.py (which undoes it with `matrices`)

Conventions (see DESIGN.md): boxes are xyxy float32 in absolute pixels, with continuous pixel
coordinates (pixel i covers [i, i + 1]); labels are contiguous int64 0..C-1 and label -1 marks a
crowd / ignore region that is carried along with the boxes but is never a training target.

Reading order: readers (COCO, YOLO, the Dataset) -> the built-in shapes set -> the loader ->
augmentation (matrices, boxes, warp, mosaic, colour, MixUp) -> pictures -> CLI.
"""
import argparse
import concurrent.futures
import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.abspath(__file__))
PAD_VALUE = 114  # grey used for every pixel that has no source pixel (canvas padding, letterbox bars)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # what cameras and label tools write


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------
class Dataset(torch.utils.data.Dataset):
    """One split of a detection dataset; decoding happens lazily, per item, with PIL.

    ds[i] -> dict(image=uint8 [H, W, 3] RGB, boxes=float32 [N, 4] xyxy px, labels=int64 [N]
    (-1 = crowd / ignore region), image_id=int).
    Attributes: class_names, cat_ids (label -> COCO category id), image_ids, files, source.
    """

    def __init__(self, records, class_names, cat_ids, source, coco=None):
        self.records = records  # list of dict(file, image_id, width, height, boxes, labels)
        self.class_names = list(class_names)
        self.cat_ids = [int(c) for c in cat_ids]
        self.image_ids = [r["image_id"] for r in records]
        self.files = [r["file"] for r in records]
        self.source = source
        self._coco = coco

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        image, boxes, labels, image_id, _ = self.load(i)
        return dict(image=image, boxes=boxes, labels=labels, image_id=image_id)

    def load(self, i, max_side=None):
        """Decode item i; if max_side is given and the longer side is above it, shrink the image
        (JPEG draft mode makes this nearly free). Returns (image, boxes, labels, image_id, scale)
        where scale = (x, y) output px per original px (two numbers: rounding the shrunk width and
        height to whole pixels makes them differ slightly)."""
        r = self.records[i]
        image, scale = decode_image(r["file"], max_side, size=(r["width"], r["height"]))
        return image, r["boxes"] * np.float32(scale + scale), r["labels"], r["image_id"], scale

    def coco_gt(self):
        """COCO-format ground truth of this split (images, annotations incl. iscrowd, categories)."""
        if self._coco is not None:
            return self._coco
        # A crowd region keeps no class in the records (label -1), so it is written under the
        # first category, and pycocotools ignores detections only in crowds of their own class.
        # No reader here meets that: COCO keeps its own json (self._coco) and YOLO has no crowds.
        images, annotations = [], []
        for r in self.records:
            images.append(dict(id=r["image_id"], file_name=os.path.basename(r["file"]),
                               width=r["width"], height=r["height"]))
            for box, label in zip(r["boxes"].tolist(), r["labels"].tolist()):
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append(dict(id=len(annotations) + 1, image_id=r["image_id"], bbox=[box[0], box[1], w, h],
                                        area=w * h, iscrowd=int(label < 0), category_id=self.cat_ids[max(label, 0)]))
        categories = [dict(id=c, name=n) for c, n in zip(self.cat_ids, self.class_names)]
        self._coco = dict(images=images, annotations=annotations, categories=categories)
        return self._coco


class DataLoadError(ValueError):
    """An image of the dataset could not be read while batches were being made (see batches())."""


# EXIF orientation tag (1..8) -> the transpose that shows the stored pixels upright; tags 5 to 8
# turn the picture by 90 degrees, swapping its width and height.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_SWAPPING = {_UPRIGHT[tag] for tag in (5, 6, 7, 8)}


def _upright(im, size=None):
    """The transpose that shows im upright, or None. Phones store the pixels as the sensor saw
    them and write the turn into an EXIF tag; labelling tools, browsers and the readers of YOLOX,
    detectron2 and mmdetection all show (and label) the upright picture, so boxes refer to it.
    size: the (width, height) the annotations give, if any. Where it is the stored size and not
    the upright one, the boxes were drawn on the stored pixels, and those are kept as stored."""
    try:
        turn = _UPRIGHT.get(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block is no reason to reject pixels that decode fine
        return None
    if turn is None or size is None:
        return turn
    upright_size = im.size[::-1] if turn in _SWAPPING else im.size
    if tuple(size) != tuple(upright_size) and tuple(size) == tuple(im.size):
        return None
    return turn


def _rgb(im):
    """im as 8-bit RGB. convert("RGB") clips 16-bit greyscale (PNG exports of depth, thermal or
    medical images) at 255, which turns such a picture white: its top 8 bits are kept instead;
    and it would turn a float image of 0..1 values black."""
    if im.mode == "I" or im.mode.startswith("I;16"):
        im = Image.fromarray((np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8), "L")
    elif im.mode == "F":  # 32-bit float greyscale (a TIFF): values in 0..1 are scaled to 0..255, others clipped
        pixels = np.nan_to_num(np.asarray(im, np.float64))
        pixels = pixels * 255 if pixels.max() <= 1 else pixels
        im = Image.fromarray(np.round(pixels).clip(0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def decode_image(path, max_side=None, size=None, fix="remove its entry from the annotations"):
    """PIL decode to uint8 [H, W, 3] RGB, upright (see _upright; size: the annotations' (width,
    height), if known). Returns (image, scale): scale = (x, y) output px per original px, (1, 1)
    unless max_side shrank it. Raises DataLoadError, naming the file and the fix, for a missing
    or undecodable image, or one of another size than the annotations give (an image resized
    after labelling: its boxes would land in the wrong place); fix: what else the user can do
    with the file."""
    if not os.path.exists(path):
        raise DataLoadError(f"image {path} is missing: restore the file, or {fix}")
    try:
        with Image.open(path) as im:
            turn = _upright(im, size)
            width, height = im.size  # as stored
            shown = (height, width) if turn in _SWAPPING else (width, height)
            if size is not None and tuple(map(float, size)) != tuple(map(float, shown)):
                raise DataLoadError(f"image {path} is {shown[0]}x{shown[1]} but the annotations say "
                                    f"{size[0]}x{size[1]} (width x height): fix its width and height there, or, if "
                                    f"the image was resized after labelling, its boxes too")
            scale = (1.0, 1.0)
            if max_side and max(im.size) > max_side:
                shrink = max_side / max(im.size)
                target = (max(1, round(width * shrink)), max(1, round(height * shrink)))
                im.draft("RGB", target)  # JPEG: decode at 1/2, 1/4 or 1/8 size directly, far cheaper
                im = _rgb(im).resize(target, Image.BILINEAR)
                scale = (target[0] / width, target[1] / height)
            else:
                im = _rgb(im)
            if turn is not None:
                im = im.transpose(turn)
                if turn in _SWAPPING:  # x of the upright picture is y as stored
                    scale = scale[::-1]
            image = np.array(im)  # writable, so torch.from_numpy is safe
    except Image.DecompressionBombError as e:  # PIL refuses images over ~179 megapixels (aerial photos)
        raise DataLoadError(f"image {path} is too large to decode ({e}): cut it into tiles, or {fix}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataLoadError(f"image {path} cannot be decoded ({e}): replace it with a valid JPEG/PNG, "
                            f"or {fix}") from None
    return image, scale


def _image_size(path, fix):
    """(width, height) of the upright picture, from the image header only, no pixel decoding. A
    file PIL cannot read is reported here, when the dataset is opened, rather than later inside a
    DataLoader worker. fix: what else the user can do with the file (the reader knows where it is
    listed)."""
    try:
        with Image.open(path) as im:
            turn = _upright(im)
            return im.size[::-1] if turn in _SWAPPING else im.size
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {path} is too large to decode ({e}): cut it into tiles, or {fix}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"image {path} cannot be read ({e}): replace it with a valid JPEG/PNG or {fix}") from None


def _clean_boxes(boxes_xyxy, widths, heights, framed=None):
    """Clip slightly-outside boxes (in place); find NaN, non-positive-size or far-outside ones.
    boxes_xyxy: float64 [N, 4]; widths / heights: [N] size of each box's image; framed: optional
    bool [N], boxes whose YOLO numbers are all in 0..1 (the format's own validity rule, as
    Ultralytics checks it): clipped however far a corner reaches. Returns a keep mask; the reader
    reports the dropped boxes, once for the whole split (_warn_bad_boxes)."""
    w_img, h_img = np.asarray(widths, np.float64), np.asarray(heights, np.float64)
    finite = np.isfinite(boxes_xyxy).all(1)
    b = np.where(finite[:, None], boxes_xyxy, 0)
    margin = 0.1 * np.maximum(w_img, h_img)  # a few pixels outside is annotation noise, more is a bug
    inside = (b[:, 0] > -margin) & (b[:, 1] > -margin) & (b[:, 2] < w_img + margin) & (b[:, 3] < h_img + margin)
    if framed is not None:
        inside |= framed
    np.clip(boxes_xyxy[:, 0::2], 0, w_img[:, None], out=boxes_xyxy[:, 0::2])
    np.clip(boxes_xyxy[:, 1::2], 0, h_img[:, None], out=boxes_xyxy[:, 1::2])
    # Size is judged after clipping: a box just past the edge clips to zero width, and kept it
    # would be an object nothing can find (pycocotools counts an area-0 box as a miss).
    b = np.where(finite[:, None], boxes_xyxy, 0)
    positive = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return finite & positive & inside


def _warn_bad_boxes(source, count, total, examples, hint=""):
    """One warning for a whole split, not one per file: 100 label files written in pixels must not
    bury the console in 100 warnings. examples: a few bad boxes, as written in the annotations (so
    the user can find them), not as the xyxy they became here. A split left with no box at all is
    allowed (background-only val sets exist), but the warning says so plainly."""
    every = "; that is every box: no usable box is left in this split" if count == total else ""
    warnings.warn(f"{source}: skipped {count} bad boxes of {total} (NaN, non-positive size or far outside the "
                  f"image){every}. {hint}E.g. {'; '.join(examples)}. Fix those annotations to use them.")


@contextlib.contextmanager
def plain_warnings(prog):
    """Inside, each warning (the readers' skipped boxes) is printed as one line "PROG: warning: ..."
    on stderr, like the command lines' errors. Python's default adds "data.py:153: UserWarning:"
    and the source line, which mean nothing to someone running a command. Restored on the way out."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(f"{prog}: warning: {message}", file=sys.stderr)
        yield


def _numbers(values, sep=" "):
    """Numbers as a user would write them: 320 not 320.0, 0.25 not 0.25000000001."""
    return sep.join(f"{v:.12g}" for v in values)


def _find_image_dir(candidates, file_names, what):
    """The first candidate folder that holds any of file_names (the split's first few images, so
    that one missing file does not hide the right folder; read_coco then checks every image)."""
    for d in candidates:
        if any(os.path.exists(os.path.join(d, f)) for f in file_names):
            return d
    raise FileNotFoundError(f"{what}: cannot find image {file_names[0]} in any of {candidates}: put the images in one "
                            f"of those folders")


def is_key(value, table):
    """value in table, where a json list or object (unhashable) is simply not a key."""
    try:
        return value in table
    except TypeError:
        return False


def check_coco_json(coco, json_path, need_files=True):
    """A loaded COCO instances json, checked before anything reads it by key (a missing key would
    otherwise stop a run as a bare KeyError, perhaps after an epoch of training); in place, the
    keys pycocotools and the per-class table read that some exporters leave out get COCO's
    meaning: iscrowd 0 (not a crowd), area = the bbox's w x h, a category's name = its id.
    need_files: images must name their file (not when only scoring results against it).
    Raises ValueError naming json_path, the entry and the fix."""
    if not isinstance(coco, dict) or not all(k in coco for k in ("images", "annotations", "categories")):
        raise ValueError(f"{json_path} is not a COCO instances file (needs 'images', 'annotations' and 'categories' "
                         f"lists): convert it to COCO format")
    for key, needed in (("images", ("id", "file_name") if need_files else ("id",)),
                        ("annotations", ("image_id", "category_id")),
                        ("categories", ("id",))):
        if not isinstance(coco[key], list) or not all(isinstance(e, dict) for e in coco[key]):
            raise ValueError(f"{json_path}: '{key}' is not a list of objects: convert the file to COCO format")
        for entry in coco[key]:
            absent = [k for k in needed if k not in entry]
            if absent:
                raise ValueError(f"{json_path}: an entry of '{key}' has no '{absent[0]}' ({json.dumps(entry)[:80]}): "
                                 f"add it, or remove the entry")
    if need_files:  # the loader carries image ids as an int64 tensor (results are written with them)
        def whole(v):
            return not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))
        odd = next((im["id"] for im in coco["images"] if not whole(im["id"])), None)
        if odd is not None:
            raise ValueError(f"{json_path}: image id {json.dumps(odd)} is not a whole number: number the images "
                             f"1, 2, 3, ... and give each annotation's image_id the same number")
        file_of = {}  # two images under one id would each get the other's boxes too
        for im in coco["images"]:
            if im["id"] in file_of:
                raise ValueError(f"{json_path}: images {file_of[im['id']]} and {im['file_name']} both have id "
                                 f"{json.dumps(im['id'])}: give each image its own id, and its annotations that id")
            file_of[im["id"]] = im["file_name"]
    for a in coco["annotations"]:
        bbox = a.get("bbox")  # checked one by one, so the error names the annotation rather than numpy's shapes
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise ValueError(f"{json_path}: annotation {a.get('id')} has no bbox of 4 numbers [x, y, w, h]: fix or "
                             f"remove it (it has {'no bbox' if bbox is None else 'bbox ' + json.dumps(bbox)[:60]})")
        a.setdefault("iscrowd", 0)
        a.setdefault("area", bbox[2] * bbox[3])
    for c in coco["categories"]:
        c.setdefault("name", str(c["id"]))


def read_coco(json_path, images_dir=None, split=None):
    """COCO instances json -> Dataset. iscrowd objects become label -1; images without
    annotations stay (background images); category ids map to contiguous labels by sorted id."""
    if not os.path.exists(json_path):
        raise FileNotFoundError(f"{json_path} does not exist: give a COCO folder with "
                                f"annotations/instances_<split>.json, a COCO json file, a YOLO folder, or 'shapes'")
    try:
        with open(json_path) as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path} is not valid JSON ({e}): re-export or re-download it") from None
    check_coco_json(coco, json_path)
    if not coco["images"]:
        raise ValueError(f"{json_path} has no images (empty split): point to a split that has images")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    cat_ids = [c["id"] for c in cats]
    label_of = {c: i for i, c in enumerate(cat_ids)}
    json_dir = os.path.dirname(os.path.abspath(json_path))
    if images_dir is None:
        root = os.path.dirname(json_dir)
        names = [json_dir, os.path.join(json_dir, "images")]
        if split:  # the split's folder beside the json (a download unpacked in one folder) or beside annotations/
            names += [os.path.join(d, name) for d in (json_dir, root) for name in (split, f"{split}2017", f"{split}2014")]
            names += [os.path.join(root, "images", split)]
        names += [os.path.join(root, "images"), root]
        images_dir = _find_image_dir(names, [im["file_name"] for im in coco["images"][:20]], json_path)
    # The folder was found from the first images; every image must be there too, or training would
    # stop mid-epoch inside a DataLoader worker. One exists() per file is cheap, even for COCO's 118k.
    missing = [im["file_name"] for im in coco["images"]
               if not os.path.exists(os.path.join(images_dir, im["file_name"]))]
    if missing:
        raise FileNotFoundError(f"{json_path}: {len(missing)} of its {len(coco['images'])} images "
                                f"{'is' if len(missing) == 1 else 'are'} missing from "
                                f"{images_dir}, e.g. {', '.join(missing[:3])}: restore them, or remove them (and "
                                f"their annotations) from the json")

    per_image = {im["id"]: [] for im in coco["images"]}
    orphans = []
    for a in coco["annotations"]:
        if not is_key(a["category_id"], label_of):
            raise ValueError(f"{json_path}: annotation {a.get('id')} has category_id {json.dumps(a['category_id'])} "
                             f"that is not in 'categories': add the category or fix the annotation")
        if is_key(a["image_id"], per_image):
            per_image[a["image_id"]].append(a)
        else:
            orphans.append(a)
    if orphans:  # often ids written as text ("1") against numbers (1): said, never silently trained as background
        example = (f"annotation {orphans[0].get('id')} has image_id {json.dumps(orphans[0]['image_id'])}, the images "
                   f"have ids like {json.dumps(coco['images'][0]['id']) if coco['images'] else 'none'}")
        if len(orphans) == len(coco["annotations"]):
            raise ValueError(f"{json_path}: none of its {len(orphans)} annotations names an image of 'images' "
                             f"({example}): give each annotation's image_id the id of its image")
        warnings.warn(f"{json_path}: skipped {len(orphans)} of its {len(coco['annotations'])} annotations that name "
                      f"no image of 'images' ({example}). Fix their image_id to use them.")
        listed = {id(a) for im in coco["images"] for a in per_image[im["id"]]}
        coco = dict(coco, annotations=[a for a in coco["annotations"] if id(a) in listed])
    anns = [a for im in coco["images"] for a in per_image[im["id"]]]
    size_of = {im["id"]: (im.get("width"), im.get("height")) for im in coco["images"]}
    for im in coco["images"]:
        if not im.get("width") or not im.get("height"):  # read only the header for a missing size
            size_of[im["id"]] = _image_size(os.path.join(images_dir, im["file_name"]), "remove it from the json")
    xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    keep = _clean_boxes(xyxy, [size_of[a["image_id"]][0] for a in anns], [size_of[a["image_id"]][1] for a in anns])
    bad = np.nonzero(~keep)[0]
    if len(bad):
        _warn_bad_boxes(json_path, len(bad), len(anns),
                        [f"annotation {anns[j].get('id')} bbox [{_numbers(xywh[j], ', ')}]" for j in bad[:3]])
        # Skipped means skipped everywhere: the ground truth that the evaluation scores against
        # (coco_gt) leaves them out too, else each would count as an object nobody can find.
        dropped = {id(anns[j]) for j in bad}
        coco = dict(coco, annotations=[a for a in coco["annotations"] if id(a) not in dropped])
    records, k = [], 0
    for im in coco["images"]:
        n = len(per_image[im["id"]])
        sel = keep[k:k + n]
        labels = np.array([-1 if a.get("iscrowd", 0) else label_of[a["category_id"]]
                           for a in per_image[im["id"]]], np.int64)
        records.append(dict(file=os.path.join(images_dir, im["file_name"]), image_id=im["id"],
                            width=size_of[im["id"]][0], height=size_of[im["id"]][1],
                            boxes=xyxy[k:k + n][sel].astype(np.float32).reshape(-1, 4), labels=labels.reshape(-1)[sel]))
        k += n
    names = [c["name"] for c in cats]
    return Dataset(records, names, cat_ids, json_path, coco)


def _is_names_file(name):
    return name.endswith(".names") or name in ("classes.txt", "names.txt")


def _yolo_names(folder, label_dir):
    """Class names of a YOLO folder: a names file (one name per line) in the folder or beside the
    label files (where LabelImg writes its classes.txt), else data.yaml's `names`."""
    # utf-8-sig: Windows editors put a byte-order mark in front, which would stick to the first name.
    files = [os.path.join(d, n) for d in (folder, label_dir) for n in sorted(os.listdir(d)) if _is_names_file(n)]
    names, source = None, files[0] if files else None
    if source:
        try:
            with open(source, encoding="utf-8-sig") as f:
                names = [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as e:  # a Windows code page (LabelImg with local class names, say)
            raise ValueError(f"{source} is not UTF-8 text ({e}): save it as UTF-8") from None
    if names is None and os.path.exists(os.path.join(folder, "data.yaml")):
        source = os.path.join(folder, "data.yaml")
        names = _yaml_names(source)
    if names == []:
        raise ValueError(f"{source} lists no class names: add them, one per class, in label order")
    if names is not None:
        return names
    raise FileNotFoundError(f"{folder}: no class-names file (obj.names, classes.txt, names.txt or data.yaml "
                            f"`names: [...]`): add one with a class name per line")


def _unquote(text):
    """A YAML scalar as YOLO exports write one: `person`, 'person' or "person", maybe followed by a
    # comment (outside the quotes: 'no. #1' is a name)."""
    text = text.strip()
    if text[:1] in ("'", '"') and text.find(text[0], 1) > 0:
        return text[1:text.find(text[0], 1)]
    return text.split(" #")[0].strip()


def _split_names(inside):
    """The items of a one-line list `a, 'b, c', "d"`: commas inside quotes belong to the name."""
    return [_unquote(n) for n in re.findall(r"""'[^']*'|"[^"]*"|[^,]+""", inside) if _unquote(n)]


def _yaml_names(path):
    """`names` of a YOLO data.yaml. This is not a YAML parser (no pyyaml here): it reads only the
    subset of YAML that YOLO exports write for the names, one of

        names: [person, car]        names:                names:           names: {0: person, 1: car}
                                      0: person             - person
                                      1: car                - car

    (a [...] or {...} may go on over several lines), and says so clearly when the file holds
    something else."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        lines = [line.rstrip() for line in f]
    how = "write it as `names: [a, b]`, or as a block of `  0: a` lines or of `  - a` lines"
    for i, line in enumerate(lines):
        if not line.startswith("names:"):  # a top-level key: at column 0, not nested under another
            continue
        rest = line[len("names:"):].strip()
        if rest[:1] in ("[", "{"):  # flow style: names: [a, b] or {0: a, 1: b}, maybe over more lines
            close, j = "]" if rest[0] == "[" else "}", i
            while close not in rest and j + 1 < len(lines):
                j += 1
                rest += " " + lines[j].strip()
            if close not in rest:
                raise ValueError(f"{path}:{i + 1}: `names:` opens {rest[0]} and never closes it: {how}")
            items = _split_names(rest[1:].rsplit(close, 1)[0])
            if close == "]":
                return items
            pairs = [item.split(":", 1) for item in items]
            if not all(len(p) == 2 and p[0].strip().isdigit() for p in pairs):
                raise ValueError(f"{path}:{i + 1}: cannot read `{line.strip()}`: {how}")
            return _numbered_names({int(k): _unquote(v) for k, v in pairs}, path, i, how)
        if rest and not rest.startswith("#"):
            raise ValueError(f"{path}:{i + 1}: cannot read `{line.strip()}`: {how}")
        # A block: the lines below, indented deeper than `names:` (a list may also sit at its level).
        indent = len(line) - len(line.lstrip())
        listed, numbered = [], {}
        for j in range(i + 1, len(lines)):
            text = lines[j].strip()
            if not text or text.startswith("#"):
                continue
            depth = len(lines[j]) - len(lines[j].lstrip())
            if depth < indent or (depth == indent and not text.startswith("-")):
                break  # the next key: the block is over
            if text.startswith("-"):
                listed.append(_unquote(text[1:]))
            elif ":" in text and text.split(":", 1)[0].strip().isdigit():
                numbered[int(text.split(":", 1)[0])] = _unquote(text.split(":", 1)[1])
            else:
                raise ValueError(f"{path}:{j + 1}: cannot read `{text}` under `names:`: {how}")
        if listed and not numbered:
            return listed
        return _numbered_names(numbered if not listed else {}, path, i, how)  # both forms: an error
    raise ValueError(f"{path} has no `names:` line: add the class names in label order, {how}")


def _numbered_names(numbered, path, i, how):
    """{0: a, 1: b, ...} -> [a, b, ...]: the numbers must be 0, 1, 2, ... (they are the labels)."""
    if numbered and sorted(numbered) == list(range(len(numbered))):
        return [numbered[k] for k in range(len(numbered))]
    raise ValueError(f"{path}:{i + 1}: `names:` is empty, mixes forms, or is not numbered 0, 1, 2, ...: {how}")


def _labels_path(image_path):
    """Where Ultralytics keeps an image's label file: the path's last `images` folder becomes
    `labels`, and the extension .txt (images/train/a.jpg -> labels/train/a.txt)."""
    parts = os.path.normpath(image_path).split(os.sep)
    if "images" in parts[:-1]:
        at = len(parts) - 2 - parts[-2::-1].index("images")
        parts[at] = "labels"
    return os.path.splitext(os.sep.join(parts))[0] + ".txt"


def _yaml_split(folder, split):
    """What Ultralytics' data.yaml names for this split, under its `path:`. Either a folder of
    images (`train: images/train2017`), whose label files sit where the path's last `images`
    becomes `labels`, or a txt file listing image paths, one per line (`train: autosplit_train.txt`,
    as its autosplit writes; a line "./x.jpg" is relative to the txt file's folder).
    Returns ("folders", (image folder, label folder)), ("files", [image paths]), or None when the
    yaml does not name the split or its folders do not exist (the layouts of read_yolo are then
    looked for). `path:` is often written for Ultralytics' own datasets folder, so the split's
    folder (or txt) is also looked for straight under `folder`."""
    yaml = os.path.join(folder, "data.yaml")
    if not os.path.exists(yaml):
        return None
    with open(yaml, encoding="utf-8-sig", errors="replace") as f:
        yaml_lines = [line.rstrip() for line in f]
    top = dict(line.split(":", 1) for line in yaml_lines if re.match(r"[A-Za-z_]+:", line))
    key = split if split in top or split != "val" else "valid"
    value = _unquote(top.get(key, ""))
    if key in top and not value:  # `train:` followed by a block list, `  - images/a` per line
        at = next(i for i, line in enumerate(yaml_lines) if re.match(rf"{key}:", line))
        items = []
        for line in yaml_lines[at + 1:]:  # the block ends at the first line that is not an item
            m = re.fullmatch(r"\s*-\s+(.+)", line)
            if not m:
                break
            items.append(m.group(1))
        value = f"[{', '.join(items)}]" if items else ""
    if value.startswith("["):
        items = _split_names(value.strip("[]"))
        if len(items) == 1:  # a list of one folder is that folder
            value = items[0]
        else:
            # Several folders are not read here: falling back to the folder layouts would quietly
            # train on (and score) other images than the yaml names, perhaps the val images among them.
            raise ValueError(f"{yaml}: '{key}: {value}' is a list of folders, which plaindet does not read: put the "
                             f"split's images in one folder (labels beside, with images -> labels in the path, e.g. "
                             f"images/{split} and labels/{split}) and name that folder in '{key}:'")
    if not value:
        # The train split named by a file list and no val: the folder layouts would make val of
        # every image, the training images among them.
        train = _unquote(top.get("train", ""))
        if split == "val" and train.lower().endswith(".txt"):
            raise ValueError(f"{yaml}: 'train: {train}' lists the training images but no 'val:' is given: add "
                             f"'val:' with the list (or folder) of the validation images")
        return None
    root = _unquote(top.get("path", ""))
    places = (os.path.join(folder, root, value), os.path.join(folder, value),
              os.path.join(folder, re.sub(r"^(\.\./)+", "", value)))
    if value.lower().endswith(".txt"):
        listing = next((p for p in places if os.path.isfile(p)), None)
        if listing is None:
            raise FileNotFoundError(f"{yaml}: '{key}: {value}' names a file list that is not there (looked for "
                                    f"{', '.join(dict.fromkeys(os.path.normpath(p) for p in places))}): restore it")
        base = os.path.dirname(os.path.abspath(listing))
        with open(listing, encoding="utf-8-sig", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        files = [os.path.normpath(os.path.join(base, line)) for line in lines]  # an absolute line stays as it is
        missing = [line for line, file in zip(lines, files) if not os.path.isfile(file)]
        files = list(dict.fromkeys(files))  # an image listed twice is read once
        if missing or not files:
            raise FileNotFoundError(f"{listing}: " + (f"{len(missing)} of its {len(lines)} images "
                                    f"{'is' if len(missing) == 1 else 'are'} missing, e.g. "
                                    f"{missing[0]} (read relative to {base}): restore them or remove their lines"
                                    if missing else "lists no image: add the split's image paths, one per line"))
        return "files", files
    for image_dir in places:
        label_dir = os.path.dirname(_labels_path(os.path.join(image_dir, "x.jpg")))
        if os.path.isdir(image_dir) and label_dir != os.path.normpath(image_dir) and os.path.isdir(label_dir):
            return "folders", (os.path.normpath(image_dir), label_dir)
    return None


def _read_yolo_txt(path):
    """One YOLO label file -> (rows float64 [N, 5] = class cx cy w h, line number of each row).
    Each non-empty line must hold exactly 5 numbers, checked line by line: reading the whole file
    and reshaping it to 5 columns would silently re-chunk lines of 4 numbers (class missing) or 6
    (a confidence column) into wrong boxes. A line of a class and 3 or more x y pairs is
    Ultralytics' segmentation label, a polygon: its enclosing box is read, as Ultralytics trains a
    detector on it. An empty file is a background image."""
    rows, line_numbers = [], []
    # errors="replace": a binary file then fails below as "not numbers", naming its line;
    # utf-8-sig drops the byte-order mark a Windows editor may put in front of the first line
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for n, line in enumerate(f, 1):
            words = line.split()
            if not words:
                continue  # a blank line, e.g. at the end
            polygon = len(words) >= 7 and len(words) % 2 == 1  # class x1 y1 x2 y2 x3 y3 ...
            if len(words) != 5 and not polygon:
                raise ValueError(f"{path}:{n} has {len(words)} numbers, expected 5: class cx cy w h (normalized 0..1). "
                                 f"Fix that line (4 numbers: the class is missing; 6: remove the extra column, e.g. "
                                 f"a confidence)")
            try:
                numbers = [float(w) for w in words]
            except ValueError:
                raise ValueError(f"{path}:{n} is not numbers ({line.strip()[:60]!r}), expected 5: class cx cy w h "
                                 f"(normalized 0..1)") from None
            if polygon:
                xs, ys = numbers[1::2], numbers[2::2]
                x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
                numbers = [numbers[0], (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]
            rows.append(numbers)
            if not rows[-1][0].is_integer():  # 1.7 would silently become class 1 (and nan a huge one)
                raise ValueError(f"{path}:{n}: class {words[0]} is not a whole number: the first number of a "
                                 f"line is the class index 0, 1, 2, ...")
            line_numbers.append(n)
    return np.array(rows, np.float64).reshape(-1, 5), line_numbers


class NoLabelFiles(ValueError):
    """read_yolo found no label file for the split (open_dataset then checks for Pascal VOC's xml)."""


def read_yolo(folder, split="train", images_dir=None):
    """YOLO txt layout -> Dataset. Labels are `class cx cy w h` normalized, one file per image, in
    labels/<split>/ (Ultralytics), <split>/labels/ (Roboflow, whose val split is named "valid"),
    labels/, or (darknet export) obj_<split>_data/, else obj_train_data/ (so a train-only export
    serves as val too); images in images/<split>/, <split>/images/, images/, beside the txt
    files, ../images/, or images_dir; an image of the split's own folder without a txt is a
    background image. A data.yaml that names the split's folder, or a txt file listing its images
    (Ultralytics' autosplit), decides instead (_yaml_split). Image ids are positions in sorted file
    order (in the listed order for a file list)."""
    splits = (split, "valid") if split == "val" else (split,)
    named = _yaml_split(folder, split)
    if named and named[0] == "files":  # data.yaml lists the split's images: each has its label file
        files = named[1]
        label_dir = os.path.dirname(_labels_path(files[0]))  # where a names file may sit too
        unlabelled = [f for f in files if not os.path.exists(_labels_path(f))]
        if unlabelled:  # background images, as in Ultralytics; but a wrong list would look the same
            warnings.warn(f"{folder}: {len(unlabelled)} of the {len(files)} {split} images data.yaml lists have no "
                          f"label file (e.g. {_labels_path(unlabelled[0])}): read as background images")
        return _yolo_dataset(folder, split, [(f, _labels_path(f)) for f in files],
                             label_dir if os.path.isdir(label_dir) else folder)
    from_yaml = named[1] if named else None  # (images, labels) folders named by data.yaml, or None
    looked = (([from_yaml[1]] if from_yaml else []) + [os.path.join(folder, "labels", s) for s in splits]
              + [os.path.join(folder, s, "labels") for s in splits]
              + [os.path.join(folder, "labels"), os.path.join(folder, f"obj_{split}_data"),
                 os.path.join(folder, "obj_train_data")])
    label_dir = next((d for d in looked if os.path.isdir(d) and any(f.endswith(".txt") and not _is_names_file(f)
                                                                    for f in os.listdir(d))), None)
    if label_dir is None:
        shown = ", ".join(os.path.relpath(d, folder) + "/" for d in dict.fromkeys(looked))
        raise NoLabelFiles(f"{folder}: no YOLO label files, an empty split '{split}' (looked in {shown}): put one "
                         f"`class cx cy w h` txt per image there")
    # A val split read from labels that are not the val split's own (labels/, obj_train_data/) is
    # the training images again: said, as a COCO folder with a train split alone says it.
    own_dirs = (([from_yaml[1]] if from_yaml else []) + [os.path.join(folder, "labels", s) for s in splits]
                + [os.path.join(folder, s, "labels") for s in splits] + [os.path.join(folder, f"obj_{split}_data")])
    if split == "val" and label_dir not in own_dirs:
        warnings.warn(f"{folder} has no val split: its {os.path.relpath(label_dir, folder)}/ labels serve as val, so "
                      f"an AP is measured on the training images")
    stems = sorted(f[:-4] for f in os.listdir(label_dir) if f.endswith(".txt") and not _is_names_file(f))
    split_dirs = (([from_yaml[0]] if from_yaml else []) + [os.path.join(folder, "images", s) for s in splits]
                  + [os.path.join(folder, s, "images") for s in splits])  # image folders of this split alone
    candidates = [images_dir] if images_dir else (
        split_dirs + [os.path.join(folder, "images"), label_dir,
                      os.path.join(os.path.dirname(os.path.abspath(folder)), "images")])
    # Each folder listed once: stem -> image file, whatever the case of its extension (cameras write
    # IMG_0001.JPG, and on Linux exists("IMG_0001.jpg") is False); IMAGE_EXTENSIONS' order decides
    # between a.jpg and a.png.
    def image_files(d):
        ext = lambda f: os.path.splitext(f)[1].lower()
        files = sorted(f for f in os.listdir(d) if ext(f) in IMAGE_EXTENSIONS) if os.path.isdir(d) else []
        found = {}
        for f in sorted(files, key=lambda f: IMAGE_EXTENSIONS.index(ext(f))):
            found.setdefault(os.path.splitext(f)[0], os.path.join(d, f))
        return found
    images_of = {d: image_files(d) for d in dict.fromkeys(candidates)}
    # An image without a label file is a background image (no object), as in Ultralytics' layout,
    # where such images teach the model what not to detect. They are taken from the folder that
    # holds the split's labelled images when that folder is the split's own: one shared by the
    # splits (images/ beside labels/train/ and labels/val/) cannot say which split they are in.
    home = next((d for d in candidates if stems[0] in images_of[d]), None)
    shared = os.path.join(folder, "images")  # the split's own only when the labels have no splits either
    own = [images_dir] if images_dir else (
        split_dirs + [label_dir] + ([shared] if label_dir == os.path.join(folder, "labels") else []))
    if home in own:
        stems = sorted(set(stems) | set(images_of[home]))
    pairs = []  # (image file, its label file, which may not exist: a background image)
    for stem in stems:
        path = os.path.join(label_dir, stem + ".txt")
        file = next((images_of[d][stem] for d in candidates if stem in images_of[d]), None)
        if file is None:
            raise FileNotFoundError(f"{path}: no image {stem}.jpg/.png in {candidates}: put the image in one of "
                                    f"those folders, or remove the label file")
        pairs.append((file, path))
    return _yolo_dataset(folder, split, pairs, label_dir)


def _yolo_dataset(folder, split, pairs, label_dir):
    """(image file, label file) pairs -> Dataset; a missing label file is a background image.
    Image ids are positions in `pairs`; names come from the folder (see _yolo_names)."""
    names = _yolo_names(folder, label_dir)
    records = []
    bad_count, total, examples, look_like_pixels = 0, 0, [], False  # bad boxes of the whole split
    for image_id, (file, path) in enumerate(pairs):
        width, height = _image_size(file, "remove it" + (f" and its label {path}" if os.path.exists(path) else ""))
        rows, line_numbers = _read_yolo_txt(path) if os.path.exists(path) else (np.zeros((0, 5)), [])
        cls = rows[:, 0].astype(np.int64)
        outside = np.nonzero((cls < 0) | (cls >= len(names)))[0]
        if len(outside):
            raise ValueError(f"{path}:{line_numbers[outside[0]]}: class {cls[outside[0]]} is outside "
                             f"0..{len(names) - 1}: fix the file or the names file")
        cxcywh = rows[:, 1:] * np.array([width, height, width, height])
        xyxy = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
        # cx 0.03 with w 0.3 reaches 12% past the left edge, yet every number is in 0..1: such a box
        # is clipped, not dropped as far outside.
        framed = ((rows[:, 1:] >= 0) & (rows[:, 1:] <= 1)).all(1)
        keep = _clean_boxes(xyxy, [width] * len(cls), [height] * len(cls), framed)
        total += len(keep)
        for j in np.nonzero(~keep)[0]:
            bad_count += 1
            look_like_pixels = look_like_pixels or bool((rows[j, 1:] > 1).any())
            if len(examples) < 3:
                examples.append(f"{path}:{line_numbers[j]} cx cy w h = {_numbers(rows[j, 1:])}")
        records.append(dict(file=file, image_id=image_id, width=width, height=height,
                            boxes=xyxy[keep].astype(np.float32), labels=cls[keep]))
    if not records:
        raise ValueError(f"{folder}: split '{split}' is empty: add images and labels")
    if bad_count:
        hint = ("YOLO coordinates must be normalized to 0..1 (these look like pixels): divide cx and w by the image "
                "width, cy and h by its height. ") if look_like_pixels else ""
        _warn_bad_boxes(label_dir, bad_count, total, examples, hint)
    return Dataset(records, names, list(range(len(names))), folder)


def open_dataset(path, split, images_dir=None):
    """path: "shapes" (built-in set, generated into data_cache/shapes on first use), a COCO folder
    (annotations/instances_<split>.json, or COCO's own instances_<split>2017.json / 2014.json,
    + images; or Roboflow's <split>/_annotations.coco.json; a train split alone is val too), a
    COCO json file, or a YOLO folder."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if path == "shapes":
        path = os.path.join(ROOT, "data_cache", "shapes")
        if not os.path.exists(os.path.join(path, "annotations", f"instances_{split}.json")):
            make_shapes(path)
    if os.path.isfile(path) and path.lower().endswith((".yaml", ".yml")):
        raise ValueError(f"{path} is a yaml file: give the dataset folder that holds data.yaml "
                         f"({os.path.dirname(os.path.abspath(path))}), not the yaml file")
    if os.path.isfile(path):
        # A json file is one split whichever is asked for, so its images are looked for under the
        # split its own name says (instances_val2017.json -> val2017/), never under `split`'s:
        # train/ and val/ may hold files of the same names (the shapes set does).
        own = next((s for s in ("train", "val", "test") if s in os.path.basename(path)), None)
        return read_coco(path, images_dir, own)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset {path} does not exist: give 'shapes', a COCO folder, a COCO json "
                                f"or a YOLO folder")
    # The COCO download names its files by year (instances_train2017.json beside train2017/),
    # so a folder laid out as YOLOX and effdet expect opens as it is.
    names = [f"instances_{split}.json", f"instances_{split}2017.json", f"instances_{split}2014.json"]
    for name in names:
        coco_json = os.path.join(path, "annotations", name)
        if os.path.exists(coco_json):
            return read_coco(coco_json, images_dir, split)
    # Roboflow's COCO export: train/, valid/ (and test/), each an _annotations.coco.json among its images.
    for folder in ((split, "valid") if split == "val" else (split,)):
        coco_json = os.path.join(path, folder, "_annotations.coco.json")
        if os.path.exists(coco_json):
            return read_coco(coco_json, images_dir, split)
    # A train split alone serves as val too, as one json does, with a warning: an AP measured
    # on the training images says little about new ones.
    if split == "val":
        alone = f"{path} has no val split: its train split serves as val, so an AP is measured on the training images"
        for name in ("instances_train.json", "instances_train2017.json", "instances_train2014.json"):
            if os.path.exists(os.path.join(path, "annotations", name)):
                warnings.warn(alone)
                return read_coco(os.path.join(path, "annotations", name), images_dir, "train")
        if os.path.exists(os.path.join(path, "train", "_annotations.coco.json")):
            warnings.warn(alone)
            return read_coco(os.path.join(path, "train", "_annotations.coco.json"), images_dir, "train")
    if os.path.basename(os.path.normpath(path)) == "annotations" and not os.path.isdir(
            os.path.join(path, "annotations")):
        raise FileNotFoundError(f"{path} is the annotations folder of a COCO dataset: give the dataset folder "
                                f"above it, {os.path.dirname(os.path.abspath(path))}, or one json in it")
    if os.path.isdir(os.path.join(path, "annotations")):
        found = sorted(f for f in os.listdir(os.path.join(path, "annotations")) if f.endswith(".json"))
        raise FileNotFoundError(f"{os.path.join(path, 'annotations')} has no '{split}' split: looked for "
                                f"{', '.join(names)}; found {', '.join(found) or 'no json'}. Rename one, or "
                                f"point to the json file itself")
    top = os.listdir(path)
    jsons = sorted(f for f in top if f.endswith(".json"))
    if jsons and "labels" not in top and not any(f.startswith("obj_") for f in top):
        # Neither layout, but a json right here: most likely a COCO file without annotations/.
        raise FileNotFoundError(f"{path} is not a COCO folder (no annotations/) nor a YOLO one (no labels/); "
                                f"it holds {', '.join(jsons)}: point to the annotation json itself")
    try:
        return read_yolo(path, split, images_dir)
    except NoLabelFiles:
        # No YOLO labels anywhere, but xml files: Pascal VOC's layout (Annotations/*.xml beside
        # JPEGImages/), a third format, not read here. (Asked only now: a YOLO set converted in
        # place may keep its xml files, and it reads as YOLO.)
        voc = os.path.join(path, "Annotations") if os.path.isdir(os.path.join(path, "Annotations")) else path
        if any(f.endswith(".xml") for f in os.listdir(voc)):
            raise FileNotFoundError(f"{path} looks like Pascal VOC (xml annotations in {voc}), which is not read "
                                    f"here: convert it to a COCO json or YOLO txt labels first (most labelling tools "
                                    f"export both)") from None
        raise


# ----------------------------------------------------------------------------------------------
# The built-in shapes set
# ----------------------------------------------------------------------------------------------
SHAPE_NAMES = ["circle", "square", "triangle", "star", "cross", "ring"]
SHAPE_CAT_IDS = [1, 3, 5, 7, 9, 11]  # not contiguous on purpose: exercises the id <-> label map


def _shape_polygon(kind, cx, cy, r, angle, aspect):
    """Outline points of a shape of radius r (None for circle / ring, drawn as ellipses)."""
    if kind == "square":
        t = np.array([45, 135, 225, 315]) * math.pi / 180
        rad = np.full(4, r)
    elif kind == "triangle":
        t = np.array([90, 210, 330]) * math.pi / 180
        rad = np.full(3, r)
    elif kind == "star":
        t = np.arange(10) * math.pi / 5 + math.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    elif kind == "cross":  # a plus sign with arms of width 0.36 r
        a = 0.36
        x = np.array([a, a, 1, 1, a, a, -a, -a, -1, -1, -a, -a])
        y = np.array([1, a, a, -a, -a, -1, -1, -a, -a, a, a, 1])
        t, rad = np.arctan2(y, x), np.hypot(x, y) * r / math.sqrt(2) * 1.3
    else:
        return None
    t = t + angle
    return list(zip((cx + rad * np.cos(t) * aspect).tolist(), (cy - rad * np.sin(t)).tolist()))


def _draw_shape(draws, kind, cx, cy, r, angle, aspect, colour, instance):
    """Draw one shape into the picture and into the instance mask (same geometry)."""
    for draw, fill in zip(draws, (colour, instance)):
        if kind in ("circle", "ring"):
            box = [cx - r * aspect, cy - r, cx + r * aspect, cy + r]
            if kind == "ring":
                draw.ellipse(box, outline=fill, width=max(2, int(r * 0.3)))
            else:
                draw.ellipse(box, fill=fill)
        else:
            draw.polygon(_shape_polygon(kind, cx, cy, r, angle, aspect), fill=fill)


def _background(rng, h, w):
    """Textured background: a colour gradient + blotchy low-frequency noise + pixel noise + lines."""
    base = rng.uniform(30, 225, 3)
    ramp = rng.uniform(-60, 60, 3)
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    low = rng.normal(0, rng.uniform(5, 25), (h // 32 + 2, w // 32 + 2, 3)).astype(np.float32)
    low = np.asarray(Image.fromarray(low[..., 0]).resize((w, h), Image.BILINEAR))[..., None] + \
        np.asarray(Image.fromarray(low[..., 1]).resize((w, h), Image.BILINEAR))[..., None] * np.array([0, 1, 0.5])
    img = base + ramp * t + low + rng.normal(0, rng.uniform(2, 10), (h, w, 3))
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 6)):  # distractor lines: edges that are not objects
        xy = rng.uniform(0, 1, 4) * [w, h, w, h]
        draw.line(xy.tolist(), fill=tuple(rng.integers(0, 256, 3).tolist()), width=int(rng.integers(1, 4)))
    return img, base


def _shapes_image(rng, h, w):
    """One picture and its COCO annotations (bbox xywh from the *visible* pixels, so occlusion counts)."""
    img, base = _background(rng, h, w)
    mask = Image.new("L", (w, h), 0)
    draws = (ImageDraw.Draw(img), ImageDraw.Draw(mask))
    objects = []  # (kind index, is_crowd)
    placed = np.zeros((0, 4))  # xyxy of the shapes drawn so far
    n = 0 if rng.random() < 0.05 else int(rng.integers(1, 9))
    for _ in range(n):
        r = math.exp(rng.uniform(math.log(6), math.log(0.45 * min(h, w))))  # 12 px .. 90% of the short side
        aspect = rng.uniform(0.8, 1.25)
        # Partial occlusion, not burial: a shape whose box would be more than a third covered by
        # (or cover a third of) one already drawn is moved, up to 10 tries, else left out. A
        # fragment of a star that looks like a triangle would be a label no detector can learn.
        for _try in range(10):
            cx, cy = rng.uniform(-0.2 * r, w + 0.2 * r), rng.uniform(-0.2 * r, h + 0.2 * r)  # may be cut by the border
            box = np.array([cx - r * aspect, cy - r, cx + r * aspect, cy + r])
            iw = np.clip(np.minimum(placed[:, 2], box[2]) - np.maximum(placed[:, 0], box[0]), 0, None)
            ih = np.clip(np.minimum(placed[:, 3], box[3]) - np.maximum(placed[:, 1], box[1]), 0, None)
            smaller = np.minimum((placed[:, 2] - placed[:, 0]) * (placed[:, 3] - placed[:, 1]),
                                 (box[2] - box[0]) * (box[3] - box[1]))
            if not len(placed) or (iw * ih / smaller).max() < 0.33:
                break
        else:
            continue
        placed = np.concatenate([placed, box[None]])
        colour = rng.integers(0, 256, 3)
        while np.abs(colour - base).sum() < 120:  # keep enough contrast with the background
            colour = rng.integers(0, 256, 3)
        kind = int(rng.integers(0, 6))
        objects.append((kind, False))
        _draw_shape(draws, SHAPE_NAMES[kind], cx, cy, r, rng.uniform(0, 2 * math.pi), aspect,
                    tuple(colour.tolist()), len(objects))
    if rng.random() < 0.06:  # a crowd: a tight cluster of tiny shapes of one class, one iscrowd box
        kind = int(rng.integers(0, 6))
        gx, gy = rng.uniform(0.1, 0.7) * w, rng.uniform(0.1, 0.7) * h
        colour = tuple(rng.integers(0, 256, 3).tolist())
        objects.append((kind, True))
        for _ in range(int(rng.integers(8, 16))):
            _draw_shape(draws, SHAPE_NAMES[kind], gx + rng.uniform(0, 0.25 * w), gy + rng.uniform(0, 0.25 * h),
                        rng.uniform(3, 5), rng.uniform(0, 6.3), 1.0, colour, len(objects))
    m = np.asarray(mask)
    anns = []
    for k, (kind, crowd) in enumerate(objects, 1):
        ys, xs = np.nonzero(m == k)
        if len(xs) < 25:  # fully hidden or cut away
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        anns.append(dict(bbox=[x0, y0, x1 - x0, y1 - y0], area=float(len(xs)), iscrowd=int(crowd),
                         category_id=SHAPE_CAT_IDS[kind], segmentation=[[x0, y0, x1, y0, x1, y1, x0, y1]]))
    return img, anns


def make_shapes(out, num_train=1000, num_val=200, seed=0):
    """Write the built-in shapes set (COCO layout) to `out`: annotations/instances_{train,val}.json,
    train/*.jpg, val/*.jpg. Deterministic in `seed`. Built in a temp folder and renamed, so a
    half-built set is never seen; if another process finished first, its copy is kept."""
    if num_train < 1 or num_val < 1:  # train.py needs images in both splits: refuse such a set here
        raise ValueError(f"the shapes set needs at least 1 train and 1 val image, got --num_train {num_train} "
                         f"--num_val {num_val}: give 1 or more for each")
    out = os.path.abspath(out)
    if os.path.exists(os.path.join(out, "annotations", "instances_val.json")):
        return out
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"{out} exists but is not a complete shapes set: delete it and run again")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".shapes-", dir=os.path.dirname(out))
    try:
        os.makedirs(os.path.join(tmp, "annotations"))
        categories = [dict(id=c, name=n, supercategory="shape") for c, n in zip(SHAPE_CAT_IDS, SHAPE_NAMES)]
        for split, count, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
            rng = np.random.default_rng(split_seed)
            os.makedirs(os.path.join(tmp, split))
            images, annotations = [], []
            for i in range(count):
                w, h = int(rng.integers(6, 10)) * 32, int(rng.integers(5, 8)) * 32  # 192..288 x 160..224
                img, anns = _shapes_image(rng, h, w)
                name = f"{i:06d}.jpg"
                img.save(os.path.join(tmp, split, name), quality=int(rng.integers(75, 95)))
                images.append(dict(id=i + 1, file_name=name, width=w, height=h))
                for a in anns:
                    annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, **a))
            with open(os.path.join(tmp, "annotations", f"instances_{split}.json"), "w") as f:
                json.dump(dict(info=dict(description=f"plaindet shapes, seed {seed}"), images=images,
                               annotations=annotations, categories=categories), f)
        if os.path.exists(out):
            os.rmdir(out)  # empty (checked above)
        try:
            os.rename(tmp, out)
        except OSError:
            if not os.path.exists(os.path.join(out, "annotations", "instances_val.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------
class _Decoded(torch.utils.data.Dataset):
    """What the workers run: decode (optionally shrink) one item."""

    def __init__(self, dataset, max_side):
        self.dataset, self.max_side = dataset, max_side

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if hasattr(self.dataset, "load"):
            return self.dataset.load(i, self.max_side)
        d = self.dataset[i]
        return d["image"], d["boxes"], d["labels"], d["image_id"], (1.0, 1.0)


class _Collate:
    """Pads a list of decoded items into one batch (a class rather than a closure, so workers can
    pickle it): images top-left in a grey (114) canvas, targets padded to max_boxes with a validity mask. A batch
    with an image of more boxes pads to that image's count instead: a box dropped for want of
    room would leave its object in the pixels, to be learned as background."""

    def __init__(self, max_boxes):
        self.max_boxes = max_boxes

    def __call__(self, items):
        b, m = len(items), max([self.max_boxes] + [len(it[2]) for it in items])
        hc, wc = max(it[0].shape[0] for it in items), max(it[0].shape[1] for it in items)
        images = torch.full((b, 3, hc, wc), PAD_VALUE, dtype=torch.uint8)  # planar, as the warp reads it
        boxes, labels = torch.zeros(b, m, 4), torch.full((b, m), -1, dtype=torch.int64)
        valid = torch.zeros(b, m, dtype=torch.bool)
        for i, (image, bx, lb, _, _) in enumerate(items):
            images[i, :, :image.shape[0], :image.shape[1]] = torch.from_numpy(image).permute(2, 0, 1)  # HWC -> CHW
            n = len(lb)
            boxes[i, :n] = torch.from_numpy(bx)
            labels[i, :n] = torch.from_numpy(lb)
            valid[i, :n] = True
        return dict(images=images,
                    sizes=torch.tensor([it[0].shape[:2] for it in items], dtype=torch.int64).reshape(b, 2),
                    boxes=boxes, labels=labels, valid=valid,
                    image_ids=torch.tensor([int(it[3]) for it in items], dtype=torch.int64),
                    scales=torch.tensor([it[4] for it in items], dtype=torch.float32).reshape(b, 2))


def _seed_worker(worker_id):
    # torch seeds each worker from the loader's generator; numpy gets the same seed so any numpy
    # randomness a user adds in a dataset is reproducible too.
    np.random.seed(torch.initial_seed() % 2**32)
    # Ctrl-C reaches every process of the terminal's group, workers included. It is the main
    # process's to handle (train.py finishes the step and saves); a worker killed by it would
    # break the batch stream under that last step, or under an evaluation still running.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers():
    """Decode workers per process when none are asked for. JPEG decoding is the CPU's share of
    the work: next to a GPU it has to keep up with the model, so it gets this machine's cores,
    shared among the processes torchrun starts here (at most 8 each); on a CPU-only machine the
    model needs the cores itself, so 2."""
    if not torch.cuda.is_available():
        return 2
    per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, per_process))


def make_loader(dataset, batch_size, shuffle, workers, seed, max_boxes=100, drop_last=False, distributed=False,
                max_side=None, pin_memory=False, skip_batches=0):
    """DataLoader whose batches are dicts of CPU tensors:
    images uint8 [B, 3, Hc, Wc] (each image top-left in a canvas filled with 114), sizes int64 [B, 2]
    (h, w), boxes float32 [B, M, 4] xyxy canvas px, labels int64 [B, M] (-1: crowd / ignore, and
    also in padding slots; valid tells them apart), valid bool
    [B, M], image_ids int64 [B], scales float32 [B, 2] ((x, y) canvas px per original px; != 1 only
    when a worker shrank an image whose longer side was above max_side). M = max_boxes, or the
    batch's most boxes in one image where that is more (none is dropped).
    Same seed -> same order. Under torchrun (distributed=True) each process gets its own share
    (DistributedSampler, seeded by `seed`: give a new seed each epoch for a new order).
    skip_batches: start at that batch of the order, as a run resumed mid-epoch does."""
    if distributed:
        order = list(torch.utils.data.distributed.DistributedSampler(dataset, shuffle=shuffle, seed=seed,
                                                                     drop_last=drop_last))
    elif shuffle:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        order = list(range(len(dataset)))
    # The order is written out rather than left to a sampler, so that skipping the first batches
    # costs nothing: a sampler would have to be run, and the batches decoded, to get past them.
    order = order[skip_batches * batch_size:]
    return torch.utils.data.DataLoader(
        _Decoded(dataset, max_side), batch_size=batch_size, sampler=order, num_workers=workers,
        collate_fn=_Collate(max_boxes), drop_last=drop_last, generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_seed_worker, pin_memory=pin_memory, persistent_workers=workers > 0)


def batches(loader):
    """The loader's batches, with an unreadable image reported in one line.

    decode_image raises a DataLoadError that names the file and the fix. Raised inside a worker
    process, it reaches us with the worker's traceback as its text ("Caught DataLoadError in
    DataLoader worker process 0. Original Traceback ... data.DataLoadError: image x.jpg cannot be
    decoded ..."); decode_image's own words are the last line, which is all that is kept. Other
    errors (a bug, a full /dev/shm) pass through unchanged: they are not the data's fault."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except DataLoadError as e:
            last = str(e).strip().splitlines()[-1]
            raise DataLoadError(last.split("DataLoadError: ", 1)[-1]) from None
        yield batch


def to_device(t, device):
    """A CPU tensor onto `device` without making the CPU wait for the GPU.

    A plain t.to("cuda") from ordinary (pageable) memory first waits for every kernel already
    queued on the GPU, so each small matrix or index sent during a training step would stall the
    CPU until the GPU ran dry, and the GPU would then idle while Python queues the next kernels.
    Copied from pinned (page-locked) memory with non_blocking=True, the copy simply joins the
    queue; PyTorch's pinned allocator keeps the staging buffer alive until the copy has run.
    Contiguous first: from a strided tensor (a column, say) PyTorch would build a contiguous copy
    in ordinary memory and send that, which is the slow path again. Other devices (the tests use
    "meta") get the same non-blocking copy without the pinning. On a CPU this is t.to(device)."""
    device = torch.device(device)
    if t.device.type != "cpu" or device.type == "cpu":
        return t.to(device)
    if device.type == "cuda":
        t = t.contiguous().pin_memory()
    return t.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# Augmentation: geometry as one 3x3 matrix per image (source px -> output px)
# ----------------------------------------------------------------------------------------------
def _device_of(generator):
    """Random draws happen on the generator's device (a CUDA generator draws on the GPU) and the
    small results come back to the CPU, where the matrices are built in float64."""
    return generator.device if generator is not None else None


def _eye(b):
    return torch.eye(3, dtype=torch.float64).repeat(b, 1, 1)


def crop_matrices(sizes, input_shape, random_crop_mode, generator, scale_min=0.1):
    """Scale + translate per image for a crop mode. sizes: [B, 2] (h, w) of the real images.
    scale_min: the smallest factor of mode > 1 (Megvii's mosaic_scale: 0.1 for yolox_s and
    larger, 0.5 for nano / tiny, whose few channels learn little from tiny objects).
    Returns [B, 3, 3] float64 mapping source px -> output px.
      0       letterbox: aspect-preserving resize to fit, top-left, pad right / bottom
      (0, 1)  random resized crop: area fraction in (mode, 1), aspect ratio in (3/4, 4/3) x the
              target's W / H, stretched to fit (a crop too wide or tall for the image shrinks,
              keeping its aspect: the area may then be below mode)
      1       random largest crop: the smallest scale at which the image covers the whole output
              (no padding), at a random position
      > 1     random scale: factor in [scale_min, mode] of the letterbox size, random crop or pad."""
    hh, ww = float(input_shape[0]), float(input_shape[1])
    h, w = sizes[:, 0].double().cpu(), sizes[:, 1].double().cpu()
    b = len(sizes)
    m = _eye(b)
    u = torch.rand(b, 4, generator=generator, dtype=torch.float64, device=_device_of(generator)).cpu()
    if random_crop_mode == 0:
        s = torch.minimum(hh / h, ww / w)
        sx = sy = s
        tx = ty = torch.zeros(b, dtype=torch.float64)
    elif random_crop_mode < 1:
        area = h * w * (random_crop_mode + (1 - random_crop_mode) * u[:, 0])
        ratio = torch.exp(math.log(3 / 4) + u[:, 1] * math.log(16 / 9)) * (ww / hh)  # crop w / h, around the target's
        cw, ch = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        # A crop larger than the image on a side shrinks as a whole, keeping its aspect ratio (a
        # panorama is then cropped, not squashed); its area drops below the drawn one.
        fit = torch.minimum(torch.ones_like(cw), torch.minimum(w / cw, h / ch))
        cw, ch = cw * fit, ch * fit
        x0, y0 = u[:, 2] * (w - cw), u[:, 3] * (h - ch)
        sx, sy = ww / cw, hh / ch
        tx, ty = -x0 * sx, -y0 * sy
    else:
        s = torch.maximum(hh / h, ww / w) if random_crop_mode == 1 else \
            torch.minimum(hh / h, ww / w) * (scale_min + u[:, 0] * (random_crop_mode - scale_min))
        sx = sy = s
        # one formula for crop (negative room) and pad (positive room): offset uniform in [0, room]
        tx, ty = u[:, 2] * (ww - s * w), u[:, 3] * (hh - s * h)
    m[:, 0, 0], m[:, 1, 1], m[:, 0, 2], m[:, 1, 2] = sx, sy, tx, ty
    return m


def flip_matrices(flip, width):
    """Horizontal flip in output px: x -> W - x where flip is True. flip: bool [B]."""
    m = _eye(len(flip))
    m[flip, 0, 0] = -1
    m[flip, 0, 2] = float(width)
    return m


GEOMETRIC_OPS = ["rotate", "shear_x", "shear_y", "translate_x", "translate_y", "scale"]
COLOUR_OPS = ["contrast", "brightness", "color", "sharpness", "posterize", "solarize", "equalize", "autocontrast"]
RANDAUGMENT_OPS = ["identity"] + GEOMETRIC_OPS + COLOUR_OPS


def randaugment_matrices(ops, signs, magnitude, input_shape):
    """RandAugment's positional ops as [B, 3, 3] matrices about the output centre.
    ops: int64 [B, L] indices into RANDAUGMENT_OPS; signs: [B, L] of +-1. Magnitude m gives
    rotate 3m deg, shear 0.03m, translate 0.045m of the size, scale 1 +- 0.05m."""
    hh, ww = float(input_shape[0]), float(input_shape[1])
    b, n_layers = ops.shape
    m = _eye(b)
    centre, uncentre = _eye(1), _eye(1)
    centre[0, :2, 2] = torch.tensor([-ww / 2, -hh / 2], dtype=torch.float64)
    uncentre[0, :2, 2] = torch.tensor([ww / 2, hh / 2], dtype=torch.float64)
    for layer in range(n_layers):  # a loop over the (2) layers, never over images
        op, v = ops[:, layer], signs[:, layer].double() * magnitude
        a = _eye(b)
        rot = (op == RANDAUGMENT_OPS.index("rotate"))
        angle = v * 3 * math.pi / 180
        a[rot, 0, 0], a[rot, 0, 1] = torch.cos(angle[rot]), -torch.sin(angle[rot])
        a[rot, 1, 0], a[rot, 1, 1] = torch.sin(angle[rot]), torch.cos(angle[rot])
        sel = op == RANDAUGMENT_OPS.index("shear_x")
        a[sel, 0, 1] = 0.03 * v[sel]
        sel = op == RANDAUGMENT_OPS.index("shear_y")
        a[sel, 1, 0] = 0.03 * v[sel]
        sel = op == RANDAUGMENT_OPS.index("translate_x")
        a[sel, 0, 2] = 0.045 * v[sel] * ww
        sel = op == RANDAUGMENT_OPS.index("translate_y")
        a[sel, 1, 2] = 0.045 * v[sel] * hh
        sel = op == RANDAUGMENT_OPS.index("scale")
        a[sel, 0, 0] = a[sel, 1, 1] = 1 + 0.05 * v[sel]
        m = uncentre @ a @ centre @ m
    return m


def transform_boxes(boxes, valid, matrices, input_shape, min_size=2.0, max_aspect=20.0, min_area_kept=0.15,
                    clip_to=None):
    """Move boxes by their 4 corners -> enclosing box -> clip -> drop degenerate ones. A rotation
    or shear makes the box larger than the object (the hull of a turned rectangle, and objects
    are not rectangles), and clipping the hull rather than the turned shape adds to that, as in
    YOLOX and keras_cv_attention_models; the larger the angle, the looser the box.
    boxes: [B, M, 4] xyxy; matrices: [B, 3, 3] (or [B, 2, 3]) source px -> output px;
    clip_to: optional [B, M, 4] xyxy region per box (default the whole output).
    Drops boxes under min_size px a side, thinner than 1:max_aspect, or with less than
    min_area_kept of their moved, unclipped enclosing box left inside. Returns (boxes [B, M, 4],
    zeros where dropped; valid [B, M])."""
    mat = matrices[:, :2].to(boxes.dtype)
    x0, y0, x1, y1 = boxes.unbind(-1)
    corners = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1), torch.stack([x0, y1], -1),
                           torch.stack([x1, y1], -1)], -2)  # [B, M, 4, 2]
    moved = torch.einsum("bij,bmkj->bmki", mat[:, :, :2], corners) + mat[:, None, None, :, 2]
    lo, hi = moved.min(-2).values, moved.max(-2).values  # [B, M, 2]
    full_area = (hi - lo).prod(-1)
    if clip_to is None:
        limit = to_device(torch.tensor([float(input_shape[1]), float(input_shape[0])], dtype=boxes.dtype), boxes.device)
        lo_c, hi_c = lo.clamp(min=0), torch.minimum(hi, limit)
    else:
        lo_c, hi_c = torch.maximum(lo, clip_to[..., :2]), torch.minimum(hi, clip_to[..., 2:])
    wh = hi_c - lo_c
    keep = valid & (wh >= min_size).all(-1) & (wh.max(-1).values <= max_aspect * wh.min(-1).values) & \
        (wh.clamp(min=0).prod(-1) >= min_area_kept * full_area)
    out = torch.cat([lo_c, hi_c], -1) * keep[..., None]
    return out, keep


def _to_theta(matrices, canvas_hw, input_shape):
    """Output px -> source px matrices [B, 3, 3] as affine_grid's normalized theta [B, 2, 3]
    (align_corners=False: normalized -1..1 spans the pixel edges 0..size)."""
    hc, wc = canvas_hw
    hh, ww = input_shape
    to_norm = torch.tensor([[2 / wc, 0, -1], [0, 2 / hc, -1], [0, 0, 1]], dtype=torch.float64)
    from_norm = torch.tensor([[ww / 2, 0, ww / 2], [0, hh / 2, hh / 2], [0, 0, 1]], dtype=torch.float64)
    return (to_norm @ matrices @ from_norm)[:, :2].float()


def warp(images, theta, input_shape, mode="bilinear"):
    """grid_sample for a batch (or a chunk of one). images uint8 [n, 3, Hc, Wc] (canvas padding 114);
    theta: [n, 2, 3] normalized output -> input coordinates (see _to_theta). Returns float32
    [n, 3, H, W] in 0..255 MINUS 114, so that zero padding is the grey pad value once 114 is added
    back (folded into the colour step)."""
    hh, ww = int(input_shape[0]), int(input_shape[1])
    # The sampling grid is exactly F.affine_grid(theta, (n, 3, H, W), align_corners=False), i.e.
    # theta @ (x_n, y_n, 1) at every output pixel centre; written as two broadcast terms because
    # affine_grid's batched matmul over a [n, H*W, 3] base grid costs more than the sampling on a CPU.
    xs = (torch.arange(ww, device=images.device, dtype=torch.float32) * 2 + 1) / ww - 1  # pixel centres
    ys = (torch.arange(hh, device=images.device, dtype=torch.float32) * 2 + 1) / hh - 1
    row = xs[None, :, None] * theta[:, None, :, 0] + theta[:, None, :, 2]  # [n, W, 2]
    col = ys[None, :, None] * theta[:, None, :, 1]  # [n, H, 2]
    grid = row[:, None] + col[:, :, None]  # [n, H, W, 2], one write
    x = images.float().sub_(PAD_VALUE)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp_region(images, inverse, region, rows, mode="bilinear"):
    """Output pixels region = (y0, y1, x0, x1) of images[rows]: the canvas rectangle those pixels can
    read (their corners through `inverse`, +2 px for the interpolation taps) is cropped first (one
    rectangle, the union over all rows, so the crop stays one slice), so only it is converted to
    float. images uint8 [B, 3, Hc, Wc]; inverse [B, 3, 3] float64 output
    px -> canvas px; rows: a slice or index tensor. Returns float32 [n, 3, y1 - y0, x1 - x0], minus 114."""
    y0, y1, x0, x1 = region
    hc, wc = images.shape[-2:]
    inv = inverse[rows]
    corners = torch.tensor([[x0, x1, x0, x1], [y0, y0, y1, y1], [1, 1, 1, 1]], dtype=torch.float64)
    src = inv[:, :2] @ corners  # [n, 2, 4] canvas px
    lo, hi = src.amin((0, 2)).floor() - 2, src.amax((0, 2)).ceil() + 2
    cx0, cy0 = min(max(int(lo[0]), 0), wc - 1), min(max(int(lo[1]), 0), hc - 1)
    cx1, cy1 = min(max(int(hi[0]), cx0 + 1), wc), min(max(int(hi[1]), cy0 + 1), hc)
    shift_in, shift_out = _eye(1), _eye(1)
    shift_in[0, :2, 2] = torch.tensor([-cx0, -cy0], dtype=torch.float64)
    shift_out[0, :2, 2] = torch.tensor([x0, y0], dtype=torch.float64)
    theta = to_device(_to_theta(shift_in @ inv @ shift_out, (cy1 - cy0, cx1 - cx0), (y1 - y0, x1 - x0)), images.device)
    if isinstance(rows, torch.Tensor):
        rows = to_device(rows, images.device)
    return warp(images[:, :, cy0:cy1, cx0:cx1][rows], theta, (y1 - y0, x1 - x0), mode)


# ----------------------------------------------------------------------------------------------
# Mosaic, per batch: a plan (split point + which image fills each quadrant), then boxes and pixels.
# This is keras_cv_attention_models' batch mosaic: with probability mosaic_mix_prob the whole batch
# is mixed, each quadrant showing the same region of another image at the same place and scale.
# It is not YOLOX's Mosaic (per image, four whole images rescaled around a random centre of a 2x
# canvas, then a random affine): objects keep their size here, and each output shows one
# quadrant-shaped region from each of four sources (not always different ones).
# ----------------------------------------------------------------------------------------------
def mosaic_plan(b, h, w, generator, split_range=(0.25, 0.75)):
    """One random split point (cy, cx) for the batch, returned as (regions, src): regions are the 4
    quadrants (y0, y1, x0, x1) in output px, TL, TR, BL, BR; src [B, 4] int64. Output i shows, in
    quadrant q, the same region of image src[i, q], at the same place and scale. One permutation
    of the batch per quadrant (src[:, q]), so each image's region q appears exactly once; an
    output may show itself, or one source twice."""
    u = torch.rand(2, generator=generator, device=_device_of(generator)).cpu()
    cy = int(round(h * (split_range[0] + (split_range[1] - split_range[0]) * float(u[0]))))
    cx = int(round(w * (split_range[0] + (split_range[1] - split_range[0]) * float(u[1]))))
    src = torch.stack([torch.randperm(b, generator=generator, device=_device_of(generator)).cpu() for _ in range(4)], 1)
    regions = [(0, cy, 0, cx), (0, cy, cx, w), (cy, h, 0, cx), (cy, h, cx, w)]  # (y0, y1, x0, x1)
    return regions, src


def mosaic_boxes(boxes, labels, valid, plan, min_area_kept=0.15):
    """Boxes of the mosaicked batch: each quadrant takes its source's boxes cut to the quadrant,
    filtered like any crop. boxes [B, M, 4] -> [B, M', 4], survivors first, M' = M or, when the
    four sources leave an output more survivors than that, their number: a box dropped for want
    of room would leave its object in the pixels as background to learn."""
    regions, src = plan
    b, m = boxes.shape[:2]
    src = to_device(src, boxes.device)
    qb, ql, qv = boxes[src].reshape(b, 4 * m, 4), labels[src].reshape(b, 4 * m), valid[src].reshape(b, 4 * m)
    clip = to_device(torch.tensor([[x0, y0, x1, y1] for y0, y1, x0, x1 in regions], dtype=boxes.dtype), boxes.device)
    clip = clip.repeat_interleave(m, 0)[None].expand(b, 4 * m, 4)
    ident = torch.eye(3, dtype=boxes.dtype, device=boxes.device).expand(b, 3, 3)
    h, w = regions[3][1], regions[3][3]
    qb, qv = transform_boxes(qb, qv, ident, (h, w), clip_to=clip, min_area_kept=min_area_kept)
    # Counting survivors is free on the CPU, where train.py keeps the boxes (on a GPU it would wait).
    width = max(m, int(qv.sum(1).max()))
    order = torch.sort(qv.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
    return qb.gather(1, order[..., None].expand(-1, -1, 4)), ql.gather(1, order), qv.gather(1, order)


def mosaic_images(images, plan, rows=slice(None)):
    """Pixels of mosaicked outputs `rows`: four batched slice copies, no loop over images."""
    regions, src = plan
    src = to_device(src[rows], images.device)
    out = torch.empty((len(src),) + tuple(images.shape[1:]), dtype=images.dtype, device=images.device)
    for q, (y0, y1, x0, x1) in enumerate(regions):
        out[:, :, y0:y1, x0:x1] = images[:, :, y0:y1, x0:x1][src[:, q]]  # index the region only
    return out


def mosaic(images, boxes, labels, valid, generator, split_range=(0.25, 0.75), min_area_kept=0.15):
    """2x2 mosaic of a whole batch: images [B, C, H, W], boxes [B, M, 4] -> images of the same shape,
    boxes [B, M', 4] with M' >= M (see mosaic_boxes). augment does not call this (its step 4
    samples each quadrant straight from its source); it is the same mosaic on already-warped
    images, kept as the plain version the tests check augment against."""
    plan = mosaic_plan(len(images), images.shape[2], images.shape[3], generator, split_range)
    return (mosaic_images(images, plan),) + mosaic_boxes(boxes, labels, valid, plan, min_area_kept)


# ----------------------------------------------------------------------------------------------
# Colour: the linear ops (HSV jitter, brightness, colour, contrast) fold into one affine map per
# image, v -> A v + c + D m (m = the image's mean RGB, for contrast); the rest (sharpness,
# posterize, solarize, equalize, autocontrast) run afterwards on the images that drew them.
# They run on the warped output, so the grey (114) padding a letterbox or a small scale leaves
# takes part in the statistics (contrast's mean, equalize's histogram, autocontrast's range),
# where PIL's ops see the picture alone: cheaper, and a slightly weaker op on padded images.
# ----------------------------------------------------------------------------------------------
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
_GREY = _YIQ[0]


def hsv_matrices(gains, generator, b):
    """Random HSV jitter as [B, 3, 3] RGB matrices: hue = rotation of the chroma plane in YIQ,
    saturation = chroma scale, value = overall scale (a linear stand-in for HSV that costs one
    matmul). gains: (hue fraction of a full turn, saturation, value), each drawn in +-gain."""
    u = torch.rand(b, 3, generator=generator, dtype=torch.float64, device=_device_of(generator)).cpu() * 2 - 1
    theta = u[:, 0] * gains[0] * 2 * math.pi
    sat, val = 1 + u[:, 1] * gains[1], 1 + u[:, 2] * gains[2]
    mid = _eye(b)
    mid[:, 1, 1], mid[:, 1, 2] = sat * torch.cos(theta), -sat * torch.sin(theta)
    mid[:, 2, 1], mid[:, 2, 2] = sat * torch.sin(theta), sat * torch.cos(theta)
    return val[:, None, None] * (torch.linalg.inv(_YIQ) @ mid @ _YIQ)


def _blend_matrices(sel, factor):
    """PIL's Color enhance as matrices: blend with the grey image by factor where sel, else identity."""
    f = torch.where(sel, factor, torch.ones_like(factor))[:, None, None]
    return f * _eye(len(sel)) + (1 - f) * _GREY.expand(3, 3)[None]


def colour_affine(ops, factors, hsv, generator):
    """Compose the linear colour ops of each image into (A [B, 3, 3], c [B, 3], D [B, 3, 3]),
    the map v -> A v + c + D m on 0..1 RGB, m = the warped image's mean RGB. Contrast blends towards
    the current image's mean grey g.(A m + c + D m), which is why D exists. c stays 0 for these
    ops (none adds a constant); it keeps the map a general affine one. Clamping between ops is
    skipped (one pass instead of one per op)."""
    b, n_layers = ops.shape
    a, c, d = _eye(b), torch.zeros(b, 3, dtype=torch.float64), torch.zeros(b, 3, 3, dtype=torch.float64)
    ones_grey = torch.ones(3, 1, dtype=torch.float64) @ _GREY[None]  # [3, 3]: v -> (g.v) in every channel
    for layer in range(n_layers):  # a loop over the (2) layers, never over images
        op, f = ops[:, layer], factors[:, layer]
        bright = torch.where(op == RANDAUGMENT_OPS.index("brightness"), f, torch.ones_like(f))[:, None, None]
        mat = bright * _blend_matrices(op == RANDAUGMENT_OPS.index("color"), f)
        a, c, d = mat @ a, (mat @ c[..., None])[..., 0], mat @ d
        fc = torch.where(op == RANDAUGMENT_OPS.index("contrast"), f, torch.ones_like(f))
        fm = fc[:, None, None]
        a, c, d = fm * a, fc[:, None] * c + (1 - fc[:, None]) * (c @ _GREY)[:, None], \
            fm * d + (1 - fm) * ones_grey @ (a + d)
    if hsv:
        mat = hsv_matrices(hsv, generator, b)
        a, c, d = mat @ a, (mat @ c[..., None])[..., 0], mat @ d
    return a, c, d


def _colour_into(out, warped, a, c, d):
    """out [n, 3, H, W] = clamp(A v + c + D m, 0, 1) with v = (warped + 114) / 255; one matmul
    pass plus one in-place pass. a, c, d: float64 on the CPU, for these n images."""
    n, dev = len(warped), warped.device
    bias = to_device((c + (a @ torch.full((n, 3, 1), PAD_VALUE / 255, dtype=torch.float64))[..., 0]).float(), dev)
    if d.any():  # contrast drawn somewhere: its term needs the mean colour, taken where the pixels are
        mean = (warped.mean((2, 3)) + PAD_VALUE) / 255  # [n, 3]; no trip to the CPU and back
        bias = bias + (to_device(d.float(), dev) @ mean[..., None])[..., 0]
    if torch.equal(a, _eye(n)):
        torch.add(warped, 0, out=out).mul_(1 / 255)  # identity colour: skip the matmul
    else:
        torch.bmm(to_device((a / 255).float(), dev), warped.reshape(n, 3, -1), out=out.view(n, 3, -1))
    return out.add_(bias[..., None, None]).clamp_(0, 1)


def _sharpness(x, factor):
    """PIL's sharpness: blend with the smoothed image (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, i.e.
    (3x3 box sum + 4 x centre) / 13, done with separable slice sums: cheaper than a depthwise conv)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    v = p[..., :-2, :] + p[..., 1:-1, :] + p[..., 2:, :]
    blurred = (v[..., :-2] + v[..., 1:-1]).add_(v[..., 2:]).add_(x, alpha=4).div_(13)
    f = factor[:, None, None, None]
    return blurred.mul_(1 - f).add_(x * f).clamp_(0, 1)


def _solarize(x, threshold):
    # lerp with a 0/1 mask: the same as torch.where(x >= t, 1 - x, x), several times faster on a CPU
    return torch.lerp(x, 1 - x, (x >= threshold).to(x.dtype))


def _equalize(x):
    """Per-image, per-channel histogram equalization on [n, 3, H, W] in 0..1, batched. A channel of
    one value stays as it is, as with PIL (the stretch below would send it to 0)."""
    n, c, h, w = x.shape
    q = (x * 255).round_().long().reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float32))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).min(1, keepdim=True).values
    lut = ((cdf - cdf_min) / (h * w - cdf_min).clamp(min=1)).clamp_(0, 1)
    flat = (cdf_min >= h * w).reshape(n, c, 1, 1)  # every pixel in one bin
    return torch.where(flat, x, lut.gather(1, q).reshape(n, c, h, w))


def _autocontrast(x):
    """Stretch each channel of each image to 0..1 (channels with one value stay as they are)."""
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    flat = hi <= lo
    scale = 1 / torch.where(flat, torch.ones_like(hi), hi - lo)  # small [n, 3, 1, 1] tensors
    return (x - torch.where(flat, torch.zeros_like(lo), lo)).mul_(scale)


def _apply_on(x, sel, fn):
    """x[sel] = fn(x[sel], indices): an op on the selected images only (index, not a loop)."""
    idx = sel.nonzero().flatten()  # sel is on the CPU: no wait for the GPU to count the images
    if len(idx):
        idx = to_device(idx, x.device)
        x[idx] = fn(x[idx], idx)
    return x


def _colour_chunk(out, warped, affine, ops, factors, magnitude):
    """Colour for n images: the folded linear map (_colour_into), then each non-linear RandAugment
    op on the images that drew it. ops [n, L], factors [n, L] (enhance factors)."""
    x = _colour_into(out, warped, *affine)
    dev = x.device
    step_q = 2 ** (8 - max(1, 8 - int(round(magnitude * 0.4))))  # posterize: keep 8 - 0.4 m bits
    threshold = 1 - magnitude * 0.09  # solarize: invert above 1 - 0.09 m
    factors = to_device(factors.float(), dev)  # sharpness reads them on the device; one copy for all layers
    for layer in range(ops.shape[1]):
        op, f = ops[:, layer], factors[:, layer]
        _apply_on(x, op == RANDAUGMENT_OPS.index("sharpness"), lambda t, i: _sharpness(t, f[i]))
        # posterize rounds to the 8-bit grid first, as PIL works on uint8: the colour map's
        # (v - 114) / 255 + 114 / 255 leaves pixel 64 as 63.999996 after * 255, which would floor a bucket low
        _apply_on(x, op == RANDAUGMENT_OPS.index("posterize"),
                  lambda t, i: torch.floor(torch.round(t * 255) / step_q) * (step_q / 255))
        _apply_on(x, op == RANDAUGMENT_OPS.index("solarize"), lambda t, i: _solarize(t, threshold))
        _apply_on(x, op == RANDAUGMENT_OPS.index("equalize"), lambda t, i: _equalize(t))
        _apply_on(x, op == RANDAUGMENT_OPS.index("autocontrast"), lambda t, i: _autocontrast(t))
    return x


# ----------------------------------------------------------------------------------------------
# augment: the whole pipeline
# ----------------------------------------------------------------------------------------------
# On a CPU every fresh tensor above ~32 MB is new memory from the kernel (page faults + zeroing),
# which costs as much as the arithmetic here. The pixel work therefore runs over chunks of images
# whose temporaries stay small enough for malloc to reuse; the maths per image is unchanged.
# On a GPU the caching allocator makes this moot, so the whole batch is one chunk.
CPU_CHUNK_BYTES = 8 << 20


def check_augment_args(random_crop_mode, magnitude, num_layers, mosaic_mix_prob, flip_prob=0.5, scale_min=0.1,
                       mixup_prob=0.0):
    """The augmentation flags of train.py and `data.py show`, checked before any work, each error
    naming its flag (a negative crop mode would otherwise fail deep in a step as a NaN size)."""
    if not (math.isfinite(random_crop_mode) and random_crop_mode >= 0):
        raise ValueError(f"--random_crop_mode {random_crop_mode}: give 0 or more")
    # A factor of 0 would shrink an image to a point (a singular matrix); a floor above the
    # ceiling would draw from an upside-down range.
    if not (math.isfinite(scale_min) and scale_min > 0):
        raise ValueError(f"--random_scale_min {scale_min}: give a factor above 0, like 0.1 or 0.5")
    if random_crop_mode > 1 and scale_min > random_crop_mode:
        raise ValueError(f"--random_scale_min {scale_min} is above --random_crop_mode {random_crop_mode}, the "
                         f"largest factor: give a smaller floor or a larger mode")
    # RandAugment's scale ends at 10, its strongest. Past ~11 the enhance factors 1 - 0.09 m turn
    # negative (a black image) and solarize inverts every pixel; at 20 the scale op shrinks the image
    # to a point.
    if not (math.isfinite(magnitude) and 0 <= magnitude <= 10):
        raise ValueError(f"--magnitude {magnitude}: give 0 to 10 (RandAugment's scale, 10 the strongest)")
    if num_layers < 0:
        raise ValueError(f"--num_layers {num_layers}: give 0 or more")
    if not 0 <= mosaic_mix_prob <= 1:
        raise ValueError(f"--mosaic_mix_prob {mosaic_mix_prob}: a probability, in 0..1")
    if not 0 <= mixup_prob <= 1:
        raise ValueError(f"--mixup_prob {mixup_prob}: a probability, in 0..1")
    if not 0 <= flip_prob <= 1:
        raise ValueError(f"--flip_prob {flip_prob}: a probability, in 0..1")


def augment(batch, input_shape, random_crop_mode=1.0, magnitude=0, num_layers=2, mosaic_mix_prob=0.5, generator=None,
            hsv=(0.015, 0.5, 0.3), flip_prob=0.5, min_area_kept=0.15, mode="bilinear", scale_min=0.1,
            mixup_prob=0.0):
    """Augment a loader batch on its own device.

    batch: make_loader's dict (images uint8 [B, 3, Hc, Wc] with canvas padding 114, sizes, boxes
    [B, M, 4] xyxy, labels, valid, image_ids, scales). input_shape: (H, W) or an int.
    random_crop_mode, magnitude, num_layers: see crop_matrices, randaugment_matrices;
    mosaic_mix_prob: the chance that the whole batch is mosaicked (see the Mosaic section).
    generator: a torch.Generator, CPU or the batch's device (every random draw);
    None draws from torch's global generator (torch.manual_seed sets it), so each call differs.
    hsv: (hue, saturation, value) gains, or None for off. min_area_kept: drop boxes with less than
    this fraction of their area left after a crop. scale_min: the floor of random_crop_mode > 1.
    mixup_prob: the chance that an image is blended with another of the batch (mixup_images).
    Returns dict(images float32 [B, 3, H, W] 0..1, boxes [B, M, 4] xyxy output px (M may grow past
    the loader's after a mosaic or a MixUp: see mosaic_boxes, mixup_images), labels [B, M],
    valid [B, M], image_ids [B], matrices float32 [B, 2, 3] output px -> ORIGINAL image px (undefined
    after mosaic or MixUp)). random_crop_mode=0, magnitude=0, mosaic_mix_prob=0, flip_prob=0, hsv=None is the
    eval letterbox.
    Pixels and matrices come back on the images' device, boxes / labels / valid on the boxes'
    device. train.py leaves the targets on the CPU: their few hundred numbers are cheap to
    transform there, and the number of boxes left after the crop is known without asking the GPU."""
    if isinstance(input_shape, int):
        input_shape = (input_shape, input_shape)
    hh, ww = int(input_shape[0]), int(input_shape[1])
    generator = generator if generator is not None else torch.default_generator
    images, dev = batch["images"], batch["images"].device
    b = len(images)

    # 1. geometry: crop mode, then flip, then RandAugment, composed into one matrix per image
    fwd = crop_matrices(batch["sizes"], (hh, ww), random_crop_mode, generator, scale_min)
    flip = torch.rand(b, generator=generator, device=_device_of(generator)).cpu() < flip_prob
    fwd = flip_matrices(flip, ww) @ fwd
    ops = torch.randint(0, len(RANDAUGMENT_OPS), (b, num_layers), generator=generator, device=_device_of(generator)).cpu()
    signs = torch.randint(0, 2, (b, num_layers), generator=generator, device=_device_of(generator)).cpu() * 2 - 1
    if magnitude == 0:
        ops = torch.zeros_like(ops)  # all "identity": magnitude 0 changes nothing
    fwd = randaugment_matrices(ops, signs, magnitude, (hh, ww)) @ fwd
    inverse = torch.linalg.inv(fwd)  # output px -> canvas px, what the sampling needs
    scales = batch.get("scales", torch.ones(b, 2)).double().cpu()  # [B, 2] (x, y)
    matrices = (torch.diag_embed(torch.cat([1 / scales, torch.ones(b, 1, dtype=torch.float64)], 1))
                @ inverse)[:, :2].float()
    matrices = to_device(matrices, dev)

    # 2. mosaic, decided per batch: its boxes now, with the geometry's, its pixels in step 4
    plan = None
    if mosaic_mix_prob > 0 and float(torch.rand(1, generator=generator, device=_device_of(generator))) < mosaic_mix_prob:
        plan = mosaic_plan(b, hh, ww, generator)
    boxes, labels, valid = batch["boxes"].float(), batch["labels"], batch["valid"]
    fwd_boxes = to_device(fwd.float(), boxes.device)
    if plan is None:
        boxes, valid = transform_boxes(boxes, valid, fwd_boxes, (hh, ww), min_area_kept=min_area_kept)
    else:
        # Moved unclipped, then cut once, to their quadrant: min_area_kept then compares what
        # the quadrant shows with the whole moved box. Cut to the output first and then to the
        # quadrant, each cut would keep 15% of what it was given: as little as 2% in all.
        everywhere = to_device(torch.tensor([-math.inf, -math.inf, math.inf, math.inf]), boxes.device)
        boxes, valid = transform_boxes(boxes, valid, fwd_boxes, (hh, ww), min_area_kept=0,
                                       clip_to=everywhere.expand_as(boxes))
        boxes, labels, valid = mosaic_boxes(boxes, labels, valid, plan, min_area_kept)

    # 3. colour maps per image (per OUTPUT image: after a mosaic, all four quadrants share one)
    factors = 1 + signs.double() * magnitude * 0.09  # enhance factors of contrast / brightness / color / sharpness
    a, c, d = colour_affine(ops, factors, hsv, generator)

    # 4. pixels: warp (+ mosaic) + colour, chunk by chunk (see CPU_CHUNK_BYTES). With a mosaic,
    # output i's quadrant q is sampled straight from image src[i, q] through that image's matrix,
    # one grid_sample per quadrant for the chunk, so the mosaic costs no extra pass.
    step = b if dev.type != "cpu" else max(1, CPU_CHUNK_BYTES // (3 * hh * ww * 4))
    x = torch.empty(b, 3, hh, ww, device=dev)
    for s in range(0, b, step):  # chunks of images: a memory tiling, each chunk fully batched
        rows = slice(s, s + step)
        if plan is None:
            y = warp_region(images, inverse, (0, hh, 0, ww), rows, mode)
        else:
            regions, src = plan
            y = torch.empty(len(src[rows]), 3, hh, ww, device=dev)
            for q, (y0, y1, x0, x1) in enumerate(regions):  # the 4 quadrants
                y[:, :, y0:y1, x0:x1] = warp_region(images, inverse, (y0, y1, x0, x1), src[rows, q], mode)
        _colour_chunk(x[rows], y, (a[rows], c[rows], d[rows]), ops[rows], factors[rows], magnitude)

    # 5. MixUp, per image, on the finished pictures
    if mixup_prob > 0:
        x, boxes, labels, valid = mixup_images(x, boxes, labels, valid, mixup_prob, generator)
    return dict(images=x, boxes=boxes, labels=labels, valid=valid, image_ids=batch["image_ids"], matrices=matrices)


def mixup_images(images, boxes, labels, valid, prob, generator):
    """YOLOX's MixUp, batched: with probability `prob` image i becomes the even blend of itself
    and image (i + k) mod B of the same batch, and keeps the boxes of both.

    images [B, 3, H, W] float; boxes [B, M, 4] xyxy px, labels [B, M], valid [B, M] (boxes may be on
    another device than the pixels). Returns the images and [B, 2M] boxes / labels / valid, the
    partner's boxes valid only where image i was mixed (when no image is, the inputs unchanged).
    Megvii blends 0.5 / 0.5 and keeps every box at full weight: an object at half contrast is
    still an object to find. Its partner is a new image, scaled by 0.5-1.5 and maybe flipped;
    here the partner is another output of this batch, already through its own crop, flip and
    colour, so the mix costs one pass over the pixels and no decoding. k is drawn once per batch
    from 1..B-1 leaving out B/2: k = 0 would mix an image with itself (doubling its boxes), and
    k = B/2 would mix i with i + k and i + k with i, two identical outputs. A batch of 1 or 2
    has no such k and comes back unmixed (train.py says so)."""
    b = len(images)
    shifts = [k for k in range(1, b) if 2 * k != b]
    if not shifts:
        return images, boxes, labels, valid
    k = shifts[int(torch.randint(0, len(shifts), (1,), generator=generator, device=_device_of(generator)))]
    mixed = torch.rand(b, generator=generator, device=_device_of(generator)).cpu() < prob
    if not mixed.any():
        return images, boxes, labels, valid
    partner = (torch.arange(b) + k) % b
    blend = to_device(mixed, images.device)[:, None, None, None]  # to_device: no wait for the GPU
    images = torch.where(blend, 0.5 * (images + images[to_device(partner, images.device)]), images)
    boxes = torch.cat([boxes, boxes[to_device(partner, boxes.device)]], 1)
    labels = torch.cat([labels, labels[to_device(partner, labels.device)]], 1)
    valid = torch.cat([valid, valid[to_device(partner, valid.device)] & to_device(mixed, valid.device)[:, None]], 1)
    return images, boxes, labels, valid


def augment_ahead(items, work, device, stream=None):
    """work(item) for each of items, in order, with the next item's work done ahead while the
    caller uses this one's: on a CUDA device, in a second thread and on a second CUDA stream.

    Why: augmenting a batch is several hundred small operations, each of which costs the CPU a
    few microseconds to launch (about 13 ms a step for yolox_s at 640, batch 32, on an H200's
    host), while the GPU replays the model's recorded graphs without needing the CPU at all.
    Done in the training loop, those launches come between the GPU's steps and the GPU waits for
    them; done here, they overlap the step before. PyTorch releases Python's lock (the GIL) inside
    each operation, so the two threads do run side by side.
    The second stream keeps the augmentation's kernels out of the training stream's queue, so they
    can fill its gaps. The training stream waits for a batch's last kernel (an event) before it
    reads the batch, and the batch's CUDA tensors are marked as used by the training stream
    (record_stream), so that their memory is not reused by the next augmentation while training
    still reads it.
    work runs in one thread, one item after the other, so a generator it draws from gives the
    same draws as in a plain loop; but while the caller handles item k, item k + 1's work may be
    drawing from it already, so work returns whatever state the caller needs (train.py: the
    generator's state for a Ctrl-C checkpoint). The items themselves are drawn in the caller's
    thread, before item k is handed over (so a caller's timing of them counts loader waits only;
    a wait for the thread itself shows in the steps' time, not there).
    stream: the second CUDA stream; make it once (torch.cuda.Stream) and pass it on every call,
    since the memory PyTorch caches for one stream serves that stream alone, so a new stream each
    epoch would strand the last one's cached blocks. None: a new one.
    On any other device (the CPU) this is the plain loop: work(item), then yield it."""
    if torch.device(device).type != "cuda":
        for item in items:
            yield work(item)
        return
    stream = stream if stream is not None else torch.cuda.Stream(device)
    training = torch.cuda.current_stream(device)

    def run(item):  # in the second thread
        with torch.cuda.device(device), torch.cuda.stream(stream):
            out = work(item)
            done = torch.cuda.Event()
            done.record(stream)
        for t in _cuda_tensors(out):
            t.record_stream(training)
        return out, done

    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        ahead = [pool.submit(run, item) for item in itertools.islice(items, 1)]
        while ahead:
            out, done = ahead.pop().result()  # item k's work, finished on the CPU
            ahead = [pool.submit(run, item) for item in itertools.islice(items, 1)]  # item k + 1 starts
            training.wait_event(done)  # the GPU, not the CPU, waits for item k's last kernel
            yield out


def _cuda_tensors(x):
    """The CUDA tensors in x, a tensor or nested tuples / lists / dicts of them (others skipped)."""
    if isinstance(x, torch.Tensor):
        return [x] if x.is_cuda else []
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _cuda_tensors(v)]
    return []


def letterbox(batch, input_shape, mode="bilinear"):
    """The eval transform: aspect-preserving resize, top-left, grey pad; exact inverse in `matrices`
    (output px -> original image px). mode: grid_sample's "bilinear" | "nearest" | "bicubic"."""
    return augment(batch, input_shape, random_crop_mode=0, magnitude=0, num_layers=0, mosaic_mix_prob=0,
                   generator=torch.Generator().manual_seed(0), hsv=None, flip_prob=0, mode=mode)


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------
PICTURE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # extension -> PIL format


def picture_format(path):
    """PIL format for a picture path, from its extension, or a clear error (checked before any work)."""
    if os.path.isdir(path):
        raise ValueError(f"-o {path} is a folder: give a file name, e.g. {os.path.join(path, 'batch.png')}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in PICTURE_FORMATS:
        raise ValueError(f"-o {path}: cannot tell the picture format from '{ext}': end the name with .png or .jpg")
    return PICTURE_FORMATS[ext]


SHEET_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                 (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]  # a colour per label, cycled
CROWD_COLOUR = (128, 128, 128)
# The ground truth under a sheet of detections: a white line with a black one inside it, which
# shows on any picture (a grey one vanished on the grey letterbox padding).
TRUTH_LINE, TRUTH_SHADOW = (255, 255, 255), (0, 0, 0)


def draw_label(draw, box, text, colour, font=None, fallback=None):
    """A box's label as text on a filled tag of the box's colour (bare text in the box's colour
    is lost on a bright or busy picture): above the box's top-left corner where there is room,
    else just inside it. Black or white text, whichever reads on the colour. fallback: drawn
    instead where the font cannot (PIL's bitmap font, without FreeType, knows Latin-1 only)."""
    try:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    except UnicodeEncodeError:
        text = fallback
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 2, bottom - top + 2  # 1 px of tag around the letters
    x, y = box[0], box[1] - th if box[1] - th >= 0 else box[1]
    draw.rectangle((x, y, x + tw - 1, y + th - 1), fill=colour)
    ink = (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else (255, 255, 255)
    draw.text((x + 1 - left, y + 1 - top), text, fill=ink, font=font)


def show_batch_sample(batch, path, class_names=None, max_images=16, columns=4, truth=None, captions=None):
    """Grid picture (PNG, or JPEG for .jpg / .jpeg) of a batch (augment's output, or a loader batch)
    with boxes and class names. Crowd / ignore regions are drawn grey. With batch["scores"] [B, M]
    the boxes are detections and each name gets its score; truth = (boxes [B, M', 4] xyxy px, valid
    [B, M']) is then drawn underneath in thin white-and-black lines, so missed objects show.
    captions: a line of text per image, written at its bottom-left. The folder is made if missing;
    the file is written to a temp name, then renamed."""
    fmt = picture_format(path)
    images = batch["images"][:max_images].detach().cpu()
    if images.dtype == torch.uint8:
        images = images.float() / 255
    boxes, labels, valid = (batch[k][:max_images].cpu() for k in ("boxes", "labels", "valid"))
    scores = batch["scores"][:max_images].cpu() if "scores" in batch else None
    n, _, h, w = images.shape
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (w + 4), rows * (h + 4)), (255, 255, 255))
    for i in range(n):
        pic = Image.fromarray((images[i].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())
        draw = ImageDraw.Draw(pic)
        if truth is not None:
            for x0, y0, x1, y1 in truth[0][i][truth[1][i]].tolist():
                draw.rectangle((x0, y0, x1, y1), outline=TRUTH_LINE, width=1)
                draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), outline=TRUTH_SHADOW, width=1)
        kept = valid[i].nonzero().flatten().tolist()
        for k in kept:  # all outlines first, then the tags, so that no line crosses a label
            colour = CROWD_COLOUR if labels[i, k] < 0 else SHEET_PALETTE[int(labels[i, k]) % len(SHEET_PALETTE)]
            draw.rectangle(boxes[i, k].tolist(), outline=colour, width=2)
        for k in kept:
            box, label = boxes[i, k].tolist(), int(labels[i, k])
            colour = CROWD_COLOUR if label < 0 else SHEET_PALETTE[label % len(SHEET_PALETTE)]
            name = "crowd" if label < 0 else (class_names[label] if class_names and label < len(class_names)
                                              else str(label))
            score = f" {float(scores[i, k]):.2f}" if scores is not None else ""
            draw_label(draw, box, name + score, colour, fallback=str(label) + score)  # "ネコ" -> its label
        if captions is not None:
            draw_label(draw, (0, h), captions[i], (40, 40, 40))  # no room under the picture: just above it
        sheet.paste(pic, ((i % cols) * (w + 4) + 2, (i // cols) * (h + 4) + 2))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as eval.py does for its pictures
        sheet.save(tmp, format=fmt)  # the format the extension says, not the temp name's
        os.replace(tmp, path)
    except OSError as e:  # e.g. no permission: name the file asked for, and leave no temp file behind
        raise ValueError(f"cannot write {path} ({e.strerror or e}): give a path in a writable folder") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(
        description="plaindet data tools: build the shapes set, or draw an augmented batch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shapes", help="write the built-in synthetic shapes set (COCO layout)")
    p.add_argument("--out", default=os.path.join(ROOT, "data_cache", "shapes"), help="output folder (absent or empty; a complete set already there is kept)")
    p.add_argument("--num_train", type=int, default=1000, help="number of train images")
    p.add_argument("--num_val", type=int, default=200, help="number of val images")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same set")
    p = sub.add_parser("show", help="draw one augmented batch as a PNG grid")
    p.add_argument("-d", "--data", default="shapes", help="'shapes', a COCO folder, a COCO json or a YOLO folder")
    p.add_argument("--split", default="train", choices=["train", "val"], help="which split to read")
    p.add_argument("--batch_size", type=int, default=16, help="images in the picture")
    p.add_argument("-i", "--input_shape", default="256", help="output size in pixels: S, or H,W as train.py's -i")
    p.add_argument("--random_crop_mode", type=float, default=1.0,
                   help="0 letterbox, (0,1) random resized crop, 1 random largest crop, >1 random scale")
    p.add_argument("--random_scale_min", type=float, default=0.1,
                   help="smallest scale factor when --random_crop_mode > 1 (YOLOX: 0.1; nano / tiny 0.5)")
    p.add_argument("--magnitude", type=float, default=6, help="RandAugment magnitude (0 = off)")
    p.add_argument("--num_layers", type=int, default=2, help="RandAugment ops per image")
    p.add_argument("--mosaic_mix_prob", type=float, default=0.5, help="probability that the batch is mosaicked")
    p.add_argument("--mixup_prob", type=float, default=0.0, help="probability that an image is MixUp-blended "
                   "with another of the batch (YOLOX: 1.0)")
    p.add_argument("--flip_prob", type=float, default=0.5, help="probability of a horizontal flip per image")
    p.add_argument("--seed", type=int, default=0, help="random seed for order and augmentation")
    p.add_argument("-o", "--output", default="batch.png", help="picture to write: .png, or .jpg / .jpeg")
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        return 2


def _main(args):
    with plain_warnings("data.py"):
        if args.command == "shapes":
            print(make_shapes(args.out, args.num_train, args.num_val, args.seed))
            return 0
        # Numbers checked before any file is read, with the flag named, rather than as a torch
        # error (--batch_size 0) or a singular matrix (--input_shape 0) further down.
        try:
            hw = [int(v) for v in args.input_shape.replace("x", ",").split(",")]
        except ValueError:
            hw = []
        if len(hw) not in (1, 2) or min(hw) < 1:
            raise ValueError(f"-i/--input_shape {args.input_shape!r}: give one size like 256, or H,W like 256,320")
        if args.batch_size < 1:
            raise ValueError(f"--batch_size {args.batch_size}: give 1 or more")
        check_augment_args(args.random_crop_mode, args.magnitude, args.num_layers, args.mosaic_mix_prob,
                           args.flip_prob, args.random_scale_min, args.mixup_prob)
        picture_format(args.output)  # a bad -o fails now, not after the batch is made
        ds = open_dataset(args.data, args.split)
        batch = next(iter(make_loader(ds, args.batch_size, True, 0, args.seed)))
        out = augment(batch, (hw[0], hw[-1]), args.random_crop_mode, args.magnitude,
                      args.num_layers, args.mosaic_mix_prob, torch.Generator().manual_seed(args.seed),
                      flip_prob=args.flip_prob, scale_min=args.random_scale_min, mixup_prob=args.mixup_prob)
        print(show_batch_sample(out, args.output, ds.class_names))
        return 0


if __name__ == "__main__":
    sys.exit(main())
