#!/usr/bin/env python
"""Build the bundled demo MoE model (tiny Mixtral) and its demo task data.

The same as ``moe-peft-ds build-demo-model`` (``moe_peft_ds/commands/build_demo_model.py``), kept as a script for
``deepspeed launch/build_demo_model.py ...``; ``--help`` explains every flag.
"""

import sys

from moe_peft_ds.commands.build_demo_model import main

if __name__ == "__main__":
    sys.exit(main())
