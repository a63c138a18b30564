"""Shared test helpers: where the real data in ../shared lives, and a skip when it is absent."""
import os
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
