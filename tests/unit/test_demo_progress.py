"""The demo's training phases show steps, loss, rate and time left, reported by the real training process."""

from __future__ import annotations

import json
import sys

from tsarank import demo


def test_training_phase_bar_follows_the_steps_of_the_real_run(tmp_path, tiny_checkpoint, capsys):
    groups = tmp_path / "g.jsonl"
    groups.write_text("".join(json.dumps({
        "query": f"query {i}", "positive_passages": [{"text": f"positive passage {i}"}],
        "negative_passages": [{"text": f"negative {i}-{j}"} for j in range(2)]}) + "\n" for i in range(3)))
    cmd = [sys.executable, "-m", "tsarank.cli", "train", "sft", "--model_name_or_path", str(tiny_checkpoint),
           "--train_file", str(groups), "--output_dir", str(tmp_path / "o"), "--max_steps", "3", "--logging_steps", "1",
           "--train_group_size", "3", "--lambda_dp", "0", "--save_strategy", "no", "--report_to", "none",
           "--max_doc_tokens", "16", "--max_query_tokens", "8", "--bf16", "false"]
    demo._run_logged(cmd, tmp_path / "logs" / "sft.log", 10, "4/6 SFT", steps=3)
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("4/6 SFT: 100%") and "3/3" in final and ("step/s" in final or "s/step" in final) and "loss=" in final, final
    progress = json.loads((tmp_path / "logs" / "sft.progress.json").read_text())
    history = json.loads((tmp_path / "o" / "trainer_state.json").read_text())["log_history"]
    last_loss = [r["loss"] for r in history if "loss" in r and "train_loss" not in r][-1]
    assert progress["step"] == progress["max_steps"] == 3 and progress["loss"] == last_loss
    assert f"loss={last_loss:.3f}" in final
