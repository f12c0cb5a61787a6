#!/usr/bin/env python
"""Profile expert routing of an MoE model on a calibration set, without training.

The same as ``moe-peft-ds profile`` (``moe_peft_ds/commands/profile_routing.py``), kept as a script for
``deepspeed launch/profile_routing.py ...``; ``--help`` explains every flag.
"""

import sys

from moe_peft_ds.commands.profile_routing import main

if __name__ == "__main__":
    sys.exit(main())
