#!/usr/bin/env python
"""Benchmark stage-1 (CPT) training throughput on the default model: padded batches vs packed rows.

Both modes train on exactly the same pairs per step (real DL19 BM25 candidates as documents, their queries as
targets), with the real training computation (tsarank.training.cpt_trainer.causal_lm_loss forward + backward; the optimizer step
costs the same in both modes and is left out, so both modes see identical weights and their losses can be compared).
Padded batches
right-pad every pair to the longest of the batch; packed batches put several pairs per row (first-fit decreasing,
row capacity = the longest pair, the default, or --pack-capacity) with restarting position ids and a block-diagonal mask (SDPA here; FlashAttention-2
varlen on CUDA). Steps of the two modes alternate so that drifting machine load hits both alike.

Prints per-mode tokens/s (non-padding tokens), the padding fraction (padding positions / all positions), the
speed-up, and a last line ``RESULT {json}``. About 2-3 minutes on 1 CPU thread.

    python scripts/bench_cpt.py [--batch-size 8] [--steps 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/trec-dl-passage/bm25_top100/retrieve_results_dl19.json"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up step each)")
    parser.add_argument("--pack-capacity", type=int, default=512,
                        help="row capacity of the second packed mode (the first uses the default: longest pair)")
    parser.add_argument("--max-doc-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from tsarank.data.collate import CPTCollator
    from tsarank.data.formats import read_rank_llm
    from tsarank.modeling import load_causal_lm, model_inputs
    from tsarank.prompts import PromptTemplate, encode_pairs
    from tsarank.training.cpt_trainer import causal_lm_loss
    from tsarank.training.model_setup import load_tokenizer, resolve_model_path

    path = resolve_model_path("default")
    tok = load_tokenizer(path)
    model = load_causal_lm(path, dtype=torch.float32, attn_implementation="sdpa", device="cpu")
    model.config.use_cache = False
    model.train()
    template = PromptTemplate(max_doc_tokens=args.max_doc_tokens, max_query_tokens=32)

    rng = random.Random(args.seed)
    pool = [(c.query, t) for c in read_rank_llm(args.data) for t in c.texts]
    n = args.batch_size * (args.steps + 1)
    chosen = rng.sample(pool, n)
    enc = encode_pairs(tok, template, [q for q, _ in chosen], [d for _, d in chosen])
    feats = [{"input_ids": e.input_ids, "target_start": e.target_start, "target_end": e.target_end} for e in enc]
    batches = [feats[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    collator = CPTCollator(pad_token_id=tok.pad_token_id)
    # (packing, row capacity): the packing happens on the device, in the loss, as in CausalLMTrainer.
    settings = {"padded": (False, None), "packed": (True, None), f"packed{args.pack_capacity}": (True, args.pack_capacity)}
    modes = list(settings)

    stats = {m: {"seconds": [], "tokens": 0, "positions": 0, "rows": 0, "losses": []} for m in settings}
    for step, feats_b in enumerate(batches):
        batch = collator(feats_b)
        for mode in modes[step % len(modes):] + modes[: step % len(modes)]:  # rotate the order every step
            packing, capacity = settings[mode]
            layout = model_inputs(model, batch["input_ids"], batch["attention_mask"], pack=packing,
                                  pad_id=tok.pad_token_id, capacity=capacity).input_ids
            t0 = time.perf_counter()
            loss, _ = causal_lm_loss(model, batch, packing=packing, capacity=capacity, pad_id=tok.pad_token_id)
            loss.backward()
            model.zero_grad(set_to_none=True)  # no update: both modes must see identical weights
            dt = time.perf_counter() - t0
            if step == 0:
                continue  # warm-up
            s = stats[mode]
            s["seconds"].append(dt)
            s["tokens"] += int(batch["attention_mask"].sum())
            s["positions"] += layout.numel()
            s["rows"] += layout.shape[0]
            s["losses"].append(loss.item())
        print(f"step {step}{' (warm-up)' if step == 0 else ''}: " + ", ".join(
            f"{m} {stats[m]['seconds'][-1]:.2f}s" for m in modes if step > 0))

    out = {}
    for mode, s in stats.items():
        total = sum(s["seconds"])
        out[mode] = {
            "tokens_per_s": s["tokens"] / total,
            "padding_fraction": 1 - s["tokens"] / s["positions"],
            "rows_per_batch": s["rows"] / args.steps,
            "median_step_s": statistics.median(s["seconds"]),
        }
        print(f"{mode:>10}: {out[mode]['tokens_per_s']:8.1f} tokens/s  padding {100 * out[mode]['padding_fraction']:5.1f}%  "
              f"rows/batch {out[mode]['rows_per_batch']:.1f}  median step {out[mode]['median_step_s']:.2f}s")
    # Same pairs, same weights: the loss must agree (packing changes layout, not the computation).
    big = f"packed{args.pack_capacity}"
    max_loss_diff = max(abs(a - b) for m in modes[1:] for a, b in zip(stats["padded"]["losses"], stats[m]["losses"]))
    speedup = out["packed"]["tokens_per_s"] / out["padded"]["tokens_per_s"]
    speedup_big = out[big]["tokens_per_s"] / out["padded"]["tokens_per_s"]
    print(f"packed / padded tokens/s: {speedup:.2f}x; {big} / padded: {speedup_big:.2f}x  "
          f"(max |loss difference| {max_loss_diff:.2e})")
    result = {
        "model": "SmolLM2-135M-Instruct", "device": "cpu", "threads": args.threads, "batch_size": args.batch_size,
        "steps": args.steps, "max_doc_tokens": args.max_doc_tokens, "attn": "sdpa",
        "tokens_per_s_padded": round(out["padded"]["tokens_per_s"], 1),
        "tokens_per_s_packed": round(out["packed"]["tokens_per_s"], 1),
        "speedup_packed_vs_padded": round(speedup, 3),
        "padding_fraction_padded": round(out["padded"]["padding_fraction"], 4),
        "padding_fraction_packed": round(out["packed"]["padding_fraction"], 4),
        "rows_per_batch_padded": out["padded"]["rows_per_batch"],
        "rows_per_batch_packed": out["packed"]["rows_per_batch"],
        f"tokens_per_s_{big}": round(out[big]["tokens_per_s"], 1),
        f"speedup_{big}_vs_padded": round(speedup_big, 3),
        f"padding_fraction_{big}": round(out[big]["padding_fraction"], 4),
        f"rows_per_batch_{big}": out[big]["rows_per_batch"],
        "max_loss_diff": max_loss_diff,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
