"""Laplace on a (tiny) Hugging Face language model fine-tuned with LoRA.

A GPT-2 classifier built from a ``GPT2Config`` (random weights, nothing is
downloaded) is fine-tuned with LoRA (peft) on a toy sequence-classification task
(does a sequence hold more tokens from the upper than from the lower half of the
vocabulary?). Then two Laplace approximations are compared with the MAP model:

- last-layer Laplace on the classification head, whose inputs are sequence
  features ``(batch, seq, n_embd)``, reduced with ``feature_reduction='pick_last'``
  (GPT-2 classifies from the last token);
- all-weights Laplace where only the LoRA weights have ``requires_grad=True``:
  the posterior covers the LoRA weights only.

Batches are dicts, as Hugging Face data loaders yield them; the wrapper's
``forward`` takes the dict. Run ``python examples/huggingface_example.py``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import MutableMapping

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import GPT2Config, GPT2ForSequenceClassification  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402

from laplace import Laplace  # noqa: E402

VOCAB, N_CLASSES = 100, 2


class MyGPT2(nn.Module):
    """A GPT-2 sequence classifier whose ``forward`` takes a dict-like batch."""

    def __init__(self, seq_len: int, n_embd: int = 32, n_layer: int = 2) -> None:
        super().__init__()
        config = GPT2Config(
            vocab_size=VOCAB,
            n_positions=seq_len,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=2,
            num_labels=N_CLASSES,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
            # The GLM predictive takes per-sample Jacobians with torch.func.vmap,
            # which the SDPA attention path (data-dependent mask checks) breaks.
            attn_implementation="eager",
        )
        self.hf_model = GPT2ForSequenceClassification(config)

    def forward(self, data: MutableMapping) -> torch.Tensor:
        device = next(self.parameters()).device
        out = self.hf_model(
            input_ids=data["input_ids"].to(device),
            attention_mask=data["attention_mask"].to(device),
        )
        return out.logits  # (batch, N_CLASSES)


def make_data(n: int, seq_len: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Label 1 iff the sequence holds more tokens from the upper half of the
    vocabulary than from the lower half (token 0 is padding, never drawn)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, seq_len), generator=gen)
    labels = ((ids >= VOCAB // 2).sum(1) * 2 > seq_len).long()
    mask = torch.ones(seq_len, dtype=torch.long)
    return [
        {"input_ids": i, "attention_mask": mask, "labels": y}
        for i, y in zip(ids, labels)
    ]


def lora_model(seq_len: int, rank: int) -> nn.Module:
    """LoRA on the attention weights; the (randomly initialised) head is trained
    as well."""
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["c_attn"],
        fan_in_fan_out=True,  # GPT-2's attention uses transposed Conv1D weights
        lora_dropout=0.0,
        bias="none",
    )
    model = get_peft_model(MyGPT2(seq_len), config)
    for p in model.base_model.model.hf_model.score.parameters():
        p.requires_grad_(True)
    return model


def train(model: nn.Module, loader: DataLoader, n_epochs: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-2)
    model.train()
    for _ in range(n_epochs):
        for batch in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(batch), batch["labels"])
            loss.backward()
            optimizer.step()
    model.eval()


def evaluate(predict, loader: DataLoader) -> dict[str, float]:
    probs = torch.cat([predict(batch) for batch in loader])
    labels = torch.cat([batch["labels"] for batch in loader])
    nll = nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    acc = (probs.argmax(-1) == labels).double().mean().item()
    return {"acc": acc, "nll": nll}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-test", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)

    train_loader = DataLoader(
        make_data(args.n_train, args.seq_len, seed=0), batch_size=32, shuffle=True
    )
    test_loader = DataLoader(make_data(args.n_test, args.seq_len, 1), batch_size=64)
    model = lora_model(args.seq_len, args.rank)
    train(model, train_loader, args.epochs)

    results = {}
    with torch.no_grad():
        results["MAP"] = evaluate(lambda b: torch.softmax(model(b), -1), test_loader)

    # Last-layer Laplace on the head: its inputs are (batch, seq, n_embd) features;
    # GPT-2 classifies from the last (non-padding) token, so pick the last one.
    la_ll = Laplace(
        model,
        "classification",
        subset_of_weights="last_layer",
        hessian_structure="kron",
        feature_reduction="pick_last",
    )
    la_ll.fit(train_loader)
    la_ll.optimize_prior_precision(method="marglik")
    results["last-layer LA"] = evaluate(la_ll, test_loader)

    # Laplace over the LoRA weights only: freeze everything else, then
    # subset_of_weights='all' treats exactly the parameters with requires_grad.
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    la_lora = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="kron"
    )
    la_lora.fit(train_loader)
    la_lora.optimize_prior_precision(method="marglik")
    results["LoRA LA"] = evaluate(la_lora, test_loader)

    print(f"LoRA parameters under the posterior: {la_lora.n_params}")
    for name, metrics in results.items():
        print(f"{name:>14}: accuracy {metrics['acc']:.3f}  NLL {metrics['nll']:.4f}")
    return results


if __name__ == "__main__":
    main()
