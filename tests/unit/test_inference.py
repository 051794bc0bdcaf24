"""Ranker scoring against brute-force references on a tiny random Llama, loading paths, and the default-model cache."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_llama
from tsarank.hub import load_tsarank_config, save_tsarank_config
from tsarank.inference import Ranker, collate_pairs, plan_batches
from tsarank.backend import flash_attn_available, resolve_attn_implementation
from tsarank.modeling import LastTokenHead
from tsarank.prompts import PromptTemplate, encode_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

QUERY = "what is the capital of france"
DOCS = [
    "Paris is the capital and largest city of France.",
    "Bananas are an elongated edible fruit produced by several kinds of plants.",
    "",
    "The mitochondria is the powerhouse of the cell and produces energy. " * 6,
    "Caf\u00e9 na\u00efve \u00e2\u0080\u0099 \u00c2\u00b0 \u6771\u4eac \u0645\u0631\u062d\u0628\u0627 \u041f\u0440\u0438\u0432\u0435\u0442",
    "Mount Everest is 8,849 metres above sea level.",
    "France",
]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    """The tiny random Llama (same weights as conftest's ``tiny_llama`` and ``tiny_checkpoint``), built once."""
    return build_tiny_llama(len(tiny_tokenizer))


# ------------------------------------------------------------------------------------------ references
def brute_force_scores(model, tokenizer, template: PromptTemplate, query: str, docs: list[str]) -> list[float]:
    """Mean log p(query tokens | prefix): one unpadded sequence at a time, full [L, V] logits, Python loop."""
    out = []
    for enc in encode_pairs(tokenizer, template, [query] * len(docs), docs):
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()  # [L, V]
        logp = torch.log_softmax(logits, dim=-1)
        terms = [logp[t - 1, enc.input_ids[t]].item() for t in range(enc.target_start, enc.target_end)]
        out.append(sum(terms) / len(terms))
    return out


def brute_force_last_token(model, head: LastTokenHead, tokenizer, template, query, docs) -> list[float]:
    """w . h_last + b with the final hidden state of each unpadded sequence (normed, as the LM head sees it)."""
    out = []
    for enc in encode_pairs(tokenizer, template, [query] * len(docs), docs):
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([enc.input_ids]), output_hidden_states=True).hidden_states[-1][0]
            w, b = head.linear.weight[0].double(), head.linear.bias[0].double()
            out.append((hidden[-1].double() @ w + b).item())
    return out


def max_diff(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- scoring
def test_scores_equal_brute_force_full_logits(model, tiny_tokenizer):
    ranker = Ranker(model, tiny_tokenizer)
    got = ranker.score(QUERY, DOCS)
    want = brute_force_scores(model, tiny_tokenizer, ranker.template, QUERY, DOCS)
    assert max_diff(got, want) < 1e-5
    # Different docs give different scores (the test would be vacuous otherwise).
    assert len({round(s, 6) for s in got}) == len(set(DOCS))


def test_scores_with_truncation_equal_brute_force(model, tiny_tokenizer):
    template = PromptTemplate(max_doc_tokens=6, max_query_tokens=3)
    ranker = Ranker(model, tiny_tokenizer, template)
    got = ranker.score(QUERY, DOCS)
    assert max_diff(got, brute_force_scores(model, tiny_tokenizer, template, QUERY, DOCS)) < 1e-5


@pytest.mark.parametrize("batch_size, max_tokens", [(1, None), (2, None), (3, 64), (None, 40), (None, 100000)])
def test_batch_size_invariance(model, tiny_tokenizer, batch_size, max_tokens):
    reference = Ranker(model, tiny_tokenizer, max_tokens=100000).score(QUERY, DOCS, batch_size=1)
    got = Ranker(model, tiny_tokenizer, max_tokens=max_tokens).score(QUERY, DOCS, batch_size=batch_size)
    assert max_diff(got, reference) < 1e-4


def test_order_invariance_and_score_pairs_across_queries(model, tiny_tokenizer):
    ranker = Ranker(model, tiny_tokenizer, max_tokens=64)
    base = ranker.score(QUERY, DOCS)
    perm = list(range(len(DOCS)))
    random.Random(0).shuffle(perm)
    shuffled = ranker.score(QUERY, [DOCS[i] for i in perm])
    assert max_diff(shuffled, [base[i] for i in perm]) < 1e-4
    # Mixed queries in one call equal per-query calls.
    other = "banana fruit"
    pairs = [(QUERY if i % 2 else other, d) for i, d in enumerate(DOCS)]
    mixed = ranker.score_pairs(pairs)
    single = [ranker.score(q, [d])[0] for q, d in pairs]
    assert max_diff(mixed, single) < 1e-4
    progress = []
    ranker.score_pairs(pairs, on_batch=progress.append)
    assert sum(progress) == len(pairs)


def test_rerank_ties_lower_index_first(tiny_tokenizer):
    # A zero LM head gives every token log p = -log V exactly, so every document ties.
    model = build_tiny_llama(len(tiny_tokenizer), tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ranker = Ranker(model, tiny_tokenizer)
    scores = ranker.score(QUERY, DOCS)
    assert len(set(scores)) == 1
    assert ranker.rerank(QUERY, DOCS) == [(i, scores[0]) for i in range(len(DOCS))]
    assert ranker.rerank(QUERY, DOCS, top_k=3) == [(i, scores[0]) for i in range(3)]


def test_rerank_duplicates_keep_input_order(model, tiny_tokenizer):
    ranker = Ranker(model, tiny_tokenizer)
    docs = [DOCS[1], DOCS[0], DOCS[1], DOCS[0], DOCS[5]]
    scores = ranker.score(QUERY, docs)
    ranked = ranker.rerank(QUERY, docs)
    assert scores[0] == scores[2] and scores[1] == scores[3]  # same length -> same batch -> same bits
    assert [i for i, _ in ranked] == sorted(range(len(docs)), key=lambda i: (-scores[i], i))
    pos = {i: k for k, (i, _) in enumerate(ranked)}
    assert pos[0] < pos[2] and pos[1] < pos[3]


def test_input_errors(model, tiny_tokenizer):
    ranker = Ranker(model, tiny_tokenizer)
    assert ranker.score(QUERY, []) == []
    assert ranker.rerank(QUERY, []) == []
    assert ranker.score_pairs([]) == []
    with pytest.raises(TypeError, match=r"docs\[1\]"):
        ranker.score(QUERY, ["fine", None, "also fine"])
    with pytest.raises(TypeError, match=r"pairs\[2\]\[1\]"):
        ranker.score_pairs([(QUERY, "a"), (QUERY, "b"), (QUERY, 3)])
    with pytest.raises(ValueError, match="empty"):
        ranker.score("", ["doc"])
    with pytest.raises(ValueError, match="empty"):
        ranker.score("   ", ["doc"])
    with pytest.raises(ValueError, match="empty"):
        ranker.score_pairs([(QUERY, "a"), (" ", "b")])


def test_module_level_score_with_a_ranker(model, tiny_tokenizer):
    import tsarank

    ranker = Ranker(model, tiny_tokenizer)
    assert tsarank.score(QUERY, DOCS[:3], model=ranker) == ranker.score(QUERY, DOCS[:3])


# ------------------------------------------------------------------------------------------ batching
@pytest.mark.parametrize("seed", range(5))
def test_plan_batches_respects_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 200))]
    max_tokens, max_batch = rng.choice([256, 512, 2048]), rng.choice([None, 3, 16])
    batches = plan_batches(lengths, max_tokens, max_batch)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [i for b in batches for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    for b in batches:
        padded = len(b) * max(lengths[i] for i in b)
        assert padded <= max_tokens or len(b) == 1
        assert max_batch is None or len(b) <= max_batch
    # Greedy packing: a batch could not have taken the next sequence.
    for b, nxt in zip(batches, batches[1:]):
        full_budget = (len(b) + 1) * lengths[b[0]] > max_tokens
        assert full_budget or (max_batch is not None and len(b) == max_batch)


def test_plan_batches_oversized_sequence_alone():
    assert plan_batches([500, 10, 10], 100) == [[0], [1, 2]]
    assert plan_batches([], 100) == []


def test_collate_pairs_matches_hand_padding(tiny_tokenizer):
    encs = encode_pairs(tiny_tokenizer, PromptTemplate(), [QUERY, "banana"], [DOCS[0], ""])
    batch = collate_pairs(encs, pad_id=2)
    n = max(len(e.input_ids) for e in encs)
    for row, e in enumerate(encs):
        k = len(e.input_ids)
        assert batch.input_ids[row].tolist() == e.input_ids + [2] * (n - k)
        assert batch.attention_mask[row].tolist() == [1] * k + [0] * (n - k)
        assert batch.target_mask[row].nonzero().flatten().tolist() == list(range(e.target_start, e.target_end))


# -------------------------------------------------------------------------------------------- loading
@pytest.mark.skipif(flash_attn_available(), reason="flash_attn is installed here")
def test_flash_attention_without_flash_attn_is_clear_error(tiny_checkpoint):
    with pytest.raises(ValueError, match="flash-attn"):
        resolve_attn_implementation("flash_attention_2", "cpu")
    with pytest.raises(ValueError, match="flash-attn"):
        Ranker.from_pretrained(str(tiny_checkpoint), attn_implementation="flash_attention_2", device="cpu", dtype="float32")
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_from_pretrained_without_sidecar_uses_defaults(tiny_checkpoint, model, tiny_tokenizer):
    from tsarank import backend

    auto = Ranker.from_pretrained(str(tiny_checkpoint), device="cpu")
    # dtype auto: bf16 on a CPU with AVX512-BF16 / AMX, fp32 on other CPUs.
    assert auto.model.dtype == (torch.bfloat16 if backend.cpu_bf16_flags() else torch.float32)
    # Against the fp32 brute force, in fp32.
    ranker = Ranker.from_pretrained(str(tiny_checkpoint), device="cpu", dtype="float32")
    assert ranker.template == PromptTemplate()
    assert ranker.model.dtype == torch.float32 and ranker.device.type == "cpu"
    # The saved tiny checkpoint is build_tiny_llama(seed=0), the same weights as the fixture.
    want = brute_force_scores(model, tiny_tokenizer, PromptTemplate(), QUERY, DOCS)
    assert max_diff(ranker.score(QUERY, DOCS), want) < 1e-5


def test_from_pretrained_reads_template_sidecar(tiny_checkpoint, model, tiny_tokenizer, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    template = PromptTemplate(source="Passage: {doc} Question:", target=" {query}", max_doc_tokens=9, max_query_tokens=4)
    save_tsarank_config(ckpt, template, stage="sft", base_model="tiny")
    assert load_tsarank_config(ckpt)["template"] == template
    ranker = Ranker.from_pretrained(str(ckpt), device="cpu", dtype="float32")
    assert ranker.template == template
    want = brute_force_scores(model, tiny_tokenizer, template, QUERY, DOCS)
    assert max_diff(ranker.score(QUERY, DOCS), want) < 1e-5


def test_last_token_checkpoint_round_trip(tiny_checkpoint, model, tiny_tokenizer, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    torch.manual_seed(1)
    head = LastTokenHead(model.config.hidden_size)
    head.save(str(ckpt))
    template = PromptTemplate.last_token(max_doc_tokens=20)
    save_tsarank_config(ckpt, template, stage="sft")
    ranker = Ranker.from_pretrained(str(ckpt), device="cpu", dtype="float32")
    assert ranker.template.scoring_head == "last_token" and ranker.head is not None
    got = ranker.score(QUERY, DOCS)
    want = brute_force_last_token(model, head, tiny_tokenizer, template, QUERY, DOCS)
    assert max_diff(got, want) < 1e-5
    # Missing head weights are an error, not random scores.
    (ckpt / "tsarank_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="tsarank_head"):
        Ranker.from_pretrained(str(ckpt), device="cpu", dtype="float32")


def test_lora_adapter_directory(tiny_checkpoint, tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    peft_model = get_peft_model(base, config).eval()
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    meta = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == str(tiny_checkpoint)
    assert not (adapter_dir / "tokenizer.json").exists()  # the tokenizer must come from the base

    want = brute_force_scores(peft_model, tiny_tokenizer, PromptTemplate(), QUERY, DOCS)
    plain_base = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()
    base_scores = brute_force_scores(plain_base, tiny_tokenizer, PromptTemplate(), QUERY, DOCS)
    assert max_diff(want, base_scores) > 1e-3  # the adapter changes the scores

    ranker = Ranker.from_pretrained(str(adapter_dir), device="cpu", dtype="float32")
    assert max_diff(ranker.score(QUERY, DOCS), want) < 1e-5


# ------------------------------------------------------------------------------------ default model cache
@pytest.mark.integration
def test_default_model_cache_concurrent_first_use_and_rebuild(tmp_path):
    """Two processes converting at once leave one valid cache; a damaged cache is detected and rebuilt."""
    from tsarank.default_model import MARKER, MODEL_DIRNAME, is_valid_cache

    env = dict(os.environ, TSARANK_HOME=str(tmp_path / "home"))
    cmd = [sys.executable, "-c", "from tsarank.default_model import default_model_path; print(default_model_path())"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    final = tmp_path / "home" / "models" / MODEL_DIRNAME
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        # Last line: importing transformers' model code may log a deepspeed accelerator warning to stdout first.
        assert out.strip().splitlines()[-1] == str(final)
    assert is_valid_cache(final)
    # Nothing but the final copy is left in the models directory (no temporary or stale directories).
    assert sorted(p.name for p in final.parent.iterdir()) == [MODEL_DIRNAME]
    manifest = json.loads((final / MARKER).read_text())["files"]

    # Damage a weight file (a partial copy): the next use must notice and rebuild it.
    weights = final / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    assert not is_valid_cache(final)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(final)
    assert is_valid_cache(final)
    assert json.loads((final / MARKER).read_text())["files"] == manifest
    assert sorted(p.name for p in final.parent.iterdir()) == [MODEL_DIRNAME]


# ----------------------------------------------------------------------------- `tsarank rerank` (tiny model)
def write_candidates(path: Path, n_queries: int = 4, n_docs: int = 3) -> list[dict]:
    texts = DOCS + ["Lyon is a city in France.", "Paris hosts the Louvre."]
    entries = []
    for q in range(n_queries):
        qid = 10 - q  # file order differs from qid order on purpose
        hits = [{"qid": qid, "docid": f"d{q}-{j}", "content": texts[(q + j) % len(texts)], "score": -j} for j in range(n_docs)]
        entries.append({"query": f"{QUERY} {q}", "hits": hits})
    path.write_text(json.dumps(entries))
    return entries


def cli(*argv: str) -> int:
    from tsarank.cli import main

    return main(list(argv))


def test_rerank_command_validates_inputs_before_loading_model(tmp_path, capsys):
    cands = tmp_path / "cands.json"
    write_candidates(cands)
    missing_model = str(tmp_path / "no-such-model")
    # Bad inputs are reported (exit 2) before the (nonexistent) model would be loaded.
    assert cli("rerank", "--candidates", str(cands), "--top-k", "0", "--model", missing_model, "--out", str(tmp_path / "o")) == 2
    assert "--top-k must be >= 1" in capsys.readouterr().err
    assert cli("rerank", "--run", str(cands), "--model", missing_model, "--out", str(tmp_path / "o")) == 2
    assert "missing --queries, --corpus" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('[{"query": "q", "hits": [{"qid": 1, "docid": "a"}]}]')
    # The data error comes before loading the model.
    assert cli("rerank", "--candidates", str(bad), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "bad.json:1" in err and "hits[0].content" in err
    # A Hub id is resolved from its small files (config, sidecar) before the data is read: offline and not cached,
    # it is the first error, naming it.
    assert cli("rerank", "--candidates", str(bad), "--model", "no-such-org/no-such-model", "--out",
               str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "no-such-org/no-such-model: no config.json" in err and "bad.json" not in err
    (tmp_path / "exists.trec").write_text("x\n")
    assert cli("rerank", "--candidates", str(cands), "--out", str(tmp_path / "exists.trec")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli("rerank", "--candidates", str(cands), "--out", str(tmp_path / "nodir" / "o.trec")) == 2
    assert "does not exist" in capsys.readouterr().err
    # Inputs fine, model missing: a clear error, not a traceback.
    assert cli("rerank", "--candidates", str(cands), "--model", missing_model, "--out", str(tmp_path / "o")) == 2
    assert "no-such-model" in capsys.readouterr().err


def _interrupted_run_options(out: Path, argv: list[str]) -> None:
    """The options file an interrupted `tsarank rerank ARGV --out OUT` leaves beside its sidecar."""
    from tsarank.cli import build_parser
    from tsarank.commands.rerank import run_options

    ns = build_parser().parse_args([*argv, "--out", str(out)])
    Path(str(out) + ".partial.json").write_text(json.dumps(run_options(ns)))


def test_rerank_command_output_and_resume(tiny_checkpoint, tiny_tokenizer, model, tmp_path, capsys):
    cands = tmp_path / "cands.json"
    entries = write_candidates(cands)
    args = ["rerank", "--candidates", str(cands), "--model", str(tiny_checkpoint), "--chunk-docs", "3", "--tag", "tiny",
            "--dtype", "float32"]
    full = tmp_path / "full.trec"
    assert cli(*args, "--out", str(full)) == 0
    lines = full.read_text().splitlines(keepends=True)
    # Queries in qid order (7..10), each ranked by the Ranker's scores, ties by docid.
    ranker = Ranker(model, tiny_tokenizer)
    expected = []
    for e in sorted(entries, key=lambda e: e["hits"][0]["qid"]):
        scores = ranker.score(e["query"], [h["content"] for h in e["hits"]])
        ranked = sorted(zip([h["docid"] for h in e["hits"]], scores), key=lambda t: (-t[1], t[0]))
        expected += [f"{e['hits'][0]['qid']} Q0 {d} {r} {format(s, '.8g')} tiny\n" for r, (d, s) in enumerate(ranked, 1)]
    assert [l.split()[:4] for l in lines] == [l.split()[:4] for l in expected]
    assert max(abs(float(a.split()[4]) - float(b.split()[4])) for a, b in zip(lines, expected)) < 1e-5

    # An interrupted run: two finished queries, then half of the third query's block (a torn write).
    out = tmp_path / "out.trec"
    sidecar = Path(str(out) + ".partial")
    sidecar.write_text("".join(lines[:6]) + lines[6] + lines[7][:9])
    _interrupted_run_options(out, args)
    assert cli(*args, "--out", str(out)) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli(*args, "--out", str(out), "--resume") == 0
    assert out.read_bytes() == full.read_bytes() and not sidecar.exists()
    assert "2 queries resumed" in capsys.readouterr().out

    # A sidecar from other inputs is refused, not merged.
    stale = tmp_path / "stale.trec"
    Path(str(stale) + ".partial").write_text(lines[0].replace("d3-", "zz-"))
    _interrupted_run_options(stale, args)
    assert cli(*args, "--out", str(stale), "--resume") == 2
    assert "stale" in capsys.readouterr().err
    Path(str(stale) + ".partial").write_text(lines[0].replace(" tiny", " other"))
    assert cli(*args, "--out", str(stale), "--resume") == 2
    assert "tag" in capsys.readouterr().err

    # --max-queries takes the first N in qid order; --top-k cuts each candidate list.
    small = tmp_path / "small.trec"
    assert cli(*args, "--out", str(small), "--max-queries", "2", "--top-k", "2") == 0
    rows = [l.split() for l in small.read_text().splitlines()]
    assert [r[0] for r in rows] == ["7", "7", "8", "8"]
    assert {r[2] for r in rows if r[0] == "7"} == {"d3-0", "d3-1"}


def test_from_pretrained_budgets_and_named_template(tiny_checkpoint, model, tiny_tokenizer, caplog):
    """Budgets and a named template on the Python API, as on `tsarank rerank`; a causal LM without a sidecar is
    scored with the default template and says so."""
    import logging

    with caplog.at_level(logging.WARNING, logger="tsarank.loading"):
        plain = Ranker.from_pretrained(str(tiny_checkpoint), device="cpu", dtype="float32")
    assert plain.checkpoint_kind == "causal_lm" and "no tsarank_config.json" in caplog.text
    assert "--template rankinggpt" in caplog.text
    ranker = Ranker.from_pretrained(str(tiny_checkpoint), device="cpu", dtype="float32", max_doc_tokens=5, max_query_tokens=3)
    want_template = PromptTemplate(max_doc_tokens=5, max_query_tokens=3)
    assert ranker.template == want_template
    assert max_diff(ranker.score(QUERY, DOCS), brute_force_scores(model, tiny_tokenizer, want_template, QUERY, DOCS)) < 1e-5
    assert max_diff(ranker.score(QUERY, DOCS), plain.score(QUERY, DOCS)) > 1e-3  # the budgets changed the inputs
    rgpt = Ranker.from_pretrained(str(tiny_checkpoint), device="cpu", dtype="float32", template="rankinggpt", max_length=40)
    assert (rgpt.template.style, rgpt.template.max_length) == ("rankinggpt", 40)
    with pytest.raises(ValueError, match="rankinggpt style only"):
        Ranker.from_pretrained(str(tiny_checkpoint), device="cpu", dtype="float32", max_length=40)
    with pytest.raises(ValueError, match="unknown template 'rankgpt'"):
        Ranker.from_pretrained(str(tiny_checkpoint), device="cpu", dtype="float32", template="rankgpt")


def test_released_sft_checkpoint_recognised_by_its_weights(tiny_checkpoint, tmp_path):
    """RankingGPT's sft.py saves its frozen reference inside the checkpoint (`init_model.*` tensors): a renamed copy
    of such a checkpoint still gets the rankinggpt template."""
    from safetensors.torch import load_file, save_file

    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "my-ranker")
    weights = load_file(str(ckpt / "model.safetensors"))
    weights.update({f"init_model.{k}": v.clone() for k, v in weights.items()})
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    ranker = Ranker.from_pretrained(str(ckpt), device="cpu", dtype="float32")
    assert ranker.checkpoint_kind == "rankinggpt" and ranker.template == PromptTemplate.named("rankinggpt")
