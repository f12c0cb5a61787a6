"""The command-line programs: ``moe-peft-ds <command>`` (``python -m moe_peft_ds <command>``), and
the scripts in ``launch/`` that call the same ``main`` (for ``deepspeed launch/train.py ...``).
Each module is one command; its ``--help`` explains every flag."""

# command -> (module, one line for the overview)
COMMANDS = {
    "train": ("train", "fine-tune: the sieve, LoRA/DoRA on all experts, or MixLoRA/MixDoRA on a dense model"),
    "profile": ("profile_routing", "profile expert routing on a calibration set, without training"),
    "evaluate": ("evaluate", "evaluate a base model or an adapter: perplexity and multiple-choice accuracy"),
    "export": ("export_adapter", "export an adapter for vLLM, SGLang, PEFT, or as a merged model"),
    "import": ("import_adapter", "import a PEFT LoRA adapter or an ESFT expert selection"),
    "continual": ("continual", "continual learning over a sequence of tasks with dynamic experts"),
    "plan": ("plan", "per-rank memory of a training layout, from a model config alone"),
    "convert": ("convert_adapter", "convert a sieve adapter between Megatron-core and transformers"),
    "megatron-sieve": ("megatron_sieve", "the sieve on a Megatron-core GPT-MoE model"),
    "build-demo-model": ("build_demo_model", "rebuild the bundled demo models"),
}
