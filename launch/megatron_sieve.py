#!/usr/bin/env python
"""MoE-Sieve on a Megatron-core GPT-MoE model: build a small model, profile its routing on --data,
select the hottest experts of each layer, train their LoRA for a few steps and save the adapter
(adapter_config.json, adapter_model.safetensors, routing_profile.json).

The same as ``moe-peft-ds megatron-sieve`` (``moe_peft_ds/commands/megatron_sieve.py``), kept as a script for
``deepspeed launch/megatron_sieve.py ...``; ``--help`` explains every flag.
"""

import sys

from moe_peft_ds.commands.megatron_sieve import main

if __name__ == "__main__":
    sys.exit(main())
