"""Shared fixtures: a tiny random Llama (built in-process, real SmolLM2 tokenizer) for fast plumbing tests,
and the real default model for the tests marked ``slow``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The real default model's cached directory (dequantized once per machine, ~30 s the first time)."""
    from adapters.default_model import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> str:
    """A 2-layer, width-32 random Llama saved with the real tokenizer: loads and runs in milliseconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from adapters.hf import HFBackend

    return HFBackend(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def real_backend(default_model_dir):
    from adapters.hf import HFBackend

    return HFBackend("smollm2-135m", device="cpu")


@pytest.fixture
def storage_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'bbpt.db'}"


@pytest.fixture
def sst2_jsonl(tmp_path) -> Path:
    """A small user data file in the custom-task format."""
    import gzip
    from importlib import resources

    src = resources.files("bbpt.tasks") / "data" / "sst2" / "train.jsonl.gz"
    lines = gzip.decompress(src.read_bytes()).decode().splitlines()
    neg = [ln for ln in lines if ln.endswith('"label": 0}')][:40]
    pos = [ln for ln in lines if ln.endswith('"label": 1}')][:40]
    p = tmp_path / "my.jsonl"
    p.write_text("\n".join(neg + pos) + "\n")
    return p
