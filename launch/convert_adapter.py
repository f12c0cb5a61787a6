#!/usr/bin/env python
"""Convert a sieve adapter between Megatron-core and transformers.

The same as ``moe-peft-ds convert`` (``moe_peft_ds/commands/convert_adapter.py``), kept as a script for
``deepspeed launch/convert_adapter.py ...``; ``--help`` explains every flag.
"""

import sys

from moe_peft_ds.commands.convert_adapter import main

if __name__ == "__main__":
    sys.exit(main())
