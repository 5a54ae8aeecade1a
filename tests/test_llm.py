"""Laplace on LLM-style models: LoRA subsets (peft), feature reduction of sequence
features, dict-like batches on a tiny random GPT-2, and predictives that are
differentiable w.r.t. the inputs (``enable_backprop=True``).

Ground truths: an equivalent plain model (``W0 + s B A`` written out by hand), the
dense GGN from ``torch.func.jacrev``, manual reductions, the same model fed
tensors instead of dicts, and central finite differences, all in float64.
"""

import os
from copy import deepcopy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.curvature import CurvlinopsGGN, GGNInterface
from laplace.utils.feature_extractor import FeatureExtractor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

RTOL = 1e-8
N, D_IN, HIDDEN, RANK, SCALE = 24, 3, 5, 2, 2.0
# Dense curvature from curvlinops operators is slow on CPU; torch.func GGN is exact
BACKENDS = {"full": GGNInterface, "kron": CurvlinopsGGN, "diag": CurvlinopsGGN}


def regression_data(n_out=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D_IN, generator=gen)
    y = torch.randn(N, n_out, generator=gen)
    return X, y


def fitted(model, loader, likelihood, subset, structure, **kwargs):
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=BACKENDS[structure],
        **kwargs,
    )
    la.fit(loader)
    return la


def assert_same_laplace(la_a, la_b, x_a, x_b, regression=True):
    torch.testing.assert_close(
        la_a.log_marginal_likelihood(),
        la_b.log_marginal_likelihood(),
        rtol=RTOL,
        atol=0,
    )
    if regression:
        for a, b in zip(la_a(x_a), la_b(x_b)):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12)
    else:
        torch.testing.assert_close(la_a(x_a), la_b(x_b), rtol=RTOL, atol=1e-12)


# ---- LoRA ------------------------------------------------------------------------------
class PlainLoRALinear(nn.Module):
    """``x -> x (W0 + s B A)^T + b0`` with frozen ``W0, b0``; ``A`` then ``B``
    trainable. ``as_modules`` writes ``A`` and ``B`` as bias-free ``nn.Linear``
    layers (needed by KFAC), otherwise the merged weight is formed explicitly."""

    def __init__(self, base, A, B, as_modules):
        super().__init__()
        self.register_buffer("W0", base.weight.detach().clone())
        self.register_buffer("b0", base.bias.detach().clone())
        self.as_modules = as_modules
        if as_modules:
            self.A = nn.Linear(A.shape[1], A.shape[0], bias=False)
            self.B = nn.Linear(B.shape[1], B.shape[0], bias=False)
            with torch.no_grad():
                self.A.weight.copy_(A)
                self.B.weight.copy_(B)
        else:
            self.A = nn.Parameter(A.detach().clone())
            self.B = nn.Parameter(B.detach().clone())

    def forward(self, x):
        if self.as_modules:
            return nn.functional.linear(x, self.W0, self.b0) + SCALE * self.B(self.A(x))
        return nn.functional.linear(x, self.W0 + SCALE * self.B @ self.A, self.b0)


def lora_pair(n_out, as_modules):
    """A peft LoRA model and the equivalent plain model, same weights."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, n_out))
    plain_layers = []
    lora_model = peft.get_peft_model(
        deepcopy(base),
        peft.LoraConfig(
            r=RANK, lora_alpha=RANK * SCALE, target_modules=["0", "2"], lora_dropout=0.0
        ),
    )
    for i in (0, 2):
        layer = lora_model.base_model.model[i]
        with torch.no_grad():  # peft starts with B = 0: make the point generic
            layer.lora_B["default"].weight.normal_(0, 0.5)
        plain_layers.append(
            PlainLoRALinear(
                base[i],
                layer.lora_A["default"].weight,
                layer.lora_B["default"].weight,
                as_modules,
            )
        )
    plain = nn.Sequential(plain_layers[0], nn.Tanh(), plain_layers[1])
    return lora_model.eval(), plain.eval()


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_lora_subset_equals_plain_model(structure, likelihood):
    n_out = 2 if likelihood == "regression" else 3
    lora_model, plain = lora_pair(n_out, as_modules=structure == "kron")
    X, y = regression_data(n_out)
    if likelihood == "classification":
        y = y.argmax(-1)
    loader = DataLoader(TensorDataset(X, y), batch_size=8)
    kwargs = {"prior_precision": 0.7}
    if likelihood == "regression":
        kwargs["sigma_noise"] = 0.6
    la_lora = fitted(lora_model, loader, likelihood, "all", structure, **kwargs)
    la_plain = fitted(plain, loader, likelihood, "all", structure, **kwargs)
    expected_n = RANK * (D_IN + HIDDEN) + RANK * (HIDDEN + n_out)
    assert la_lora.n_params == la_plain.n_params == expected_n
    torch.testing.assert_close(la_lora.mean, la_plain.mean, rtol=0, atol=0)
    assert_same_laplace(
        la_lora, la_plain, X[:5], X[:5], regression=likelihood == "regression"
    )


def test_lora_posterior_precision_equals_dense_ggn():
    lora_model, plain = lora_pair(2, as_modules=False)
    X, y = regression_data(2)
    sigma, prior = 0.6, 0.7
    la = fitted(
        lora_model,
        DataLoader(TensorDataset(X, y), batch_size=8),
        "regression",
        "all",
        "full",
        sigma_noise=sigma,
        prior_precision=prior,
    )
    params = {n: p.detach() for n, p in plain.named_parameters()}
    jac = jacrev(lambda p: functional_call(plain, p, (X,)))(params)
    J = torch.cat([j.flatten(2) for j in jac.values()], dim=2).flatten(0, 1)
    P = J.T @ J / sigma**2 + prior * torch.eye(J.shape[1])
    torch.testing.assert_close(la.posterior_precision, P, rtol=RTOL, atol=1e-10)


# ---- feature reduction -------------------------------------------------------------------
REDUCTIONS = {
    "pick_first": lambda h: h[:, 0],
    "pick_last": lambda h: h[:, -1],
    "average": lambda h: h.mean(dim=1),
}
SEQ, D_TOK, EMB = 4, 3, 6


class SequenceModel(nn.Module):
    """Per-token body ``(B, T, D) -> (B, T, E)`` and head; the reduction over tokens
    is applied to the head's outputs, or (``pre_reduce``) to its inputs, which
    gives the same function since the head is affine."""

    def __init__(self, reduction, pre_reduce, n_out=2):
        super().__init__()
        self.reduce = REDUCTIONS[reduction]
        self.pre_reduce = pre_reduce
        self.body = nn.Sequential(nn.Linear(D_TOK, EMB), nn.Tanh())
        self.head = nn.Linear(EMB, n_out)

    def forward(self, x):
        h = self.body(x)
        if self.pre_reduce:
            return self.head(self.reduce(h))
        return self.reduce(self.head(h))


def sequence_pair(reduction):
    torch.manual_seed(0)
    post = SequenceModel(reduction, pre_reduce=False)
    pre = SequenceModel(reduction, pre_reduce=True)
    pre.load_state_dict(post.state_dict())
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(N, SEQ, D_TOK, generator=gen)
    y = torch.randn(N, 2, generator=gen)
    return post, pre, X, y


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_feature_extractor_reduces_like_manual(reduction):
    post, _, X, _ = sequence_pair(reduction)
    extractor = FeatureExtractor(
        post, last_layer_name="head", feature_reduction=reduction
    )
    out, features = extractor.forward_with_features(X)
    torch.testing.assert_close(out, post(X), rtol=0, atol=0)
    expected = REDUCTIONS[reduction](post.body(X))
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    _, unreduced = FeatureExtractor(post, "head").forward_with_features(X)
    assert unreduced.shape == (N, SEQ, EMB)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_last_layer_feature_reduction_equals_reduced_model(reduction, structure):
    post, pre, X, y = sequence_pair(reduction)
    loader = DataLoader(TensorDataset(X, y), batch_size=8)
    la_seq = fitted(
        post, loader, "regression", "last_layer", structure, feature_reduction=reduction
    )
    la_ref = fitted(pre, loader, "regression", "last_layer", structure)
    assert la_seq.model.last_layer_name == "head"
    assert_same_laplace(la_seq, la_ref, X[:5], X[:5])


# ---- dict batches on a tiny GPT-2 ------------------------------------------------------------
VOCAB, T_TOK, N_SEQ = 50, 6, 8


def tiny_gpt2(num_labels=3):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=T_TOK,
        n_embd=16,
        n_layer=2,
        n_head=2,
        num_labels=num_labels,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        # SDPA attention is not vmap-able (data-dependent mask checks), and the
        # GLM predictive vmaps the model for per-sample Jacobians
        attn_implementation="eager",
    )
    return transformers.GPT2ForSequenceClassification(config).eval()


class DictGPT(nn.Module):
    """Takes the batch as Hugging Face data loaders yield it."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    def forward(self, batch):
        out = self.hf(input_ids=batch["input_ids"], attention_mask=batch["attn"])
        return out.logits


class TensorGPT(nn.Module):
    """The same model fed a tensor of token ids."""

    def __init__(self, dict_model):
        super().__init__()
        self.inner = dict_model

    def forward(self, ids):
        return self.inner({"input_ids": ids, "attn": torch.ones_like(ids)})


def token_data():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (N_SEQ, T_TOK), generator=gen)
    labels = torch.randint(0, 3, (N_SEQ,), generator=gen)
    return ids, labels


@pytest.mark.parametrize(
    "subset,structure", [("all", "kron"), ("all", "diag"), ("last_layer", "full")]
)
def test_dict_batches_on_tiny_gpt2(subset, structure):
    ids, labels = token_data()
    dict_model = DictGPT(tiny_gpt2())
    if subset == "all":
        dict_model = peft.get_peft_model(
            dict_model,
            peft.LoraConfig(
                r=1, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True
            ),
        ).eval()
        for name, p in dict_model.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    p.normal_(0, 0.1)
    tensor_model = TensorGPT(dict_model)
    rows = [
        {"input_ids": i, "attn": torch.ones_like(i), "target": t}
        for i, t in zip(ids, labels)
    ]
    dict_loader = DataLoader(rows, batch_size=4)
    tensor_loader = DataLoader(TensorDataset(ids, labels), batch_size=4)
    kwargs = {"feature_reduction": "pick_last"} if subset == "last_layer" else {}
    la_dict = fitted(
        dict_model,
        dict_loader,
        "classification",
        subset,
        structure,
        dict_key_y="target",
        **kwargs,
    )
    la_tensor = fitted(
        tensor_model, tensor_loader, "classification", subset, structure, **kwargs
    )
    if subset == "all":
        assert la_dict.n_params == 2 * (16 * 1 + 1 * 48)  # LoRA A and B per layer
    batch = next(iter(dict_loader))
    assert_same_laplace(la_dict, la_tensor, batch, ids[:4], regression=False)
    # a BatchEncoding (what tokenizers return) is dict-like too
    encoding = transformers.BatchEncoding({"input_ids": ids[:4], "attn": batch["attn"]})
    torch.testing.assert_close(la_dict(encoding), la_dict(batch), rtol=0, atol=0)


# ---- enable_backprop -----------------------------------------------------------------------
def backprop_model(n_out):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, n_out)
    ).eval()


def central_difference(fn, x, h=1e-5):
    grad = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x).flatten()
        e[i] = h
        e = e.view_as(x)
        grad.view(-1)[i] = (fn(x + e) - fn(x - e)) / (2 * h)
    return grad


CASES = [
    ("all", "full"),
    ("all", "kron"),
    ("all", "diag"),
    ("last_layer", "full"),
    ("last_layer", "kron"),
    ("last_layer", "diag"),
    ("lora", "full"),
]


@pytest.mark.parametrize("subset,structure", CASES)
@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_predictive_gradients_wrt_inputs(subset, structure, likelihood):
    n_out = 2 if likelihood == "regression" else 3
    X, y = regression_data(n_out, seed=2)
    if likelihood == "classification":
        y = y.argmax(-1)
    if subset == "lora":
        model, subset = lora_pair(n_out, as_modules=False)[0], "all"
    else:
        model = backprop_model(n_out)
    la = fitted(
        model,
        DataLoader(TensorDataset(X, y), batch_size=8),
        likelihood,
        subset,
        structure,
        enable_backprop=True,
    )
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, D_IN, generator=gen)
    w_mean = torch.randn(4, n_out, generator=gen)
    w_var = torch.randn(4, n_out, n_out, generator=gen)

    def objective(x):
        if likelihood == "classification":
            return (w_mean * la(x, link_approx="probit")).sum()
        f_mu, f_var = la(x)
        return (w_mean * f_mu).sum() + (w_var * f_var).sum()

    x = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(x), x)
    with torch.no_grad():
        expected = central_difference(objective, x0)
    # central differences have O(h^2) = 1e-10 truncation error
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_no_graph_without_enable_backprop(subset):
    X, y = regression_data(2)
    la = fitted(
        backprop_model(2),
        DataLoader(TensorDataset(X, y), batch_size=8),
        "regression",
        subset,
        "kron",
    )
    f_mu, f_var = la(X[:3].clone().requires_grad_(True))
    assert not f_mu.requires_grad and not f_var.requires_grad
