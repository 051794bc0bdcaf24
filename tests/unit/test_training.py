"""Shared training plumbing (tsarank/training/) on tiny models: pad-token init, LoRA / top-layer parameter counts
against hand-worked formulas, output-dir refusal, the NaN guard, token counting, checkpoints that Ranker loads."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tsarank.data.collate import CPTCollator
from tsarank.modeling import forward_hidden
from tsarank.packing import padded_inputs
from tsarank.prompts import PromptTemplate, encode_pairs
from tsarank.training.arguments import ModelArguments, OptionError, TsarankTrainingArguments
from tsarank.training.callbacks import NanGuardCallback, ThroughputCallback, attach_callbacks
from tsarank.training.checkpoints import check_output_dir, resolve_resume_checkpoint
from tsarank.training.cpt_trainer import CausalLMTrainer
from tsarank.training.model_setup import count_parameters, prepare_model

pytestmark = pytest.mark.usefixtures("one_thread")


# Tiny Llama of conftest: hidden 32, intermediate 64, 3 layers, 4 heads (head_dim 8), 2 KV heads.
H, I, L, KV = 32, 64, 3, 16


@pytest.fixture()
def tiny_dir(tmp_path, tiny_tokenizer):
    from conftest import build_tiny_llama

    path = tmp_path / "tiny"
    build_tiny_llama(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _args(path, **kw):
    return ModelArguments(model_name_or_path=str(path), dtype="float32", attn_implementation="sdpa", **kw)


# ------------------------------------------------------------------------------------------- prepare_model
@pytest.mark.parametrize("tied", [True, False])
def test_pad_token_added_with_mean_embedding(tmp_path, tied):
    from conftest import build_tiny_llama, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    path = tmp_path / "m"
    build_tiny_llama(len(tok), tie_word_embeddings=tied).save_pretrained(path)
    original = load_file(str(path / "model.safetensors"))
    tok.pad_token = None  # a tokenizer without a pad token, like Llama-3's
    assert tok.pad_token_id is None
    n = len(tok)
    model = prepare_model(_args(path), tok, None)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == n
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == n + 1
    expected = original["model.embed_tokens.weight"].mean(0)  # mean over the rows of the old vocabulary
    torch.testing.assert_close(emb[n], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(emb[:n], original["model.embed_tokens.weight"])  # old rows untouched
    if not tied:
        torch.testing.assert_close(model.get_output_embeddings().weight[n], original["lm_head.weight"].mean(0), atol=1e-6, rtol=0)
    assert model.config.pad_token_id == n


def test_lora_without_pad_token_pads_with_eos(tmp_path):
    from conftest import build_tiny_llama, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    build_tiny_llama(len(tok)).save_pretrained(tmp_path / "m")
    tok.pad_token = None
    model = prepare_model(_args(tmp_path / "m", use_lora=True, lora_r=2), tok, None)
    assert tok.pad_token_id == tok.eos_token_id and len(tok) == 384
    assert model.get_input_embeddings().weight.shape[0] == 384


def test_lora_parameter_count_hand_formula(tiny_dir, tiny_tokenizer):
    r = 4
    model = prepare_model(_args(tiny_dir, use_lora=True, lora_r=r), tiny_tokenizer, None)
    # LoRA adds A [r, in] and B [out, r] to each target Linear: r * (in + out).
    shapes = {"q": (H, H), "k": (H, KV), "v": (H, KV), "o": (H, H), "gate": (H, I), "up": (H, I), "down": (I, H)}
    expected = L * sum(r * (i + o) for i, o in shapes.values())
    assert expected == 6144
    trainable, total = count_parameters(model)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert trainable == expected
    assert total == base + expected


def test_lora_target_subset_and_bad_targets(tiny_dir, tiny_tokenizer):
    model = prepare_model(_args(tiny_dir, use_lora=True, lora_r=2, lora_target_modules=["q_proj", "v_proj"]), tiny_tokenizer, None)
    assert count_parameters(model)[0] == L * (2 * (H + H) + 2 * (H + KV))
    with pytest.raises(ValueError, match="match no Linear module"):
        prepare_model(_args(tiny_dir, use_lora=True, lora_target_modules=["query_key_value"]), tiny_tokenizer, None)


def test_train_top_layers_parameter_count(tiny_dir, tiny_tokenizer):
    """As released (``model.transformer.h[-top:]``): exactly the top blocks train; the final norm only on request."""
    block = H * H + 2 * H * KV + H * H + 3 * H * I + 2 * H  # attention, MLP, two RMSNorm weights
    model = prepare_model(_args(tiny_dir, train_top_layers=1), tiny_tokenizer, None)
    trainable, _ = count_parameters(model)
    assert trainable == block
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("model.layers.2.") for n in names)
    model = prepare_model(_args(tiny_dir, train_top_layers=1, train_final_norm=True), tiny_tokenizer, None)
    assert count_parameters(model)[0] == block + H  # + the final norm; the LM head is tied to the embeddings
    with pytest.raises(ValueError, match="tied to its input embeddings"):
        prepare_model(_args(tiny_dir, train_top_layers=1, train_lm_head=True), tiny_tokenizer, None)


def test_train_lm_head_on_an_untied_head(tmp_path, tiny_tokenizer):
    from conftest import build_tiny_llama

    path = tmp_path / "untied"
    build_tiny_llama(len(tiny_tokenizer), tie_word_embeddings=False).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    model = prepare_model(_args(path, train_top_layers=2, train_lm_head=True), tiny_tokenizer, None)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in names and "model.norm.weight" not in names
    assert not any(n.startswith(("model.layers.0.", "model.embed_tokens")) for n in names)


def test_contradictory_model_options(tiny_dir):
    """Checked where the options live (ModelArguments), before any model is loaded."""
    with pytest.raises(OptionError, match="use_lora and train_top_layers"):
        _args(tiny_dir, use_lora=True, train_top_layers=1)
    with pytest.raises(OptionError, match="merge_lora: true needs use_lora"):
        _args(tiny_dir, merge_lora=True)
    with pytest.raises(OptionError, match="train_top_layers must be >= 0"):
        _args(tiny_dir, train_top_layers=-1)
    with pytest.raises(OptionError, match="add to train_top_layers"):
        _args(tiny_dir, train_final_norm=True)


def test_forward_hidden_equals_decoder_output(tiny_llama, tiny_tokenizer):
    ids = torch.tensor([tiny_tokenizer("Document: Paris. Query: capital")["input_ids"]])
    with torch.no_grad():
        ours, _ = forward_hidden(tiny_llama, padded_inputs(ids, torch.ones_like(ids)))
        ref = tiny_llama.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, ref)


# ------------------------------------------------------------------------------------------- output dir / resume
def test_output_dir_refusal(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    check_output_dir(str(out), overwrite=False, resuming=False)  # empty: fine
    (out / "model.safetensors").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        check_output_dir(str(out), overwrite=False, resuming=False)
    check_output_dir(str(out), overwrite=True, resuming=False)
    check_output_dir(str(out), overwrite=False, resuming=True)


def test_cpt_train_refuses_non_empty_output_dir_before_loading(tmp_path):
    from tsarank.training import cpt as cpt_train

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        cpt_train.train(["--train_file", str(tmp_path / "missing.jsonl"), "--output_dir", str(out), "--report_to", "none"])
    assert (out / "keep.txt").read_text() == "precious"


def test_resume_last_without_checkpoint(tmp_path):
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_resume_checkpoint("true", str(tmp_path))
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-12").mkdir()
    assert resolve_resume_checkpoint("last", str(tmp_path)).endswith("checkpoint-12")


# ------------------------------------------------------------------------------------------- trainer + callbacks
PAIRS = [
    ("capital of france", "Paris is the capital and largest city of France."),
    ("banana fruit", "Bananas are an elongated edible fruit."),
    ("what do mitochondria do", "The mitochondria is the powerhouse of the cell."),
    ("everest", "Mount Everest is 8,849 metres above sea level."),
]


def _dataset(tok, n_repeat=2):
    import datasets

    enc = encode_pairs(tok, PromptTemplate(max_doc_tokens=64), [q for q, _ in PAIRS] * n_repeat, [d for _, d in PAIRS] * n_repeat)
    return datasets.Dataset.from_list(
        [{"input_ids": e.input_ids, "target_start": e.target_start, "target_end": e.target_end} for e in enc]
    )


def _trainer(cls, model, tok, out, **kw):
    args = TsarankTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, report_to=[],
        remove_unused_columns=False, use_cpu=True, dataloader_pin_memory=False, save_strategy="steps",
        **{"bf16": False, **kw},  # fp32, as the brute-force references (unset would pick bf16 on CPUs with AMX)
    )
    return cls(model=model, args=args, train_dataset=_dataset(tok), data_collator=CPTCollator(tok.pad_token_id),
               processing_class=tok)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_llama, tiny_tokenizer):
    class NaNAtThirdStep(CausalLMTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss * float("nan") if self.state.global_step == 2 else loss

    out = tmp_path / "out"
    trainer = _trainer(NaNAtThirdStep, tiny_llama, tiny_tokenizer, out, max_steps=6, save_steps=1)
    attach_callbacks(trainer, [NanGuardCallback()])
    assert trainer.args.logging_nan_inf_filter is False  # the Trainer would otherwise hide the NaN
    with pytest.raises(FloatingPointError, match=r"non-finite \(nan\) at step 3.*checkpoint-2"):
        trainer.train()
    assert trainer.state.global_step == 3  # stopped right after the bad step
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    weights = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # The in-memory weights after the bad step are corrupted: exactly what must never reach the disk.
    assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_throughput_counts_non_padding_tokens(tmp_path, tiny_llama, tiny_tokenizer):
    trainer = _trainer(CausalLMTrainer, tiny_llama, tiny_tokenizer, tmp_path / "out", max_steps=2, save_steps=100)
    attach_callbacks(trainer, [ThroughputCallback(), NanGuardCallback()])
    assert isinstance(trainer.callback_handler.callbacks[0], ThroughputCallback)  # before wandb & co.
    assert isinstance(trainer.callback_handler.callbacks[-1], NanGuardCallback)
    trainer.train()
    ds = _dataset(tiny_tokenizer)
    expected_tokens = sum(len(r["input_ids"]) for r in ds)  # 8 pairs = 2 steps x 4, each seen once
    assert trainer.state.num_input_tokens_seen == expected_tokens
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["tokens_per_second"] > 0 for h in logs)
    assert all(math.isfinite(h["loss"]) for h in logs)


def test_eval_query_perplexity_matches_brute_force(tmp_path, tiny_llama, tiny_tokenizer):
    trainer = _trainer(CausalLMTrainer, tiny_llama, tiny_tokenizer, tmp_path / "out", max_steps=1, per_device_eval_batch_size=3)
    trainer.eval_dataset = _dataset(tiny_tokenizer, n_repeat=1)
    metrics = trainer.evaluate()
    nll, n = 0.0, 0
    for row in trainer.eval_dataset:  # one pair at a time, plain transformers forward
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(tiny_llama(input_ids=ids).logits[0].double(), -1)
        for t in range(row["target_start"], row["target_end"]):
            nll -= lp[t - 1, row["input_ids"][t]].item()
            n += 1
    assert metrics["eval_query_tokens"] == n
    assert abs(metrics["eval_loss"] - nll / n) < 1e-5
    assert abs(metrics["eval_query_ppl"] - math.exp(nll / n)) < 1e-3 * math.exp(nll / n)


def test_ranking_eval_callback_matches_independent_ndcg(tmp_path, tiny_llama, tiny_tokenizer, shared_data):
    import ir_measures

    from tsarank.training.callbacks import RankingEvalCallback

    template = PromptTemplate(max_doc_tokens=48, max_query_tokens=16)
    cb = RankingEvalCallback(shared_data / "trec-dl-passage/bm25_top100/retrieve_results_dl19.json",
                             shared_data / "trec-dl-passage/qrels.dl19-passage.txt", template, every_n_steps=1,
                             top_k=5, max_queries=2)
    trainer = _trainer(CausalLMTrainer, tiny_llama, tiny_tokenizer, tmp_path / "out", max_steps=1)
    cb.bind(trainer)
    tiny_llama.train()
    value = cb.evaluate()
    assert tiny_llama.training  # train mode restored
    # Independent: mean log p(query tokens | doc) with a plain forward per pair, nDCG@10 by ir_measures directly.
    run = {}
    for c in cb.lists:
        enc = encode_pairs(tiny_tokenizer, template, [c.query] * len(c.texts), c.texts)
        for docid, e in zip(c.docids, enc):
            with torch.no_grad():
                lp = torch.log_softmax(tiny_llama.eval()(input_ids=torch.tensor([e.input_ids])).logits[0].double(), -1)
            s = sum(lp[t - 1, e.input_ids[t]].item() for t in range(e.target_start, e.target_end)) / (e.target_end - e.target_start)
            run.setdefault(c.qid, {})[docid] = s
    expected = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], cb.qrels, run)[ir_measures.nDCG @ 10]
    assert abs(value - expected) < 1e-9


def test_finalize_writes_sidecars(tmp_path, tiny_llama, tiny_tokenizer):
    from tsarank.hub import load_tsarank_config
    from tsarank.training.checkpoints import finalize_checkpoint

    out = tmp_path / "out"
    trainer = _trainer(CausalLMTrainer, tiny_llama, tiny_tokenizer, out, max_steps=1, save_steps=100)
    trainer.train()
    template = PromptTemplate(max_doc_tokens=64, max_query_tokens=16)
    margs = ModelArguments(model_name_or_path="some/base")
    load_dir = finalize_checkpoint(trainer, out, template, "cpt", margs, {"data": {"train_file": "x.jsonl"}})
    assert load_dir == out
    meta = load_tsarank_config(out)
    assert meta["template"] == template and meta["stage"] == "cpt" and meta["base_model"] == "some/base"
    assert meta["training"]["data"]["train_file"] == "x.jsonl"
    assert json.loads((out / "training_args.json").read_text())["learning_rate"] == 1e-2
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1


def test_every_cpt_checkpoint_loads_with_its_training_template(tmp_path, tiny_dir):
    """Intermediate checkpoint-N directories carry tsarank_config.json: Ranker scores them with the template and
    budgets they were trained with, not the defaults."""
    from tsarank import Ranker
    from tsarank.training import cpt as cpt_train

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"text": d, "query": q}) + "\n" for q, d in PAIRS * 2))
    out = tmp_path / "out"
    assert cpt_train.main(["--model_name_or_path", str(tiny_dir), "--train_file", str(pairs), "--output_dir", str(out),
                           "--max_doc_tokens", "40", "--max_query_tokens", "12", "--template_source",
                           "Passage: {doc} Question:", "--max_steps", "2", "--save_steps", "1",
                           "--per_device_train_batch_size", "4", "--report_to", "none", "--eval_strategy", "no",
                           "--use_cpu", "true"]) == 0
    trained = PromptTemplate(source="Passage: {doc} Question:", max_doc_tokens=40, max_query_tokens=12)
    for ckpt in ("checkpoint-1", "checkpoint-2"):
        ranker = Ranker.from_pretrained(str(out / ckpt), device="cpu", dtype="float32")
        assert ranker.template == trained, ckpt
    assert Ranker.from_pretrained(str(out), device="cpu", dtype="float32").template == trained
