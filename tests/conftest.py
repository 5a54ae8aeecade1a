"""Shared fixtures: float64 by default and a GPU marker that skips without CUDA."""

import pytest
import torch

import laplace.curvature

# The layer-factor exact GGN is the default backend's own route once
# laplace.curvature.LayerFactorGGN exists (the curvature-engine branch); until
# then fits go through CurvlinopsGGN and the tests of that route are skipped.
LAYER_FACTOR_DEFAULT = "LayerFactorGGN" in getattr(laplace.curvature, "__all__", ())


@pytest.fixture(autouse=True)
def _float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def one_thread():
    """One torch thread: on tiny matrices thread start-up dominates on a busy
    2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    no_route = pytest.mark.skip(reason="needs LayerFactorGGN as the default backend")
    for item in items:
        if "layer_factor_fit" in item.keywords and not LAYER_FACTOR_DEFAULT:
            item.add_marker(no_route)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
