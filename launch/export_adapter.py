#!/usr/bin/env python
"""Export an adapter for serving: vLLM, SGLang, PEFT, or a model with the adapter merged in.

The same as ``moe-peft-ds export`` (``moe_peft_ds/commands/export_adapter.py``), kept as a script for
``deepspeed launch/export_adapter.py ...``; ``--help`` explains every flag.
"""

import sys

from moe_peft_ds.commands.export_adapter import main

if __name__ == "__main__":
    sys.exit(main())
