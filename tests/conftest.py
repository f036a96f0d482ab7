"""Shared fixtures: a tiny random model + tokenizer built locally (no hub), and sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random Llama-shaped model with a ChatML tokenizer, saved with save_pretrained."""
    from tuneyard.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture()
def sample_jsonl(tmp_path) -> Path:
    from tuneyard.demo.tiny import write_sample_jsonl

    return write_sample_jsonl(tmp_path / "train.jsonl")
