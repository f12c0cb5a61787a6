"""Write the table of transformers MoE families in docs/sieve.md, from the installed transformers.

    python launch/family_table.py            # rewrites the <!-- families --> block of docs/sieve.md
    python launch/family_table.py --print    # prints the table only

Every family comes from the discovery the tests use (``backends.hf_families``): a tiny model of it
is built, its layout read, and the sieve applied with zero-initialised adapters, which must leave the
logits unchanged for the family to be listed as supported. "EP=2 tested" lists the families that
tests/test_parallel.py runs expert-parallel against one process.
"""

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: its docs and tests

import torch
import transformers
from tqdm import tqdm

from moe_peft_ds import AdapterConfig, apply_sieve_lora
from moe_peft_ds.backends.hf import find_moe_blocks, shared_experts
from moe_peft_ds.backends.hf_families import NOT_TINY, Family, discover_families, tiny_model

BLOCK = re.compile(r"(<!-- families -->\n)(.*?)(<!-- /families -->)", re.S)
# Config fields that make some decoder layers dense (no experts), as the families name them.
DENSE_FIELDS = (
    "first_k_dense_replace",
    "mlp_only_layers",
    "decoder_sparse_step",
    "mlp_layer_types",
    "num_dense_layers",
    "expert_layer_period",
    "moe_layer_freq",
    "dense_layers",
    "moe_layers",
)


def ep_tested() -> list[str]:
    """The families tests/test_parallel.py runs with EP=2 (its ``EP_FAMILIES`` literal)."""
    tree = ast.parse((ROOT / "tests" / "test_parallel.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "EP_FAMILIES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return []


def layout(family: Family) -> str:
    notes = [] if family.concatenated or not family.layout.has_gate else ["interleaved"]
    notes += [] if family.default_gate or not family.layout.has_gate else ["own gate fn"]
    return ", ".join([family.layout.describe()] + notes)


def row(family: Family, ep: list[str]) -> str:
    cells = [f"`{family.model_type}`", layout(family)]
    if family.model_type in NOT_TINY:
        return "| " + " | ".join(cells + ["", "", "", f"not built tiny: {NOT_TINY[family.model_type]}", ""]) + " |"
    model = tiny_model(family.model_type)
    blocks = find_moe_blocks(model)
    shared = [s for b in blocks for s in shared_experts(b)]
    linear = any(isinstance(m, torch.nn.Linear) for s in shared for m in s.modules())
    cells.append("nn.Linear (LoRA-able)" if linear else "fused tensors" if shared else "")
    fields = model.config.to_dict()
    dense = [f for f in DENSE_FIELDS if f in fields]
    layers = model.config.num_hidden_layers
    cells.append(f"{layers - len(blocks)} of {layers}" + (f" ({', '.join(dense)})" if dense else ""))
    kinds = sorted(set(fields.get("layer_types") or []))
    cells.append(", ".join(kinds) if len(kinds) > 1 else "")
    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        apply_sieve_lora(model, {b.layer: [0, 1] for b in blocks}, AdapterConfig(r=4))
        same = torch.allclose(model(input_ids=ids).logits, base, rtol=1e-5, atol=1e-5)
    cells.append("yes" if same else "**no**: zero adapters change the logits")
    cells.append("yes" if family.model_type in ep else "")
    return "| " + " | ".join(cells) + " |"


def table(progress: bool = True) -> str:
    families = discover_families()
    ep = ep_tested()
    head = [
        f"{len(families)} MoE families with fused experts in transformers {transformers.__version__} "
        "(written by `python launch/family_table.py`; tiny models of each: 4 layers, 8 experts, top-2).",
        "",
        "| model type | experts layout | shared experts | dense layers (tiny model) | layer kinds | sieve | EP=2 tested |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [row(f, ep) for f in tqdm(families, desc="families", disable=not progress)]
    return "\n".join(head + rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the table instead of rewriting docs/sieve.md")
    parser.add_argument(
        "--readme", type=Path, default=ROOT / "docs" / "sieve.md", help="page to rewrite (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.print:
        print(table(progress=not args.no_progress))
        return 0
    readme = args.readme.read_text() if args.readme.is_file() else ""
    if not BLOCK.search(readme):  # checked before the minute of building every family
        print(f"error: {args.readme} has no <!-- families --> ... <!-- /families --> block", file=sys.stderr)
        return 2
    text = table(progress=not args.no_progress)
    args.readme.write_text(BLOCK.sub(lambda m: m[1] + text + m[3], readme))
    print(f"wrote the table of {len(discover_families())} families into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
