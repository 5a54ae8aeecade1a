"""BackPACK and ASDL backends: clear errors, the user's model left unchanged,
lazy imports and the placeholders for the old ``asdfghjkl`` package."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import UserDict

import pytest
import torch
from test_backends import DT, DictModel, case, make_data, make_model
from torch import nn

from laplace.curvature import (
    AsdfghjklEF,
    AsdfghjklGGN,
    AsdfghjklHessian,
    AsdfghjklInterface,
    AsdlEF,
    AsdlGGN,
    AsdlHessian,
    BackPackEF,
    BackPackGGN,
)

BACKENDS = [BackPackGGN, BackPackEF, AsdlGGN, AsdlEF, AsdlHessian]
KRON = [BackPackGGN, AsdlGGN, AsdlEF]


def test_backpack_ef_has_no_kron():
    model, x, y, _ = case("mlp", "classification", 3)
    with pytest.raises(NotImplementedError, match="Unavailable through Backpack"):
        BackPackEF(model, "classification").kron(x, y, N=5)


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_asdl_hessian_structures(structure):
    model, x, y, _ = case("mlp", "classification", 3)
    with pytest.raises(NotImplementedError, match="AsdlGGN"):
        getattr(AsdlHessian(model, "classification"), structure)(x, y, N=5)


@pytest.mark.parametrize(
    "backend,method",
    [(BackPackGGN, m) for m in ["full", "diag", "kron", "jacobians", "gradients"]]
    + [(BackPackEF, m) for m in ["full", "diag", "jacobians"]],
)
def test_backpack_refuses_dict_inputs(backend, method):
    model = DictModel(3)
    x, y = make_data("mlp", "classification", 3)
    batch = UserDict({"input_ids": x, "labels": y})
    curv = backend(model, "classification")
    args = {"jacobians": (batch,), "kron": (batch, y, 5)}.get(method, (batch, y))
    with pytest.raises(ValueError, match="dict-like.*CurvlinopsGGN"):
        getattr(curv, method)(*args)


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_backpack_unsupported_layer(structure):
    class Square(nn.Module):
        def forward(self, x):
            return x.square()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Square(), nn.Linear(4, 3)).to(DT)
    x, y = make_data("mlp", "classification", 3)
    with pytest.raises(ValueError, match="BackPACK cannot handle.*CurvlinopsGGN"):
        getattr(BackPackGGN(model, "classification"), structure)(x, y, N=5)


@pytest.mark.parametrize("backend", KRON)
def test_kron_refuses_batchnorm_unless_frozen(backend):
    """ASDL skips BatchNorm in KFAC with a warning (silently wrong): refuse."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4).eval()
    model = nn.Sequential(nn.Linear(3, 4), bn, nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x, y = make_data("mlp", "classification", 3)
    with pytest.raises(ValueError, match="BatchNorm1d.*'diag' or 'full'"):
        backend(model, "classification").kron(x, y, N=5)
    bn.requires_grad_(False)
    if backend is BackPackGGN:  # BackPACK's KFLR cannot pass through BatchNorm
        with pytest.raises(ValueError, match="BackPACK cannot handle.*BatchNorm1d"):
            backend(model, "classification").kron(x, y, N=5)
        return
    _, kron = backend(model, "classification").kron(x, y, N=5)
    assert len(kron.kfacs) == 4


@pytest.mark.parametrize("backend", KRON)
def test_kron_refuses_layer_called_twice(backend):
    torch.manual_seed(0)
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer, nn.Tanh(), layer).to(DT)
    x, y = make_data("mlp", "classification", 3)
    with pytest.raises(ValueError, match="called 2 times|BackPACK cannot handle"):
        backend(model, "classification").kron(x, y, N=5)


@pytest.mark.parametrize("backend", [AsdlGGN, AsdlEF])
def test_asdl_refuses_unsupported_parameters(backend):
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(3, dtype=DT))

        def forward(self, x):
            return self.alpha * x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3).to(DT), Scale())
    x, y = make_data("mlp", "classification", 3)
    with pytest.raises(ValueError, match="'1.alpha' belongs to a Scale"):
        backend(model, "classification").diag(x, y)


@pytest.mark.parametrize("layer", ["sequence", "conv"])
def test_asdl_diag_warns_with_weight_sharing(layer):
    """Where ASDL squares per-position instead of per-sample gradients (Linear
    on sequences; Conv2d when ASDL takes its memory-saving branch), its
    diagonal is approximate: warn."""
    torch.manual_seed(0)
    if layer == "sequence":
        model = nn.Sequential(nn.Linear(3, 2), nn.Flatten(), nn.Linear(8, 3))
        x, uses = torch.randn(5, 4, 3, dtype=DT), 4
    else:
        model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(32, 3))
        x, uses = torch.randn(5, 4, 4, 4, dtype=DT), 4
    model = model.to(DT)
    y = torch.randint(3, (5,))
    with pytest.warns(
        UserWarning, match=f"independent samples.*'0.weight' .{uses} uses"
    ):
        AsdlGGN(model, "classification").diag(x, y)


@pytest.mark.parametrize("backend", KRON)
def test_kron_argument_checks(backend):
    model, x, y, _ = case("mlp", "classification", 3)
    with pytest.raises(ValueError, match="N .data set size."):
        backend(model, "classification").kron(x, y, N=0)
    curv = backend(model, "classification", subnetwork_indices=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="subnetwork"):
        curv.kron(x, y, N=5)


# -- the user's model is left as it was -------------------------------------------
def snapshot(model: nn.Module) -> list:
    """Everything about a model that hooks, attributes or backward can change."""
    state = []
    for m in model.modules():
        attrs = {k: v for k, v in vars(m).items() if not k.startswith("_")}
        hooks = [
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(m._backward_pre_hooks),
            m._is_full_backward_hook,
        ]
        state.append((type(m).__name__, sorted(attrs), hooks, m.training))
    for name, p in model.named_parameters():
        grad = None if p.grad is None else p.grad.clone()
        state.append((name, sorted(vars(p)), p.requires_grad, grad, p.detach().clone()))
    return state


def assert_same(before: list, after: list) -> None:
    assert len(before) == len(after)
    for b, a in zip(before, after):
        for u, v in zip(b, a):
            if isinstance(u, torch.Tensor):
                assert torch.equal(u, v)
            else:
                assert u == v


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_left_unchanged(backend):
    from backpack.context import CTX

    model = make_model("frozen", 3)  # not the cached case: grads are set below
    x, y = make_data("mlp", "classification", 3)
    model[2].weight.grad = torch.ones_like(model[2].weight)
    before, n_handles = snapshot(model), len(CTX.hook_handles)
    curv = backend(model, "classification")
    structures = {"full", "diag", "kron"} - {
        BackPackEF: {"kron"},
        AsdlHessian: {"diag", "kron"},
    }.get(backend, set())
    for structure in sorted(structures):
        if structure == "kron":
            curv.kron(x, y, N=5)
        else:
            getattr(curv, structure)(x, y)
    curv.jacobians(x)
    if backend in (BackPackEF, AsdlEF):
        curv.gradients(x, y)
    assert_same(before, snapshot(model))
    assert len(CTX.hook_handles) == n_handles
    # The user can still install full backward hooks (ASDL's regular ones,
    # once installed, would forbid them unless undone).
    calls = []
    handle = model[2].register_full_backward_hook(lambda *args: calls.append(1))
    model(x).sum().backward()
    handle.remove()
    assert calls == [1]


# -- lazy imports and missing packages ----------------------------------------------
_SCRIPT = textwrap.dedent(
    """
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("backpack", "asdl"):
                raise ImportError(f"blocked {name}")

    import laplace, laplace.curvature
    assert "backpack" not in sys.modules and "asdl" not in sys.modules
    sys.meta_path.insert(0, Block())
    from laplace.curvature import *  # noqa: F403
    import torch
    model = torch.nn.Linear(2, 2)
    for name in ("BackPackGGN", "BackPackEF", "AsdlGGN", "AsdlEF", "AsdlHessian"):
        cls = getattr(laplace.curvature, name)
        try:
            cls(model, "regression")
        except ImportError as err:
            assert "pip install" in str(err), err
        else:
            raise AssertionError(name + " did not raise")
    assert "BackPackGGN" in dir(laplace.curvature)
    print("ok")
    """
)


def test_lazy_import_and_missing_packages():
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_unknown_attribute():
    import laplace.curvature

    with pytest.raises(AttributeError, match="NoSuchBackend"):
        laplace.curvature.NoSuchBackend  # noqa: B018


@pytest.mark.parametrize(
    "backend", [AsdfghjklInterface, AsdfghjklGGN, AsdfghjklEF, AsdfghjklHessian]
)
def test_asdfghjkl_placeholders(backend):
    model, *_ = case("mlp", "regression", 1)
    with pytest.raises(ImportError, match="git-only `asdfghjkl`.*Asdl"):
        backend(model, "regression")
