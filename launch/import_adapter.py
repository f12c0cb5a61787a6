#!/usr/bin/env python
"""Import an adapter made elsewhere: a PEFT LoRA adapter, or an ESFT expert selection.

The same as ``moe-peft-ds import`` (``moe_peft_ds/commands/import_adapter.py``), kept as a script for
``deepspeed launch/import_adapter.py ...``; ``--help`` explains every flag.
"""

import sys

from moe_peft_ds.commands.import_adapter import main

if __name__ == "__main__":
    sys.exit(main())
