"""Stage-2 loss: equivalence with the full-logits formulation, references, trainer wiring.

The reference implementation below is the released code's way of computing the objective, written out
plainly: full ``[B*G, L, V]`` logits of policy and reference, ``log_softmax``, gather, masked means, KL at
every selected position with padding masked. ``RankingTrainer.compute_loss`` (rows only, chunked) must give the
same loss and the same parameter gradients.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import build_tiny_llama  # noqa: E402

from tsarank.data.groups import GroupCollator, GroupDataset  # noqa: E402
from tsarank.layers import freeze_all_but_top  # noqa: E402
from tsarank.modeling import HEAD_WEIGHTS, LastTokenHead, body_and_head, model_inputs  # noqa: E402
from tsarank.packing import padded_inputs  # noqa: E402
from tsarank.prompts import PromptTemplate  # noqa: E402
from tsarank.reference import (  # noqa: E402
    AdapterOffReference,
    SeparateReference,
    SharedPrefixReference,
    build_reference,
)
from tsarank.row_head import target_rows  # noqa: E402
from tsarank.training.sft_loss import RankingLossConfig, group_loss  # noqa: E402
from tsarank.training.sft_trainer import SCORE_HEAD_ATTR, RankingTrainer  # noqa: E402


def run_body(body, ids, am):
    """The decoder body's final hidden states, called directly (an independent route from forward_hidden)."""
    return body(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state

G = 4

QUERIES = ["what is the capital of france", "banana fruit"]
DOCS = [
    ["Paris is the capital and largest city of France.", "Bananas are an elongated edible fruit.",
     "The mitochondria is the powerhouse of the cell.", "Mount Everest is 8,849 metres above sea level."],
    ["Bananas are an elongated edible fruit produced by several kinds of plants.", "Paris", "energy",
     "Caf\u00e9 na\u00efve 0123456789 and a longer tail of text to make padding"],
]


def make_batch(tokenizer, template=None, teacher=False):
    template = template or PromptTemplate(max_doc_tokens=24, max_query_tokens=8)
    examples = [{"query": q, "docs": d, "teacher": ([3.0, 1.0, 0.5, -1.0] if teacher else None)}
                for q, d in zip(QUERIES, DOCS)]
    return GroupCollator(tokenizer, template, G)(examples)


def make_trainer(model, tmp_path, loss_config, reference=None, score_head=None, **args):
    from transformers import TrainingArguments

    targs = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, **args)
    return RankingTrainer(model=model, args=targs, loss_config=loss_config, reference=reference,
                          score_head=score_head)


# ----------------------------------------------------------------------------------- full-logits baseline
def full_logits_loss(model, ref_model, batch, cfg: RankingLossConfig, score_head=None):
    """The released code's formulation (padding masked), written independently of tsarank's row gathering."""
    ids, am, qm = batch["input_ids"], batch["attention_mask"], batch["query_mask"]
    out = model(input_ids=ids, attention_mask=am, output_hidden_states=score_head is not None)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)  # [R, L-1, V]
    tok_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [R, L-1]
    real = am[:, 1:].bool()
    q = qm[:, 1:].bool() & real
    if score_head is None:
        scores = (tok_lp * q).sum(1) / q.sum(1)
    else:
        body, _ = body_and_head(model)
        hidden = run_body(body, ids, am)
        last = am.sum(1) - 1
        scores = score_head.linear(hidden[torch.arange(ids.shape[0]), last]).squeeze(-1).float()
    scores = scores.view(-1, G)
    if cfg.loss == "softmax":
        z = (scores.exp() if cfg.score_transform == "prob" else scores) / cfg.temperature
        rank = -torch.log_softmax(z, dim=-1)[:, 0].mean()
    else:
        rank = group_loss(cfg, scores, batch.get("teacher"))
    total = rank
    pos = torch.zeros(ids.shape[0], dtype=torch.bool)
    pos[::G] = True
    if cfg.lambda_gen > 0:
        gm = (real if cfg.gen_span == "all" else q) & pos[:, None]
        gen = -(tok_lp * gm).sum() / gm.sum()
        total = total + cfg.lambda_gen * gen
    if cfg.lambda_dp > 0:
        with torch.no_grad():
            ref_logp = torch.log_softmax(ref_model(input_ids=ids, attention_mask=am).logits[:, :-1].float(), -1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [R, L-1]
        dm = real if cfg.dp_span == "all" else q
        dp = (kl * dm).sum() / dm.sum()
        total = total + cfg.lambda_dp * dp
    return total


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, rel=1e-5):
    assert a.keys() == b.keys() and a
    for n in a:
        diff = (a[n] - b[n]).norm().item()
        scale = b[n].norm().item()
        assert diff <= rel * scale + 1e-12, f"{n}: |diff| {diff:.3e} vs |grad| {scale:.3e}"


@pytest.fixture()
def policy_and_ref(tiny_tokenizer):
    policy = build_tiny_llama(len(tiny_tokenizer), seed=0).float().train()
    ref_model = build_tiny_llama(len(tiny_tokenizer), seed=1).float().eval()  # differs: KL is non-zero
    return policy, ref_model


def run_both(policy, ref_model, batch, cfg, tmp_path, score_head=None):
    full_policy = copy.deepcopy(policy)
    full_head = copy.deepcopy(score_head) if score_head is not None else None
    expected = full_logits_loss(full_policy, ref_model, batch, cfg, score_head=full_head)
    expected.backward()
    trainer = make_trainer(policy, tmp_path, cfg, reference=SeparateReference(copy.deepcopy(ref_model)),
                           score_head=score_head)
    got = trainer.compute_loss(policy, batch)
    got.backward()
    return got, expected, grads_of(policy), grads_of(full_policy), trainer


@pytest.mark.parametrize("dp_span", ["all", "query"])
@pytest.mark.parametrize("gen_span", ["all", "query"])
@pytest.mark.parametrize("chunk,pack", [(None, None), (7, False), (5, True)])
def test_equivalence_with_full_logits(tiny_tokenizer, policy_and_ref, tmp_path, dp_span, gen_span, chunk, pack):
    policy, ref_model = policy_and_ref
    batch = make_batch(tiny_tokenizer)
    assert not batch["attention_mask"].all()  # padding is present and must be masked
    # pack=None: auto, i.e. packed for Llama (the batch packs into fewer rows than sequences)
    rows = model_inputs(policy, batch["input_ids"], batch["attention_mask"], pack=True, pad_id=2,
                        capacity=int(1.5 * batch["input_ids"].shape[1]))
    assert rows.packed and rows.input_ids.shape[0] < 2 * G
    cfg = RankingLossConfig(group_size=G, dp_span=dp_span, gen_span=gen_span, logit_chunk_rows=chunk,
                            pack_sequences=pack)
    got, expected, g_got, g_exp, _ = run_both(policy, ref_model, batch, cfg, tmp_path)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_grads_close(g_got, g_exp)


@pytest.mark.parametrize("loss", ["softmax", "poly1", "pair", "point_ce", "distill_kl", "ranknet"])
def test_equivalence_other_group_losses(tiny_tokenizer, policy_and_ref, tmp_path, loss):
    policy, ref_model = policy_and_ref
    batch = make_batch(tiny_tokenizer, teacher=True)
    cfg = RankingLossConfig(group_size=G, loss=loss, score_transform="logprob", temperature=0.5)
    got, expected, g_got, g_exp, _ = run_both(policy, ref_model, batch, cfg, tmp_path)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_grads_close(g_got, g_exp)


@pytest.mark.parametrize("span", ["all", "query"])
def test_equivalence_last_token_head(tiny_tokenizer, policy_and_ref, tmp_path, span):
    """The last-token head with L_gen / L_dp over every token or over the query inside its prompt."""
    policy, ref_model = policy_and_ref
    batch = make_batch(tiny_tokenizer, PromptTemplate.last_token(max_doc_tokens=24, max_query_tokens=8))
    torch.manual_seed(3)
    head = LastTokenHead(policy.config.hidden_size)
    cfg = RankingLossConfig(group_size=G, scoring_head="last_token", dp_span=span, gen_span=span)
    got, expected, g_got, g_exp, trainer = run_both(policy, ref_model, batch, cfg, tmp_path, score_head=head)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    g_got.pop(f"{SCORE_HEAD_ATTR}.linear.weight")  # the head is part of the policy for the optimizer
    g_got.pop(f"{SCORE_HEAD_ATTR}.linear.bias")
    assert_grads_close(g_got, g_exp)
    assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
    # the head is trained: its parameters are in the optimizer
    opt = trainer.create_optimizer()
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert id(head.linear.weight) in in_opt and id(head.linear.bias) in in_opt


def test_last_token_defaults_and_refuses_prob():
    """The last-token head's score is an unbounded linear value: its defaults are logprob and tau 1 (the
    query-likelihood defaults, exp(score)/0.001, would explode), and an explicit 'prob' is refused."""
    cfg = RankingLossConfig(scoring_head="last_token", dp_span="query", gen_span="query")
    assert (cfg.score_transform, cfg.temperature) == ("logprob", 1.0)
    assert (RankingLossConfig().score_transform, RankingLossConfig().temperature) == ("prob", 0.001)
    with pytest.raises(ValueError, match="explodes"):
        RankingLossConfig(scoring_head="last_token", score_transform="prob")


def test_hand_computed_l_rank():
    # One group, scores s = [-1, -2, -0.5] (mean log-probs), tau = 0.5, transform prob:
    # z = exp(s) / tau = [2 e^-1, 2 e^-2, 2 e^-0.5];  L = -z_0 + log(sum exp z)
    s = [-1.0, -2.0, -0.5]
    z = [2 * math.exp(v) for v in s]
    hand = -z[0] + math.log(sum(math.exp(v) for v in z))
    cfg = RankingLossConfig(group_size=3, temperature=0.5, score_transform="prob")
    assert group_loss(cfg, torch.tensor([s]), None).item() == pytest.approx(hand, rel=1e-6)
    # paper's tau = 0.001: the loss is a hard softmax over exp(s) / 0.001
    cfg = RankingLossConfig(group_size=3)
    z = [math.exp(v) / 0.001 for v in s]
    m = max(z)
    hand = -(z[0] - m) + math.log(sum(math.exp(v - m) for v in z))
    assert group_loss(cfg, torch.tensor([s]), None).item() == pytest.approx(hand, rel=1e-6)


def test_no_reference_needed_without_dp(tiny_tokenizer, policy_and_ref, tmp_path):
    policy, ref_model = policy_and_ref
    batch = make_batch(tiny_tokenizer)
    cfg = RankingLossConfig(group_size=G, lambda_dp=0.0)
    expected = full_logits_loss(copy.deepcopy(policy), ref_model, batch, cfg)
    trainer = make_trainer(policy, tmp_path, cfg)
    assert trainer.compute_loss(policy, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="reference"):
        make_trainer(policy, tmp_path, RankingLossConfig(group_size=G, lambda_dp=1.0))


# ------------------------------------------------------------------------------- precision, checkpointing
def test_gradient_checkpointing_same_grads(tiny_tokenizer, policy_and_ref, tmp_path):
    policy, ref_model = policy_and_ref
    batch = make_batch(tiny_tokenizer)
    cfg = RankingLossConfig(group_size=G, dp_span="all", logit_chunk_rows=9)
    ckpt = copy.deepcopy(policy)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = SeparateReference(copy.deepcopy(ref_model))
    losses, grads = [], []
    for model in (policy, ckpt):
        trainer = make_trainer(model, tmp_path, cfg, reference=ref)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(grads_of(model))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert_grads_close(grads[1], grads[0])


def test_bf16_runs_and_matches_fp32(tiny_tokenizer, policy_and_ref, tmp_path):
    policy, ref_model = policy_and_ref
    batch = make_batch(tiny_tokenizer)
    cfg = RankingLossConfig(group_size=G, dp_span="all", score_transform="logprob", temperature=1.0)
    fp32 = make_trainer(policy, tmp_path, cfg, reference=SeparateReference(copy.deepcopy(ref_model)))
    expected = fp32.compute_loss(policy, batch).item()
    p16 = copy.deepcopy(policy).to(torch.bfloat16)
    r16 = SeparateReference(copy.deepcopy(ref_model).to(torch.bfloat16))
    trainer = make_trainer(p16, tmp_path, cfg, reference=r16)
    loss = trainer.compute_loss(p16, batch)
    assert loss.dtype == torch.float32  # the head's rows are computed in fp32
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=3e-2)
    grads = grads_of(p16)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(g.float().abs().sum().item() for g in grads.values()) > 0


# ---------------------------------------------------------------------------------------------- references
def _rows(batch):
    return target_rows(batch["query_mask"])


def _inputs(batch):
    return padded_inputs(batch["input_ids"], batch["attention_mask"])


def _full_logits_at(model, batch, rows):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[rows[0], rows[1]]


def test_adapter_off_reference_equals_base_model(tiny_tokenizer, tiny_checkpoint):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).float()
    policy = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    policy.train()
    batch = make_batch(tiny_tokenizer)
    rows = _rows(batch)
    ref = AdapterOffReference(policy)
    got = ref.logits_at(_inputs(batch), *rows)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).float().eval()
    expected = _full_logits_at(loaded, batch, rows)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the adapters are live again afterwards and do change the output
    assert not torch.allclose(_full_logits_at(policy, batch, rows), expected, atol=1e-4)
    assert policy.training  # train/eval flags restored
    # build_reference picks it for LoRA
    assert isinstance(build_reference(policy, kind=None, ref_path=None, train_top_layers=0, training_args=None),
                      AdapterOffReference)


def test_adapter_off_reference_in_training(tiny_tokenizer, tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).float()
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    loaded = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).float().eval()
    batch = make_batch(tiny_tokenizer)
    cfg = RankingLossConfig(group_size=G, dp_span="all")
    expected = full_logits_loss(policy, loaded, batch, cfg)
    trainer = make_trainer(policy, tmp_path, cfg, reference=AdapterOffReference(policy))
    assert trainer.compute_loss(policy, batch).item() == pytest.approx(expected.item(), rel=1e-5)


def build_tiny_qwen2(vocab_size, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_reference_equals_full_reference(tiny_tokenizer, arch, checkpointing):
    vocab = len(tiny_tokenizer)
    policy = build_tiny_llama(vocab, num_hidden_layers=4) if arch == "llama" else build_tiny_qwen2(vocab)
    start = copy.deepcopy(policy).eval()  # M_cpt: what the reference must reproduce
    freeze_all_but_top(policy, 2, train_final_norm=True, train_lm_head=arch == "qwen2")
    ref = SharedPrefixReference(policy, 2)
    assert ref.cost_fraction() == 0.5
    # qwen2's untied head is trained here: it is copied; llama's is tied to frozen embeddings: shared
    assert ref.head_shared == (arch == "llama")
    # "train" the policy: its top blocks and final norm move away from M_cpt
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    policy.train()
    if checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = make_batch(tiny_tokenizer)
    rows = target_rows(batch["attention_mask"].bool() & (torch.arange(batch["input_ids"].shape[1]) > 0))
    expected = SeparateReference(start).logits_at(_inputs(batch), *rows)
    # within a training step: captured from the policy's own forward
    ref.prepare(policy)
    body, head = body_and_head(policy)
    hidden = run_body(body, batch["input_ids"], batch["attention_mask"])
    assert ref._captured is not None
    got = ref.logits_at(_inputs(batch), *rows)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    hidden.sum().backward()  # the policy graph is intact
    # standalone (no capture): runs the frozen prefix itself
    got2 = ref.logits_at(_inputs(batch), *rows)
    torch.testing.assert_close(got2, expected, rtol=1e-5, atol=1e-5)
    # the policy really differs from the reference now
    assert not torch.allclose(_full_logits_at(policy, batch, rows), expected, atol=1e-3)


def test_shared_prefix_follows_policy_cast_to_bf16(tiny_tokenizer):
    # DeepSpeed bf16 (ZeRO-1/2) casts the policy after the reference copied its top blocks.
    policy = build_tiny_llama(len(tiny_tokenizer), num_hidden_layers=4)
    start = copy.deepcopy(policy)
    freeze_all_but_top(policy, 2)
    ref = SharedPrefixReference(policy, 2)
    policy.to(torch.bfloat16)
    batch = make_batch(tiny_tokenizer)
    rows = _rows(batch)
    got = ref.logits_at(_inputs(batch), *rows)
    # the blocks follow the policy to bf16; the head's logits are computed in fp32 from them
    assert got.dtype == torch.float32 and next(ref.blocks.parameters()).dtype == torch.bfloat16
    expected = SeparateReference(start).logits_at(_inputs(batch), *rows)
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


def test_shared_prefix_in_trainer_equals_separate(tiny_tokenizer, tmp_path):
    vocab = len(tiny_tokenizer)
    policy = build_tiny_qwen2(vocab)
    freeze_all_but_top(policy, 1)
    shared = SharedPrefixReference(policy, 1)
    separate = SeparateReference(copy.deepcopy(policy))
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    policy.train()
    batch = make_batch(tiny_tokenizer)
    cfg = RankingLossConfig(group_size=G, dp_span="all")
    out = []
    for ref in (separate, shared):
        trainer = make_trainer(policy, tmp_path, cfg, reference=ref)
        policy.zero_grad()
        loss = trainer.compute_loss(policy, batch)
        loss.backward()
        out.append((loss.item(), grads_of(policy)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    assert_grads_close(out[1][1], out[0][1])


def test_shared_prefix_requires_frozen_bottom(tiny_tokenizer):
    policy = build_tiny_llama(len(tiny_tokenizer), num_hidden_layers=4)
    with pytest.raises(ValueError, match="freeze_all_but_top"):
        SharedPrefixReference(policy, 2)
    with pytest.raises(ValueError, match="train_top_layers"):
        SharedPrefixReference(policy, 4)


def test_build_reference_choices(tiny_tokenizer, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    in_memory = build_tiny_llama(len(tiny_tokenizer))
    assert build_reference(in_memory, kind=None, ref_path=None, train_top_layers=0, training_args=None,
                           lambda_dp=0.0) is None
    with pytest.raises(ValueError, match="lambda_dp > 0 needs a frozen reference"):
        build_reference(in_memory, kind=None, ref_path=None, train_top_layers=0, training_args=None)
    with pytest.raises(ValueError, match="peft"):
        build_reference(in_memory, kind="adapter_off", ref_path=None, train_top_layers=0, training_args=None)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    sep = build_reference(loaded, kind=None, ref_path=None, train_top_layers=0, training_args=None)
    assert isinstance(sep, SeparateReference) and sep.model is not loaded
    assert all(not p.requires_grad for p in sep.model.parameters()) and not sep.model.training
    freeze_all_but_top(loaded, 1)
    shared = build_reference(loaded, kind=None, ref_path=None, train_top_layers=1, training_args=None)
    assert isinstance(shared, SharedPrefixReference)
    # another reference checkpoint cannot share the prefix
    other = build_reference(loaded, kind=None, ref_path=str(tiny_checkpoint) + "/", train_top_layers=1,
                            training_args=None)
    assert isinstance(other, SeparateReference)


@pytest.mark.parametrize("kind", ["separate", "shared_prefix", "last_token"])
def test_saved_checkpoint_has_no_reference(tiny_tokenizer, tmp_path, kind):
    from safetensors import safe_open

    policy = build_tiny_llama(len(tiny_tokenizer), num_hidden_layers=3)
    expected_keys = set(policy.state_dict())
    head = None
    cfg = RankingLossConfig(group_size=G)
    if kind == "shared_prefix":
        freeze_all_but_top(policy, 1)
        ref = SharedPrefixReference(policy, 1)
    else:
        ref = SeparateReference(copy.deepcopy(policy))
    if kind == "last_token":
        head = LastTokenHead(policy.config.hidden_size)
        cfg = RankingLossConfig(group_size=G, scoring_head="last_token", dp_span="all", gen_span="all")
    trainer = make_trainer(policy, tmp_path, cfg, reference=ref, score_head=head)
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # tied lm_head.weight may be dropped on save; nothing else may appear or disappear
    assert keys <= expected_keys and expected_keys - keys <= {"lm_head.weight"}
    assert not any("ref" in k or SCORE_HEAD_ATTR in k for k in keys)
    total = sum(p.numel() for n, p in policy.named_parameters() if not n.startswith(SCORE_HEAD_ATTR))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert sum(f.get_tensor(k).numel() for k in keys) <= total
    if kind == "last_token":
        loaded = LastTokenHead.load(str(out), policy.config.hidden_size)
        torch.testing.assert_close(loaded.linear.weight, head.linear.weight)
        assert (out / HEAD_WEIGHTS).is_file()
    else:
        assert not (out / HEAD_WEIGHTS).exists()


# --------------------------------------------------------------------------------------------- training
def test_trainer_trains_and_logs_terms(tiny_tokenizer, tmp_path):
    from transformers import TrainingArguments

    records = [{"query": q, "positive_passages": [{"title": "", "text": d[0]}],
                "negative_passages": [{"title": "", "text": x} for x in d[1:]], "teacher_scores": None}
               for q, d in zip(QUERIES, DOCS)]
    policy = build_tiny_llama(len(tiny_tokenizer)).train()
    template = PromptTemplate(max_doc_tokens=24, max_query_tokens=8)
    dataset = GroupDataset(records * 2, G)
    cfg = RankingLossConfig(group_size=G, score_transform="logprob", temperature=1.0)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=4,
                             per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                             gradient_accumulation_steps=2)
    trainer = RankingTrainer(model=policy, args=args, train_dataset=dataset,
                             data_collator=GroupCollator(tiny_tokenizer, template, G), loss_config=cfg,
                             reference=SeparateReference(copy.deepcopy(policy).eval()))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for h in logs:
        assert {"loss_rank", "loss_gen", "loss_dp"} <= set(h)
        # each logged term is the mean over the micro-batches of that step; they add up to the loss
        assert h["loss"] == pytest.approx(h["loss_rank"] + h["loss_gen"] + h["loss_dp"], rel=1e-3, abs=1e-5)
    assert logs[0]["loss_dp"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert logs[-1]["loss_dp"] > 0
    assert logs[-1]["loss_gen"] < logs[0]["loss_gen"]
