"""Models that torch.func.vmap cannot vectorise (data-dependent control flow, as in
Hugging Face's attention-mask checks) still get exact per-sample curvature through
the loop fallback."""

import pytest
import torch
from torch import nn
from torch.func import jacrev

from laplace.curvature import CurvlinopsGGN, GGNInterface


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: vmap refuses it
            return self.lin(x)
        return self.lin(-x)


def reference_jacobians(model, X):
    Js = []
    for x in X:
        params = dict(model.named_parameters())

        def f(p, x=x):
            return torch.func.functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

        jac = jacrev(f)({k: v.detach() for k, v in params.items()})
        Js.append(torch.cat([j.reshape(2, -1) for j in jac.values()], -1))
    return torch.stack(Js)


@pytest.mark.parametrize("backend_cls", [GGNInterface, CurvlinopsGGN])
def test_loop_fallback_is_exact(backend_cls):
    model = Branchy()
    X = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(2, (5,))
    backend = backend_cls(model, "classification")
    J_ref = reference_jacobians(model, X)
    with pytest.warns(UserWarning, match="loop over samples"):
        Js, f = backend.jacobians(X)
    torch.testing.assert_close(Js, J_ref, rtol=1e-12, atol=1e-12)
    # the branch depends on the batch, so the outputs are per sample as well
    f_ref = torch.cat([model(x.unsqueeze(0)) for x in X]).detach()
    torch.testing.assert_close(f, f_ref, rtol=1e-12, atol=0)
    p = torch.softmax(f_ref, -1)
    lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    ggn = torch.einsum("bop,boq,bqr->pr", J_ref, lam, J_ref)
    with pytest.warns(UserWarning, match="loop over samples"):
        _, diag = backend.diag(X, y)
    torch.testing.assert_close(diag, ggn.diagonal(), rtol=1e-10, atol=1e-12)
