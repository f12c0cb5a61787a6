#!/usr/bin/env python
"""Fine-tune an MoE model with the sieve (LoRA on the most-routed experts) or LoRA/DoRA on all experts,
or a dense model with MixLoRA/MixDoRA (a routed mixture of LoRA experts per FFN).

The same as ``moe-peft-ds train`` (``moe_peft_ds/commands/train.py``), kept as a script for
``deepspeed launch/train.py ...``; ``--help`` explains every flag.
"""

import sys

from moe_peft_ds.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
