"""Shared test helpers: where the real data in ../shared lives, and a skip when it is absent;
a copy of a shapes set with one bad box."""
import json
import os
import shutil

import pytest
import torch

# Tests are tiny; two threads match the CI machine and keep timings stable.
torch.set_num_threads(2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def shared_path(*parts):
    """Path under ../shared/data, or skip the test with the reason when it is absent."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (the real-data checks need ../shared/data beside the checkout)")
    return path


def shapes_with_a_bad_box(shapes_dir, out):
    """A copy of a shapes set whose first training box lies far outside its image: the readers
    skip it with one warning. Returns the copy's path."""
    shutil.copytree(shapes_dir, out)
    path = os.path.join(out, "annotations", "instances_train.json")
    with open(path) as f:
        gt = json.load(f)
    gt["annotations"][0]["bbox"] = [5000, 5000, 10, 10]
    with open(path, "w") as f:
        json.dump(gt, f)
    return str(out)


def published_state(source, scale=0.05, bias_scale=None):
    """A state dict with the names and shapes of a published model (a key of
    tests/fixtures/published_state_dict_keys.json, e.g. "megvii:yolox_nano"): BatchNorm at
    identity, every other tensor random (seed 0) times scale (bias_scale for 1-d ones)."""
    with open(os.path.join(ROOT, "tests", "fixtures", "published_state_dict_keys.json")) as f:
        keys = json.load(f)[source]
    torch.manual_seed(0)
    state = {}
    for name, shape in keys:
        if name.endswith(("running_var", "bn.weight")):
            state[name] = torch.ones(shape)
        elif name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
        elif name.endswith("running_mean"):
            state[name] = torch.zeros(shape)
        else:
            state[name] = torch.randn(shape) * (scale if len(shape) > 1 or bias_scale is None else bias_scale)
    return state
