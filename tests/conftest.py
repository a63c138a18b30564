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
