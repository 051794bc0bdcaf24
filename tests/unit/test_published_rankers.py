"""Published rankers by Hub id: RankingGPT (zyznull/RankingGPT-*) and RankLLaMA (castorini/rankllama-*).

The checkpoints are tiny random models laid out exactly as the Hub repositories are (config, weights, tokenizer;
RankLLaMA: a SEQ_CLS LoRA adapter with no tokenizer over ``meta-llama/Llama-2-7b-hf``) in a private HF cache read
offline, so ``Ranker.from_pretrained("zyznull/RankingGPT-bloom-560m")`` takes the path a user's call takes. Each
score is compared with the released usage written out plainly below: RankingGPT's eval.py (mean log-probability of
the query tokens after ``len(tokenize(source))`` tokens, one example at a time) and RankLLaMA's model card
(``tokenizer(f"query: {q}", f"document: {doc}")``, the merged sequence-classification model, ``logits[0][0]``).
(Both written out in ``tests/released.py``.) The loads run in a subprocess because the HF cache location is fixed when huggingface_hub is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, build_tiny_llama, build_tiny_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
QUERIES = ["what is the capital of france", "banana fruit"]
DOCS = [
    "Paris is the capital and largest city of France.",
    "Bananas are an elongated edible fruit produced by several kinds of plants. " * 3,
    "The mitochondria is the powerhouse of the cell and produces energy.",
]


def _snapshot(cache: Path, repo: str) -> Path:
    """The directory a Hub repository's files live in inside an HF cache (``refs/main`` pointing at it)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _with_bos(tokenizer, pair: bool):
    """A Llama-style tokenizer: BOS before each segment (``<s> A`` and ``<s> A <s> B``), as Llama-2's adds."""
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1" if pair else f"{bos} $A $B",
        special_tokens=[(bos, tokenizer.bos_token_id)])
    return tokenizer


def _rankinggpt_bloom(snap: Path) -> None:
    from transformers import BloomConfig, BloomForCausalLM

    tok = build_tiny_tokenizer()  # BLOOM's tokenizer adds no special tokens; pad is its own token
    tok.add_special_tokens({"pad_token": "[PAD]"})
    torch.manual_seed(1)
    BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4, initializer_range=0.3,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(snap)
    tok.save_pretrained(snap)


def _rankinggpt_llama(snap: Path) -> None:
    tok = _with_bos(build_tiny_tokenizer(), pair=False)
    tok.add_special_tokens({"pad_token": "[PAD]"})  # the released training adds [PAD] to Llama's tokenizer
    build_tiny_llama(len(tok), seed=2, pad_token_id=tok.pad_token_id, initializer_range=0.3).save_pretrained(snap)
    tok.save_pretrained(snap)


def _rankllama(base_snap: Path, adapter_snap: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    tok = _with_bos(build_tiny_tokenizer(), pair=True)
    tok.pad_token = None  # Llama-2's tokenizer has no pad token
    base = build_tiny_llama(len(tok), seed=3, pad_token_id=None, tie_word_embeddings=False)
    base.save_pretrained(base_snap)
    tok.save_pretrained(base_snap)
    torch.manual_seed(4)
    seq_cls = LlamaForSequenceClassification.from_pretrained(base_snap, num_labels=1)
    peft = get_peft_model(seq_cls, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                              target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # a trained adapter: B != 0, so merging changes the weights
        for name, p in peft.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0, 0.2)
    peft.save_pretrained(adapter_snap)
    cfg = json.loads((adapter_snap / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (adapter_snap / "adapter_config.json").write_text(json.dumps(cfg))


REMOTE_CONFIG = """
from transformers import LlamaConfig


class QWenConfig(LlamaConfig):
    model_type = "qwen"
"""

REMOTE_MODEL = """
from transformers import LlamaForCausalLM

from .configuration_qwen import QWenConfig


class QWenLMHeadModel(LlamaForCausalLM):
    config_class = QWenConfig
"""


def _remote_code_qwen(snap: Path) -> None:
    """Qwen-7B's layout: modelling code in the repository (``auto_map``), a tokenizer without a pad token."""
    tok = build_tiny_tokenizer()
    tok.pad_token = None  # eval.py pads with Qwen's eod_id; tsarank falls back to EOS
    build_tiny_llama(len(tok), seed=5, pad_token_id=None, initializer_range=0.3).save_pretrained(snap)
    tok.save_pretrained(snap)
    (snap / "configuration_qwen.py").write_text(REMOTE_CONFIG)
    (snap / "modeling_qwen.py").write_text(REMOTE_MODEL)
    cfg = json.loads((snap / "config.json").read_text())
    cfg.update(model_type="qwen", architectures=["QWenLMHeadModel"],
               auto_map={"AutoConfig": "configuration_qwen.QWenConfig",
                         "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"})
    (snap / "config.json").write_text(json.dumps(cfg))


SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from peft import PeftModel
    from tsarank import Ranker

    queries, docs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    out = {}

    from tests.released import rankinggpt_eval_scores, rankllama_card_scores
    pairs = [(q, d) for q in queries for d in docs]

    def eval_py(repo, **kw):
        model = AutoModelForCausalLM.from_pretrained(repo, **kw).eval()
        return rankinggpt_eval_scores(model, AutoTokenizer.from_pretrained(repo, **kw), pairs)

    def model_card(adapter):  # RankLLaMA's model card: the base's tokenizer, the merged seq-cls model
        base = json.load(open(__import__("huggingface_hub").hf_hub_download(adapter, "adapter_config.json")))
        base = base["base_model_name_or_path"]
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
        return rankllama_card_scores(model, AutoTokenizer.from_pretrained(base), pairs)

    def ours(repo, **kw):
        try:
            ranker = Ranker.from_pretrained(repo, device="cpu", dtype="float32", **kw)
        except Exception as exc:
            return {"error": type(exc).__name__, "message": str(exc)}
        scores = [s for q in queries for s in ranker.score(q, docs)]
        return {"scores": scores, "style": ranker.template.style, "head": ranker.template.scoring_head}

    for repo in ("zyznull/RankingGPT-bloom-560m", "zyznull/RankingGPT-llama2-7b"):
        out[repo] = {"ours": ours(repo), "reference": eval_py(repo)}
    adapter = "castorini/rankllama-v1-7b-lora-passage"
    out[adapter] = {"ours": ours(adapter), "reference": model_card(adapter)}
    qwen = "zyznull/RankingGPT-qwen-7b"
    out["remote"] = ours(qwen)
    out[qwen] = {"ours": ours(qwen, trust_remote_code=True), "reference": eval_py(qwen, trust_remote_code=True)}
    out["encoder"] = ours("org/an-encoder")
    out["absent"] = ours("org/not-in-the-cache")
    out["missing-dir"] = ours("./no/such/checkpoint")
    json.dump(out, open(sys.argv[3], "w"))
''')


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("hub")
    _rankinggpt_bloom(_snapshot(cache, "zyznull/RankingGPT-bloom-560m"))
    _rankinggpt_llama(_snapshot(cache, "zyznull/RankingGPT-llama2-7b"))
    _rankllama(_snapshot(cache, "meta-llama/Llama-2-7b-hf"), _snapshot(cache, "castorini/rankllama-v1-7b-lora-passage"))
    _remote_code_qwen(_snapshot(cache, "zyznull/RankingGPT-qwen-7b"))
    encoder = _snapshot(cache, "org/an-encoder")
    (encoder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    script, out = cache / "run.py", cache / "out.json"
    script.write_text(SCRIPT)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_MODULES_CACHE=str(cache / "modules"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script), json.dumps(QUERIES), json.dumps(DOCS), str(out)],
                          cwd=cache, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("repo", ["zyznull/RankingGPT-bloom-560m", "zyznull/RankingGPT-llama2-7b",
                                  "zyznull/RankingGPT-qwen-7b"])
def test_rankinggpt_by_hub_id_scores_as_released_eval(results, repo):
    got = results[repo]
    assert "scores" in got["ours"], got["ours"]
    assert got["ours"]["style"] == "rankinggpt"
    assert got["ours"]["scores"] == pytest.approx(got["reference"], abs=2e-5)
    ref = sorted(got["reference"])
    assert min(b - a for a, b in zip(ref, ref[1:])) > 1e-3  # distinct scores: a mix-up of pairs would show


def test_rankllama_adapter_by_hub_id_scores_as_model_card(results):
    got = results["castorini/rankllama-v1-7b-lora-passage"]
    assert "scores" in got["ours"], got["ours"]
    assert (got["ours"]["style"], got["ours"]["head"]) == ("rankllama", "last_token")
    assert got["ours"]["scores"] == pytest.approx(got["reference"], abs=2e-5)
    assert max(got["reference"]) - min(got["reference"]) > 1e-3  # the adapter's head is not constant


def test_remote_code_refused_without_trust(results):
    got = results["remote"]
    assert got["error"] == "ValueError"
    assert "trust_remote_code=True" in got["message"] and "--trust-remote-code" in got["message"]


def test_unsupported_and_absent_models_named(results):
    assert results["encoder"]["error"] == "ValueError"
    assert "BertModel" in results["encoder"]["message"] and "causal LM" in results["encoder"]["message"]
    assert results["absent"]["error"] == "FileNotFoundError"
    assert "org/not-in-the-cache" in results["absent"]["message"]
    assert results["missing-dir"]["error"] == "FileNotFoundError"
    assert "no such directory" in results["missing-dir"]["message"]


def test_pad_id_fallbacks():
    """eval.py pads Qwen-7B's batches with ``tokenizer.eod_id`` (its tokenizer has no pad or EOS token)."""
    from types import SimpleNamespace

    from tsarank.loading import pad_id_of

    assert pad_id_of(SimpleNamespace(pad_token_id=5, eos_token_id=2)) == 5
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=None, eod_id=151643)) == 151643
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=None, unk_token_id=0)) == 0
