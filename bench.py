"""bench.py: every speed claim of plaindet, each measured side by side with a peer in the same run.

    python bench.py data      # input pipeline vs albumentations 2.0.8
    python bench.py models    # forward latency vs keras_cv_attention_models' PyTorch builds
    python bench.py assign    # batched SimOTA vs a per-image loop (as YOLOX does it)
    python bench.py nms       # vectorized soft-NMS vs a per-image, per-class loop (as effdet does it)
    python bench.py train     # training images/s vs effdet's DetBenchTrain

Each subcommand prints both sides and ends with one line `ratio: X.XX` (this project over the
peer). The peers are benchmark-only packages, never requirements of plaindet:
    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r requirements-bench.txt
    .venv-bench/bin/pip install --no-deps keras-cv-attention-models
    .venv-bench/bin/python bench.py data
The machines this runs on are shared and noisy: read the ratios, not the absolute numbers.
Each section below is self-contained; its names carry the subcommand as a prefix.
"""
import sys


# ==============================================================================================
# bench.py data
# ==============================================================================================
DATA_DOC = """bench data: images/s of the whole input pipeline, plaindet vs albumentations 2.0.8.

Both sides run the same ops on the same JPEGs, per image: JPEG decode (PIL, the same call on both
sides), crop mode 1 (short side covers 512, random 512x512 crop), horizontal flip, RandAugment at
magnitude 6 (one affine warp; colour ops), HSV jitter; then per batch of 32, a 2x2 mosaic with
probability 0.5, ending in a float32 [32, 3, 512, 512] 0..1 tensor ready for a model.

CPU, per core: one process, one thread on each side (torch.set_num_threads(1), cv2.setNumThreads(1)).
CUDA (only when a GPU is present): decode in DataLoader workers on all cores + plaindet's batched
augmentation on the GPU, against albumentations in as many DataLoader workers as cores.
The last line is `ratio: X.XX`, plaindet over albumentations, CPU per core.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

import data  # noqa: E402

DATA_SIZE = 512
DATA_MAGNITUDE = 6


def data_peer_modules():
    try:
        import albumentations as A
        import cv2
    except ImportError:
        sys.exit("albumentations is not installed: pip install -r requirements-bench.txt (albumentations==2.0.8)")
    return A, cv2


def data_peer_transform(A, cv2):
    """albumentations' version of the same per-image ops (magnitude 6: rotate 18 deg, shear 0.18 ~ 10 deg,
    translate 0.27, scale 1 +- 0.3), boxes kept in pascal_voc xyxy px."""
    return A.Compose([
        A.SmallestMaxSize(max_size=DATA_SIZE, p=1.0),
        A.RandomCrop(DATA_SIZE, DATA_SIZE, p=1.0),
        A.HorizontalFlip(p=0.5),
        A.Affine(rotate=(-18, 18), shear=(-10, 10), translate_percent=(-0.27, 0.27), scale=(0.7, 1.3),
                 border_mode=cv2.BORDER_CONSTANT, fill=114, p=1.0),
        A.OneOf([A.RandomBrightnessContrast(0.54, 0.54), A.Sharpen(), A.Posterize(num_bits=6),
                 A.Solarize(threshold_range=(0.46, 0.46)), A.Equalize(), A.AutoContrast()], p=1.0),
        A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=30, val_shift_limit=30, p=1.0),
    ], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=0.15, min_area=4))


def data_peer_mosaic(images, boxes, labels, rng):
    """The same per-batch 2x2 mosaic in numpy (albumentations' own Mosaic is per sample and needs the
    other three samples' metadata; this is what a batch-level mosaic beside it looks like)."""
    b = len(images)
    cy, cx = (rng.uniform(0.25, 0.75, 2) * DATA_SIZE).astype(int)
    src = rng.permutation(4 * b) % b
    out = np.empty_like(images)
    regions = [(0, cy, 0, cx), (0, cy, cx, DATA_SIZE), (cy, DATA_SIZE, 0, cx), (cy, DATA_SIZE, cx, DATA_SIZE)]
    out_boxes, out_labels = [], []
    for i in range(b):
        bx, lb = [], []
        for q, (ya, yb, xa, xb) in enumerate(regions):
            j = src[4 * i + q]
            out[i, ya:yb, xa:xb] = images[j, ya:yb, xa:xb]
            c = np.asarray(boxes[j], np.float32).reshape(-1, 4).copy()
            c[:, 0::2] = c[:, 0::2].clip(xa, xb)
            c[:, 1::2] = c[:, 1::2].clip(ya, yb)
            keep = ((c[:, 2] - c[:, 0]) >= 2) & ((c[:, 3] - c[:, 1]) >= 2)
            bx.append(c[keep])
            lb.append(np.asarray(labels[j])[keep])
        out_boxes.append(np.concatenate(bx))
        out_labels.append(np.concatenate(lb))
    return out, out_boxes, out_labels


def data_run_peer(transform, ds, indices, batch_size, rng):
    """albumentations, one process: decode + transform each image, mosaic the batch, to a float tensor."""
    images, boxes, labels = [], [], []
    for i in indices:
        image, bx, lb, _, _ = ds.load(i)
        r = transform(image=image, bboxes=bx, labels=lb)
        images.append(r["image"])
        boxes.append(r["bboxes"])
        labels.append(r["labels"])
        if len(images) == batch_size:
            batch = np.stack(images)
            if rng.random() < 0.5:
                batch, boxes, labels = data_peer_mosaic(batch, boxes, labels, rng)
            torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255)  # what a model takes
            images, boxes, labels = [], [], []


def data_run_ours(ds, indices, batch_size, generator, device="cpu"):
    collate = data._Collate(max_boxes=100)
    for start in range(0, len(indices) - batch_size + 1, batch_size):
        batch = collate([ds.load(i) for i in indices[start:start + batch_size]])
        batch["images"] = batch["images"].to(device)  # the targets stay on the CPU, as in train.py
        data.augment(batch, (DATA_SIZE, DATA_SIZE), 1.0, DATA_MAGNITUDE, 2, 0.5, generator)


def data_dataset_for_bench(tmp):
    voc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data",
                       "voc2007_100", "instances_coco.json")
    if os.path.exists(voc):
        return data.open_dataset(voc, "train"), "voc2007_100 photos (~500x375 JPEG)"
    path = data.make_shapes(os.path.join(tmp, "shapes"), num_train=128, num_val=8)
    return data.open_dataset(path, "train"), "generated shapes JPEGs (~240x192)"


class data_PeerItems(torch.utils.data.Dataset):
    """albumentations' side in DataLoader workers: decode + transform item indices[i] of ds."""

    def __init__(self, ds, indices, transform):
        self.ds, self.indices, self.transform = ds, indices, transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, bx, lb, _, _ = self.ds.load(self.indices[i])
        r = self.transform(image=image, bboxes=bx, labels=lb)
        return torch.from_numpy(r["image"])


def data_bench_cuda(ds, transform, batch_size, batches):
    """GPU: decode in workers on all cores + batched augment on the GPU vs albumentations in workers."""
    workers = os.cpu_count() or 1
    dev = torch.device("cuda")
    n = batch_size * batches
    indices = [i % len(ds) for i in range(n)]
    subset = torch.utils.data.Subset(ds, indices)
    loader = data.make_loader(subset, batch_size, True, workers, 0, pin_memory=True)
    g = torch.Generator().manual_seed(0)

    def epoch():
        for batch in loader:
            batch["images"] = batch["images"].to(dev, non_blocking=True)  # targets stay on the CPU, as in train.py
            data.augment(batch, (DATA_SIZE, DATA_SIZE), 1.0, DATA_MAGNITUDE, 2, 0.5, g)

    epoch()  # warm-up (workers start, kernels load)
    torch.cuda.synchronize()
    t = time.perf_counter()
    epoch()
    torch.cuda.synchronize()
    ours = n / (time.perf_counter() - t)
    peer_loader = torch.utils.data.DataLoader(data_PeerItems(ds, indices, transform), batch_size, num_workers=workers,
                                              persistent_workers=True)
    for _ in peer_loader:
        pass
    t = time.perf_counter()
    for x in peer_loader:
        x.to(dev).permute(0, 3, 1, 2).float().div_(255)
    torch.cuda.synchronize()
    peer = n / (time.perf_counter() - t)
    print(f"cuda ({torch.cuda.get_device_name()}, {workers} workers): plaindet {ours:.1f} img/s, "
          f"albumentations {peer:.1f} img/s, gpu ratio {ours / peer:.2f}")


def data_main(argv=None):
    parser = argparse.ArgumentParser(description="Input-pipeline images/s: plaindet vs albumentations 2.0.8.")
    parser.add_argument("--batch_size", type=int, default=32, help="images per batch")
    parser.add_argument("--batches", type=int, default=3, help="timed batches per side per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each side counts")
    parser.add_argument("--no_cuda", action="store_true", help="skip the GPU comparison even if a GPU is present")
    args = parser.parse_args(argv)
    A, cv2 = data_peer_modules()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ds, what = data_dataset_for_bench(tmp)
        transform = data_peer_transform(A, cv2)
        n = args.batch_size * args.batches
        indices = [i % len(ds) for i in range(n)]
        print(f"data: {what}; {n} images per round, batches of {args.batch_size}, output {DATA_SIZE}x{DATA_SIZE}; "
              f"torch {torch.__version__}, albumentations {A.__version__}; 1 thread each")
        g, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
        data_run_ours(ds, indices[:args.batch_size], args.batch_size, g)  # warm-up
        data_run_peer(transform, ds, indices[:args.batch_size], args.batch_size, rng)
        best_ours = best_peer = 0.0
        for _ in range(args.rounds):
            t = time.perf_counter()
            data_run_ours(ds, indices, args.batch_size, g)
            best_ours = max(best_ours, n / (time.perf_counter() - t))
            t = time.perf_counter()
            data_run_peer(transform, ds, indices, args.batch_size, rng)
            best_peer = max(best_peer, n / (time.perf_counter() - t))
        print(f"cpu per core: plaindet {best_ours:.1f} img/s, albumentations {best_peer:.1f} img/s")
        if torch.cuda.is_available() and not args.no_cuda:
            torch.set_num_threads(os.cpu_count() or 1)
            # Throughput, not latency: with W workers, fewer than ~W batches would all be made at
            # once, one per worker, and the time would be one batch's latency. Four rounds of W.
            data_bench_cuda(ds, transform, args.batch_size, max(args.batches, 4 * (os.cpu_count() or 1)))
    print(f"ratio: {best_ours / best_peer:.2f}")


# ==============================================================================================
# bench.py models
# ==============================================================================================
MODELS_DOC = """bench models: plaindet's networks against keras_cv_attention_models' PyTorch builds.

    python bench.py models [--threads N] [--repeats 5] [--quick] [--no-cuda]

CPU: forward latency (eval mode, no_grad) of efficientdet_d0 at 512 and yolox_s at 640,
batch 1 and 8, for both projects in the same process, same thread count, timed
interleaved (ours, theirs, ours, theirs, ...) so drifting machine load hits both alike;
medians are reported. Our timing includes flatten_outputs, since theirs returns one
flattened [B, N, K] tensor.
CUDA (only when a GPU is present): bf16 autocast training steps (forward, sum-of-outputs
loss, backward, SGD step) at batch 32, images per second for both.

The last line is `ratio: X.XX` = their latency / ours for efficientdet_d0 batch 8 on CPU
(above 1 means plaindet is faster).

The peer is keras-cv-attention-models (`pip install -r requirements-bench.txt`, then
`pip install --no-deps keras-cv-attention-models`), run with KECAM_BACKEND=torch. Its
constructors try to download ImageNet backbone weights and fall back to random ones; the
download is made to fail at once here so the bench never waits on the network.
"""
import argparse
import os
import socket
import statistics
import sys
import time


import torch

import models

MODELS_CASES = [("efficientdet_d0", 512, "EfficientDetD0"), ("yolox_s", 640, "YOLOXS")]


def models_load_peer():
    """Import kecam with its torch backend and its weight download disabled, or exit clearly."""
    os.environ["KECAM_BACKEND"] = "torch"
    socket.setdefaulttimeout(2)

    def no_download(url, dst, *args, **kwargs):
        raise OSError(f"bench: offline, not downloading {url}")

    torch.hub.download_url_to_file = no_download
    try:
        from keras_cv_attention_models import efficientdet, yolox
    except ImportError:
        sys.exit("bench models: keras_cv_attention_models is missing; run `pip install -r requirements-bench.txt` "
                 "and `pip install --no-deps keras-cv-attention-models`")
    return {"EfficientDetD0": lambda: efficientdet.EfficientDetD0(pretrained=None),
            "YOLOXS": lambda: yolox.YOLOXS(pretrained=None)}


def models_ours_forward(model):
    return lambda x: models.flatten_outputs(model(x))


def models_time_interleaved(fns, x, repeats):
    """Median seconds per call of each fn in fns (dict), calls interleaved, one warm-up each."""
    times = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(x)
        for _ in range(repeats):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn(x)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def models_cpu_bench(peers, cases, batches, repeats):
    rows = []
    for name, size, peer_name in cases:
        ours = models.build_model(name, num_classes=90 if name.startswith("efficientdet") else 80,
                                  input_shape=(size, size)).eval()
        theirs = peers[peer_name]().eval()
        for batch in batches:
            x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            t = models_time_interleaved({"ours": models_ours_forward(ours), "theirs": theirs}, x, repeats)
            rows.append((name, size, batch, t["ours"], t["theirs"]))
            print(f"cpu  {name:16s} {size:4d} batch {batch}: ours {t['ours'] * 1000:8.1f} ms   "
                  f"kecam {t['theirs'] * 1000:8.1f} ms   speed-up {t['theirs'] / t['ours']:.2f}x", flush=True)
    return rows


def models_train_bench(peers, device="cuda", batch=32, steps=20, warmup=3):
    """bf16 autocast training steps (forward, sum-of-outputs loss, backward, SGD), images/s for both."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.backends.cudnn.benchmark = True  # as train.py sets on CUDA; both sides run with it
    for name, size, peer_name in MODELS_CASES:
        ours = models.build_model(name, num_classes=90 if name.startswith("efficientdet") else 80,
                                  input_shape=(size, size)).to(device).train()
        theirs = peers[peer_name]().to(device).train()
        x = torch.rand(batch, 3, size, size, device=device)
        result = {}
        for side, model, loss_fn in [("ours", ours, lambda out: sum(o.float().sum() for o in out)),
                                     ("theirs", theirs, lambda out: out.float().sum())]:
            opt = torch.optim.SGD(model.parameters(), lr=1e-6)

            def step():
                with torch.autocast(device, dtype=torch.bfloat16):
                    loss = loss_fn(model(x))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            for _ in range(warmup):
                step()
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            result[side] = batch * steps / (time.perf_counter() - t)
        print(f"{device} {name:16s} {size:4d} batch {batch} bf16 train: ours {result['ours']:7.1f} img/s   "
              f"kecam {result['theirs']:7.1f} img/s   speed-up {result['ours'] / result['theirs']:.2f}x", flush=True)


def models_main(argv=None):
    parser = argparse.ArgumentParser(prog="bench.py models", description=MODELS_DOC.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads, both sides (default: all cores; on a machine shared "
                             "with other jobs, 1 gives steadier numbers)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side and case")
    parser.add_argument("--quick", action="store_true", help="only efficientdet_d0 batch 8 (the ratio)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA training-step bench")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    peers = models_load_peer()
    print(f"torch {torch.__version__}, {args.threads} CPU threads, median of {args.repeats}, interleaved")
    cases = MODELS_CASES[:1] if args.quick else MODELS_CASES
    rows = models_cpu_bench(peers, cases, [8] if args.quick else [1, 8], args.repeats)
    if torch.cuda.is_available() and not args.no_cuda:
        models_train_bench(peers)
    ours, theirs = next((r[3], r[4]) for r in rows if r[0] == "efficientdet_d0" and r[2] == 8)
    print(f"ratio: {theirs / ours:.2f}")


# ==============================================================================================
# bench.py assign
# ==============================================================================================
ASSIGN_DOC = """bench assign: batched SimOTA (assign.simota_assign) against a plain per-image loop.

    python bench.py assign [--batch 16] [--max_boxes 50] [--classes 80] [--repeats 5]

The loop side is the same algorithm written the way YOLOX's reference head does it: one image
at a time, gather the candidate priors, materialise the [boxes, candidates, classes] BCE for the
class cost, and a Python loop over boxes for the dynamic-k top-k. Both sides get the same random
batch (640 x 640 input, strides 8 / 16 / 32 -> 8400 priors) and must agree on every assignment.
Prints the timings of both sides (CPU; CUDA too when a GPU is present) and ends with one line
`ratio: X.XX` = loop time / batched time on CPU. Needs only torch (no peer package).
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from assign import box_iou, simota_assign  # noqa: E402


def assign_make_grid_priors(input_size, strides, device):
    """Grid-point priors, (level, y, x) order: centers [N, 2] px, strides [N]."""
    centers, per_prior_stride = [], []
    for s in strides:
        n = input_size // s
        y, x = torch.meshgrid(torch.arange(n, device=device), torch.arange(n, device=device), indexing="ij")
        centers.append(torch.stack([(x + 0.5) * s, (y + 0.5) * s], dim=-1).reshape(-1, 2).float())
        per_prior_stride.append(torch.full((n * n,), float(s), device=device))
    return torch.cat(centers), torch.cat(per_prior_stride)


def assign_make_batch(batch, max_boxes, classes, centers, strides, input_size, generator):
    """Random but plausible inputs: boxes 8..~300 px, 0..max_boxes per image (one image full),
    predictions scattered around each prior, low class scores like an early-training head."""
    B, N, M = batch, centers.shape[0], max_boxes
    g = generator
    counts = torch.randint(0, M + 1, (B,), generator=g)
    counts[0] = M
    valid = torch.arange(M)[None, :] < counts[:, None]
    wh = torch.exp(torch.empty(B, M, 2).uniform_(2.0, 5.7, generator=g))
    xy = torch.rand(B, M, 2, generator=g) * (input_size - wh)
    boxes = torch.cat([xy, xy + wh], dim=-1) * valid[..., None]
    labels = torch.randint(0, classes, (B, M), generator=g).masked_fill(~valid, -1)
    off = torch.randn(B, N, 2, generator=g) * strides[None, :, None]
    size = torch.exp(torch.empty(B, N, 2).uniform_(0.0, 3.0, generator=g)) * strides[None, :, None]
    c = centers[None] + off
    pred = torch.cat([c - size / 2, c + size / 2], dim=-1)
    cls = torch.randn(B, N, classes, generator=g) - 4.0
    obj = torch.randn(B, N, generator=g)
    return pred, cls, obj, boxes, labels, valid


def assign_simota_loop(pred_boxes, cls_logits, obj_logits, centers, strides, gt_boxes, gt_labels, gt_valid,
                center_radius=2.5, candidate_topk=10, iou_weight=3.0, outside_cost=1e5):
    """SimOTA one image at a time (the reference structure). Returns positive [B, N], gt_index [B, N]."""
    B, N, C = cls_logits.shape
    positive = torch.zeros(B, N, dtype=torch.bool, device=cls_logits.device)
    gt_index = torch.full((B, N), -1, dtype=torch.long, device=cls_logits.device)
    for b in range(B):
        keep = (gt_valid[b] & (gt_labels[b] >= 0)).nonzero().squeeze(1)
        G = keep.numel()
        if G == 0:
            continue
        boxes, labels = gt_boxes[b, keep], gt_labels[b, keep]
        # Geometry, [G, N], as distances from each box centre.
        dx = (centers[None, :, 0] - (boxes[:, 0, None] + boxes[:, 2, None]) / 2).abs()
        dy = (centers[None, :, 1] - (boxes[:, 1, None] + boxes[:, 3, None]) / 2).abs()
        half_w, half_h = (boxes[:, 2, None] - boxes[:, 0, None]) / 2, (boxes[:, 3, None] - boxes[:, 1, None]) / 2
        in_box = (dx < half_w) & (dy < half_h)
        in_center = torch.maximum(dx, dy) < center_radius * strides[None, :]
        fg = (in_box | in_center).any(dim=0)                         # [N]
        fg_idx = fg.nonzero().squeeze(1)
        in_both = (in_box & in_center)[:, fg]                        # [G, Nc]
        Nc = fg_idx.numel()
        ious = box_iou(boxes, pred_boxes[b, fg])                     # [G, Nc]
        p = (cls_logits[b, fg].sigmoid() * obj_logits[b, fg, None].sigmoid()).sqrt()
        onehot = F.one_hot(labels, C).float()
        cls_cost = F.binary_cross_entropy(p[None].expand(G, Nc, C), onehot[:, None].expand(G, Nc, C),
                                          reduction="none").sum(-1)  # [G, Nc]
        cost = cls_cost + iou_weight * -torch.log(ious + 1e-8) + outside_cost * (~in_both).float()
        k = min(candidate_topk, Nc)
        dynamic_k = ious.topk(k, dim=1).values.sum(1).int().clamp(min=1)
        matching = torch.zeros(G, Nc, dtype=torch.bool, device=cost.device)
        for g in range(G):
            idx = cost[g].topk(int(dynamic_k[g]), largest=False).indices
            matching[g, idx] = True
        claimed = matching.any(dim=0)
        owner = cost.masked_fill(~matching, float("inf")).argmin(dim=0)
        positive[b, fg_idx[claimed]] = True
        gt_index[b, fg_idx[claimed]] = keep[owner[claimed]]
    return positive, gt_index


def assign_timed(fn, repeats, sync):
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times), out


def assign_run(device, args):
    g = torch.Generator().manual_seed(args.seed)
    centers, strides = assign_make_grid_priors(640, (8, 16, 32), "cpu")
    inputs = assign_make_batch(args.batch, args.max_boxes, args.classes, centers, strides, 640, g)
    pred, cls, obj, boxes, labels, valid = (t.to(device) for t in inputs)
    centers, strides = centers.to(device), strides.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def batched():
        a = simota_assign(pred, cls, obj, centers, strides, boxes, labels, valid)
        return a.positive, a.gt_index

    def loop():
        with torch.no_grad():
            return assign_simota_loop(pred, cls, obj, centers, strides, boxes, labels, valid)

    batched(), loop()                                                # warm up
    t_batched, (pos_b, idx_b) = assign_timed(batched, args.repeats, sync)
    t_loop, (pos_l, idx_l) = assign_timed(loop, args.repeats, sync)
    same_pos = bool((pos_b == pos_l).all())
    same_idx = bool((idx_b == idx_l).all())
    n_pos = int(pos_b.sum())
    print(f"[{device}] batch {args.batch} x {centers.shape[0]} priors x {args.classes} classes x "
          f"<= {args.max_boxes} boxes ({int(valid.sum())} boxes, {n_pos} positives)")
    print(f"[{device}] batched simota_assign: {t_batched * 1000:9.1f} ms")
    print(f"[{device}] per-image loop:        {t_loop * 1000:9.1f} ms")
    print(f"[{device}] speed-up: {t_loop / t_batched:.2f}x; same assignments: {same_pos and same_idx}")
    assert same_pos, f"positives differ at {int((pos_b != pos_l).sum())} priors"
    assert same_idx, f"assigned boxes differ at {int((idx_b != idx_l).sum())} priors"
    return t_loop / t_batched


def assign_main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py assign", description=ASSIGN_DOC.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="images per assignment call")
    p.add_argument("--max_boxes", type=int, default=50, help="padded boxes per image (the real count varies)")
    p.add_argument("--classes", type=int, default=80, help="classes of the class scores SimOTA's cost reads")
    p.add_argument("--repeats", type=int, default=5, help="assign_timed runs per side (the best is reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random boxes and scores")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if torch.cuda.is_available():
        assign_run("cuda", args)
    ratio = assign_run("cpu", args)
    print(f"ratio: {ratio:.2f}")
    return ratio


# ==============================================================================================
# bench.py nms
# ==============================================================================================
NMS_DOC = """bench nms: per_class gaussian soft-NMS over a batch, eval.batched_nms vs a plain loop.

The workload of the issue: batch 8, 5000 priors x 80 classes of scores per image, top-k 5000
(prior, class) pairs kept per image before NMS, gaussian soft-NMS (sigma 0.5) per class, score
threshold 0.001, 100 detections per image.

CPU: eval.batched_nms (the vectorized torch twin) side by side with a plain loop: per image,
per class, a Python while-loop that picks one box at a time, as effdet's soft_nms does (effdet's
batched_soft_nms runs one such loop over all classes of an image, their boxes offset apart so
they never overlap; one loop per class, measured here, is the faster of the two layouts, so the
ratio is the lower one). The loop is slow, so by default it runs on --loop_images images and
its time is scaled to the batch (said so in the output); both sides are timed after a warm-up
call, with the same number of threads.
GPU (only where CUDA is available): the CUDA kernel, the torch twin on the GPU, and torchvision's
batched_nms (hard NMS, per class, looped over the images; torchvision is imported only there).

Run from the repository root:  python bench.py nms   (ends with `ratio: X.XX`,
the CPU loop time over the CPU twin time for the whole batch).
"""
import argparse
import os
import statistics
import sys
import time

import torch

import eval as ev  # noqa: E402  (the repository root is on the path only now)


def nms_make_inputs(batch, priors, classes, seed=0, size=640.0):
    """Boxes in clusters, as a detector's are: boxes [B, N, 4] xyxy px, scores [B, N, C].

    Scores are skewed towards 0 (u^4) like sigmoid outputs, so the top-k keeps a realistic mix.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 40, 2, generator=g) * size                      # 40 objects per image
    which = torch.randint(0, 40, (batch, priors), generator=g)
    xy = torch.gather(centres, 1, which[..., None].expand(-1, -1, 2)) + torch.randn(batch, priors, 2, generator=g) * 10
    wh = 16 + torch.rand(batch, priors, 2, generator=g) * 120
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], -1)
    scores = torch.rand(batch, priors, classes, generator=g) ** 4
    return boxes, scores


def nms_loop_soft_nms(boxes, scores, sigma, score_threshold):
    """One group's gaussian soft-NMS the effdet way: a while-loop, one pick per iteration.

    boxes [K, 4], scores [K] -> (indices, scores) of the picks, best first.
    """
    scores = scores.clone()
    index = torch.arange(len(scores))
    keep, kept_scores = [], []
    while len(scores):
        top = int(torch.argmax(scores))
        keep.append(int(index[top]))
        kept_scores.append(float(scores[top]))
        box = boxes[top]
        iw = (torch.minimum(box[2], boxes[:, 2]) - torch.maximum(box[0], boxes[:, 0])).clamp(min=0)
        ih = (torch.minimum(box[3], boxes[:, 3]) - torch.maximum(box[1], boxes[:, 1])).clamp(min=0)
        inter = iw * ih
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        union = (box[2] - box[0]) * (box[3] - box[1]) + areas - inter
        iou = inter / union
        scores = scores * torch.exp(-(iou * iou) / sigma)
        alive = scores >= score_threshold
        alive[top] = False
        boxes, scores, index = boxes[alive], scores[alive], index[alive]
    return keep, kept_scores


def nms_loop_batched(boxes, scores, topk, sigma, score_threshold, max_output_size):
    """Per image, per class: top-k pairs, then nms_loop_soft_nms on each class, then the best 100."""
    out = []
    c = scores.shape[-1]
    for b in range(boxes.shape[0]):
        flat = scores[b].reshape(-1)
        top_scores, top_index = flat.topk(min(topk, flat.numel()))
        passed = top_scores >= score_threshold
        top_scores, top_index = top_scores[passed], top_index[passed]
        prior, label = top_index // c, top_index % c
        picks = []
        for cls in label.unique().tolist():
            sel = label == cls
            keep, kept = nms_loop_soft_nms(boxes[b, prior[sel]], top_scores[sel], sigma, score_threshold)
            picks += [(s, cls) for s in kept]
        picks.sort(key=lambda p: -p[0])
        out.append(picks[:max_output_size])
    return out


def nms_timed(fn, repeats, sync=None):
    """Median seconds of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def nms_main(argv=None):
    parser = argparse.ArgumentParser(prog="bench.py nms", description=NMS_DOC.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="images per batched_nms call")
    parser.add_argument("--priors", type=int, default=5000, help="boxes per image")
    parser.add_argument("--classes", type=int, default=80, help="class scores per box")
    parser.add_argument("--topk", type=int, default=5000, help="(box, class) pairs kept per image before NMS")
    parser.add_argument("--loop_images", type=int, default=8,
                        help="images the slow loop runs on; its time is scaled to the batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of the CPU twin, and at least 10 "
                        "of each GPU row (the median is reported; the slow loop runs once, after a warm-up on one image)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both CPU sides")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sigma, thr, max_out = 0.5, 0.001, 100
    boxes, scores = nms_make_inputs(args.batch, args.priors, args.classes)
    kwargs = dict(method="gaussian", mode="per_class", iou_or_sigma=sigma, score_threshold=thr,
                  topk=args.topk, max_output_size=max_out)
    print(f"nms: per_class gaussian soft-NMS, batch {args.batch} x {args.priors} priors x {args.classes} classes, "
          f"top-k {args.topk}, sigma {sigma}, score threshold {thr}, {max_out} per image; "
          f"torch {torch.__version__}, {args.threads} CPU thread(s)")

    # CPU: the vectorized twin on the whole batch.
    twin = nms_timed(lambda: ev.batched_nms(boxes, scores, **kwargs), args.repeats)
    print(f"  cpu  eval.batched_nms (torch twin), whole batch:      {twin * 1e3:10.1f} ms")

    # CPU: the loop, on the first loop_images images, scaled to the batch.
    n = max(1, min(args.loop_images, args.batch))
    nms_loop_batched(boxes[:1], scores[:1], args.topk, sigma, thr, max_out)  # warm-up, as the twin's
    t = time.perf_counter()
    reference = nms_loop_batched(boxes[:n], scores[:n], args.topk, sigma, thr, max_out)
    loop = (time.perf_counter() - t) * args.batch / n
    scaled = f" (timed on {n} of {args.batch} images, scaled x{args.batch / n:g})" if n < args.batch else ""
    print(f"  cpu  per-image, per-class Python while-loop:        {loop * 1e3:10.1f} ms{scaled}")

    # The two sides must agree: same number of detections, same scores and labels.
    _, out_scores, out_labels, counts = ev.batched_nms(boxes[:n], scores[:n], **kwargs)
    same = all(int(counts[b]) == len(reference[b])
               and torch.allclose(out_scores[b, :len(reference[b])], torch.tensor([s for s, _ in reference[b]]),
                                  atol=1e-5)
               and out_labels[b, :len(reference[b])].tolist() == [c for _, c in reference[b]]
               for b in range(n))
    print(f"  same detections (loop vs twin, {n} images): {'yes' if same else 'NO'}")

    if torch.cuda.is_available():
        sync = torch.cuda.synchronize
        gb, gs = boxes.cuda(), scores.cuda()
        rows = [("cuda kernel, gaussian per_class", lambda: ev.batched_nms(gb, gs, **kwargs)),
                ("torch twin on the GPU, gaussian per_class",
                 lambda: ev.batched_nms(gb, gs, use_kernel=False, **kwargs)),
                ("cuda kernel, hard per_class (iou 0.5)",
                 lambda: ev.batched_nms(gb, gs, **dict(kwargs, method="hard", iou_or_sigma=0.5)))]
        try:
            import torchvision  # for the benchmark only

            def torchvision_hard():
                for b in range(gb.shape[0]):  # torchvision's batched_nms takes one image at a time
                    flat = gs[b].reshape(-1)
                    top_scores, top_index = flat.topk(args.topk)
                    prior, label = top_index // gs.shape[-1], top_index % gs.shape[-1]
                    torchvision.ops.batched_nms(gb[b, prior], top_scores, label, 0.5)[:max_out]
            rows.append((f"torchvision batched_nms, hard per_class, {args.batch}-image loop", torchvision_hard))
        except ImportError:
            print("  torchvision is absent: pip install -r requirements-bench.txt for its row")
        print(f"  gpu: {torch.cuda.get_device_name()}")
        for name, fn in rows:
            print(f"  gpu  {name:<52} {nms_timed(fn, max(args.repeats, 10), sync) * 1e3:10.3f} ms")
        cpu_out = ev.batched_nms(boxes, scores, **kwargs)
        gpu_out = ev.batched_nms(gb, gs, **kwargs)
        agree = all(torch.allclose(a.float(), b.float().cpu(), atol=1e-4) for a, b in zip(cpu_out, gpu_out))
        print(f"  kernel vs CPU twin, same boxes: {'yes' if agree else 'NO'}")
    else:
        print("  gpu: no CUDA device here, GPU rows skipped")

    print(f"ratio: {loop / twin:.2f}")
    return 0


# ==============================================================================================
# bench.py train
# ==============================================================================================
TRAIN_DOC = """bench.py train: training images/s of efficientdet_d0, ours vs effdet's DetBenchTrain.

CPU: efficientdet_d0 at 256, batch 4; ours with data + augmentation included, effdet's bench on
one fixed synthetic batch (model + loss only). The last line, `ratio: X.XX`, is ours over effdet.
CUDA (where a GPU is present): ours at batch 32 in bf16, the step train.py runs with the data
included (JPEG decode in DataLoader workers, augmentation on the GPU) for efficientdet_d0 at 512
and yolox_s at 640, eager and torch.compile, each with the fraction of step time
spent waiting for the loader; effdet's DetBenchTrain for tf_efficientdet_d0 at 512 beside it.
"""
import argparse
import contextlib
import gzip
import os
import shutil
import sys
import time
import traceback
import warnings

import torch


def train_effdet_step_fn(size, batch, num_classes):
    """effdet's own training bench (model + anchor labeler + focal / box loss), random weights,
    one fixed synthetic batch: it measures the model + loss only, no data pipeline."""
    from effdet import create_model
    model = create_model("tf_efficientdet_d0", bench_task="train", num_classes=num_classes,
                         image_size=(size, size), pretrained=False, pretrained_backbone=False,
                         bench_labeler=True)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    boxes_yxyx = torch.tensor([[20.0, 10.0, 120.0, 100.0], [60.0, 50.0, 220.0, 200.0]]).repeat(batch, 1, 1)
    target = {"bbox": boxes_yxyx, "cls": torch.tensor([[1.0, 3.0]]).repeat(batch, 1),
              "img_scale": torch.ones(batch), "img_size": torch.tensor([[size, size]] * batch)}

    def step():
        out = model(x, target)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    return step


def train_our_step_fn(size, batch, data_root, with_data=True):
    """Our CPU training step, the parts train.py runs: loader (PIL decode, in the main process as
    --workers 0) -> augment (crop mode 1, flip, RandAugment 6, mosaic 0.5, HSV) -> model ->
    assignment + loss -> SGD (no EMA, no loss checks: effdet's side has neither)."""
    import assign
    import data
    import models
    import train
    ds = data.open_dataset(data_root, "train")
    model = models.build_model("efficientdet_d0", num_classes=len(ds.class_names), input_shape=(size, size))
    model.train()
    priors = model.priors((size, size))
    opt = train.build_optimizer(model, "sgd", 1e-3, 4e-5)
    gen = torch.Generator().manual_seed(0)
    state = {"it": None}
    fixed = {}

    def next_batch():
        if not with_data and fixed:
            return fixed["b"]
        if state["it"] is None:
            state["it"] = iter(data.make_loader(ds, batch, shuffle=True, workers=0, seed=0, drop_last=True))
        try:
            raw = next(state["it"])
        except StopIteration:
            state["it"] = None
            return next_batch()
        b = data.augment(raw, (size, size), random_crop_mode=1.0, magnitude=6, num_layers=2,
                         mosaic_mix_prob=0.5, generator=gen)
        fixed["b"] = b
        return b

    def step():
        b = next_batch()
        outputs = model(b["images"])
        losses = assign.detection_loss(outputs, priors, {k: b[k] for k in ("boxes", "labels", "valid")},
                                       model.anchors_mode)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        opt.step()
    return step


def train_effdet_gpu(size, batch, num_classes, warmup, steps, device="cuda"):
    """effdet's DetBenchTrain on the GPU in bf16 autocast: model + anchor labeler + loss on one
    fixed synthetic batch (no data pipeline). Returns images/s."""
    from effdet import create_model
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = create_model("tf_efficientdet_d0", bench_task="train", num_classes=num_classes,
                         image_size=(size, size), pretrained=False, pretrained_backbone=False,
                         bench_labeler=True).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    boxes_yxyx = torch.tensor([[40.0, 20.0, 240.0, 200.0], [120.0, 100.0, 440.0, 400.0]]).repeat(batch, 1, 1)
    target = {"bbox": boxes_yxyx.to(device), "cls": torch.tensor([[1.0, 3.0]]).repeat(batch, 1).to(device),
              "img_scale": torch.ones(batch, device=device), "img_size": torch.tensor([[size, size]] * batch).to(device)}
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(x, target)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return batch * steps / (time.perf_counter() - t0)


def train_ours_gpu(name, size, batch, dataset, workers, variant, warmup, steps, device="cuda", phase_steps=10,
                   profile=False, fused_bn_silu=False, trace=None, trace_steps=6):
    """Our training step on the GPU exactly as train.py runs it, data included: the loader decodes
    JPEGs in `workers` processes; on the GPU augment (crop mode 1, flip, RandAugment 6, mosaic 0.5,
    HSV), bf16 forward, float32 assignment + loss, backward, SGD, EMA. variant: one of
    GPU_VARIANTS: "eager", "compile" (torch.compile, as train.py --compile), "reduce-overhead" (compile
    with CUDA graphs) or "graphs" (train.py --cuda_graphs: train.graph_model). The
    model is channels-last (NHWC) in all, as build_model makes it. fused_bn_silu: BatchNorm + SiLU
    through bn_silu_kernels.cu, as train.py --cuda_graphs --fused_bn_silu (graphs rows only).
    After the timed steps, phase_steps more steps run with a sync after each phase, to say where
    the time goes (the syncs make those steps slower than the timed ones; read the shares).
    profile: also record the phase steps with torch.profiler and print the 15 kernels that take the
    most GPU time (the syncs do not change what a kernel costs).
    On CUDA two last steps run under torch.cuda.set_sync_debug_mode("warn"): every point where the
    CPU waits for the GPU is listed as file:line (the goal is none but the ones a step needs).
    trace: a path; trace_steps more steps as in the timed loop are recorded with torch.profiler
    (CPU ops and both CUDA streams' kernels) into it as a gzipped Chrome trace, for
    chrome://tracing or ui.perfetto.dev: where the GPU sits idle, and what the CPU does then.
    Returns (images/s, fraction of the timed wall time spent waiting for the loader,
    {phase: ms per step}, [file:line of each host sync in the two audited steps],
    {thread: CPU ms per timed step} for the training and the augmentation thread, plus the
    training thread's wall ms per step spent waiting for the augmentation thread)."""
    import assign
    import data
    import models
    import train
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = models.build_model(name, num_classes=len(dataset.class_names), input_shape=(size, size)).to(device).train()
    priors = model.priors((size, size), device=device)
    if fused_bn_silu and variant == "graphs":
        models.use_fused_bn_silu(model)
    optimizer = train.build_optimizer(model, "sgd", 1e-3, 4e-5)
    ema = train.ModelEMA(model, 0.9998)
    forward = model
    if variant == "compile":
        forward = torch.compile(model, dynamic=False)
    elif variant == "reduce-overhead":  # Inductor's fused kernels, replayed as CUDA graphs
        forward = torch.compile(model, dynamic=False, mode="reduce-overhead")
    elif variant == "graphs":  # as train.py --cuda_graphs
        forward = train.graph_model(model, batch, (size, size), torch.bfloat16)
    audit = 2 if device == "cuda" else 0  # steps under CUDA's sync debug mode, to list the host syncs
    n = batch * (warmup + steps + (trace_steps if trace else 0) + phase_steps + audit)
    items = torch.utils.data.Subset(dataset, [i % len(dataset) for i in range(n)])
    loader = data.make_loader(items, batch, shuffle=True, workers=workers, seed=0, drop_last=True,
                              pin_memory=device == "cuda")
    gen = torch.Generator().manual_seed(0)
    it, wait = iter(loader), [0.0]
    phases = dict.fromkeys(("data", "augment", "forward", "assign + loss", "backward", "optimizer + EMA"), 0.0)

    def loaded(count):  # the loader's next `count` batches, its waits counted
        for _ in range(count):
            t = time.perf_counter()
            raw = next(it)
            wait[0] += time.perf_counter() - t
            yield raw

    cpu = {"augment": 0.0}  # CPU seconds of the augmentation's thread (time.thread_time: this thread's only)

    def augmented(raw):  # as train.py: the pixels to the GPU, the targets stay on the CPU
        c = time.thread_time()
        raw["images"] = raw["images"].to(device, non_blocking=True)
        out = data.augment(raw, (size, size), random_crop_mode=1.0, magnitude=6, num_layers=2,
                           mosaic_mix_prob=0.5, generator=gen)
        cpu["augment"] += time.thread_time() - c
        return out

    def mark(phase, since):
        """In the phase steps: sync, book the time since `since` to `phase`, return now."""
        sync()
        now = time.perf_counter()
        phases[phase] += now - since
        return now

    def train_step(b, timing=False):
        t = time.perf_counter()
        if variant == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are no longer read
        with torch.autocast(device, dtype=torch.bfloat16):
            outputs = forward(b["images"])  # bf16; detection_loss upcasts, as in train.py
        t = mark("forward", t) if timing else t
        losses = assign.detection_loss(outputs, priors, {k: b[k] for k in ("boxes", "labels", "valid")},
                                       model.anchors_mode)
        t = mark("assign + loss", t) if timing else t
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        t = mark("backward", t) if timing else t
        optimizer.step()
        ema.update()
        if timing:
            mark("optimizer + EMA", t)

    # 1. warm-up and timed steps, exactly as train.py runs them: on a GPU the next batch is
    # augmented in a second thread while this one trains (data.augment_ahead)
    side = torch.cuda.Stream(device) if device == "cuda" else None
    batches = data.augment_ahead(loaded(warmup + steps), augmented, device, side)
    handed = 0.0  # seconds the training thread spent in next(batches): the loader's wait + the augmentation's
    for i in range(warmup + steps):
        if i == warmup:  # workers started, kernels chosen, graphs compiled
            sync()
            t0, wait[0], handed = time.perf_counter(), 0.0, 0.0
            c0, cpu["augment"] = time.thread_time(), 0.0
        t = time.perf_counter()
        b = next(batches)
        handed += time.perf_counter() - t
        train_step(b)
    sync()
    total = time.perf_counter() - t0
    data_wait = wait[0] / total
    # Is the step bound by the CPU? Each thread's own CPU time per timed step, against the step's
    # wall time: a thread near it is the limit (on a CPU device both are this thread). And the
    # training thread's wait for the augmentation thread's batch: above zero, augmenting is slower
    # than training.
    cpu_ms = {"training thread": (time.thread_time() - c0) * 1000 / steps,
              "augmentation thread": cpu["augment"] * 1000 / steps,
              "training thread waiting for the augmentation (wall)": (handed - wait[0]) * 1000 / steps}
    if trace:  # trace_steps more steps as above, recorded (the profiler slows the CPU's side a little)
        activities = [torch.profiler.ProfilerActivity.CPU] + \
            ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for b in data.augment_ahead(loaded(trace_steps), augmented, device, side):
                train_step(b)
            sync()
        raw_path = trace + ".tmp.json"
        prof.export_chrome_trace(raw_path)
        with open(raw_path, "rb") as f, gzip.open(trace + ".tmp", "wb") as g:
            shutil.copyfileobj(f, g)
        os.replace(trace + ".tmp", trace)
        os.remove(raw_path)
        print(f"    trace of {trace_steps} steps: {trace}", flush=True)
    # 2. phase steps: one thread, a sync after each phase, to say where the time goes (the syncs
    # make these steps slower than the timed ones; read the shares); the kernels profiled here
    if profile:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])  # kernels only
        prof.start()
    for _ in range(phase_steps):
        t = time.perf_counter()
        raw = next(it)
        t = mark("data", t)
        b = augmented(raw)
        mark("augment", t)
        train_step(b, timing=True)
    if profile:
        profile_report(prof)
    # 3. audit: two steps as in 1., under CUDA's sync debug mode: every point where the CPU waits
    # for the GPU is listed as file:line (the augment thread's too)
    syncs = []
    with train_sync_audit(syncs) if audit else contextlib.nullcontext():
        for b in data.augment_ahead(loaded(audit), augmented, device, side):
            train_step(b)
    return (batch * steps / total, data_wait, {k: v * 1000 / max(phase_steps, 1) for k, v in phases.items()}, syncs,
            cpu_ms)


@contextlib.contextmanager
def train_sync_audit(syncs):
    """CUDA's sync debug mode over the block: each point where the CPU waits for the GPU is
    appended to `syncs` as path:line of the innermost frame in this repository (a sync inside a
    torch function is reported where our code called it; one during backward, at .backward())."""
    root = os.path.dirname(os.path.abspath(__file__))
    with warnings.catch_warnings():  # restores warnings.showwarning on the way out
        warnings.simplefilter("always")
        show = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return show(message, category, filename, lineno, file, line)
            ours = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(root)]
            syncs.append(f"{os.path.relpath(ours[-1].filename, root)}:{ours[-1].lineno}" if ours
                         else f"{filename}:{lineno}")

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


def profile_report(prof):
    prof.stop()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15), flush=True)


GPU_VARIANTS = ("eager", "compile", "reduce-overhead", "graphs")


def train_gpu(args):
    """The CUDA rows; returns ours / effdet for efficientdet_d0 (eager)."""
    import data
    torch.backends.cudnn.benchmark = True  # as train.py sets on CUDA; effdet's row runs with it too
    if args.gpu_trace:
        os.makedirs(args.gpu_trace, exist_ok=True)  # checked in train_main
    rows = []  # (name, size, variant), checked before anything runs
    for row in args.gpu_rows.split(","):
        if row == "effdet":
            continue
        parts = row.split(":")
        if (len(parts) not in (3, 4) or not parts[1].isdigit() or parts[2] not in GPU_VARIANTS
                or parts[3:] not in ([], ["fused"]) or (parts[3:] and parts[2] != "graphs")):
            sys.exit(f"bench.py train: --gpu_rows entry {row!r}: write NAME:SIZE:VARIANT, e.g. "
                     f"yolox_s:640:eager (VARIANT one of {', '.join(GPU_VARIANTS)}), NAME:SIZE:graphs:fused "
                     f"for BatchNorm + SiLU through the fused kernel (train.py --fused_bn_silu), or effdet")
        rows.append((parts[0], parts[1], parts[2], parts[3:] == ["fused"]))
    voc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "voc2007_100",
                       "instances_coco.json")
    dataset = data.open_dataset(voc if os.path.exists(voc) else args.data, "train")
    workers = max(1, (os.cpu_count() or 2) - 2)
    print(f"cuda: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.gpu_batch}, bf16, "
          f"{args.gpu_warmup} warm-up + {args.gpu_steps} timed steps; data: {len(dataset)} "
          f"{'voc2007_100 photos' if os.path.exists(voc) else args.data} decoded by {workers} loader workers",
          flush=True)
    effdet_ips = None
    if "effdet" in args.gpu_rows:
        effdet_ips = train_effdet_gpu(512, args.gpu_batch, len(dataset.class_names), args.gpu_warmup, args.gpu_steps)
        print(f"  effdet DetBenchTrain tf_efficientdet_d0 512, model + loss only : {effdet_ips:8.1f} img/s", flush=True)
    ours_d0 = None
    for name, size, variant, fused in rows:
        t = time.perf_counter()
        ips, wait, phases, syncs, cpu_ms = train_ours_gpu(name, int(size), args.gpu_batch, dataset, workers,
                                                          variant, args.gpu_warmup, args.gpu_steps,
                                                          profile=args.gpu_profile, fused_bn_silu=fused,
                                                          trace=os.path.join(args.gpu_trace, f"trace_{name}_{size}_{variant}"
                                                                             f"{'_fused' if fused else ''}.json.gz")
                                                          if args.gpu_trace else None)
        if name == "efficientdet_d0" and variant == "eager":
            ours_d0 = ips
        variant += ":fused" if fused else ""
        print(f"  plaindet {name} {size} {variant:15s}, data + aug + model + loss: {ips:8.1f} img/s, "
              f"data wait {wait * 100:.1f}% (row took {time.perf_counter() - t:.0f}s)", flush=True)
        print("    ms per step, synced after each phase: "
              + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()), flush=True)
        print("    CPU ms per timed step: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu_ms.items())
              + f" (a step took {args.gpu_batch / ips * 1000:.1f} ms)", flush=True)
        print(f"    host syncs in two steps: {len(syncs)}" + (f" ({', '.join(syncs)})" if syncs else ""), flush=True)
    if effdet_ips and ours_d0:
        print(f"  cuda efficientdet_d0 512: plaindet over effdet {ours_d0 / effdet_ips:.2f}x")
        return ours_d0 / effdet_ips
    return None


def train_time(step, n):
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t0


def train_main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py train", description=TRAIN_DOC)
    p.add_argument("--size", type=int, default=256, help="CPU rows: input size of efficientdet_d0")
    p.add_argument("--batch", type=int, default=4, help="CPU rows: images per step")
    p.add_argument("--steps", type=int, default=8, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating the two sides")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for both sides")
    p.add_argument("--data", default="shapes", help="dataset our side loads and augments (as train.py -d)")
    p.add_argument("--no_cpu", action="store_true", help="skip the CPU comparison (on a GPU machine)")
    p.add_argument("--no_cuda", action="store_true", help="skip the CUDA rows even if a GPU is present")
    p.add_argument("--gpu_batch", type=int, default=32, help="CUDA rows: images per step")
    p.add_argument("--gpu_warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--gpu_steps", type=int, default=30, help="CUDA rows: timed steps")
    p.add_argument("--gpu_rows", default="effdet,efficientdet_d0:512:eager,yolox_s:640:eager,"
                   "efficientdet_d0:512:compile,yolox_s:640:compile",
                   help="comma list: effdet, and NAME:SIZE:VARIANT with VARIANT eager | compile (as train.py "
                        "--compile) | reduce-overhead (compile with CUDA graphs) | graphs (as train.py --cuda_graphs)")
    p.add_argument("--gpu_trace", default=None, metavar="DIR",
                   help="write a torch.profiler trace of 6 more steps of each of our rows to "
                        "DIR/trace_NAME_SIZE_VARIANT.json.gz (chrome://tracing, ui.perfetto.dev)")
    p.add_argument("--gpu_profile", action="store_true",
                   help="print the 15 costliest GPU kernels of each of our rows (torch.profiler, after the timed steps)")
    args = p.parse_args(argv)
    if args.gpu_trace and os.path.exists(args.gpu_trace) and not os.path.isdir(args.gpu_trace):
        sys.exit(f"bench.py train: --gpu_trace {args.gpu_trace} is a file: give a folder (made if missing)")
    torch.set_num_threads(args.threads)
    try:
        import effdet  # noqa: F401
    except ImportError:
        sys.exit("bench.py train needs effdet and timm: pip install -r requirements-bench.txt")

    gpu_ratio = None
    if torch.cuda.is_available() and not args.no_cuda:
        gpu_ratio = train_gpu(args)
    if args.no_cpu:
        if gpu_ratio is not None:
            print(f"ratio: {gpu_ratio:.2f}  (CUDA, efficientdet_d0 512; the CPU comparison was skipped)")
        return

    torch.manual_seed(0)
    ours = train_our_step_fn(args.size, args.batch, args.data, with_data=True)
    ours_model_only = train_our_step_fn(args.size, args.batch, args.data, with_data=False)
    theirs = train_effdet_step_fn(args.size, args.batch, 6)
    for fn in (ours, ours_model_only, theirs):  # warm-up: first-call allocations, lazy init
        fn(); fn()
    t = {"ours": [], "ours_model": [], "effdet": []}
    for _ in range(args.rounds):
        t["ours"].append(train_time(ours, args.steps))
        t["ours_model"].append(train_time(ours_model_only, args.steps))
        t["effdet"].append(train_time(theirs, args.steps))
    ips = {k: args.batch * args.steps / sorted(v)[len(v) // 2] for k, v in t.items()}
    print(f"efficientdet_d0 training at {args.size}, batch {args.batch}, CPU, {args.threads} threads, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"  plaindet, data + augmentation + model + loss : {ips['ours']:8.2f} img/s")
    print(f"  plaindet, model + loss only (one fixed batch): {ips['ours_model']:8.2f} img/s")
    print(f"  effdet DetBenchTrain, model + loss only      : {ips['effdet']:8.2f} img/s")
    print(f"ratio: {ips['ours'] / ips['effdet']:.2f}")



COMMANDS = {"data": data_main, "models": models_main, "assign": assign_main, "nms": nms_main, "train": train_main}


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print(f"subcommands: {', '.join(COMMANDS)}; `python bench.py SUBCOMMAND -h` lists its flags")
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        sys.exit(f"bench.py: unknown subcommand {argv[0]!r}: choose one of {', '.join(COMMANDS)}")
    COMMANDS[argv[0]](argv[1:])  # each prints its own report, ending with the ratio line
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
