"""The bad-input corpus: every case is refused with exactly one ``error:`` line (exit status 2, no
traceback) and writes nothing: no output directory, no change to any input file.

One table, ``CASES``: ``(id, where, input, the exact error line)``. ``where`` is a launcher (its
``main`` is called with the command line ``input``) or ``api`` (``input`` is a function of ``{d}``
calling the package, which must raise one of the errors the launchers turn into that line). In
inputs and lines, ``{d}`` is the fixture directory (``corpus_dir``) and ``{out}`` a fresh output
directory. Legal but suspicious input (some rows with nothing to learn) gets a warning with
counts instead: ``test_rows_with_nothing_to_learn_are_counted_and_skipped``.
"""

from __future__ import annotations

import json
import os
import runpy
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from moe_peft_ds import AdapterConfig, MixLoRAConfig, SieveConfig, apply_sieve_lora, load_adapter, save_adapter
from moe_peft_ds.checkpoint import read_adapter
from moe_peft_ds.data import load_examples, make_train_loader
from moe_peft_ds.ds_config import load_deepspeed_config
from moe_peft_ds.models import load_model
from moe_peft_ds.state_file import read_state_file
from moe_peft_ds.train import train

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = {
    name: runpy.run_path(str(ROOT / "launch" / f"{name}.py"), run_name="not_main")["main"]
    for name in ("train", "continual", "evaluate", "profile_routing", "convert_adapter")
}
TINY = "--model tiny-mixtral --data demo:arithmetic --output-dir {out} --no-progress --max-steps 2 --batch-size 2"
TRAIN = f"{TINY} --calibration-samples 8"
MIX = "--model tiny-llama --data demo:arithmetic --output-dir {out} --no-progress --max-steps 2 --batch-size 2 --method mixlora"
CONT = "--model tiny-llama --task a={d}/data/good.jsonl --output-dir {out} --no-progress --steps-per-task 1 --batch-size 2 --eval-samples 2"
EVAL = "--model tiny-mixtral --tasks arc_easy --source fixtures --limit 2 --output-dir {out} --no-progress"
PROF = "--model tiny-mixtral --data demo:arithmetic --output-dir {out} --no-progress --calibration-samples 8"
ADAPTER = "{d}/runs/sieve"

CASES = [
    # --- launch/train.py: flags
    ("lr-negative", "train", f"{TRAIN} --lr -1", "error: --lr=-1.0 must be > 0 and finite"),
    ("lr-nan", "train", f"{TRAIN} --lr nan", "error: --lr=nan must be > 0 and finite"),
    ("lr-inf", "train", f"{TRAIN} --lr inf", "error: --lr=inf must be > 0 and finite"),
    ("max-steps-zero", "train", f"{TRAIN} --max-steps 0", "error: --max-steps=0 must be > 0 and finite"),
    ("batch-size-zero", "train", f"{TRAIN} --batch-size 0", "error: --batch-size=0 must be > 0 and finite"),
    ("max-length-zero", "train", f"{TRAIN} --max-length 0", "error: --max-length=0 must be > 0 and finite"),
    (
        "calibration-zero",
        "train",
        f"{TRAIN} --calibration-samples 0",
        "error: --calibration-samples=0 must be > 0 and finite",
    ),
    (
        "grad-norm-nan",
        "train",
        f"{TRAIN} --max-grad-norm nan",
        "error: --max-grad-norm=nan must be >= 0 (0: no clipping)",
    ),
    (
        "grad-norm-negative",
        "train",
        f"{TRAIN} --max-grad-norm -1",
        "error: --max-grad-norm=-1.0 must be >= 0 (0: no clipping)",
    ),
    ("eval-every-negative", "train", f"{TRAIN} --eval-every -1", "error: --eval-every=-1 must be >= 0"),
    (
        "keep-best-alone",
        "train",
        f"{TRAIN} --keep-best",
        "error: --keep-best needs --eval-every N (it keeps the adapter of the best evaluation)",
    ),
    ("save-every-negative", "train", f"{TRAIN} --save-every -1", "error: --save-every=-1 must be >= 0"),
    (
        "eval-samples-zero",
        "train",
        f"{TRAIN} --eval-every 1 --eval-samples 0",
        "error: --eval-samples=0 must be > 0 and finite",
    ),
    (
        "eval-task-unknown",
        "train",
        f"{TRAIN} --eval-every 1 --eval-tasks nosuchtask",
        "error: unknown task 'nosuchtask'; known: ['arc_challenge', 'arc_easy', 'boolq', 'hellaswag', 'openbookqa', 'piqa', 'siqa', 'winogrande']",
    ),
    ("sieve-fraction-zero", "train", f"{TRAIN} --sieve-fraction 0", "error: fraction=0.0 must be in (0, 1]"),
    ("sieve-fraction-above-one", "train", f"{TRAIN} --sieve-fraction 1.5", "error: fraction=1.5 must be in (0, 1]"),
    ("sieve-fraction-nan", "train", f"{TRAIN} --sieve-fraction nan", "error: fraction=nan must be in (0, 1]"),
    ("sieve-k-zero", "train", f"{TRAIN} --sieve-k 0", "error: k=0 must be a positive integer"),
    ("sieve-k-above-experts", "train", f"{TRAIN} --sieve-k 17", "error: k=17 exceeds the 16 experts per layer"),
    (
        "sieve-coverage-above-one",
        "train",
        f"{TRAIN} --selection-policy coverage --sieve-coverage 2",
        "error: coverage=2.0 must be in (0, 1]",
    ),
    ("lora-r-zero", "train", f"{TRAIN} --lora-r 0", "error: r=0 must be a positive integer"),
    ("lora-alpha-zero", "train", f"{TRAIN} --lora-alpha 0", "error: alpha=0.0 must be a finite number > 0"),
    ("lora-alpha-nan", "train", f"{TRAIN} --lora-alpha nan", "error: alpha=nan must be a finite number > 0"),
    ("lora-dropout-above-one", "train", f"{TRAIN} --lora-dropout 1.5", "error: dropout=1.5 must be in [0, 1)"),
    (
        "attention-target-absent",
        "train",
        f"{TRAIN} --attention-lora qkv_proj",
        "error: attention_targets ['qkv_proj'] are not attention projections of this model; it has ['q_proj', 'k_proj', 'v_proj', 'o_proj']",
    ),
    (
        "shared-expert-lora-without-shared",
        "train",
        f"{TRAIN} --shared-expert-lora",
        "error: shared_expert_lora: this model's MoE blocks have no shared experts (one of ('shared_expert', 'shared_experts', 'shared_mlp'))",
    ),
    (
        "sieve-on-dense-model",
        "train",
        f"{TRAIN} --model tiny-llama",
        "error: model_type='llama' is not a supported MoE model: it holds no fused experts module (transformers marks those with use_experts_implementation), no deepspeed.moe.layer.MoE and no Megatron-core expert layer",
    ),
    ("mixlora-num-experts-zero", "train", f"{MIX} --num-experts 0", "error: num_experts=0 must be an integer >= 1"),
    ("mixlora-top-k-zero", "train", f"{MIX} --top-k 0", "error: top_k=0 must be in [1, num_experts=8]"),
    ("mixlora-top-k-above-experts", "train", f"{MIX} --top-k 9", "error: top_k=9 must be in [1, num_experts=8]"),
    ("mixlora-top-p-above-one", "train", f"{MIX} --routing dynamic --top-p 1.5", "error: top_p=1.5 must be in (0, 1]"),
    (
        "mixlora-top-p-max-zero",
        "train",
        f"{MIX} --routing dynamic --top-p-max-experts 0",
        "error: top_p_max_experts=0 must be a positive integer (or None: no cap)",
    ),
    (
        "mixlora-expert-r-garbled",
        "train",
        f"{MIX} --expert-r x:y",
        "error: --expert-r 'x:y': expected EXPERT:VALUE pairs separated by commas, e.g. 0:16,3:4",
    ),
    (
        "mixlora-expert-r-out-of-range",
        "train",
        f"{MIX} --expert-r 9:4",
        "error: per-expert overrides name experts [9] outside [0, 8)",
    ),
    (
        "mixlora-expert-alpha-garbled",
        "train",
        f"{MIX} --expert-alpha 0=4",
        "error: --expert-alpha '0=4': expected EXPERT:VALUE pairs separated by commas, e.g. 0:16,3:4",
    ),
    (
        "mixlora-capacity-zero",
        "train",
        f"{MIX} --routing switch --capacity-factor 0",
        "error: capacity_factor=0.0 must be > 0",
    ),
    (
        "mixlora-temperature-negative",
        "train",
        f"{MIX} --router-temperature -1",
        "error: router_temperature=-1.0 must be a finite number >= 0 (0: off)",
    ),
    ("mixlora-jitter-negative", "train", f"{MIX} --jitter-noise -1", "error: jitter_noise=-1.0 must be in [0, 1)"),
    (
        "mixlora-aux-coef-negative",
        "train",
        f"{MIX} --router-aux-loss-coef -1",
        "error: router_aux_loss_coef=-1.0 must be >= 0",
    ),
    (
        "mixlora-on-moe-model",
        "train",
        f"{MIX} --model tiny-mixtral",
        "error: model_type='mixtral' is not a supported dense family for MixLoRA; supported: ['gemma', 'gemma2', 'gemma3_text', 'llama', 'mistral', 'qwen2', 'qwen3']. Add a DenseFamily entry in moe_peft_ds/mixlora.py to support another layout.",
    ),
    ("ep-size-zero", "train", f"{TRAIN} --ep-size 0", "error: --ep-size=0 must be > 0 and finite"),
    (
        "ep-size-without-deepspeed",
        "train",
        f"{TRAIN} --ep-size 2",
        "error: --ep-size > 1 needs --deepspeed_config (run under the deepspeed launcher)",
    ),
    ("dist-timeout-zero", "train", f"{TRAIN} --dist-timeout 0", "error: --dist-timeout=0 must be > 0 and finite"),
    # --- launch/train.py: model, data, output
    (
        "model-missing",
        "train",
        f"{TRAIN} --model {{d}}/nosuchmodel",
        "error: --model {d}/nosuchmodel does not exist (a local directory was meant)",
    ),
    (
        "model-without-weights",
        "train",
        f"{TRAIN} --model {{d}}/models/noweights",
        "error: Error no file named model.safetensors, or pytorch_model.bin, found in directory {d}/models/noweights.",
    ),
    (
        "model-without-tokenizer",
        "train",
        f"{TRAIN} --model {{d}}/models/notokenizer",
        "error: --model {d}/models/notokenizer: no usable tokenizer there (Couldn't instantiate the backend tokenizer from one of:); pass one with --tokenizer",
    ),
    (
        "data-missing",
        "train",
        f"{TRAIN} --data {{d}}/data/nosuch.jsonl",
        "error: --data '{d}/data/nosuch.jsonl' does not exist (a local file or directory was meant)",
    ),
    (
        "data-malformed",
        "train",
        f"{TRAIN} --data {{d}}/data/malformed.jsonl",
        "error: --data '{d}/data/malformed.jsonl' (split 'train') is not readable from its files: An error occurred while generating the dataset (JSON parse error: Missing a colon after a name of object member. in row 0)",
    ),
    (
        "data-empty-file",
        "train",
        f"{TRAIN} --data {{d}}/data/empty.jsonl",
        "error: {d}/data/empty.jsonl holds no records",
    ),
    (
        "data-unknown-type",
        "train",
        f"{TRAIN} --data {{d}}/data/notes.txt",
        "error: {d}/data/notes.txt: unknown file type '.txt'; use one of ['.csv', '.json', '.jsonl', '.parquet']",
    ),
    (
        "data-wrong-columns",
        "train",
        f"{TRAIN} --data {{d}}/data/wrongcols.jsonl",
        "error: --data '{d}/data/wrongcols.jsonl' has columns ['answer', 'question']; expected messages or prompt+response or text (map yours with --prompt-column/--response-column/--messages-column/--text-column)",
    ),
    (
        "data-dict-prompt",
        "train",
        f"{TRAIN} --data {{d}}/data/dictprompt.jsonl",
        "error: --data '{d}/data/dictprompt.jsonl': column 'prompt' holds a dict; instruction data needs text (or numbers) there",
    ),
    (
        "data-list-response",
        "train",
        f"{TRAIN} --data {{d}}/data/listresp.jsonl",
        "error: --data '{d}/data/listresp.jsonl': column 'response' holds a list; instruction data needs text (or numbers) there",
    ),
    (
        "data-messages-not-a-list",
        "train",
        f"{TRAIN} --data {{d}}/data/msgstr.jsonl",
        "error: --data '{d}/data/msgstr.jsonl': column 'messages' holds text; chat data needs a list of {{\"role\", \"content\"}} messages there",
    ),
    (
        "data-messages-without-reply",
        "train",
        f"{TRAIN} --data {{d}}/data/msgnoreply.jsonl",
        "error: --data '{d}/data/msgnoreply.jsonl' (split 'train'): none of its 4 rows has anything to learn (4 with no assistant reply at the end)",
    ),
    (
        "data-all-responses-null",
        "train",
        f"{TRAIN} --data {{d}}/data/nullresp.jsonl",
        "error: --data '{d}/data/nullresp.jsonl' (split 'train'): none of its 4 rows has anything to learn (4 with no response)",
    ),
    (
        "data-all-responses-empty",
        "train",
        f"{TRAIN} --data {{d}}/data/emptyresp.jsonl",
        "error: --data '{d}/data/emptyresp.jsonl' (split 'train'): none of its 4 rows has anything to learn (4 with no response)",
    ),
    (
        "data-all-prompts-too-long",
        "train",
        f"{TRAIN} --data {{d}}/data/longprompt.jsonl --max-length 16",
        "error: --data '{d}/data/longprompt.jsonl' (split 'train'): none of its 4 rows has anything to learn (4 whose response starts after --max-length) (raise --max-length 16)",
    ),
    (
        "data-all-text-empty",
        "train",
        f"{TRAIN} --data {{d}}/data/emptytext.jsonl",
        "error: --data '{d}/data/emptytext.jsonl' (split 'train'): none of its 4 rows has anything to learn (4 with no text)",
    ),
    (
        "data-split-missing",
        "train",
        f"{TRAIN} --data {{d}}/splits --train-split test",
        "error: --data {d}/splits has files for splits ['train', 'validation'], none for 'test' (their names say which)",
    ),
    (
        "data-format-mismatch",
        "train",
        f"{TRAIN} --data-format chat",
        "error: --data 'demo:arithmetic' has columns ['prompt', 'response']; expected messages (map yours with --prompt-column/--response-column/--messages-column/--text-column)",
    ),
    (
        "data-fewer-than-a-batch",
        "train",
        f"{TRAIN} --data {{d}}/data/one.jsonl --batch-size 4",
        "error: 1 training samples are fewer than one global batch (4 per rank x 1 ranks)",
    ),
    (
        "output-dir-is-a-file",
        "train",
        f"{TRAIN} --output-dir {{d}}/afile",
        "error: --output-dir {d}/afile: {d}/afile is a file, not a directory",
    ),
    (
        "output-dir-under-a-file",
        "train",
        f"{TRAIN} --output-dir {{d}}/afile/run",
        "error: --output-dir {d}/afile/run: {d}/afile is a file, not a directory",
    ),
    (
        "output-dir-not-writable",
        "train",
        f"{TRAIN} --output-dir /proc/1/run",
        "error: --output-dir /proc/1/run: /proc/1 is not writable",
    ),
    (
        "output-dir-holds-an-adapter",
        "train",
        f"{TRAIN} --output-dir {ADAPTER}",
        "error: {d}/runs/sieve already holds an adapter; pass --overwrite or choose another --output-dir",
    ),
    # --- launch/train.py: DeepSpeed configs
    (
        "ds-config-missing",
        "train",
        f"{TRAIN} --deepspeed_config {{d}}/ds/nosuch.json",
        "error: --deepspeed_config {d}/ds/nosuch.json does not exist; presets are in ds_configs/",
    ),
    (
        "ds-config-not-json",
        "train",
        f"{TRAIN} --deepspeed_config {{d}}/ds/notjson.json",
        "error: --deepspeed_config {d}/ds/notjson.json is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    ),
    (
        "ds-config-a-list",
        "train",
        f"{TRAIN} --deepspeed_config {{d}}/ds/list.json",
        "error: --deepspeed_config {d}/ds/list.json must hold a JSON object, not a list",
    ),
    (
        "ds-zero-not-an-object",
        "train",
        f"{TRAIN} --deepspeed_config {{d}}/ds/zero5.json",
        'error: --deepspeed_config {d}/ds/zero5.json: zero_optimization must be an object like {{"stage": 2}}, not 5',
    ),
    (
        "ds-zero-stage-5",
        "train",
        f"{TRAIN} --deepspeed_config {{d}}/ds/stage5.json",
        "error: --deepspeed_config {d}/ds/stage5.json: zero_optimization.stage must be one of 0, 1, 2, 3, not 5",
    ),
    (
        "ds-accumulation-zero",
        "train",
        f"{TRAIN} --deepspeed_config {{d}}/ds/gas0.json",
        "error: --deepspeed_config {d}/ds/gas0.json: gradient_accumulation_steps must be an integer >= 1, not 0",
    ),
    (
        "ds-accumulation-a-string",
        "train",
        f"{TRAIN} --deepspeed_config {{d}}/ds/gasstr.json",
        "error: --deepspeed_config {d}/ds/gasstr.json: gradient_accumulation_steps must be an integer >= 1, not '2'",
    ),
    (
        "ds-batch-sizes-contradict",
        "train",
        f"{TRAIN} --deepspeed_config {{d}}/ds/tbs.json",
        "error: --deepspeed_config {d}/ds/tbs.json: train_batch_size 64 is not --batch-size 2 x gradient_accumulation_steps 1 x 1 rank(s) = 2; remove train_batch_size or make them agree",
    ),
    (
        "ds-optimizer-section",
        "train",
        f"{TRAIN} --deepspeed_config {{d}}/ds/optimizer.json",
        "error: --deepspeed_config {d}/ds/optimizer.json: remove its 'optimizer'; the launcher builds AdamW and the warmup + cosine schedule itself (--lr)",
    ),
    (
        "ds-clipping-negative",
        "train",
        f"{TRAIN} --deepspeed_config {{d}}/ds/clipneg.json",
        "error: --deepspeed_config {d}/ds/clipneg.json: gradient_clipping must be a finite number >= 0, not -1",
    ),
    (
        "ds-bf16-not-bool",
        "train",
        f"{TRAIN} --deepspeed_config {{d}}/ds/bf16str.json",
        "error: --deepspeed_config {d}/ds/bf16str.json: bf16 must be an object like {{\"enabled\": true}}, not {{'enabled': 'yes'}}",
    ),
    (
        "ds-fp16-and-bf16",
        "train",
        f"{TRAIN} --deepspeed_config {{d}}/ds/fp16bf16.json",
        "error: --deepspeed_config {d}/ds/fp16bf16.json: DeepSpeed rejects it: bfloat16 and fp16 modes cannot be simultaneously enabled",
    ),
    (
        "ds-zero3-with-ep",
        "train",
        f"{TRAIN} --deepspeed_config {{d}}/ds/zero3.json --ep-size 2",
        "error: ZeRO-3 cannot shard expert-parallel experts (DeepSpeed MoE rejects it); use a ZeRO-0/1/2 preset with --ep-size > 1",
    ),
    # --- launch/train.py: --resume
    (
        "resume-from-nothing",
        "train",
        f"{TRAIN} --resume {{d}}/data",
        "error: --resume {d}/data: no step_N/rank0.safetensors training state there",
    ),
    (
        "resume-other-seed",
        "train",
        f"{TRAIN} --resume {ADAPTER}/checkpoints --seed 1",
        "error: --resume {d}/runs/sieve/checkpoints/step_2 was saved by a different run: seed (saved 0, now 1); resume with the saved run's flags, data and number of ranks",
    ),
    (
        "resume-other-data",
        "train",
        f"{TRAIN} --resume {ADAPTER}/checkpoints --data {{d}}/data/good.jsonl",
        "error: --resume {d}/runs/sieve/checkpoints/step_2 was saved by a different run: adapter_config (saved 'e93eaade731a', now '362cc0ed35ec'); selection (saved '3b54893b0838', now 'fab37b45a00c'); data (saved 'demo:arithmetic (split train)', now '{d}/data/good.jsonl (split train)'); examples (saved 'f1f98bb6bd59', now '134bc8403914'); resume with the saved run's flags, data and number of ranks",
    ),
    (
        "resume-other-batch-size",
        "train",
        f"{TRAIN} --resume {ADAPTER}/checkpoints --batch-size 4",
        "error: --resume {d}/runs/sieve/checkpoints/step_2 was saved by a different run: batch_size (saved 2, now 4); resume with the saved run's flags, data and number of ranks",
    ),
    (
        "resume-other-fraction",
        "train",
        f"{TRAIN} --resume {ADAPTER}/checkpoints --sieve-fraction 0.5",
        "error: --resume {d}/runs/sieve/checkpoints/step_2 was saved by a different run: adapter_config (saved 'e93eaade731a', now '9ddb64438654'); selection (saved '3b54893b0838', now '041afb8398d8'); resume with the saved run's flags, data and number of ranks",
    ),
    (
        "resume-a-lora-run",
        "train",
        f"{TRAIN} --resume {{d}}/runs/lora/checkpoints",
        "error: --resume {d}/runs/lora/checkpoints/step_2 was saved by a different run: method (saved 'lora', now 'sieve'); adapter_config (saved 'd842eddb8efd', now 'e93eaade731a'); selection (saved '97a044172e3f', now '3b54893b0838'); resume with the saved run's flags, data and number of ranks",
    ),
    (
        "resume-a-mixlora-run",
        "train",
        f"{TRAIN} --resume {{d}}/runs/mixlora/checkpoints",
        "error: --resume {d}/runs/mixlora/checkpoints/step_2 was saved by a different run: model (saved 'tiny-llama', now 'tiny-mixtral'); method (saved 'mixlora', now 'sieve'); adapter_config (saved 'c9cffd2803e6', now 'e93eaade731a'); selection (saved '74234e98afe7', now '3b54893b0838'); resume with the saved run's flags, data and number of ranks",
    ),
    (
        "resume-past-max-steps",
        "train",
        f"{TRAIN} --resume {ADAPTER}/checkpoints/step_2 --max-steps 2",
        "error: --resume {d}/runs/sieve/checkpoints/step_2 is at step 2, not before --max-steps 2: nothing left to train",
    ),
    (
        "resume-truncated-state",
        "train",
        f"{TRAIN} --resume {{d}}/resume/truncated --max-steps 4",
        "error: {d}/resume/truncated/rank0.safetensors is not a readable state file (Error while deserializing header: incomplete metadata, file not fully covered)",
    ),
    (
        "resume-flipped-byte",
        "train",
        f"{TRAIN} --resume {{d}}/resume/flipped --max-steps 4",
        "error: {d}/resume/flipped/rank0.safetensors is corrupt: its bytes do not match the checksum written with them",
    ),
    (
        "resume-forged-class",
        "train",
        f"{TRAIN} --resume {{d}}/resume/forged --max-steps 4",
        "error: {d}/resume/forged/rank0.safetensors: a state file names a class 'system' that state files do not hold",
    ),
    (
        "resume-old-pickle",
        "train",
        f"{TRAIN} --resume {{d}}/resume/pickle",
        "error: --resume {d}/resume/pickle: no step_N/rank0.safetensors training state there (torch pickle files from an older version are not loaded)",
    ),
    # --- launch/continual.py
    (
        "continual-no-task",
        "continual",
        CONT.replace("--task a={d}/data/good.jsonl ", ""),
        "error: no tasks: pass --task NAME=DATA at least once, in training order",
    ),
    (
        "continual-task-without-equals",
        "continual",
        f"{CONT} --task b",
        "error: --task 'b': expected NAME=DATA, e.g. mood=data/mood.jsonl",
    ),
    (
        "continual-duplicate-task",
        "continual",
        f"{CONT} --task a={{d}}/data/good.jsonl",
        "error: task names must be unique: ['a', 'a']",
    ),
    (
        "continual-invalid-json",
        "continual",
        f"{CONT} --task b={{d}}/data/malformed.jsonl",
        "error: --data '{d}/data/malformed.jsonl' (split 'train') is not readable from its files: An error occurred while generating the dataset (JSON parse error: Missing a colon after a name of object member. in row 0)",
    ),
    (
        "continual-missing-data",
        "continual",
        f"{CONT} --task b={{d}}/data/nosuch.jsonl",
        "error: --data '{d}/data/nosuch.jsonl' does not exist (a local file or directory was meant)",
    ),
    ("continual-lr-nan", "continual", f"{CONT} --lr nan", "error: --lr=nan must be > 0 and finite"),
    (
        "continual-steps-zero",
        "continual",
        f"{CONT} --steps-per-task 0",
        "error: --steps-per-task=0 must be > 0 and finite",
    ),
    (
        "continual-top-k-above-experts",
        "continual",
        f"{CONT} --top-k 9 --experts-per-task 2",
        "error: --top-k 9 must be at most --experts-per-task 2 (the first task has only those experts)",
    ),
    (
        "continual-merge-threshold-above-one",
        "continual",
        f"{CONT} --merge-threshold 2",
        "error: --merge-threshold 2.0 is a cosine similarity, at most 1",
    ),
    (
        "continual-ep-not-dividing",
        "continual",
        f"{CONT} --experts-per-task 3 --ep-size 2",
        "error: --ep-size > 1 needs --deepspeed_config (run under the deepspeed launcher)",
    ),
    (
        "continual-zero3",
        "continual",
        f"{CONT} --deepspeed_config {{d}}/ds/zero3.json",
        "error: continual learning adds parameters between tasks, which ZeRO-3 partitions once; use a ZeRO-0/1/2 preset",
    ),
    (
        "continual-ds-a-list",
        "continual",
        f"{CONT} --deepspeed_config {{d}}/ds/list.json",
        "error: --deepspeed_config {d}/ds/list.json must hold a JSON object, not a list",
    ),
    (
        "continual-output-dir-is-a-file",
        "continual",
        f"{CONT} --output-dir {{d}}/afile",
        "error: --output-dir {d}/afile: {d}/afile is a file, not a directory",
    ),
    (
        "continual-dict-prompts",
        "continual",
        f"{CONT} --task b={{d}}/data/dictprompt.jsonl",
        "error: --data '{d}/data/dictprompt.jsonl': column 'prompt' holds a dict; instruction data needs text (or numbers) there",
    ),
    # --- launch/evaluate.py
    (
        "eval-unknown-task",
        "evaluate",
        f"{EVAL} --tasks nosuchtask",
        "error: unknown task 'nosuchtask'; known: ['arc_challenge', 'arc_easy', 'boolq', 'hellaswag', 'openbookqa', 'piqa', 'siqa', 'winogrande']",
    ),
    ("eval-batch-size-zero", "evaluate", f"{EVAL} --batch-size 0", "error: --batch-size=0 must be > 0 and finite"),
    ("eval-shots-negative", "evaluate", f"{EVAL} --shots -1", "error: --shots=-1 must be >= 0"),
    ("eval-limit-zero", "evaluate", f"{EVAL} --limit 0", "error: --limit=0 must be > 0 and finite"),
    (
        "eval-source-missing",
        "evaluate",
        f"{EVAL} --source {{d}}/nosuchdir",
        "error: arc_easy: split 'test' could not be loaded from '{d}/nosuchdir': Unable to find '{d}/nosuchdir/arc_easy.jsonl'",
    ),
    (
        "eval-output-dir-is-a-file",
        "evaluate",
        f"{EVAL} --output-dir {{d}}/afile",
        "error: --output-dir {d}/afile: {d}/afile is a file, not a directory",
    ),
    (
        "eval-adapter-missing",
        "evaluate",
        f"{EVAL} --adapter {{d}}/nosuchadapter",
        "error: {d}/nosuchadapter is not an adapter directory: it needs adapter_config.json and adapter_model.safetensors",
    ),
    (
        "eval-adapter-flipped-byte",
        "evaluate",
        f"{EVAL} --adapter {{d}}/adapters/flipped",
        "error: {d}/adapters/flipped/adapter_model.safetensors is corrupt: its tensors do not match the checksum written with them",
    ),
    (
        "eval-adapter-huge-r",
        "evaluate",
        f"{EVAL} --adapter {{d}}/adapters/huge_r",
        "error: {d}/adapters/huge_r: layers.0.experts.11.down_proj.lora_A has shape [8, 128] but adapter_config.json says r=1048576: the two files do not belong together",
    ),
    (
        "eval-adapter-negative-expert",
        "evaluate",
        f"{EVAL} --adapter {{d}}/adapters/negative_id",
        "error: selection for layer 0 has expert ids [-1]; expert ids are integers in [0, 16)",
    ),
    (
        "eval-adapter-duplicate-expert",
        "evaluate",
        f"{EVAL} --adapter {{d}}/adapters/duplicate_id",
        "error: selection for layer 0 names an expert more than once: [3, 3, 11, 13]",
    ),
    (
        "eval-adapter-float-expert",
        "evaluate",
        f"{EVAL} --adapter {{d}}/adapters/float_id",
        "error: selection for layer 0 has expert ids [1.5]; expert ids are integers in [0, 16)",
    ),
    (
        "eval-adapter-bool-expert",
        "evaluate",
        f"{EVAL} --adapter {{d}}/adapters/bool_id",
        "error: selection for layer 0 has expert ids [True]; expert ids are integers in [0, 16)",
    ),
    (
        "eval-adapter-alpha-null",
        "evaluate",
        f"{EVAL} --adapter {{d}}/adapters/alpha_null",
        "error: alpha=None must be a finite number > 0",
    ),
    (
        "eval-adapter-config-not-json",
        "evaluate",
        f"{EVAL} --adapter {{d}}/adapters/not_json",
        "error: cannot read adapter config {d}/adapters/not_json/adapter_config.json: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    ),
    (
        "eval-adapter-without-weights",
        "evaluate",
        f"{EVAL} --adapter {{d}}/adapters/no_weights",
        "error: {d}/adapters/no_weights is not an adapter directory: it needs adapter_config.json and adapter_model.safetensors",
    ),
    (
        "eval-adapter-of-another-model",
        "evaluate",
        f"{EVAL} --model tiny-llama --adapter {ADAPTER}",
        "error: model_type='llama' is not a supported MoE model: it holds no fused experts module (transformers marks those with use_experts_implementation), no deepspeed.moe.layer.MoE and no Megatron-core expert layer",
    ),
    # --- launch/profile_routing.py
    (
        "profile-calibration-zero",
        "profile_routing",
        f"{PROF} --calibration-samples 0",
        "error: --calibration-samples=0 must be > 0 and finite",
    ),
    (
        "profile-data-missing",
        "profile_routing",
        f"{PROF} --data {{d}}/data/nosuch.jsonl",
        "error: --data '{d}/data/nosuch.jsonl' does not exist (a local file or directory was meant)",
    ),
    (
        "profile-fraction-above-one",
        "profile_routing",
        f"{PROF} --sieve-fraction 2",
        "error: fraction=2.0 must be in (0, 1]",
    ),
    (
        "profile-output-dir-is-a-file",
        "profile_routing",
        f"{PROF} --output-dir {{d}}/afile",
        "error: --output-dir {d}/afile: {d}/afile is a file, not a directory",
    ),
    (
        "profile-dense-model",
        "profile_routing",
        f"{PROF} --model tiny-llama",
        "error: model_type='llama' is not a supported MoE model: it holds no fused experts module (transformers marks those with use_experts_implementation), no deepspeed.moe.layer.MoE and no Megatron-core expert layer",
    ),
    (
        "profile-dict-prompts",
        "profile_routing",
        f"{PROF} --data {{d}}/data/dictprompt.jsonl",
        "error: --data '{d}/data/dictprompt.jsonl': column 'prompt' holds a dict; instruction data needs text (or numbers) there",
    ),
    # --- launch/convert_adapter.py
    (
        "convert-adapter-missing",
        "convert_adapter",
        "{d}/nosuchadapter {out} --to megatron",
        "error: {d}/nosuchadapter is not an adapter directory: it needs adapter_config.json and adapter_model.safetensors",
    ),
    (
        "convert-to-unknown",
        "convert_adapter",
        f"{ADAPTER} {{out}} --to nosuchtype",
        "error: {d}/runs/sieve is a 'mixtral' adapter; convert it to 'megatron' or from 'megatron' to a transformers family",
    ),
    (
        "convert-flipped-byte",
        "convert_adapter",
        "{d}/adapters/flipped {out} --to megatron",
        "error: {d}/adapters/flipped/adapter_model.safetensors is corrupt: its tensors do not match the checksum written with them",
    ),
    (
        "convert-mixlora",
        "convert_adapter",
        "{d}/runs/mixlora {out} --to megatron",
        "error: {d}/runs/mixlora holds a mixlora adapter; only expert (sieve/lora/dora) adapters convert",
    ),
    (
        "convert-onto-itself",
        "convert_adapter",
        f"{ADAPTER} {ADAPTER} --to megatron",
        "error: {d}/runs/sieve already holds an adapter; choose another output directory",
    ),
    # --- the Python API
    ("api-lora-r-zero", "api", lambda d: AdapterConfig(r=0), "error: r=0 must be a positive integer"),
    (
        "api-lora-alpha-null",
        "api",
        lambda d: AdapterConfig(alpha=None),
        "error: alpha=None must be a finite number > 0",
    ),
    (
        "api-lora-dropout-negative",
        "api",
        lambda d: AdapterConfig(dropout=-0.1),
        "error: dropout=-0.1 must be in [0, 1)",
    ),
    (
        "api-attention-target-unknown",
        "api",
        lambda d: AdapterConfig(attention_targets=["nope"]),
        "error: attention_targets has ['nope']; allowed: ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'qkv_proj', 'q_a_proj', 'q_b_proj', 'kv_a_proj_with_mqa', 'kv_b_proj', 'out_proj', 'dense')",
    ),
    (
        "api-mixlora-top-k-zero",
        "api",
        lambda d: MixLoRAConfig(top_k=0),
        "error: top_k=0 must be in [1, num_experts=8]",
    ),
    (
        "api-mixlora-routing-unknown",
        "api",
        lambda d: MixLoRAConfig(routing="nope"),
        "error: routing='nope' is unknown; choose one of ('topk', 'dynamic', 'switch')",
    ),
    (
        "api-sieve-policy-unknown",
        "api",
        lambda d: SieveConfig(policy="nope"),
        "error: policy='nope' is unknown; choose one of ('topk', 'coverage', 'random', 'greedy', 'all')",
    ),
    (
        "api-sieve-negative-expert",
        "api",
        lambda d: apply_sieve_lora(moe(), {0: [-1]}, AdapterConfig()),
        "error: selection for layer 0 has expert ids [-1]; expert ids are integers in [0, 16)",
    ),
    (
        "api-sieve-expert-out-of-range",
        "api",
        lambda d: apply_sieve_lora(moe(), {0: [16]}, AdapterConfig()),
        "error: selection for layer 0 has expert ids [16]; expert ids are integers in [0, 16)",
    ),
    (
        "api-sieve-duplicate-expert",
        "api",
        lambda d: apply_sieve_lora(moe(), {0: [1, 1]}, AdapterConfig()),
        "error: selection for layer 0 names an expert more than once: [1, 1]",
    ),
    (
        "api-sieve-float-expert",
        "api",
        lambda d: apply_sieve_lora(moe(), {0: [1.5]}, AdapterConfig()),
        "error: selection for layer 0 has expert ids [1.5]; expert ids are integers in [0, 16)",
    ),
    (
        "api-sieve-bool-expert",
        "api",
        lambda d: apply_sieve_lora(moe(), {0: [True]}, AdapterConfig()),
        "error: selection for layer 0 has expert ids [True]; expert ids are integers in [0, 16)",
    ),
    (
        "api-sieve-layer-not-moe",
        "api",
        lambda d: apply_sieve_lora(moe(), {9: [1]}, AdapterConfig()),
        "error: selection names layers [9] that are not MoE layers of this model; MoE layers: [0, 1, 2, 3]",
    ),
    (
        "api-sieve-dense-model",
        "api",
        lambda d: apply_sieve_lora(dense(), {0: [1]}, AdapterConfig()),
        "error: model_type='llama' is not a supported MoE model: it holds no fused experts module (transformers marks those with use_experts_implementation), no deepspeed.moe.layer.MoE and no Megatron-core expert layer",
    ),
    (
        "api-load-adapter-huge-r",
        "api",
        lambda d: load_adapter(moe(), d / "adapters/huge_r"),
        "error: {d}/adapters/huge_r: layers.0.experts.11.down_proj.lora_A has shape [8, 128] but adapter_config.json says r=1048576: the two files do not belong together",
    ),
    (
        "api-load-adapter-of-another-model",
        "api",
        lambda d: load_adapter(dense(), d / "runs/sieve"),
        "error: model_type='llama' is not a supported MoE model: it holds no fused experts module (transformers marks those with use_experts_implementation), no deepspeed.moe.layer.MoE and no Megatron-core expert layer",
    ),
    (
        "api-read-adapter-flipped-byte",
        "api",
        lambda d: read_adapter(d / "adapters/flipped"),
        "error: {d}/adapters/flipped/adapter_model.safetensors is corrupt: its tensors do not match the checksum written with them",
    ),
    (
        "api-read-adapter-missing",
        "api",
        lambda d: read_adapter(d / "nosuchadapter"),
        "error: {d}/nosuchadapter is not an adapter directory: it needs adapter_config.json and adapter_model.safetensors",
    ),
    (
        "api-examples-dict-prompt",
        "api",
        lambda d: load_examples(str(d / "data/dictprompt.jsonl"), tokenizer(), 32),
        "error: --data '{d}/data/dictprompt.jsonl': column 'prompt' holds a dict; instruction data needs text (or numbers) there",
    ),
    (
        "api-examples-all-null",
        "api",
        lambda d: load_examples(str(d / "data/nullresp.jsonl"), tokenizer(), 32),
        "error: --data '{d}/data/nullresp.jsonl' (split 'train'): none of its 4 rows has anything to learn (4 with no response)",
    ),
    (
        "api-ds-config-a-list",
        "api",
        lambda d: load_deepspeed_config(d / "ds/list.json", 2),
        "error: --deepspeed_config {d}/ds/list.json must hold a JSON object, not a list",
    ),
    (
        "api-ds-batch-contradicts",
        "api",
        lambda d: load_deepspeed_config(d / "ds/tbs.json", 2, world=2),
        "error: --deepspeed_config {d}/ds/tbs.json: train_batch_size 64 is not --batch-size 2 x gradient_accumulation_steps 1 x 2 rank(s) = 4; remove train_batch_size or make them agree",
    ),
    (
        "api-state-forged-class",
        "api",
        lambda d: read_state_file(d / "resume/forged/rank0.safetensors"),
        "error: {d}/resume/forged/rank0.safetensors: a state file names a class 'system' that state files do not hold",
    ),
    (
        "api-state-truncated",
        "api",
        lambda d: read_state_file(d / "resume/truncated/rank0.safetensors"),
        "error: {d}/resume/truncated/rank0.safetensors is not a readable state file (Error while deserializing header: incomplete metadata, file not fully covered)",
    ),
    (
        "api-train-lr-nan",
        "api",
        lambda d: train(sieve_model(), loader(), 2, float("nan"), progress=False),
        "error: lr=nan must be a finite number > 0",
    ),
    (
        "api-train-no-adapter",
        "api",
        lambda d: train(moe().requires_grad_(False), loader(), 2, 1e-3, progress=False),
        "error: the model has no trainable parameters; inject an adapter first",
    ),
    (
        "api-save-nan-adapter",
        "api",
        lambda d: save_adapter(nan_model(), d / "never"),
        "error: 4 adapter tensors hold NaN or inf (e.g. layers.0.experts.1.gate_up_proj.lora_A): not written",
    ),
]


def _jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _data(d: Path) -> None:
    data = d / "data"
    data.mkdir()
    good = [{"prompt": f"{i} + {i} =", "response": f" {2 * i}"} for i in range(16)]
    _jsonl(data / "good.jsonl", good)
    _jsonl(data / "one.jsonl", good[:1])
    (data / "malformed.jsonl").write_text('{"prompt": "a", "response"\n')
    (data / "empty.jsonl").write_text("")
    (data / "notes.txt").write_text("hello\n")
    rows = {
        "wrongcols": {"question": "a", "answer": "b"},
        "dictprompt": {"prompt": {"x": 1}, "response": "b"},
        "listresp": {"prompt": "a", "response": ["b"]},
        "msgstr": {"messages": "hello"},
        "msgnoreply": {"messages": [{"role": "user", "content": "hi"}]},
        "nullresp": {"prompt": "a", "response": None},
        "emptyresp": {"prompt": "a", "response": " "},
        "longprompt": {"prompt": "word " * 40, "response": "b"},
        "emptytext": {"text": ""},
    }
    for name, row in rows.items():
        _jsonl(data / f"{name}.jsonl", [row] * 4)
    (d / "afile").write_text("not a directory\n")
    (d / "splits").mkdir()
    for split in ("train", "validation"):
        _jsonl(d / "splits" / f"{split}.jsonl", good)


def _deepspeed_configs(d: Path) -> None:
    ds = d / "ds"
    ds.mkdir()
    base = json.loads((ROOT / "ds_configs" / "zero2_fp32.json").read_text())
    (ds / "notjson.json").write_text("{")
    (ds / "list.json").write_text("[]")
    configs = {
        "zero5": {**base, "zero_optimization": 5},
        "stage5": {**base, "zero_optimization": {"stage": 5}},
        "gas0": {**base, "gradient_accumulation_steps": 0},
        "gasstr": {**base, "gradient_accumulation_steps": "2"},
        "tbs": {**base, "train_batch_size": 64},
        "optimizer": {**base, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}},
        "clipneg": {**base, "gradient_clipping": -1},
        "bf16str": {**base, "bf16": {"enabled": "yes"}},
        "fp16bf16": {**base, "fp16": {"enabled": True}, "bf16": {"enabled": True}},
        "zero3": json.loads((ROOT / "ds_configs" / "zero3_fp32.json").read_text()),
    }
    for name, cfg in configs.items():
        (ds / f"{name}.json").write_text(json.dumps(cfg))


def _models(d: Path) -> None:
    tiny = ROOT / "moe_peft_ds" / "assets" / "tiny-mixtral"
    for name, drop in (("noweights", "model."), ("notokenizer", "tokenizer")):
        shutil.copytree(
            tiny, d / "models" / name, ignore=lambda _, names, drop=drop: [n for n in names if n.startswith(drop)]
        )


def _runs(d: Path) -> None:
    """A sieve, a LoRA and a MixLoRA run, each with the training state of step 2."""
    train = LAUNCHERS["train"]
    for name, flags in (("sieve", TRAIN), ("lora", f"{TRAIN} --method lora"), ("mixlora", MIX)):
        argv = shlex.split(flags.format(out=d / "runs" / name)) + ["--max-steps", "4", "--save-every", "2"]
        assert train(argv) == 0


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))


def _resume_states(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    from moe_peft_ds.state_file import FORMAT, _checksum

    step = d / "runs" / "sieve" / "checkpoints" / "step_2"
    for name in ("truncated", "flipped", "forged"):
        shutil.copytree(step, d / "resume" / name)
    state = d / "resume" / "truncated" / "rank0.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    _flip_last_byte(d / "resume" / "flipped" / "rank0.safetensors")
    forged = d / "resume" / "forged" / "rank0.safetensors"
    tensors, tree = load_file(str(forged)), json.dumps({"__object__": "system", "fields": {"__dict__": []}})
    from moe_peft_ds.state_file import read_state_header

    header = json.dumps(read_state_header(forged))  # the real run's fingerprint: only the state is forged
    meta = {"format": FORMAT, "state": tree, "header": header, "sha256": _checksum(tensors, tree, header)}
    save_file(tensors, str(forged), metadata=meta)
    (d / "resume" / "pickle" / "step_2").mkdir(parents=True)
    (d / "resume" / "pickle" / "step_2" / "rank0.pt").write_bytes(b"a pickle: never loaded")


def _adapters(d: Path) -> None:
    sieve = d / "runs" / "sieve"
    changes = {
        "huge_r": lambda c: c.update(r=2**20),
        "negative_id": lambda c: c["selection"]["0"].__setitem__(0, -1),
        "duplicate_id": lambda c: c["selection"]["0"].__setitem__(1, c["selection"]["0"][0]),
        "float_id": lambda c: c["selection"]["0"].__setitem__(0, 1.5),
        "bool_id": lambda c: c["selection"]["0"].__setitem__(0, True),
        "alpha_null": lambda c: c.update(alpha=None),
        "flipped": lambda c: None,
        "not_json": lambda c: None,
        "no_weights": lambda c: None,
    }
    for name, change in changes.items():
        out = d / "adapters" / name
        out.mkdir(parents=True)
        cfg = json.loads((sieve / "adapter_config.json").read_text())
        change(cfg)
        (out / "adapter_config.json").write_text("{" if name == "not_json" else json.dumps(cfg))
        if name != "no_weights":
            shutil.copy(sieve / "adapter_model.safetensors", out)
    _flip_last_byte(d / "adapters" / "flipped" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for build in (_data, _deepspeed_configs, _models, _runs, _resume_states, _adapters):
        build(d)
    return d


def moe():
    return load_model("tiny-mixtral")[0]


def dense():
    return load_model("tiny-llama")[0]


def tokenizer():
    return load_model("tiny-mixtral")[1]


def loader():
    return make_train_loader(load_examples("demo:arithmetic", tokenizer(), 32), tokenizer(), 2)


def sieve_model():
    model = moe()
    apply_sieve_lora(model, {0: [1]}, AdapterConfig())
    return model


def nan_model():
    model = sieve_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(float("nan"))
    return model


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


def refusal(where: str, given, d: Path, out: Path, capsys) -> str:
    """The one error line ``given`` ends in (asserting exit status 2 and no traceback)."""
    from moe_peft_ds.cli import USER_ERRORS

    if where == "api":
        with pytest.raises(USER_ERRORS) as err:
            given(d)
        return f"error: {err.value}"
    rc = LAUNCHERS[where](shlex.split(given.format(d=d, out=out)))
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("where, given, line", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_one_line_and_nothing_written(where, given, line, corpus_dir, tmp_path, capsys):
    out, before = tmp_path / "out", snapshot(corpus_dir)
    got = refusal(where, given, corpus_dir, out, capsys)
    if os.environ.get("CORPUS_RECORD"):  # CORPUS_RECORD=lines.jsonl pytest ...: the lines of new rows, to paste
        with open(os.environ["CORPUS_RECORD"], "a") as f:
            f.write(
                json.dumps(
                    {
                        "given": given if isinstance(given, str) else where,
                        "line": got.replace(str(corpus_dir), "{d}").replace(str(out), "{out}"),
                    }
                )
                + "\n"
            )
    else:
        assert got == line.format(d=corpus_dir, out=out)
    assert not out.exists() and snapshot(corpus_dir) == before


def test_the_corpus_is_large_and_covers_every_launcher():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[1] for c in CASES} == {*LAUNCHERS, "api"}


def test_rows_with_nothing_to_learn_are_counted_and_skipped(corpus_dir, tmp_path, capsys):
    """Legal but suspicious: a few rows with nothing to learn are skipped with one warning that counts them."""
    rows = [json.loads(x) for x in (corpus_dir / "data" / "good.jsonl").read_text().splitlines()]
    rows += [
        {"prompt": "a", "response": None},
        {"prompt": "b", "response": ""},
        {"prompt": "word " * 40, "response": "c"},
    ]
    _jsonl(tmp_path / "mixed.jsonl", rows)
    argv = shlex.split(TRAIN.format(out=tmp_path / "out")) + [
        "--data",
        str(tmp_path / "mixed.jsonl"),
        "--max-length",
        "16",
    ]
    assert LAUNCHERS["train"](argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: --data {str(tmp_path / 'mixed.jsonl')!r} (split 'train'): 3 of 19 rows have nothing to learn "
        "(2 with no response, 1 whose response starts after --max-length); skipped"
    ]
