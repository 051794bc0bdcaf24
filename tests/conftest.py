"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny random causal LMs (seconds, not minutes),
the real default model (integration tests), and the path of ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_CORPUS = [
    "Document: Paris is the capital and largest city of France. Query: what is the capital of france",
    "Document: Bananas are an elongated edible fruit produced by several kinds of plants. Query: banana fruit",
    "Document: The mitochondria is the powerhouse of the cell and produces energy. Query: what do mitochondria do",
    "query: how tall is mount everest document: Mount Everest is 8,849 metres above sea level.",
    "Caf\u00e9 na\u00efve \u00e2\u0080\u0099 \u00c2\u00b0 \u6771\u4eac \u0645\u0631\u062d\u0628\u0627 \u041f\u0440\u0438\u0432\u0435\u0442 0123456789",
]


def build_tiny_tokenizer(vocab_size: int = 384):
    """A real fast tokenizer (byte-level BPE, trained in memory), with EOS/pad like SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    return fast


def build_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=2,
        bos_token_id=1, eos_token_id=2,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.config._attn_implementation = "sdpa"
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module (restored afterwards). Tiny models are latency-bound, and on a busy 2-core
    machine two OpenMP threads spin-wait on each other (measured: 24 s instead of 0.4 s for one test); subprocesses
    get OMP_NUM_THREADS=1 for the same reason. Use: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    return build_tiny_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama + tokenizer directory (for code paths that load from disk)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_llama(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real data not found at {DATA} (expected ../shared/data beside the repository)")
    return DATA


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real embedded default model (converted once into $TSARANK_HOME; about 40 s the first time)."""
    from tsarank.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def default_ranker(default_model_dir):
    from tsarank import Ranker

    return Ranker.from_pretrained(str(default_model_dir), device="cpu", dtype="float32")
