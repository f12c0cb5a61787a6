#!/usr/bin/env python
"""Plan the memory of a training layout before launching it: per rank, from the model's config alone.

The same as ``moe-peft-ds plan`` (``moe_peft_ds/commands/plan.py``), kept as a script for
``deepspeed launch/plan.py ...``; ``--help`` explains every flag.
"""

import sys

from moe_peft_ds.commands.plan import main

if __name__ == "__main__":
    sys.exit(main())
