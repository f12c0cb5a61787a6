#!/usr/bin/env python
"""Evaluate a base model, and the base model with an adapter, on multiple-choice tasks.

The same as ``moe-peft-ds evaluate`` (``moe_peft_ds/commands/evaluate.py``), kept as a script for
``deepspeed launch/evaluate.py ...``; ``--help`` explains every flag.
"""

import sys

from moe_peft_ds.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
