#!/usr/bin/env python
"""Stage 1 (continual pre-training): a thin launcher of ``tsarank train cpt`` for ``python`` and ``deepspeed``.

    python cpt/train.py --config cpt/configs/smollm2_quick.yaml [--key value ...]
    deepspeed --num_gpus 8 cpt/train.py --deepspeed ds_configs/zero3.json --config cpt/configs/qwen2.5_zero3.yaml

The stage lives in the library (:mod:`tsarank.training.cpt`); ``--help`` lists its options.
"""

import sys

from tsarank.training.cpt import main

if __name__ == "__main__":
    sys.exit(main())
