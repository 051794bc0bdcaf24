#!/usr/bin/env python
"""Stage 2 (supervised fine-tuning): a thin launcher of ``tsarank train sft`` for ``python`` and ``deepspeed``.

    python sft/train.py --config sft/configs/smollm2_quick.yaml [--key value ...]
    deepspeed --num_gpus N sft/train.py --config sft/configs/qwen2.5_zero3.yaml --deepspeed ds_configs/zero3.json

The stage lives in the library (:mod:`tsarank.training.sft`); ``--help`` lists its options.
"""

import sys

from tsarank.training.sft import main

if __name__ == "__main__":
    sys.exit(main())
