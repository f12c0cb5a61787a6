"""Expert parallelism on 2 GPUs under NCCL (rank r on cuda:r): EP=2 equals one process (the
CUDA version of tests/test_parallel.py's gloo tests), and ``deepspeed --num_gpus 2
launch/train.py --ep-size 2`` end to end. Skipped with fewer than 2 GPUs.

Tolerances (fp32, TF32 off): loss and logits within atol 1e-5 / rtol 1e-4, gradients within
rtol 1e-4. The gloo tests hold 1e-5/1e-6 on the CPU; on CUDA the order of floating-point sums
is not fixed: ``index_add_`` (the combine of expert outputs, the backward of row gathers)
accumulates with atomics, the sharded experts' GEMMs see different row counts (and so
different kernels and tilings) than the unsharded ones, and NCCL's all-reduce adds the ranks'
gradients in its own order.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks

from moe_peft_ds.dispatch import ep_group_name
from moe_peft_ds.parallel import shard_experts

from .common import SELECTED, assert_grads_close, launch, make_batch, mixlora_model, sieve_model, to

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def _model(kind: str) -> torch.nn.Module:
    if kind != "mixlora":
        return sieve_model(kind)
    from test_mixlora import randomize

    model = mixlora_model("mixlora")
    randomize(model)
    return model.train()


def _ep_on_rank(rank, world, kind, out_dir, device_type="cuda"):
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device(device_type)
    model = _model(kind)  # identical on both ranks (same seeds), built on the CPU
    reference = copy.deepcopy(model).to(device)
    ref_outs = [reference(**to(make_batch(10 + r), device)) for r in range(world)]
    sum(out.loss for out in ref_outs).backward()  # one process over both ranks' batches
    shard_experts(model, dist.group.WORLD)  # as launch/train.py does: shard on the CPU, then move
    model.to(device)
    out = model(**to(make_batch(10 + rank), device))
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            if getattr(p, "allreduce", True):  # replicated: the data-parallel sum over the ranks
                dist.all_reduce(p.grad)
            grads[name] = p.grad.cpu()
    torch.save(
        {
            "loss": out.loss.item(),
            "ref_loss": ref_outs[rank].loss.item(),
            "logits": out.logits.detach().cpu(),
            "ref_logits": ref_outs[rank].logits.detach().cpu(),
            "grads": grads,
            "ref_grads": {n: p.grad.cpu() for n, p in reference.named_parameters() if p.grad is not None},
            "tags": {n: getattr(p, "group_name", None) for n, p in model.named_parameters() if p.requires_grad},
            "devices": sorted({str(p.device) for p in model.parameters()}),
        },
        f"{out_dir}/rank{rank}.pt",
    )


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "mixlora"])
def test_ep2_under_nccl_equals_one_process(tmp_path, kind):
    run_ranks(_ep_on_rank, world=2, args=(kind, str(tmp_path)), timeout_s=120, backend="nccl")
    check_ep2(tmp_path, kind, [f"cuda:{rank}" for rank in range(2)])


def check_ep2(out_dir, kind: str, devices: list[str]) -> None:
    """Each rank's loss, logits and gradients (``_ep_on_rank``'s files) against one process."""
    for rank in range(2):
        r = torch.load(out_dir / f"rank{rank}.pt", weights_only=True)
        assert r["devices"] == [devices[rank]]
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-4, abs=1e-5)
        torch.testing.assert_close(r["logits"], r["ref_logits"], rtol=1e-4, atol=1e-5)
        expected, local = {}, set()
        for name in r["grads"]:
            ref = r["ref_grads"][name.replace(".local.adapters.", ".adapters.")]
            if ".local.adapters." in name:  # sieve: this rank's selected experts of 0-3 / 4-7
                ref = ref[[SELECTED.index(e) for e in SELECTED if rank * 4 <= e < rank * 4 + 4]]
                local.add(name)
            elif ".adapter.lora." in name:  # MixLoRA: this rank's two LoRA experts of four
                ref = ref[2 * rank : 2 * rank + 2]
                local.add(name)
            expected[name] = ref
        assert local, "no expert-local gradients"
        if kind != "mixtral":  # shared-expert LoRA (qwen2_moe), router and attention LoRA (MixLoRA): replicated
            assert len(local) < len(expected), "no replicated gradients"
        assert all(r["tags"][n] == ep_group_name(2) for n in local)
        assert_grads_close(r["grads"], expected, rtol=1e-4, what=f"{kind} EP=2 rank {rank}")


def test_deepspeed_launcher_sieve_ep2_zero2_fp32_on_two_gpus(tmp_path):
    """The profile's all-reduce, the dispatch's all-to-alls and ZeRO-2's reductions under NCCL."""
    run_ = launch(
        tmp_path / "ep2",
        "--model",
        "tiny-mixtral",
        "--method",
        "sieve",
        "--sieve-fraction",
        "0.25",
        "--data",
        "demo:arithmetic",
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--calibration-samples",
        "64",
        "--ep-size",
        "2",
        "--deepspeed_config",
        "ds_configs/zero2_fp32.json",
        ranks=2,
    )
    assert run_["log"]["world_size"] == 2 and len(run_["log"]["losses"]) == 4
    selection = {(int(layer), e) for layer, ids in run_["config"]["selection"].items() for e in ids}
    saved = {(int(k.split(".")[1]), int(k.split(".")[3])) for k in run_["weights"]}
    assert saved == selection  # the selected experts of both ranks (0-7 and 8-15), gathered into one file
    assert len(run_["weights"]) == len(selection) * 2 * 2  # x (gate_up_proj, down_proj) x (A, B)
