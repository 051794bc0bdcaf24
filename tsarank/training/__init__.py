"""Training: stage 1 (CPT) and stage 2 (SFT), as ``tsarank train cpt|sft`` and as library code.

Modules, one responsibility each:

- :mod:`~tsarank.training.arguments`: option dataclasses, YAML + flags parsing, their checks;
- :mod:`~tsarank.training.model_setup`: loading the model and tokenizer to train, pad token, freezing, LoRA;
- :mod:`~tsarank.training.checkpoints`: output directory rules, resuming, the final and intermediate checkpoints;
- :mod:`~tsarank.training.callbacks`: NaN guard, throughput, ranking evaluation during training;
- :mod:`~tsarank.training.cards`: model cards of runs;
- :mod:`~tsarank.training.cpt_trainer` / :mod:`~tsarank.training.cpt`: stage 1's Trainer and entry point;
- :mod:`~tsarank.training.sft_loss` / :mod:`~tsarank.training.sft_trainer` / :mod:`~tsarank.training.sft`: stage 2's
  objective, Trainer and entry point.

The frozen reference of stage 2 is :mod:`tsarank.reference`; the language-model core both stages share is
:mod:`tsarank.modeling`, :mod:`tsarank.row_head` and :mod:`tsarank.packing`.
"""
