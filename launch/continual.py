#!/usr/bin/env python
"""Learn tasks one after another with MixLoRA's dynamic experts, and measure forgetting against
baselines that forget.

The same as ``moe-peft-ds continual`` (``moe_peft_ds/commands/continual.py``), kept as a script for
``deepspeed launch/continual.py ...``; ``--help`` explains every flag.
"""

import sys

from moe_peft_ds.commands.continual import main

if __name__ == "__main__":
    sys.exit(main())
