"""train.py: the training loop, the last stage, which calls every other file.

    python train.py --det_header yolox_s -d path/to/coco      # a COCO-format folder
    python train.py -d shapes                                  # the built-in shapes set

The flow of one step, each line of which is a file of this project:

    batch (uint8 images + padded boxes)  <- data.make_loader   (decode in worker processes)
    pixels on the device, augmented       <- data.augment       (crop, flip, RandAugment, mosaic;
                                                                   boxes stay on the CPU)
    raw per-level outputs                 <- models.Detector    (backbone -> neck -> head)
    assignment + named loss parts         <- assign.detection_loss
    backward, optimizer, EMA update       <- here
    COCO AP each epoch (of the EMA        <- eval.run_coco_evaluation
    weights when --ema_decay > 0)

Around the loop: the recipe (optimizer, learning-rate schedule, weight decay only on weights),
AMP, EMA, backbone freezing, checkpoints that resume exactly, a CSV + PNG history, and DDP via
torchrun. Defaults follow keras_cv_attention_models' (kecam's) COCO script (EfficientDet-D0 at 256,
batch 64, mosaic 0.5, RandAugment magnitude 6, a --pretrained backbone frozen for the first 32
of 105 epochs),
except that a `yolox_*` header switches to the YOLOX recipe (SGD, mosaic always, L1 loss and no
mosaic for the last 15 epochs, EMA).
"""
import argparse
import csv
import datetime
import importlib.util
import io
import json
import math
import os
import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import assign
import data
import eval as evaluation  # "eval" would shadow the builtin
import models

# The two recipes. A flag left unset on the command line takes its value from the recipe of the
# chosen detector family; a flag that is given always wins. Unless -e is given, a run lasts the
# decay plus the cooldown, as in the seed's script: 100 + 5 = 105 epochs, 285 + 15 = 300.
# One exception: freezing applies to a --pretrained backbone only (see resolve_config).
# The lr_*_steps flags count epochs, not optimizer steps, as in keras_cv_attention_models' (kecam's)
# script (fractions allowed, except in --lr_cooldown_steps).
# Where YOLOX_RECIPE differs from Megvii's exps:
#   "mosaic" is kecam's per-batch quadrant mix (data.mosaic_plan), not Megvii's 4-image canvas;
#   MixUp blends two outputs of one batch (data.mixup_images), with or without a mosaic (Megvii
#   mixes mosaics only; with the recipe's mosaic 1.0 that is every image either way);
#   multi-scale training is off unless asked for: --multiscale_range 5 is Megvii's for yolox_s
#   and up, --multiscale_range 320,640 for nano / tiny (heights 320..640 around their 416);
# so expect a lower AP than Megvii's table for the same epochs. yolox_nano / yolox_tiny also take
# Megvii's per-size changes (YOLOX_SMALL_SIZES, below).
EFFICIENTDET_RECIPE = dict(
    input_shape="256", batch_size=64, optimizer="adamw", lr_base_512=8e-3,
    weight_decay=0.02, lr_decay_steps="100", lr_warmup_steps=3.0, lr_warmup_power=1.0, lr_cooldown_steps=5,
    lr_min=1e-6, freeze_backbone_epochs=32, mosaic_mix_prob=0.5, random_crop_mode=1.0, random_scale_min=0.1,
    mixup_prob=0.0, magnitude=6, flip_prob=0.5, close_mosaic_epochs=0, ema_decay=0.0,
)
YOLOX_RECIPE = dict(  # Megvii YOLOX: lr 0.01 per 64 images with SGD down to 5% of it, 300 epochs, 15 without mosaic
    input_shape="preset", batch_size=64, optimizer="sgd", lr_base_512=0.08,  # preset: nano / tiny 416, others 640
    weight_decay=5e-4, lr_decay_steps="285", lr_warmup_steps=5.0, lr_warmup_power=2.0, lr_cooldown_steps=15,
    lr_min="5%", freeze_backbone_epochs=0, mosaic_mix_prob=1.0, random_crop_mode=2.0, random_scale_min=0.1,
    mixup_prob=1.0, magnitude=6, flip_prob=0.5, close_mosaic_epochs=15, ema_decay=0.9998,
)
# Megvii's exps for the two small sizes scale images by 0.5-1.5 instead of 0.1-2 and turn MixUp
# off (a network this narrow gains little from objects shrunk to a few pixels or blended to half
# contrast), and nano mosaics half its batches.
YOLOX_SMALL_SIZES = {
    "yolox_nano": dict(mosaic_mix_prob=0.5, random_crop_mode=1.5, random_scale_min=0.5, mixup_prob=0.0),
    "yolox_tiny": dict(random_crop_mode=1.5, random_scale_min=0.5, mixup_prob=0.0),
}


# What a resumed run takes from the run it resumes when the flag is left unset (see resolve_config).
RESUMED_SETTINGS = ("data", "det_header", "backbone", "anchors_mode", "epochs", "num_layers", "seed",
                    "eval_start_epoch", "eval_input_shape", "multiscale_range", *EFFICIENTDET_RECIPE)


def parse_args(argv=None):
    # The epilog is a table of both recipes, so -h answers "what runs if I leave a flag out";
    # RawDescriptionHelpFormatter keeps its lines as written instead of re-wrapping them.
    rows = [f"  --{name:<24}{str(EFFICIENTDET_RECIPE[name]):<16}{YOLOX_RECIPE[name]}" for name in EFFICIENTDET_RECIPE]
    p = argparse.ArgumentParser(
        description="Train an EfficientDet / YOLOX detector on COCO-format data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags left unset take their value from a recipe: YOLOX's when --det_header is yolox_*,\n"
        "else EfficientDet's (EFFICIENTDET_RECIPE and YOLOX_RECIPE at the top of train.py):\n\n"
        f"  {'flag':<26}{'EfficientDet':<16}YOLOX\n" + "\n".join(rows) + "\n\n"
        "yolox_nano: --mosaic_mix_prob 0.5 --random_crop_mode 1.5 --random_scale_min 0.5 --mixup_prob 0;\n"
        "yolox_tiny: --random_crop_mode 1.5 --random_scale_min 0.5 --mixup_prob 0 (as Megvii's exps).\n"
        "'preset' is the YOLOX preset's published size: yolox_nano / yolox_tiny 416, the others 640.\n"
        "(EfficientDet trains at keras_cv_attention_models' 256; its published sizes, efficientdet_d0 512 ...\n"
        "d7 1536, are in `python models.py`.)\n"
        "--freeze_backbone_epochs applies with --pretrained only (else 0).\n"
        "-e defaults to the decay plus the cooldown. With --resume, a flag left unset takes the\n"
        "value of the run being resumed.")
    a = p.add_argument
    a("-d", "--data", default=None, help="'shapes' (the default: built-in set, made on first use), a COCO "
      "folder (annotations/instances_{train,val}.json or the download's instances_{train,val}2017.json, + images), "
      "a COCO json, or a YOLO folder")
    a("-i", "--input_shape", default=None, help="model input 'S' or 'H,W'; divisible by the largest stride")
    a("--eval_input_shape", default=None, help="input 'S' or 'H,W' of the per-epoch evaluation, and the size "
      "the checkpoints give eval.py and predict (default: -i); train small and fast, evaluate at the images' own size")
    a("-b", "--batch_size", type=int, default=None, help="images per step on each process")
    a("-e", "--epochs", type=int, default=None,
      help="total epochs (default: the last --lr_decay_steps + --lr_cooldown_steps)")
    a("-p", "--optimizer", default=None, help="sgd | adam | adamw")
    a("--lr_base_512", type=float, default=None, help="learning rate for a total batch of 512; scaled linearly")
    a("--weight_decay", type=float, default=None, help="decay on conv / linear weights only (never norms or biases)")
    a("--lr_decay_steps", default=None, help="one number N: cosine from the end of warm-up down to "
      "--lr_min at epoch N; a list like 30,60,90: multiply by 0.1 at each of those epochs")
    a("--lr_warmup_steps", type=float, default=None, help="epochs of warm-up from 0")
    a("--lr_warmup_power", type=float, default=None, help="warm-up shape: lr = peak x (epoch / warm-up) ** power; "
      "1 linear (EfficientDet, kecam), 2 quadratic (Megvii YOLOX)")
    a("--lr_cooldown_steps", type=int, default=None,
      help="epochs after the decay (at --lr_min after a cosine, at the last step's lr after a list); "
           "sets the run's length when -e is not given")
    a("--lr_min", default=None, help="learning rate at the end of the decay: a number like 1e-5, or a share of "
      "the peak like 5%% (which follows the batch size, as the peak does)")
    a("--det_header", default=None, help="preset: efficientdet_d0 (the default)..d7, d7x, yolox_nano..yolox_x")
    a("--backbone", default=None, help="swap the backbone: cspdarknet, efficientnet_b0..b7, "
      "efficientnetv2_b0, resnet50, timm:NAME")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--use_anchor_free_mode", action="store_const", dest="anchors_mode",
                      const="anchor_free", help="YOLOX grid points + SimOTA, whatever the header")
    mode.add_argument("--use_anchors_mode", action="store_const", dest="anchors_mode",
                      const="efficientdet", help="EfficientDet anchors + max-IoU, whatever the header")
    a("--freeze_backbone_epochs", type=int, default=None, help="train with the backbone frozen for these "
      "first epochs (default: the recipe's, 32 for EfficientDet, when --pretrained is given; else 0)")
    a("--mosaic_mix_prob", type=float, default=None, help="probability that a batch is mosaicked")
    a("--flip_prob", type=float, default=None, help="probability of a horizontal flip per image (0 where left "
      "and right differ: text, left / right hands)")
    a("--random_crop_mode", type=float, default=None, help="0 letterbox; (0,1) random resized crop; "
      "1 random largest crop; >1 random scale in [--random_scale_min, mode]")
    a("--random_scale_min", type=float, default=None, help="smallest scale factor when --random_crop_mode > 1 "
      "(Megvii's mosaic_scale floor)")
    a("--magnitude", type=float, default=None, help="RandAugment magnitude (0 = off)")
    a("--num_layers", type=int, default=None, help="RandAugment ops per image (default 2)")
    a("--mixup_prob", type=float, default=None, help="probability that an image is blended 50/50 with another "
      "of its batch, keeping both images' boxes (YOLOX's MixUp)")
    a("--multiscale_range", default=None, metavar="N|LO,HI", help="multi-scale training as Megvii's YOLOX: every "
      "10 steps a new input height, -i's +- N times the largest stride (N = 5 for yolox_s and up, at most -i / "
      "stride; cut where the smallest would go under 2 strides), or every multiple of the stride from LO to HI px "
      "when given as LO,HI (320,640 for nano / tiny; HI at most 2 x -i); the width keeps -i's aspect; the "
      "evaluation stays at --eval_input_shape (default 0: off, so --cuda_graphs / --compile run one graph)")
    a("--close_mosaic_epochs", type=int, default=None, help="last epochs without mosaic or MixUp (and with L1 loss "
      "when anchor-free)")
    a("--ema_decay", type=float, default=None, help="EMA of the weights (0 = off); ramped up over the first steps")
    a("--amp", choices=["bf16", "fp16", "off"], default=None, help="mixed precision (default bf16 on CUDA, off on CPU)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--cuda_graphs", action="store_true",
      help="record the model's forward and backward once as CUDA graphs and replay them each step, so "
           "the CPU launches 2 graphs instead of every kernel (one GPU; not with --compile)")
    a("--fused_bn_silu", action="store_true",
      help="with --cuda_graphs: BatchNorm + SiLU as one CUDA operation (bn_silu_kernels.cu, through cupy): "
           "less GPU time per step, the same arithmetic up to rounding; off by default (README, Use it)")
    a("--sync_bn", action="store_true", help="SyncBatchNorm under DDP")
    a("--workers", type=int, default=None,
      help="DataLoader decode workers per process (default: 2 on CPU; on a GPU the cores of this "
           "machine shared among its processes, at most 8 each)")
    a("--seed", type=int, default=None, help="same seed, same batches; same weights on the CPU (a GPU's "
      "kernels, chosen by timing, may sum in another order); default 0")
    a("--eval_start_epoch", type=int, default=None, help="evaluate COCO AP from this epoch (1-based) on; default 1")
    a("--eval_batch_size", type=int, default=16, help="batch size of the per-epoch evaluation")
    a("--resume", default=None, help="a last.pt (or its run folder) to continue from, exactly where it stopped")
    a("--pretrained", default=None, help="a checkpoint (or a run folder: its best.pt, else last.pt) whose matching weights "
      "initialise the model, an effdet EfficientDet or Megvii YOLOX checkpoint, or an ImageNet classifier's weights "
      "for the backbone alone (timm's efficientnet_b0..b7 / tf_efficientnetv2_b0, torchvision's resnet50): a .pth / "
      ".bin you downloaded")
    a("--out", default=None, help="run folder: checkpoints, history.csv, history.png, config.json, "
      "train_batch.png, val_predictions.png (default runs/train; with --resume, the checkpoint's folder)")
    argv = list(sys.argv[1:] if argv is None else argv)
    evaluation.check_foreign_flags(p, argv)  # effdet's --img-size, Megvii's -n, ...: what to give here
    return p.parse_args(argv)


def fail(message):
    """One clear line for the user instead of a traceback, exit status 2 like argparse."""
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def resolve_config(args):
    """Merge the command line with the recipe of the chosen family into one plain dict, checking
    every value before any file is touched (a bad --eval_batch_size would otherwise fail after a
    whole epoch, as a torch error that names no flag)."""
    cfg = dict(vars(args))
    # A run folder stands for the checkpoint a user means by it: last.pt to resume, best.pt for
    # weights (last.pt when the run was never evaluated).
    for flag, names in (("resume", ["last.pt"]), ("pretrained", ["best.pt", "last.pt"])):
        if cfg[flag] and os.path.isdir(cfg[flag]):
            found = [os.path.join(cfg[flag], n) for n in names if os.path.isfile(os.path.join(cfg[flag], n))]
            cfg[flag] = found[0] if found else cfg[flag]
    for flag in ("resume", "pretrained"):
        if cfg[flag] and not os.path.isfile(cfg[flag]):
            what = "is a folder without last.pt / best.pt" if os.path.isdir(cfg[flag]) else "does not exist"
            fail(f"--{flag} {cfg[flag]} {what}: give the last.pt / best.pt of an earlier run" +
                 (", or weights you downloaded" if flag == "pretrained" else ""))
    # A resumed run continues the run it resumes: a flag left unset takes that run's value (its
    # checkpoint records them all, resolved), so `--resume last.pt` alone goes on as it was; a flag
    # given on the command line wins, and load_resume names it. Machine-bound settings (workers,
    # amp, compile, ...) are this machine's, as for a new run.
    if cfg["resume"]:
        saved = load_checkpoint_file(cfg["resume"], mmap=True).get("train_config", {})
        for k in RESUMED_SETTINGS:
            if cfg[k] is None and saved.get(k) is not None:
                cfg[k] = saved[k]
        # Settings newer than the run: what it was trained with before they existed.
        for k, before in (("random_scale_min", 0.1), ("mixup_prob", 0.0)):
            if cfg[k] is None and saved and k not in saved:
                cfg[k] = before
        for k in ("input_shape", "eval_input_shape", "lr_decay_steps"):  # recorded as lists: back to the flag's text
            if isinstance(cfg[k], list):
                cfg[k] = ",".join(f"{v:g}" for v in cfg[k])
    for k, default in (("data", "shapes"), ("det_header", "efficientdet_d0"), ("num_layers", 2), ("seed", 0),
                       ("multiscale_range", 0),
                       ("eval_start_epoch", 1)):
        if cfg[k] is None:
            cfg[k] = default
    if cfg["det_header"] not in models.PRESETS:
        fail(f"--det_header {cfg['det_header']!r} is unknown: choose one of {', '.join(models.PRESETS)}")
    if cfg["backbone"] is not None and cfg["backbone"] not in models.BACKBONES and not cfg["backbone"].startswith("timm:"):
        fail(f"--backbone {cfg['backbone']!r} is unknown: choose one of {', '.join(models.BACKBONES)}, or timm:NAME")
    if cfg["det_header"] in models.YOLOX_PRESETS:
        recipe = {**YOLOX_RECIPE, **YOLOX_SMALL_SIZES.get(cfg["det_header"], {})}
    else:
        recipe = EFFICIENTDET_RECIPE
    if cfg["resume"] and args.data is None and cfg["data"] != "shapes" and not os.path.exists(cfg["data"]):
        fail(f"--resume {cfg['resume']}: its run's data, {cfg['data']}, is not there: give -d with where it is now")
    if cfg["data"] != "shapes" and os.path.exists(cfg["data"]):
        # Recorded absolute, so eval.py (which defaults to a checkpoint's data) finds it from anywhere.
        cfg["data"] = os.path.abspath(cfg["data"])
    if cfg["out"] is None:  # a resumed run goes on writing where it was
        cfg["out"] = (os.path.dirname(cfg["resume"]) or ".") if cfg["resume"] else os.path.join("runs", "train")
        if not cfg["resume"] and os.path.exists(os.path.join(cfg["out"], "last.pt")):
            # Replacing a run is fine when asked for by name, never by default.
            fail(f"{cfg['out']} holds an earlier run: continue it with --resume {cfg['out']}/last.pt, or give --out "
                 f"(a new folder, or {cfg['out']} to replace that run)")
    if cfg["freeze_backbone_epochs"] is None and not cfg["pretrained"]:
        # The recipe freezes a PRETRAINED backbone while the new head settles. A random one has
        # nothing worth keeping: frozen, it would stay random, BatchNorm statistics and all.
        cfg["freeze_backbone_epochs"] = 0
    for k, v in recipe.items():
        if cfg.get(k) is None:
            cfg[k] = v
    if cfg["input_shape"] == "preset":  # the size the preset was published at, as Megvii trains it
        cfg["input_shape"] = "x".join(map(str, models.preset_input_shape(cfg["det_header"])))
    for flag in ("input_shape", "eval_input_shape"):
        try:
            if cfg[flag] is not None:
                cfg[flag] = list(models.parse_input_shape(cfg[flag]))
                models.check_input_shape(cfg[flag], cfg["det_header"])
        except ValueError as e:
            fail(f"--{flag} {e}")
    if cfg["eval_input_shape"] is None:  # evaluated at the size it trains at, unless told
        cfg["eval_input_shape"] = list(cfg["input_shape"])
    # BatchNorm in training needs 2+ values per channel: a batch of 1 at an input whose
    # coarsest level is 1 x 1 cell has one (an error deep inside torch otherwise).
    stride = models.largest_stride(cfg["det_header"])
    if cfg["batch_size"] == 1 and tuple(cfg["input_shape"]) == (stride, stride):
        fail(f"-b 1 at input {stride}: the coarsest level of {cfg['det_header']} is then 1 x 1, too little for "
             f"BatchNorm; give -b 2 or more, or -i {2 * stride}")
    raw = str(cfg["lr_decay_steps"])
    try:
        steps = [float(s) for s in raw.split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or not all(math.isfinite(s) and s > 0 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        fail(f"--lr_decay_steps {raw!r}: give one number of epochs (cosine) like 100, or increasing "
             f"epochs like 30,60,90 (step decay)")
    cfg["lr_decay_steps"] = steps
    for flag, key, low in (("-b/--batch_size", "batch_size", 1), ("--eval_batch_size", "eval_batch_size", 1),
                           ("--freeze_backbone_epochs", "freeze_backbone_epochs", 0),
                           ("--close_mosaic_epochs", "close_mosaic_epochs", 0),
                           ("--lr_cooldown_steps", "lr_cooldown_steps", 0)):
        if cfg[key] < low:
            fail(f"{flag} {cfg[key]}: give {low} or more")
    if cfg["epochs"] is None:
        cfg["epochs"] = int(math.ceil(steps[-1])) + cfg["lr_cooldown_steps"]
    if cfg["epochs"] < 1:
        fail(f"-e/--epochs {cfg['epochs']}: give 1 or more")
    if not (math.isfinite(cfg["lr_base_512"]) and cfg["lr_base_512"] > 0):
        fail(f"--lr_base_512 {cfg['lr_base_512']}: give a learning rate above 0, like 0.008")
    # The peak rate scales with the total batch; a floor written as a share of it scales along.
    # (A fixed floor tuned for batch 64 would sit at 40% of the peak at batch 8, above it at 2.)
    total_batch = cfg["batch_size"] * int(os.environ.get("WORLD_SIZE", "1"))
    lr_peak = cfg["lr_base_512"] * total_batch / 512
    # lr_min stays as given (a resumed run with another batch then takes the same share of its
    # own peak); lr_floor is the number the schedule uses.
    text = cfg["lr_min"] = str(cfg["lr_min"]).strip()
    try:
        cfg["lr_floor"] = float(text[:-1]) / 100 * lr_peak if text.endswith("%") else float(text)
    except ValueError:
        fail(f"--lr_min {text!r}: give a learning rate like 1e-5, or a share of the peak like 5%")
    if len(steps) == 1 and cfg["lr_floor"] > lr_peak:
        fail(f"--lr_min {text} is above the peak learning rate {lr_peak:.3g} of this run (--lr_base_512 "
             f"{cfg['lr_base_512']:g} x total batch {total_batch} / 512): the cosine would climb; give a smaller "
             f"--lr_min, or a share of the peak like 5%")
    for flag, key in (("--weight_decay", "weight_decay"), ("--lr_min", "lr_floor"),
                      ("--lr_warmup_steps", "lr_warmup_steps")):
        if not (math.isfinite(cfg[key]) and cfg[key] >= 0):
            fail(f"{flag} {cfg[key]}: give 0 or more")
    if not (math.isfinite(cfg["lr_warmup_power"]) and cfg["lr_warmup_power"] > 0):
        fail(f"--lr_warmup_power {cfg['lr_warmup_power']}: give a power above 0 (1 linear, 2 quadratic)")
    if len(steps) == 1 and cfg["lr_warmup_steps"] >= steps[0]:
        # The cosine runs from the end of the warm-up to epoch N: with nothing in between, the
        # rate would climb to the peak and drop straight to the floor.
        fail(f"--lr_warmup_steps {cfg['lr_warmup_steps']:g} reaches past the cosine's end at --lr_decay_steps "
             f"{steps[0]:g}: give a shorter warm-up or a later decay end")
    try:
        data.check_augment_args(cfg["random_crop_mode"], cfg["magnitude"], cfg["num_layers"], cfg["mosaic_mix_prob"],
                                cfg["flip_prob"], cfg["random_scale_min"], cfg["mixup_prob"])
    except ValueError as e:
        fail(str(e))
    if not 0 <= cfg["ema_decay"] < 1:
        fail(f"--ema_decay {cfg['ema_decay']}: give a decay in [0, 1) like 0.9998, or 0 for no EMA")
    try:  # a file given as the folder, or in its path, or no permission: before any work
        evaluation.check_output_folder("--out", cfg["out"], "the run")
    except evaluation.EvalInputError as e:
        fail(str(e))
    cfg["optimizer"] = cfg["optimizer"].lower()  # -p AdamW as torch spells it
    if cfg["optimizer"] not in ("sgd", "adam", "adamw"):
        fail(f"--optimizer {cfg['optimizer']!r} is unknown: choose sgd, adam or adamw")
    try:
        cfg["multiscale_range"] = parse_multiscale(cfg["multiscale_range"], stride)  # n or [lo, hi]
        several_sizes = multiscale_shapes(cfg["input_shape"], cfg["multiscale_range"], stride) != \
            [tuple(cfg["input_shape"])]  # more than one, or one other than -i (a graph is recorded at -i)
    except ValueError as e:
        given = cfg["multiscale_range"]
        given = ",".join(map(str, given)) if isinstance(given, list) else given
        fail(str(e) if str(e).startswith("--") else f"--multiscale_range {given}: {e}")
    if cfg["cuda_graphs"]:
        if several_sizes:
            fail("--cuda_graphs with --multiscale_range: a CUDA graph replays one input size; give "
                 "--multiscale_range 0, or leave --cuda_graphs out")
        if cfg["compile"]:
            fail("--cuda_graphs with --compile: choose one (both cut the CPU's kernel launches)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            fail("--cuda_graphs runs on one GPU: leave it out under torchrun")
        if not torch.cuda.is_available():
            fail("--cuda_graphs needs a CUDA GPU, and none is visible: leave the flag out on a CPU")
    if cfg["fused_bn_silu"]:
        if not cfg["cuda_graphs"]:
            fail("--fused_bn_silu works inside --cuda_graphs only (launched eagerly its kernels cost the CPU "
                 "more than they save the GPU): add --cuda_graphs, or leave the flag out")
        if importlib.util.find_spec("cupy") is None:
            fail("--fused_bn_silu compiles its kernel with cupy, which is not installed: pip install "
                 "cupy-cuda12x (or cupy-cuda13x, as your CUDA), or leave the flag out")
    if cfg["sync_bn"] and not torch.cuda.is_available():
        fail("--sync_bn needs CUDA GPUs (torch's SyncBatchNorm has no CPU kernel): leave it out on a CPU")
    if cfg["amp"] is None:
        # bf16 where the GPU computes in it (Ampere and later); older GPUs (V100, T4) only
        # emulate it, slowly, so they take fp16 with its loss scaler.
        native_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        cfg["amp"] = ("bf16" if native_bf16 else "fp16") if torch.cuda.is_available() else "off"
    if cfg["workers"] is None:
        cfg["workers"] = data.default_workers()
    if cfg["workers"] < 0:
        fail(f"--workers {cfg['workers']}: give 0 (decode in the main process) or more")
    return cfg


# ----------------------------------------------------------------------------------------------
# The recipe: optimizer, learning rate, EMA
# ----------------------------------------------------------------------------------------------
def build_optimizer(model, name, lr, weight_decay):
    """Weight decay pulls weights towards 0; on a norm's scale / shift or a bias it only fights
    the normalisation, so those (every parameter with fewer than 2 dims) get none."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused (Adam, AdamW): one kernel updates every parameter of a group, on a CPU as on a GPU,
    # where foreach issues a few ops per list of parameters: on the CPU the AdamW step of
    # yolox_nano takes 2.3 ms instead of 6.3 ms (11.5 ms as a Python loop over parameters); the
    # update is the same arithmetic, to rounding. SGD stays foreach: torch's fused SGD fails
    # when some parameters of a group have a momentum buffer and others not yet, which is what
    # unfreezing the backbone leaves behind.
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, foreach=True)
    if name == "adam":  # Adam's weight_decay is L2 in the gradient, as torch defines it
        return torch.optim.Adam(groups, lr=lr, fused=True)
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def learning_rate(epoch_float, cfg, lr_peak):
    """The learning rate at a (fractional) epoch: warm-up from 0 as (epoch / warm-up) ** power
    (1 linear; 2 quadratic, as Megvii YOLOX, which starts slower: 4% of the peak after a fifth
    of the warm-up instead of 20%), then cosine from the end of the warm-up down to lr_floor (the
    resolved --lr_min), reached at epoch lr_decay_steps[0], then lr_floor through the cooldown; or,
    for a list of epochs, x0.1 at each of them (no floor: the cooldown stays at the last step's rate)."""
    warmup = cfg["lr_warmup_steps"]
    if epoch_float < warmup:
        return lr_peak * (epoch_float / warmup) ** cfg["lr_warmup_power"]
    steps = cfg["lr_decay_steps"]
    if len(steps) > 1:  # step decay at the listed epochs
        return lr_peak * 0.1 ** sum(epoch_float >= s for s in steps)
    span = max(steps[0] - warmup, 1e-8)
    progress = min((epoch_float - warmup) / span, 1.0)  # past the decay: the cooldown at lr_min
    return cfg["lr_floor"] + 0.5 * (lr_peak - cfg["lr_floor"]) * (1 + math.cos(math.pi * progress))


class ModelEMA:
    """An exponential moving average of the weights, the copy that is evaluated and kept.

    The decay ramps up as decay * (1 - exp(-updates / 2000)), as YOLOX does: early on the
    average follows the fast-changing weights closely instead of remembering the random init.
    BatchNorm's running mean and variance are averaged like the weights (as YOLOX does); its
    integer batch counters are copied."""

    def __init__(self, model, decay):
        import copy
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0
        # The (average, live) tensors, listed once: state_dict() hands out detached views of the
        # tensors themselves, so in-place updates and load_state_dict() keep these lists valid.
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self.averages = [e for e, t in pairs if e.dtype.is_floating_point]
        self.weights = [t for e, t in pairs if e.dtype.is_floating_point]
        self.counters = [e for e, t in pairs if not e.dtype.is_floating_point]
        self.counter_sources = [t for e, t in pairs if not e.dtype.is_floating_point]

    @torch.no_grad()
    def update(self):
        """Average in the current weights of the model given at construction."""
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / 2000))
        # ema = d * ema + (1 - d) * w, written as lerp(ema, w, 1 - d). The _foreach_ form does all
        # tensors in a few fused kernels; a Python loop would launch two small kernels per tensor,
        # about a thousand per step on a GPU, which costs more than the arithmetic itself.
        torch._foreach_lerp_(self.averages, self.weights, 1 - d)
        if self.counters:  # BatchNorm's num_batches_tracked (a model without BatchNorm has none)
            torch._foreach_copy_(self.counters, self.counter_sources)


# ----------------------------------------------------------------------------------------------
# Checkpoints and history
# ----------------------------------------------------------------------------------------------
def save_atomic(obj, path):
    """torch.save to a temp name, then rename: a crash mid-write never leaves a broken last.pt,
    and a failed write leaves no temp file behind."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def plot_history(rows, path):
    """Loss parts, learning rate and AP per epoch as one PNG, drawn with PIL (no matplotlib)."""
    panels = [("loss parts", [k for k in rows[0] if k.startswith("loss_")]), ("lr", ["lr"]),
              ("COCO AP (EMA if on)", ["AP", "AP50"])]
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    w, h, pad = 420, 300, 40
    img = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(img)
    for i, (title, keys) in enumerate(panels):
        x0 = i * w
        series = {k: [(int(r["epoch"]), float(r[k])) for r in rows if r.get(k) not in (None, "")] for k in keys}
        points = [v for s in series.values() for _, v in s]
        draw.text((x0 + pad, 8), title, fill="black")
        draw.rectangle([x0 + pad, pad, x0 + w - 10, h - pad], outline="grey")
        if not points:
            continue
        lo, hi = min(points + [0.0]), max(points)
        hi = hi if hi > lo else lo + 1.0
        n = max(max(int(r["epoch"]) for r in rows), 2)  # the last epoch: the x axis runs over 1..n
        draw.text((x0 + 2, pad - 4), f"{hi:.3g}", fill="black")
        draw.text((x0 + 2, h - pad - 8), f"{lo:.3g}", fill="black")
        draw.text((x0 + w // 2, h - pad + 8), "epoch", fill="black")
        draw.text((x0 + pad, h - pad + 4), "1", fill="black")  # the first and last epoch under the axis ends
        if n > 1:
            draw.text((x0 + w - 10 - draw.textlength(str(n)), h - pad + 4), str(n), fill="black")
        legend_x = x0 + pad  # the legend runs in one line above the box, where no curve can cover it
        for j, (k, s) in enumerate(series.items()):
            xy = [(x0 + pad + (e - 1) / (n - 1) * (w - pad - 10), h - pad - (v - lo) / (hi - lo) * (h - 2 * pad))
                  for e, v in s]
            colour = colours[j % len(colours)]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for x, y in xy:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            label = k.removeprefix("loss_")
            draw.text((legend_x, 24), label, fill=colour)
            legend_x += draw.textlength(label) + 12
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def append_history(path, row):
    """history.csv: one row per epoch, header from the first row."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def write_history(path, rows):
    """Rewrite history.csv with these rows (header from the first), atomically; none: no file."""
    if not rows:
        if os.path.exists(path):
            os.remove(path)
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def read_history(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
# ----------------------------------------------------------------------------------------------
def setup_distributed():
    """Returns (rank, world_size, device). A plain `python train.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # The other processes wait at a barrier while rank 0 evaluates each epoch: a large model
        # on COCO's 5,000 val images can take longer than NCCL's default 10 minutes of waiting.
        timeout = datetime.timedelta(hours=1)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", timeout=timeout)
            device = torch.device("cuda", local_rank)
        else:
            dist.init_process_group("gloo", timeout=timeout)
            device = torch.device("cpu")
        return dist.get_rank(), world, device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------
# Speed and freezing: CUDA graphs, a frozen backbone
# ----------------------------------------------------------------------------------------------
def graph_model(model, batch_size, input_shape, amp_dtype):
    """--cuda_graphs: record the model's forward and its backward once as two CUDA graphs; from
    then on model(images) in training mode replays them. Why: eager PyTorch makes the CPU launch
    every kernel itself: the forward and backward of YOLOX-S are about 1,300 operations, each
    costing microseconds of Python and driver time; a replay is one launch, so the CPU is free to
    prepare the next batch while the GPU works. In eval mode the model runs its normal forward,
    so evaluation is unchanged.

    What a graph needs, and why train.py meets it: every step the same input shape (the input
    size is fixed and the loader drops the last, smaller batch), the weights updated in place (all
    three optimizers do) and the same set of trainable weights. Freezing changes that set, so the
    loop calls this again when it does. images of the graph: float32 [batch_size, 3, H, W].
    The recording runs a few warm-up passes, which would move the BatchNorm statistics: they are
    put back afterwards, so graphing changes no number of the run.
    The gradients a replay hands out are the graph's own buffers, not copies: the loop must clear
    them with zero_grad(set_to_none=True) (zeroing them in place and adding the next replay's
    gradient would double it), and before recording again drop the last step's outputs and
    gradients, which keep the old graphs' memory alive."""
    if "forward" in vars(model):  # graphed before (freezing changed): back to the class's forward
        del model.forward
        torch.cuda.empty_cache()  # the old graphs' memory, released by the caller, goes back first
    saved = [b.clone() for b in model.buffers()]
    device = model.mean.device
    example = torch.rand(batch_size, 3, *input_shape, device=device,
                         generator=torch.Generator(device).manual_seed(0))  # leaves the global RNG alone
    # Autocast's weight cache would keep a bf16 copy made before the graph existed: off while
    # recording, so the graph itself casts the current weights each replay. (The backward is
    # recorded under autocast too, unlike eager's; none of this model's backward ops is one that
    # autocast casts, so the numbers are the same.)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=False):
        torch.cuda.make_graphed_callables(model, (example,))
    with torch.no_grad():
        for b, s in zip(model.buffers(), saved):
            b.copy_(s)
    return model


def set_backbone_frozen(model, frozen):
    """Freezing = no gradient for the backbone's weights, and its BatchNorm statistics held too
    (eval mode), so a pretrained backbone is not disturbed while the new head settles. The
    optimizer keeps every parameter from the start: a parameter without a gradient is skipped,
    so unfreezing later in the same run needs no new optimizer and loses no state."""
    model.backbone.requires_grad_(not frozen)
    model.backbone.train(not frozen)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def augment_seed(seed, epoch, rank, world):
    """The seed of an epoch's augmentation draws on one process. Unlike the loader's seed
    (seed * 1000 + epoch, which the DistributedSampler needs equal on every rank to split the
    images between them), it differs per rank: else image k of every rank would get the same
    crop, flip, RandAugment ops and mosaic coin. One process (rank 0 of 1) gets the loader's."""
    return (seed * 1000 + epoch) * world + rank


def draw_picture(name, log, draw):
    """Run draw(), which writes the run folder's picture `name`. Pictures are for looking at, not
    part of the run: one that cannot be drawn (a full disk, the GPU out of memory on large val
    images) is a warning, never a stopped run or a lost epoch. Returns whether it was drawn."""
    try:
        draw()
    except (RuntimeError, ValueError, OSError) as e:
        log(f"warning: {name} was not drawn: {e}")
        return False
    return True


def multiscale_shapes(input_shape, multiscale_range, stride):
    """The input sizes of multi-scale training, smallest first: heights k x stride, widths keeping
    -i's aspect as Megvii rounds them (stride x int(k x W / H)). multiscale_range is either
      n (Megvii's multiscale_range): k = H / stride - n .. H / stride + n, n cut so that the range
        stays centred on -i and the coarsest level stays 2 x 2 or larger (at -i 192, stride 32,
        5 becomes 4: 64..320); n strides of more than H is a ValueError (a height given as n); or
      [lo, hi] (Megvii's random_size, in px: its nano and tiny train at 320..640 around 416):
        every multiple of the stride from lo to hi; a width under 2 strides, or hi above 2 H,
        is a ValueError.
    Returns [(H, W), ...]; one entry, -i itself, when multiscale_range is 0."""
    h, w = input_shape
    if isinstance(multiscale_range, (list, tuple)):
        lo, hi = multiscale_range
        if hi > 2 * h:  # as far as n reaches; past it, most likely a typo (320,64000)
            raise ValueError(f"the largest height {hi} is over twice -i's {h}: give at most {2 * h}")
        if int(lo // stride * w / h) < 2:
            raise ValueError(f"at height {lo} the width would be {int(lo // stride * w / h) * stride} px, under "
                             f"2 x the stride {stride}: give a larger first height")
        return [(k * stride, int(k * w / h) * stride) for k in range(lo // stride, hi // stride + 1)]
    k0 = h // stride
    n = multiscale_range
    if n > k0:  # more strides than -i has: most likely a height typed where a count goes (640 for 5)
        raise ValueError(f"{n} strides of {stride} px is {n * stride} px, more than -i's height {h}: give a count "
                         f"like {max(1, min(5, k0 - 2))}, or the smallest and largest heights like "
                         f"{max(2, k0 // 2) * stride},{k0 * 3 // 2 * stride}")
    while n > 0 and (k0 - n < 2 or int((k0 - n) * w / h) < 2):
        n -= 1
    return [(k * stride, int(k * w / h) * stride) for k in range(k0 - n, k0 + n + 1)]


def parse_multiscale(value, stride):
    """--multiscale_range as given (text, or a resumed run's int / [lo, hi]) -> n >= 0 or [lo, hi]:
    heights in px, multiples of the largest stride, lo >= 2 strides (a coarsest level of 2 x 2),
    lo <= hi. Raises ValueError with the fix."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value).strip()
    parts = [p.strip() for p in text.split(",")]
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1 and numbers[0] >= 0:
        return numbers[0]
    if len(numbers) == 2:
        lo, hi = numbers
        if lo % stride or hi % stride:
            raise ValueError(f"--multiscale_range {text}: heights must be multiples of the largest stride, "
                             f"{stride}, like {max(2, round(lo / stride)) * stride},{max(2, round(hi / stride)) * stride}")
        if not 2 * stride <= lo <= hi:
            raise ValueError(f"--multiscale_range {text}: give the smallest height first, at least 2 x the largest "
                             f"stride ({2 * stride}), like 320,640")
        return [lo, hi]
    raise ValueError(f"--multiscale_range {text}: give 0 (one input size), a number of strides like 5 (-i +- 5 x "
                     f"{stride} px), or the smallest and largest heights like 320,640")


def step_input_shape(shapes, seed, epoch, step):
    """The input (H, W) of one training step: one of multiscale_shapes, drawn uniformly and kept
    for 10 steps (as Megvii's). Objects are then seen at more sizes than the crop's scale jitter
    alone gives. The draw depends on (seed, epoch, step // 10) only: every DDP rank and a
    resumed run pick the same size without exchanging a number."""
    if len(shapes) == 1:
        return shapes[0]
    g = torch.Generator().manual_seed((seed * 1000 + epoch) * 100000 + step // 10)
    return shapes[int(torch.randint(0, len(shapes), (1,), generator=g))]


def main(argv=None):
    """The command line. A Ctrl-C before the training loop (while the data opens, say) has no
    state to save: one line instead of a traceback. The loop handles its own (see run)."""
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("\ninterrupted before training began: nothing was saved", file=sys.stderr)
        sys.exit(130)


def run(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)
    rank, world, device = setup_distributed()
    is_main = rank == 0
    if device.type == "cuda":
        # Every batch of a run has the same shape (a few, with --multiscale_range), so cuDNN may
        # time its convolution algorithms once per layer shape and keep the fastest, instead of
        # picking one by heuristics.
        torch.backends.cudnn.benchmark = True
    log = print if is_main else (lambda *a, **k: None)

    # ---- data: both splits open (and the shapes set is built) before any model work. Under
    # DDP rank 0 goes first, so the built-in set is generated once, not by every process at once.
    if world > 1 and not is_main:
        dist.barrier()
    try:
        # The readers warn about the boxes they had to drop; printed here as plain lines, without
        # Python's "data.py:123: UserWarning:" and source line, which mean nothing to a user.
        with warnings.catch_warnings(record=True) as dropped:
            warnings.simplefilter("always")
            train_set = data.open_dataset(cfg["data"], "train")
            val_set = data.open_dataset(cfg["data"], "val")
    except (FileNotFoundError, ValueError) as e:
        # the readers' messages name the file or folder; the flag's value is said once
        fail(f"--data: {e}" if cfg["data"] in str(e) else f"--data {cfg['data']}: {e}")
    for w in dropped:
        log(f"train.py: warning: {w.message}")
    if world > 1 and is_main:
        dist.barrier()
    if not any((r["labels"] >= 0).any() for r in train_set.records):
        fail(f"--data {cfg['data']}: the train split has no usable box in its {len(train_set)} images "
             f"(see the warnings above, if any): nothing to learn from; fix the annotations")
    said = any("no val split" in str(w.message) for w in dropped)  # a folder's reader said it already
    if train_set.files == val_set.files and not said:  # a single COCO json, or a YOLO folder without splits
        log(f"note: --data {cfg['data']} has one split, so the AP of each epoch is measured on the "
            f"training images; give a folder with a train and a val split for a held-out AP")

    # ---- model, priors, optimizer
    torch.manual_seed(cfg["seed"])  # same seed -> same initial weights
    pixel_norm, tf_padding = weights_settings(cfg, log)
    try:
        model = models.build_model(cfg["det_header"], backbone=cfg["backbone"], anchors_mode=cfg["anchors_mode"],
                                   num_classes=len(train_set.class_names),
                                   # the size it is evaluated at, which its checkpoints give eval.py
                                   input_shape=tuple(cfg["eval_input_shape"]),
                                   pixel_norm=pixel_norm, tf_padding=tf_padding)
    except ValueError as e:
        fail(str(e))
    if cfg["pretrained"]:
        load_pretrained(model, cfg["pretrained"], log, train_set.cat_ids, train_set.class_names)
    model.to(device)
    if world > 1 and cfg["sync_bn"]:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg["fused_bn_silu"]:
        # BatchNorm + SiLU as one CUDA operation in training (models.bn_silu_cuda: the same
        # arithmetic up to rounding, fewer passes over memory; yolox_s trained 7-18% more images
        # a second with it than without on an H200, README).
        # Only inside recorded graphs: launched from Python each step, its three kernels cost the
        # CPU more than the two PyTorch operations they replace, and an eager step is CPU-bound.
        models.use_fused_bn_silu(model)
    stride = models.largest_stride(cfg["det_header"])
    shapes = multiscale_shapes(cfg["input_shape"], cfg["multiscale_range"], stride)
    # Built now, not when a size first comes up in the loop: anchors are made on the CPU and
    # copied over, a copy that would make the CPU wait for the GPU's queue mid-run.
    priors_of = {shape: model.priors(shape, device=device) for shape in shapes}

    total_batch = cfg["batch_size"] * world
    # Linear scaling: --lr_base_512 is the rate for 512 images a step (resolve_config scaled a
    # --lr_min given in % the same way, into cfg["lr_floor"]).
    lr_peak = cfg["lr_base_512"] * total_batch / 512
    optimizer = build_optimizer(model, cfg["optimizer"], lr_peak, cfg["weight_decay"])
    ema = ModelEMA(model, cfg["ema_decay"]) if cfg["ema_decay"] > 0 else None
    # fp16 needs loss scaling (its exponent range is small); bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["amp"])

    if len(train_set) // world < cfg["batch_size"]:  # checked before anything in --out is replaced
        fail(f"-b/--batch_size {cfg['batch_size']} is larger than the {len(train_set)} training images of "
             f"{cfg['data']}" + (f" shared by {world} processes" if world > 1 else "") +
             f": give -b {max(1, len(train_set) // world)} or less")
    start_epoch, start_step, start_gen, start_sums, best_ap = 0, 0, None, None, -1.0
    os.makedirs(cfg["out"], exist_ok=True)
    if cfg["resume"]:
        start_epoch, start_step, start_gen, start_sums, best_ap = load_resume(cfg, model, ema, optimizer, scaler,
                                                                             train_set, world, log)
        if start_epoch >= cfg["epochs"]:
            fail(f"--resume {cfg['resume']} already finished epoch {start_epoch}, and this run has "
                 f"{cfg['epochs']}: give a larger -e to train on")
        log(f"resumed from {cfg['resume']} at epoch {start_epoch + 1}" + (f", step {start_step + 1}" if start_step else ""))
        history = os.path.join(cfg["out"], "history.csv")
        if is_main and os.path.exists(history):  # rows past the checkpoint are redone: drop them
            write_history(history, [r for r in read_history(history) if int(r["epoch"]) <= start_epoch])
    elif is_main:
        # A fresh run starts a fresh history, and no best.pt of an earlier run in this folder may
        # stand in for this one's (eval.py picks runs/train/best.pt up by default).
        if os.path.exists(os.path.join(cfg["out"], "last.pt")):
            log(f"note: --out {cfg['out']} held an earlier run: its last.pt, best.pt and history are replaced")
        for name in ("history.csv", "best.pt", "val_predictions.png"):
            if os.path.exists(os.path.join(cfg["out"], name)):
                os.remove(os.path.join(cfg["out"], name))

    run_config = dict(cfg, num_classes=model.num_classes, model_config=model.config, world=world,
                      class_names=train_set.class_names, cat_ids=train_set.cat_ids, num_train_images=len(train_set))
    if is_main:
        write_text_atomic(os.path.join(cfg["out"], "config.json"), json.dumps(run_config, indent=2) + "\n")

    compiled = model
    if cfg["compile"]:
        # dynamic=False: with one input size one static graph is enough. Multi-scale sizes would
        # each compile a graph of their own, up to dynamo's recompile limit of 8 (after that it
        # warns and runs eager); dynamic=None compiles once more, for any size, at the first new one.
        compiled = torch.compile(model, dynamic=None if shapes != [tuple(cfg["input_shape"])] else False)
    train_model, wrapped_frozen = compiled, None  # under DDP: wrapped in the epoch loop
    graphed_frozen = None  # with --cuda_graphs: the freezing the graphs were recorded with

    n_params = sum(p.numel() for p in model.parameters())
    log(f"{cfg['det_header']} ({model.anchors_mode}, {n_params / 1e6:.2f}M params) on {device}, "
        f"{len(train_set)} train / {len(val_set)} val images, input {cfg['input_shape']}" +
        (f" (evaluated at {cfg['eval_input_shape']})" if cfg["eval_input_shape"] != cfg["input_shape"] else "") + ", "
        f"batch {cfg['batch_size']} x {world}, lr {lr_peak:.3g}, amp {cfg['amp']}")
    # The progress line's total is a weighted sum of the parts beside it: said once, as the weights
    # are assign.py's defaults and not shown there (effdet's box weight of 50 surprises).
    log("loss: total = " + ("cls + 50 x box (EfficientDet's weights)" if model.anchors_mode == "efficientdet" else
                            "5 x box + obj + cls, + l1 in the closing epochs (YOLOX's weights)"))
    if cfg["multiscale_range"]:  # asked for: said, even where it came down to one size
        given = cfg["multiscale_range"]
        given = ",".join(map(str, given)) if isinstance(given, list) else given
        n = (len(shapes) - 1) // 2
        cut = isinstance(cfg["multiscale_range"], int) and n < cfg["multiscale_range"]
        centred = f" (cut to {n} to stay centred on -i)" if cut else ""
        if len(shapes) == 1:
            log(f"note: --multiscale_range {given}{centred} leaves one training size, {shapes[0]}: no multi-scale "
                f"training; evaluation at {tuple(cfg['eval_input_shape'])}")
        else:
            untrained = "" if tuple(cfg["eval_input_shape"]) in shapes else " (not among the training sizes)"
            log(f"multi-scale: training sizes {shapes[0]}..{shapes[-1]} in steps of {stride}, a new one every 10 "
                f"steps (--multiscale_range {given}{centred}); evaluation at {tuple(cfg['eval_input_shape'])}{untrained}")
    if cfg["mixup_prob"] > 0 and cfg["batch_size"] < 3:
        log(f"note: -b {cfg['batch_size']}: MixUp needs 3 or more images per process (its partner is another "
            f"image of the batch, and with 2 the two would mix into one picture): no MixUp in this run")

    epochs = cfg["epochs"]
    # Flags that quietly reshape the run get one line each, so nobody wonders later.
    decay_end, fit = cfg["lr_decay_steps"][-1], epochs - cfg["lr_cooldown_steps"]
    if len(cfg["lr_decay_steps"]) == 1 and epochs < decay_end:
        how = (f"give --lr_decay_steps {fit} to fit it in" if fit > cfg["lr_warmup_steps"] else
               f"to fit it in, shorten --lr_warmup_steps ({cfg['lr_warmup_steps']:g}) and --lr_cooldown_steps "
               f"({cfg['lr_cooldown_steps']}) too")
        log(f"note: -e {epochs} ends the run before the cosine reaches --lr_min at epoch {decay_end:g} "
            f"(--lr_decay_steps); {how}")
    if cfg["mosaic_mix_prob"] > 0 and cfg["close_mosaic_epochs"] >= epochs:
        log(f"note: --close_mosaic_epochs {cfg['close_mosaic_epochs']} covers all {epochs} epochs: no mosaic in this run")
    if cfg["freeze_backbone_epochs"] >= epochs:
        log(f"note: --freeze_backbone_epochs {cfg['freeze_backbone_epochs']} covers all {epochs} epochs: "
            f"the backbone does not train in this run")
    # The checkpoint to go back to if the run stops: the one resumed from, then each epoch's last.pt.
    last_good, evaluated = cfg["resume"], False
    pictures = set()  # the run folder's pictures drawn by this process, for the last line
    # Ctrl-C: the step running ends, its state is saved as last.pt and the run stops; --resume then
    # continues with the next step exactly. A second Ctrl-C stops at once, keeping last.pt as it
    # was (the last finished epoch). Under torchrun the first one stops at once: the processes
    # would have to agree on the step, which costs a wait for the GPU every step.
    stop, main_pid = {"asked": False, "saving": False}, os.getpid()

    def on_ctrl_c(signum, frame):
        if os.getpid() != main_pid:  # a loader worker, forked before it could ignore Ctrl-C
            return
        if stop["saving"]:  # never cut a checkpoint write short: stop once it is written
            stop["asked"] = True
            return
        if stop["asked"] or world > 1:
            raise KeyboardInterrupt
        stop["asked"] = True
        print("\nCtrl-C: stopping after this step, with its state saved (Ctrl-C again: stop at once)", flush=True)

    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    last_path = os.path.join(cfg["out"], "last.pt")
    side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # augment_ahead's, one a run
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, epochs):
            # This epoch's schedule: backbone frozen in the first epochs; in the last ones no mosaic
            # or MixUp, and the L1 box loss on (anchor-free).
            frozen = epoch < cfg["freeze_backbone_epochs"]
            closing = epoch >= epochs - cfg["close_mosaic_epochs"]
            mosaic = 0.0 if closing else cfg["mosaic_mix_prob"]
            mixup = 0.0 if closing else cfg["mixup_prob"]  # Megvii's last epochs drop both
            model.train()
            set_backbone_frozen(model, frozen)
            if world > 1 and frozen != wrapped_frozen:
                # DDP lists the parameters that need a gradient when it is built and waits for
                # every one of them each step: a backbone frozen (or unfrozen) after that would
                # hang or fail its reduction. So it is built again whenever freezing changes, at
                # most twice a run; building it broadcasts rank 0's weights, which all ranks share.
                # (torch's DDP guide compiles the DDP-wrapped model instead, so that the graph
                # splits at DDP's gradient buckets and their all-reduce overlaps the backward;
                # around a compiled model the all-reduce starts once the whole backward is done,
                # but re-wrapping does not recompile. Not measured on several GPUs.)
                # broadcast_buffers=False (as Megvii's YOLOX trainer): by default DDP sends rank 0's
                # buffers (BatchNorm's running statistics) to every rank before each forward, a
                # collective every step. Training normalises with the batch's own statistics, and
                # rank 0 keeps, saves and evaluates exactly the running statistics it would have
                # anyway (it only ever received its own); only the other ranks' unused copies
                # drift. On 2 CPU processes (gloo, yolox_nano) a step took 336-342 ms instead of
                # 350-369 (a one-off timing script, not a bench.py row). Newer torch warns that
                # broadcast_buffers is deprecated, yet its replacement still syncs the buffers
                # once at the start, and the warning itself says to keep this flag until an
                # init_sync_buffers exists: so it is silenced here rather than shown every run.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                    train_model = torch.nn.parallel.DistributedDataParallel(
                        compiled, device_ids=[device.index] if device.type == "cuda" else None,
                        broadcast_buffers=False)
                wrapped_frozen = frozen
            if cfg["cuda_graphs"] and frozen != graphed_frozen:  # first epoch, or freezing changed
                optimizer.zero_grad(set_to_none=True)  # last step's gradients and outputs hold the old graphs
                outputs = losses = None
                graph_model(model, cfg["batch_size"], tuple(cfg["input_shape"]), amp_dtype)
                graphed_frozen = frozen

            # A new loader and generator per epoch, both seeded by (seed, epoch): an epoch's batches
            # depend on nothing but those two numbers, which is what makes resume exact.
            # A run resumed mid-epoch starts at the step it stopped before, with the generator as it was.
            skip = start_step if epoch == start_epoch else 0
            loader = data.make_loader(train_set, cfg["batch_size"], shuffle=True, workers=cfg["workers"],
                                      seed=cfg["seed"] * 1000 + epoch, drop_last=True, distributed=world > 1,
                                      pin_memory=device.type == "cuda",  # pinned: the copy to the GPU runs async
                                      skip_batches=skip)
            # A CPU generator even on a GPU: augment turns every draw into a small CPU matrix, and
            # a draw on the GPU would make the CPU wait for the GPU's queue before each one.
            gen = torch.Generator().manual_seed(augment_seed(cfg["seed"], epoch, rank, world))
            if skip:
                gen.set_state(start_gen)
            epoch_steps = skip + len(loader)  # the whole epoch's steps (batches), which the schedule counts in
            # The steps that end each quarter of the epoch: 32, 63, 94, 125 for 125 steps.
            quarter_ends = {math.ceil(epoch_steps * q / 4) for q in (1, 2, 3, 4)}
            # The loss parts are summed on the device and read (a GPU -> CPU sync) only when a
            # progress line is printed: a read every step would stall the GPU's queue every step.
            sums, counted = {}, 0  # loss parts summed over `counted` steps
            ran, seen = 0, 0  # steps run by this process (for the ETA); images, all processes (for img/s)
            nonfinite, wait, t0 = None, 0.0, time.time()  # any non-finite loss yet; seconds waiting for data
            if skip and start_sums is not None:
                # An epoch resumed after a Ctrl-C: its sums go on from the steps run before it, so
                # the epoch's means still cover all its steps.
                sums, counted = {k: torch.tensor(v, device=device) for k, v in start_sums.items()}, skip
            last_line = t0

            def loaded():  # (step, loader batch); the time spent waiting for the loader is counted
                nonlocal wait
                t_data = time.time()
                for i, raw in enumerate(data.batches(loader), start=skip):  # an unreadable image: one line, below
                    wait += time.time() - t_data
                    yield i, raw
                    t_data = time.time()

            def augmented(step):  # one step's batch, augmented on its device
                i, batch = step
                # Only the pixels go to the device (pinned, so the copy runs async). Everything else
                # stays on the CPU: augment builds its matrices and transforms the boxes there, the
                # loss moves them to the device and counts them from the CPU's `valid` mask. Reading
                # any GPU value instead would make the CPU wait for the GPU's queue (data.to_device).
                batch["images"] = batch["images"].to(device, non_blocking=True)
                shape = step_input_shape(shapes, cfg["seed"], epoch, i)
                batch = data.augment(batch, shape, random_crop_mode=cfg["random_crop_mode"],
                                     magnitude=cfg["magnitude"], num_layers=cfg["num_layers"],
                                     mosaic_mix_prob=mosaic, flip_prob=cfg["flip_prob"], generator=gen,
                                     scale_min=cfg["random_scale_min"], mixup_prob=mixup)
                return i, shape, batch, gen.get_state()  # the generator as the next step finds it

            # On a GPU the next step's batch is augmented in a second thread while this step trains
            # (data.augment_ahead says why); on a CPU this is the plain loop.
            for i, shape, batch, gen_state in data.augment_ahead(loaded(), augmented, device, side_stream):
                lr = learning_rate(epoch + i / epoch_steps, cfg, lr_peak)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                priors = priors_of[shape]
                targets = {k: batch[k] for k in ("boxes", "labels", "valid")}  # on the CPU
                if is_main and ran == 0 and epoch == start_epoch:
                    # What the model is about to learn from, once a run: boxes that sit off their
                    # objects or a wrong class list are seen here before hours are spent on them.
                    # (One read of the pixels back from the GPU, at the first step only.)
                    if draw_picture("train_batch.png", log, lambda: data.show_batch_sample(
                            batch, os.path.join(cfg["out"], "train_batch.png"), train_set.class_names)):
                        pictures.add("train_batch.png")

                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = train_model(batch["images"])
                # Outside autocast: detection_loss upcasts the bf16 / fp16 outputs and computes in
                # float32, where focal terms and IoUs keep their precision.
                losses = assign.detection_loss(outputs, priors, targets, model.anchors_mode,
                                               use_l1=closing and model.anchors_mode == "anchor_free")
                optimizer.zero_grad(set_to_none=True)  # to None, not zeros: see graph_model
                scaler.scale(losses["total"]).backward()
                scaler.step(optimizer)  # fp16: reads the inf check back to the CPU (a wait); bf16 has no scaler
                scaler.update()
                if ema is not None:
                    ema.update()

                seen, ran, counted = seen + batch["images"].shape[0] * world, ran + 1, counted + 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach()
                step_bad = ~torch.isfinite(losses["total"].detach())
                nonfinite = step_bad if nonfinite is None else nonfinite | step_bad
                # Looked at only at fixed steps (each quarter of the epoch, every 50), the same on
                # every process, so that their all_reduce below lines up.
                quarter = i + 1 in quarter_ends
                if quarter or (i + 1) % 50 == 0:
                    bad = nonfinite.float()
                    if world > 1:  # a NaN on any process stops them all, together
                        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                    if bool(bad):
                        if not is_main:
                            sys.exit(2)
                        means = {k: round(float(v) / counted, 4) for k, v in sums.items()}
                        fail(f"the loss became non-finite at epoch {epoch + 1}, by step {i + 1} (epoch means so "
                             f"far: {means}); stopped. {last_good or 'No checkpoint was written yet'} is the last "
                             f"good one: lower --lr_base_512 (now {cfg['lr_base_512']}) or try --amp off, then "
                             f"--resume it")
                # A progress line at each quarter of the epoch in a log file; on a terminal, redrawn
                # in place twice a second.
                if is_main and (quarter or (sys.stdout.isatty() and time.time() - last_line > 0.5)):
                    last_line = time.time()
                    elapsed = last_line - t0
                    ips = seen / max(elapsed, 1e-9)
                    eta = (epoch_steps - i - 1) * elapsed / ran
                    parts = " ".join(f"{k} {float(sums[k]) / counted:.4f}" for k in losses)
                    line = (f"epoch {epoch + 1}/{epochs} {i + 1}/{epoch_steps} {parts} lr {lr:.2e} "
                            f"{ips:.1f} img/s eta {eta:.0f}s{' [frozen backbone]' if frozen else ''}")
                    if sys.stdout.isatty():
                        print("\r" + line, end="", flush=True)
                    else:
                        print(line, flush=True)
                if stop["asked"] and i + 1 < epoch_steps:  # Ctrl-C in this step: save it (unless NaN), stop
                    if bool(nonfinite):
                        print(f"stopped: the loss became non-finite by step {i + 1}; {last_good or 'no checkpoint'} "
                              f"was left as it was: resume it with a lower --lr_base_512 or --amp off")
                    else:
                        stop["saving"] = True
                        save_atomic(checkpoint_state(model, ema, optimizer, scaler, epoch, best_ap, run_config,
                                                     step=i + 1, generator_state=gen_state, world=world,
                                                     epoch_sums=sums),
                                    last_path)
                        last_good = last_path
                        print(f"stopped in epoch {epoch + 1} after step {i + 1}: continue with --resume {last_good}")
                    sys.exit(130)
            if is_main and sys.stdout.isatty():
                print()

            # ---- end of epoch: last.pt, evaluation (rank 0), history
            row = {"epoch": epoch + 1, "lr": lr, "images_per_s": round(seen / (time.time() - t0), 2),
                   "data_wait_frac": round(wait / max(time.time() - t0, 1e-9), 4)}
            row.update({f"loss_{k}": round(float(v) / max(counted, 1), 6) for k, v in sums.items()})
            if is_main:
                # Saved before the evaluation, so one that fails (out of GPU memory, an unreadable
                # val image) costs no training; written again below if the epoch sets a new best AP.
                stop["saving"] = True  # a Ctrl-C now waits for the file
                state = checkpoint_state(model, ema, optimizer, scaler, epoch + 1, best_ap, run_config, world=world)
                save_atomic(state, last_path)
                stop["saving"], last_good = False, last_path
            stats = None
            if is_main and epoch + 1 >= cfg["eval_start_epoch"]:
                eval_model = ema.module if ema is not None else model
                t_eval = time.time()
                stats = evaluation.run_coco_evaluation(eval_model, val_set, input_shape=tuple(cfg["eval_input_shape"]),
                                                       batch_size=cfg["eval_batch_size"], workers=cfg["workers"],
                                                       verbose=epoch + 1 == epochs)
                evaluated = True
                log(f"epoch {epoch + 1}: AP {stats['AP']:.4f} AP50 {stats['AP50']:.4f} AR100 {stats['AR100']:.4f} "
                    f"(evaluated {len(val_set)} images in {time.time() - t_eval:.0f}s)")
            row["AP"] = round(stats["AP"], 6) if stats else ""
            row["AP50"] = round(stats["AP50"], 6) if stats else ""
            stop["saving"] = True  # a Ctrl-C now waits for the files below
            if is_main:
                if stats is not None and stats["AP"] > best_ap:
                    best_ap = stats["AP"]
                    state = checkpoint_state(model, ema, optimizer, scaler, epoch + 1, best_ap, run_config, world=world)
                    save_atomic(state, os.path.join(cfg["out"], "best.pt"))
                    save_atomic(state, last_path)  # the best AP so far, which a resumed run must beat
                history = os.path.join(cfg["out"], "history.csv")
                append_history(history, row)
                plot_history(read_history(history), os.path.join(cfg["out"], "history.png"))
                if stats is not None:  # drawn last: the epoch's files are all written by now
                    if draw_picture("val_predictions.png", log, lambda: evaluation.prediction_sheet(
                            eval_model, val_set, os.path.join(cfg["out"], "val_predictions.png"),
                            input_shape=tuple(cfg["eval_input_shape"]), batch_size=cfg["eval_batch_size"])):
                        pictures.add("val_predictions.png")
            if world > 1:
                dist.barrier()  # the others wait while rank 0 evaluates and writes
            stop["saving"], last_good = False, last_path  # written: on every rank, any may name it
            if stop["asked"] and epoch + 1 < epochs:  # Ctrl-C in the epoch's last step or its evaluation
                print(f"stopped after epoch {epoch + 1} (finished): continue with --resume {last_good}")
                sys.exit(130)

    except data.DataLoadError as e:  # an image that cannot be read, in training or evaluation
        fail(f"{e}; " + (f"fix the file, then --resume {last_good} (the last finished epoch)" if last_good
                         else "fix the file and start again (no epoch had finished)"))
    except KeyboardInterrupt:  # a second Ctrl-C, or the first under torchrun: no step to finish
        if is_main:
            print("\nstopped at once: " + (f"{last_good} (as it was) holds the last saved state; continue with "
                                             f"--resume {last_good}" if last_good else "nothing was saved yet"))
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if is_main:
        best = (f"best.pt (AP {best_ap:.4f})" if best_ap >= 0 else
                "no best.pt (the val split has no boxes to score)" if evaluated else
                "no best.pt (never evaluated: see --eval_start_epoch)")
        log(f"done: {cfg['out']}/last.pt, {best}, history.csv, history.png" +
            "".join(f", {name}" for name in sorted(pictures)))
    if world > 1:
        dist.destroy_process_group()
    return best_ap


# ----------------------------------------------------------------------------------------------
# Checkpoints: saving, resuming, starting from other weights (called from run, above)
# ----------------------------------------------------------------------------------------------
def checkpoint_state(model, ema, optimizer, scaler, epoch, best_ap, run_config, step=0, generator_state=None, world=1,
                     epoch_sums=None):
    """Everything needed to continue exactly: the weights, the EMA, the optimizer's moments, the
    loss scaler, the epochs finished and the RNG states; after a Ctrl-C also the steps finished in
    the next epoch, its augmentation generator and its loss sums so far (for the epoch's means).
    The config lets eval.py rebuild the model."""
    return {
        "step": step,
        "generator": generator_state,
        "epoch_sums": {k: float(v) for k, v in epoch_sums.items()} if epoch_sums else None,
        "world": world,
        "config": dict(run_config["model_config"], class_names=run_config["class_names"],
                       cat_ids=run_config["cat_ids"]),
        "train_config": run_config,
        "model": model.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "ema_updates": ema.updates if ema is not None else 0,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "best_ap": best_ap,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def load_checkpoint_file(path, mmap=False, flag="--resume"):
    """torch.load with one clear error for a missing or foreign file, naming the flag that gave
    it (--resume or --pretrained). mmap: map the tensors instead of reading them, for a quick look
    at the config (a file in torch's older, unmappable format is read)."""
    give = "the last.pt / best.pt of an earlier run" + (", or weights you downloaded" if flag == "--pretrained" else "")
    if not os.path.isfile(path):
        fail(f"{flag} {path} does not exist: give {give}")
    if path.endswith(".safetensors"):
        # (safetensors also stores tensors sorted by name, losing the order the position match needs)
        fail(f"{flag} {path}: torch cannot read safetensors files; download the pytorch_model.bin beside it "
             f"instead, or rebuild the model in timm and save it: `python -c \"import timm, torch, safetensors.torch "
             f"as s; m = timm.create_model('NAME'); m.load_state_dict(s.load_file('{path}')); "
             f"torch.save(m.state_dict(), 'NAME.pth')\"`")
    try:
        ckpt = models.read_checkpoint(path, mmap)  # weights_only: a download cannot run code while it loads
    except Exception as e:  # a truncated or foreign file
        fail(f"{flag} {path} is not a readable checkpoint ({type(e).__name__}: {e}); a download cut short? fetch "
             f"it again, or give {give}")
    if not isinstance(ckpt, dict):
        fail(f"{flag} {path} holds a {type(ckpt).__name__}, not a checkpoint: give {give}")
    return ckpt


def load_resume(cfg, model, ema, optimizer, scaler, train_set, world, log):
    """Load a checkpoint's whole training state. Returns (epochs finished, steps finished in the
    next epoch, that epoch's augmentation generator state or None, its loss sums so far or None,
    best AP so far). A mid-epoch state only comes from one process (under torchrun Ctrl-C stops
    at once), so the generator state is that process's."""
    path = cfg["resume"]
    ckpt = load_checkpoint_file(path)
    if "optimizer" not in ckpt or "model" not in ckpt:
        fail(f"{path} holds weights only, not a training state: use --pretrained {path} instead")
    if "config" not in ckpt:  # another program's training state (Megvii's YOLOX keeps model and optimizer too)
        fail(f"{path} is not a plaindet training state (train.py's last.pt): start from its weights with "
             f"--pretrained {path} instead")
    saved = ckpt.get("train_config", {})
    # Labels are positions in the class list: other classes, or another order, would go on
    # training each output as some other class without any error.
    if saved.get("class_names", train_set.class_names) != train_set.class_names:
        fail(f"--resume {path} was trained on other classes than --data {cfg['data']} has ("
             f"{evaluation.class_difference(saved['class_names'], train_set.class_names)}): resume with the data "
             f"it was trained on")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        fail(f"{path} was trained as {ckpt['config'].get('det_header')} with {ckpt['config'].get('num_classes')} "
             f"classes ({ckpt['config'].get('anchors_mode')}); resume it with the same --det_header, "
             f"--backbone, mode and data")
    if ema is not None and ckpt.get("ema") is not None:
        ema.module.load_state_dict(ckpt["ema"])
        ema.updates = ckpt.get("ema_updates", 0)
    # The optimizer's state is its own kind's (SGD keeps momentum, Adam two moments and a step):
    # another -p cannot take it over.
    if saved.get("optimizer", cfg["optimizer"]) != cfg["optimizer"]:
        fail(f"--resume {path} trained with -p {saved['optimizer']}, whose state -p {cfg['optimizer']} cannot take "
             f"over: resume with -p {saved['optimizer']}, or start a new run from its weights with --pretrained {path}")
    optimizer.load_state_dict(ckpt["optimizer"])
    # load_state_dict brings back the saved run's hyperparameters; the learning rate is set every
    # step, and the weight decay given now must win too (the note below says it changed).
    optimizer.param_groups[0]["weight_decay"] = cfg["weight_decay"]
    if ckpt.get("scaler") and scaler.is_enabled():  # empty when the run did not use fp16: the scaler starts fresh
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if ckpt.get("rng_cuda") is not None and torch.cuda.is_available():
        # one state per GPU the saving process saw; another machine may have fewer
        for i, state in enumerate(ckpt["rng_cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
    # A flag given now that differs from the resumed run's is allowed (a longer -e is the usual
    # one) but said, since it changes the run (unset flags took the run's values: resolve_config).
    # (det_header, backbone and mode are the model's, checked by loading its weights above.)
    skip = ("resume", "out", "pretrained", "workers", "eval_batch_size", "eval_start_epoch", "compile",
            "cuda_graphs", "fused_bn_silu", "det_header", "backbone", "anchors_mode", "lr_floor")  # lr_floor: from --lr_min and the batch, compared themselves
    if saved.get("data") not in (None, "shapes"):
        saved = dict(saved, data=os.path.abspath(saved["data"]))  # older checkpoints recorded it relative
    changed = [f"{k} {cfg[k]} (was {saved[k]})" for k in cfg if k in saved and k not in skip and saved[k] != cfg[k]]
    if saved.get("world", world) != world:  # no flag says it, but the total batch, and with it the lr, follows it
        changed.append(f"processes {world} (was {saved['world']}: the total batch and the learning rate "
                       f"scale with them)")
    if changed:
        log(f"note: resuming with settings that differ from the checkpoint's run: {', '.join(changed)}")
    step, generator = ckpt.get("step", 0), ckpt.get("generator")
    # A run stopped mid-epoch counted its steps in batches of its own size, over its processes and
    # images: with any of those changed, the same step number is other images, so the epoch
    # starts again from its first step (the steps already taken stay in the weights).
    same_batches = (saved.get("batch_size"), ckpt.get("world", 1), saved.get("num_train_images", len(train_set))) == (
        cfg["batch_size"], world, len(train_set))
    if step and not same_batches:
        log(f"note: {path} stopped in epoch {ckpt['epoch'] + 1} after step {step} with other batches (batch size, "
            f"processes or images changed): epoch {ckpt['epoch'] + 1} starts again from its first step")
        step, generator = 0, None
    sums = ckpt.get("epoch_sums") if step else None
    return ckpt["epoch"], step, generator, sums, ckpt.get("best_ap", -1.0)


def weights_settings(cfg, log):
    """(pixel_norm, tf_padding) for build_model: how the model treats its input is set by the
    weights it starts from, not by a flag, so the --resume / --pretrained file is looked at
    (mapped, not read) before the model is built.
      - a plaindet checkpoint: as its run had them (a run started from Megvii's weights goes on
        normalising as they need, in its resumed and fine-tuned runs too), as far as this model
        keeps what they apply to: its backbone for pixel_norm, an EfficientNet or BiFPN for tf_padding;
      - a Megvii YOLOX: pixel_norm "0-255" (its weights take 0..255 pixels);
      - effdet's and timm's tf_* files: TensorFlow's padding, and AdvProp's -1..1 pixels, as their
        names say (models.named_settings), so their outputs equal the originals'.
    Anything else: ("imagenet", False), as a new model is built. Each setting in use is logged."""
    flag, path = ("--resume", cfg["resume"]) if cfg["resume"] else ("--pretrained", cfg["pretrained"])
    if not path:
        return "imagenet", False
    det_header = cfg["det_header"]
    backbone = cfg["backbone"] or (models.EFFICIENTDET_PRESETS[det_header][0]
                                   if det_header in models.EFFICIENTDET_PRESETS else "cspdarknet")
    has_efficientnet = det_header in models.EFFICIENTDET_PRESETS or backbone.startswith("efficientnet")
    ckpt = load_checkpoint_file(path, mmap=True, flag=flag)
    if "config" in ckpt:
        saved = ckpt["config"]
        pixel_norm, tf_padding = saved.get("pixel_norm", "imagenet"), saved.get("tf_padding", False)
        why = "the weights of a run that did so"
        if pixel_norm != "imagenet" and saved.get("backbone") != backbone:
            log(f"{flag}: {path}'s pixel_norm {pixel_norm} stays with its backbone ({saved.get('backbone')}; this "
                f"model's is {backbone})")
            pixel_norm = "imagenet"
        if tf_padding and not has_efficientnet:
            log(f"{flag}: {path}'s tf_padding has no EfficientNet or BiFPN to apply to in {det_header} ({backbone})")
            tf_padding = False
    elif models.published_kind(models.unwrap_state_dict(ckpt.get("ema") or ckpt.get("model") or ckpt)) == "megvii":
        # (only for a model that can take them; load_pretrained says what the others need)
        fits = det_header in models.YOLOX_PRESETS and backbone == "cspdarknet" and cfg.get("anchors_mode") != "efficientdet"
        pixel_norm, tf_padding, why = ("0-255" if fits else "imagenet"), False, "Megvii YOLOX weights"
    else:
        pixel_norm, tf_padding = models.named_settings(path) if has_efficientnet else ("imagenet", False)
        why = "TensorFlow-trained weights (so its name says)"
    said = {"0-255": "takes 0..255 pixels, unnormalised (pixel_norm 0-255)",
            "inception": "scales pixels to -1..1 (pixel_norm inception)"}
    if pixel_norm in said:
        log(f"{flag}: the model {said[pixel_norm]}: {path} holds {why}")
    if tf_padding:
        log(f"{flag}: the model's stride-2 layers pad as TensorFlow does (tf_padding): {path} holds {why}")
    return pixel_norm, tf_padding


# The class predictor's tensors, in every head: the rows that stand for classes.
CLASS_PREDICTOR = ("cls_pred.weight", "cls_pred.bias", "cls_pred.pointwise.weight", "cls_pred.pointwise.bias")
# The flag that chooses each prior mode.
MODE_FLAGS = {"efficientdet": "--use_anchors_mode", "anchor_free": "--use_anchor_free_mode"}


def drop_class_predictor(state):
    """A state dict less its class predictor: rows that stand for other classes than the data's
    must not be loaded, even where their number happens to fit."""
    return {k: v for k, v in state.items() if not k.endswith(CLASS_PREDICTOR)}


def load_pretrained(model, path, log, cat_ids=None, class_names=None):
    """Copy every tensor whose name and shape match (EMA weights when present): a detector
    trained on other classes still gives its backbone and neck, and the head starts fresh, all
    but the class predictor's rows of the data's classes it knows by name.
    An effdet EfficientDet checkpoint is renamed to ours first (models.effdet_state_dict), and so
    is a Megvii YOLOX one (models.megvii_yolox_state_dict; the model was built to take its input as
    their weights want: weights_settings). A file
    with no backbone.* names is taken as an ImageNet classifier from timm or torchvision and goes
    into the backbone alone (models.load_backbone_weights): the usual start for a detector, and
    what the EfficientDet recipe's 32 frozen epochs are for.
    cat_ids, class_names: the training data's, to pick the class predictor's rows (by name; an
    effdet or Megvii file's by COCO category, models.coco_category_ids)."""
    ckpt = load_checkpoint_file(path, flag="--pretrained")
    state = models.unwrap_state_dict(ckpt.get("ema") or ckpt.get("model") or ckpt)
    kind = models.published_kind(state)
    if kind is None and "backbone.backbone.stem.conv.conv.weight" in state:
        fail(f"--pretrained {path} looks like Megvii's YOLOX without its head (no head.stems.*): give the whole "
             f"checkpoint as Megvii publishes it")
    if kind is not None:  # an effdet EfficientDet or a Megvii YOLOX: renamed, then loaded as ours
        spec = models.PUBLISHED[kind]
        name, coco_slots = ("an " if kind == "effdet" else "a ") + spec["name"], spec["slots"]
        mode = "efficientdet" if kind == "effdet" else "anchor_free"
        def preset_hint():  # for an error: the preset the file fits (a few model builds on the meta device)
            fits = models.published_preset(state, kind)
            return f" (it is {fits}'s: give --det_header {fits})" if fits else ""
        if model.config["det_header"] not in spec["presets"] or model.anchors_mode != mode or \
                (kind == "megvii" and model.config["backbone"] != "cspdarknet"):
            megvii = kind == "megvii"
            fail(f"--pretrained {path} is {name}{preset_hint()}, made with {MODE_FLAGS[mode]}" +
                 (" and its own backbone" if megvii else "") + f"; this run builds {model.config['det_header']} with "
                 f"{model.anchors_mode} priors" + (f" on {model.config['backbone']}" if megvii else ""))
        # Its class predictor has a slot per COCO category: each of the data's classes that is a
        # COCO category (by name: models.coco_category_ids) keeps its slot; the others start as
        # in a new model. So VOC keeps all 20 of its classes' slots, and a set of people, cars and
        # forklifts keeps the first two.
        slots = state[spec["slots_key"]].numel() // spec["anchors"]
        try:
            coco_ids = (models.coco_category_ids(cat_ids, class_names, partial=True)
                        if slots == coco_slots and cat_ids else None)
        except ValueError as e:  # two classes of the data are one COCO category
            fail(f"--pretrained {path} with --data: {e}")
        kept = [c for c in coco_ids if c is not None] if coco_ids else []
        # A meta-device twin (shapes only) with the file's class count, or the kept COCO classes':
        # the converter renames into it.
        with torch.device("meta"):
            shaped = models.build_model(**dict(model.config, num_classes=len(kept) if kept else slots))
        try:
            state = spec["convert"](state, shaped, kept or None)
        except ValueError as e:
            fail(f"--pretrained {path}: {e}{preset_hint()}")
        # (a None in coco_ids comes only from a name: data matched by id is all or nothing)
        unknown = [n for n, c in zip(class_names or [], coco_ids or []) if c is None]
        if unknown:  # the kept slots go to their classes' rows; the rest are the new model's own
            own = model.state_dict()
            rows_of = [kept.index(c) if c is not None else None for c in coco_ids]
            for k in [k for k in state if k.endswith(CLASS_PREDICTOR)]:
                state[k] = models.keep_class_slots(state[k], model.num_anchors, rows_of, fresh=own[k])
        log(f"--pretrained: {path} is {name}, renamed to ours (models.{spec['convert'].__name__})" +
            (f", its class slots kept for {len(kept)} of the data's {len(coco_ids)} classes, COCO's; "
             f"{unknown[:3]}{' ...' if len(unknown) > 3 else ''} start fresh" if unknown else
             ", its class slots kept for the data's classes, COCO's" if kept else ""))
        if not kept and cat_ids:
            odd = [n for c, n in zip(cat_ids, class_names or cat_ids) if models.coco_category_ids([c], [n]) is None]
            state = drop_class_predictor(state)
            log("--pretrained: the class predictor starts fresh: " +
                (f"{odd[:3]} are not COCO classes" if slots == coco_slots else f"its {slots} class slots are not "
                 f"COCO's {coco_slots}"))
    if not any(k.startswith("backbone.") for k in state):
        try:
            n = models.load_backbone_weights(model.backbone, state)
        except ValueError as e:
            fits = models.fitting_backbone(state)  # which one it is, for the fix
            presets = [p for p, spec in models.EFFICIENTDET_PRESETS.items() if spec[0] == fits]
            fix = (f"; it is {fits}'s: give --backbone {fits}" + (f" (or --det_header {presets[0]}, whose backbone "
                   f"it is)" if presets else "")) if fits else ""
            fail(f"--pretrained {path} is neither a plaindet checkpoint nor an ImageNet classifier that fits "
                 f"this model's backbone, {model.config['backbone']}: {e}{fix}")
        log(f"--pretrained: {n} backbone tensors from {path}, an ImageNet classifier (its classifier head left "
            f"out); the neck and head start fresh")
        return
    own = model.state_dict()
    # A plaindet model trained on other classes: the data's classes that are among its classes
    # (by name, VOC's as COCO's: models.same_classes) keep their rows of its class predictor,
    # and the others start as in a new model. (Rows are per anchor, and the anchor count comes
    # with the prior mode: only a checkpoint of this model's mode lines up.)
    saved = ckpt.get("config") or {}
    saved_names = saved.get("class_names") if saved.get("anchors_mode") == model.anchors_mode else None
    if saved_names and class_names and list(saved_names) != list(class_names):
        rows_of = models.same_classes(saved_names, class_names)
        known = [n for n, r in zip(class_names, rows_of or []) if r is not None]
        unknown = [n for n, r in zip(class_names, rows_of or []) if r is None]
        predictor_keys = [k for k in state if k.endswith(CLASS_PREDICTOR)]
        # Its rows line up with ours only where each tensor has a row per (anchor, class of its)
        # shaped as ours: a head of another width has rows of other shapes.
        lines_up = predictor_keys and all(k in own and state[k].shape[0] == model.num_anchors * len(saved_names) and
                                state[k].shape[1:] == own[k].shape[1:] for k in predictor_keys)
        if known and lines_up:
            for k in predictor_keys:
                state[k] = models.keep_class_slots(state[k], model.num_anchors, rows_of, fresh=own[k])
            log(f"--pretrained: its class predictor keeps the rows of {len(known)} of the data's {len(class_names)} "
                f"classes, found by name among its {len(saved_names)}" +
                (f"; {unknown[:3]}{' ...' if len(unknown) > 3 else ''} start fresh" if unknown else ""))
        elif predictor_keys:  # rows of other classes or shapes: not to be taken, even where a tensor fits
            state = drop_class_predictor(state)
            log("--pretrained: the class predictor starts fresh: " + (
                "its rows are shaped for another head" if known else
                f"none of the data's classes is among its {len(saved_names)} classes" if rows_of else
                "the data names one class twice"))
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    # Most of the backbone must come from the checkpoint: another architecture can share a layer
    # or two by chance (a 32-channel stem BatchNorm, say), and the recipe would then freeze a
    # backbone that is nearly all random. BatchNorm's batch counters (shape []) fit any layer of
    # the same name; they say nothing.
    def backbone(keys):
        return [k for k in keys if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    fit, total = len(backbone(matched)), len(backbone(own))
    if fit < total / 2:
        trained = (ckpt.get("config") or {}).get("det_header", "another model")
        fail(f"--pretrained {path}: only {fit} of this model's {total} backbone tensors fit it ({len(matched)} of "
             f"{len(own)} fit anywhere; it holds {trained}): give a checkpoint with the same --backbone / --det_header")
    model.load_state_dict(matched, strict=False)
    log(f"--pretrained: {len(matched)}/{len(own)} tensors loaded from {path}")


if __name__ == "__main__":
    main()
