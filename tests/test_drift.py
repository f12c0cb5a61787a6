"""The routing-drift monitor (``--reprofile-every``): its measures, that it fires on a router
perturbed on purpose and stays quiet on an untouched one, and growing adapters on newly hot
experts (``--reselect-on-drift``), in one process, expert-parallel and from the command line."""

import copy
import json
import runpy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import randomize_adapters
from distributed import run_ranks
from safetensors.torch import load_file
from tiny_models import tiny_model

from moe_peft_ds import AdapterConfig, apply_sieve_lora, save_adapter
from moe_peft_ds.backends.hf import find_moe_blocks, grow_expert_adapters
from moe_peft_ds.drift import RoutingDrift, coverage, falling_layers, hottest, jaccard, newly_hot
from moe_peft_ds.parallel import shard_experts
from moe_peft_ds.profiling import profile_routing

ROOT = Path(__file__).resolve().parents[1]


def test_measures():
    counts = [50, 5, 30, 15]
    assert coverage(counts, [0, 2]) == 0.8 and coverage([0, 0], [0]) == 0.0
    assert hottest(counts, 2) == [0, 2] and hottest([3, 3, 3, 1], 2) == [0, 1]  # ties: the lower id
    assert jaccard([0, 2], [0, 2]) == 1.0 and jaccard([0, 1], [0, 2]) == pytest.approx(1 / 3)
    record = {"drift/coverage/layer_3": 0.55, "drift/coverage_start/layer_3": 0.7, "drift/coverage/layer_1": 0.69}
    record["drift/coverage_start/layer_1"] = 0.7
    assert falling_layers(record, 10.0) == {3: (0.7, 0.55)}
    assert falling_layers(record, 20.0) == {}


def test_a_restarted_optimizer_warms_up_again_into_the_same_cosine():
    from moe_peft_ds.train import learning_rate_schedule

    def rates(restart):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = learning_rate_schedule(opt, 10, 100, restart=restart)
        seen = []
        for _ in range(100):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.step()
        return seen

    plain, restarted = rates(0), rates(40)
    assert restarted[:40] == plain[:40]
    assert restarted[40] == pytest.approx(plain[40] / 11) and restarted[45] == pytest.approx(plain[45] * 6 / 11)
    assert restarted[50:] == pytest.approx(plain[50:])


def _batches(n=4):
    g = torch.Generator().manual_seed(5)
    return [
        {"input_ids": torch.randint(1, 97, (4, 12), generator=g), "attention_mask": torch.ones(4, 12)}
        for _ in range(n)
    ]


SELECTION = {0: [1, 2], 1: [5, 6]}


def _watched(model, messages):
    batches = _batches()
    baseline = profile_routing(model, batches, progress=False)
    selection = {layer: hottest(baseline.counts[layer], 2) for layer in baseline.counts}
    apply_sieve_lora(model, selection, AdapterConfig(r=4))
    return RoutingDrift(1, lambda: batches, selection, baseline, warn_points=10.0, reselect=True, log=messages.append)


def test_an_untouched_router_stays_quiet_and_a_perturbed_one_is_reported():
    messages = []
    model = tiny_model("mixtral")
    drift = _watched(model, messages)
    record, grow = drift.measure(1, model)
    assert grow == {} and not messages and "drift/warned_layers" not in record
    for layer in drift.selection:  # LoRA B = 0: the routing is exactly the profile's
        assert record[f"drift/coverage/layer_{layer}"] == record[f"drift/coverage_start/layer_{layer}"]
        assert record[f"drift/jaccard/layer_{layer}"] == 1.0
    # Perturb layer 1's router: the selected experts' rows become the scores of two cold ones.
    gate = model.model.layers[1].mlp.gate.weight
    chosen = drift.selection[1]
    cold = [e for e in range(gate.shape[0]) if e not in chosen][:2]
    with torch.no_grad():
        gate[chosen + cold] = gate[cold + chosen].clone()
    record, grow = drift.measure(2, model)
    assert record["drift/warned_layers"] == [1]
    assert record["drift/coverage/layer_1"] < record["drift/coverage_start/layer_1"] - 0.1
    assert record["drift/jaccard/layer_1"] < 1.0 and record["drift/jaccard/layer_0"] == 1.0
    assert len(messages) == 1 and "layer 1" in messages[0] and "step 2" in messages[0]
    assert grow == newly_hot(profile_routing(model, _batches(), progress=False), drift.selection, [1])
    assert grow[1] and not set(grow[1]) & set(chosen)
    assert [r["step"] for r in drift.history] == [0, 1, 2]


def _logits(model, seed=3):
    ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_growing_keeps_the_trained_adapters_and_the_output():
    model = tiny_model("mixtral")
    apply_sieve_lora(model, SELECTION, AdapterConfig(r=4))
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    reference = _logits(model)
    grow_expert_adapters(model, {1: [0, 7]}, model.moe_peft_config)
    assert model.moe_peft_config.selection == {0: [1, 2], 1: [0, 5, 6, 7]}
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=0)  # new B = 0
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert all(torch.equal(before[k], state[k]) for k in before if ".layers.0." in k)
    adapter = find_moe_blocks(model)[1].experts.adapters["down_proj"]
    assert adapter.expert_ids == [0, 5, 6, 7] and adapter.lora_A.requires_grad
    old = find_moe_blocks(copy.deepcopy(model))[1].experts.adapters["down_proj"]
    assert torch.equal(old.lora_B[[0, 3]], torch.zeros_like(old.lora_B[[0, 3]]))


def _grow_on_rank(rank, world, out_dir):
    torch.manual_seed(0)
    model = tiny_model("mixtral")
    apply_sieve_lora(model, SELECTION, AdapterConfig(r=4))
    randomize_adapters(model)
    shard_experts(model, dist.group.WORLD, {1: [[0, 2, 5, 7], [1, 3, 4, 6]]})
    torch.manual_seed(1 + rank)  # the generators differ from rank to rank: the growth draws from its seed
    grow_expert_adapters(model, {1: [0, 3, 7]}, model.moe_peft_config, seed=4)
    local = find_moe_blocks(model)[1].experts.local
    assert local.expert_ids == [[0, 5, 7], [3, 6]][rank]
    assert all(getattr(p, "allreduce", True) is False for p in local.parameters())  # tagged expert-local
    save_adapter(model, f"{out_dir}/ep2")


def test_growing_expert_parallel_equals_one_process(tmp_path):
    run_ranks(_grow_on_rank, world=2, args=(str(tmp_path),))
    torch.manual_seed(0)
    model = tiny_model("mixtral")
    apply_sieve_lora(model, SELECTION, AdapterConfig(r=4))
    randomize_adapters(model)
    torch.manual_seed(99)
    grow_expert_adapters(model, {1: [0, 3, 7]}, model.moe_peft_config, seed=4)
    save_adapter(model, tmp_path / "single")
    single, ep2 = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("single", "ep2"))
    assert single.keys() == ep2.keys() and all(torch.equal(single[k], ep2[k]) for k in single)


train_main = runpy.run_path(str(ROOT / "launch" / "train.py"), run_name="not_main")["main"]
BASE = ["--model", "tiny-mixtral", "--data", "demo:arithmetic", "--no-progress", "--calibration-samples", "32"]
DRIFTING = ["--attention-lora", "q_proj", "k_proj", "v_proj", "o_proj", "--lr", "1e-2", "--max-steps", "12"]


@pytest.mark.slow
def test_the_command_logs_drift_and_grows_adapters(tmp_path):
    out = tmp_path / "run"
    # any fall of coverage counts (0.001 points): the attention LoRA at this learning rate moves routing
    flags = ["--reprofile-every", "4", "--reselect-on-drift", "--drift-warn", "0.001"]
    assert train_main(BASE + DRIFTING + flags + ["--output-dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    drift = [r for r in records if r.get("event") == "routing_drift"]
    assert [r["step"] for r in drift] == [0, 4, 8, 12]
    log = json.loads((out / "train_log.json").read_text())
    assert log["reselections"] and len(log["losses"]) == 12 and log["reprofile_seconds"] > 0
    assert not log["evaluations"]
    grown = {int(k): v for g in log["reselections"] for k, v in g["experts"].items()}
    config = json.loads((out / "adapter_config.json").read_text())
    weights = load_file(str(out / "adapter_model.safetensors"))
    for layer, experts in grown.items():
        assert set(experts) <= set(config["selection"][str(layer)])
        assert all(f"layers.{layer}.experts.{e}.down_proj.lora_B" in weights for e in experts)
    assert log["sizes"]["selected_experts"] == sum(map(len, config["selection"].values()))
    assert (out / "routing_drift.png").stat().st_size > 0


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--reselect-on-drift"], "needs --reprofile-every"),
        (["--reprofile-every", "-1"], "--reprofile-every=-1"),
        (["--reprofile-every", "2", "--drift-warn", "0"], "--drift-warn=0.0"),
        (["--reprofile-every", "2", "--method", "lora"], "has none"),
        (["--reprofile-every", "2", "--reselect-on-drift", "--save-every", "2"], "cannot replay"),
        (["--expert-placement", "balanced"], "needs --ep-size > 1"),
    ],
)
def test_bad_drift_and_placement_flags_fail_clearly_and_write_nothing(tmp_path, capsys, flags, match):
    out = tmp_path / "run"
    assert train_main(BASE + ["--output-dir", str(out), "--max-steps", "2"] + flags) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()
