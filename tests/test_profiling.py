"""Routing profiler: exact counts, padding ignored, all-reduce over ranks, report and heatmap."""

import json

import pytest
import torch
from distributed import run_ranks
from tiny_models import router_of, tiny_model

from moe_peft_ds import RoutingProfile, profile_routing
from moe_peft_ds.backends.hf import find_moe_blocks
from moe_peft_ds.profiling import format_skew, plot_heatmap


def brute_force_counts(model, batch):
    """Count routing by capturing each router's output and looping over tokens in Python."""
    blocks = find_moe_blocks(model)
    captured = {}
    handles = [
        router_of(b).register_forward_hook(lambda m, a, out, layer=b.layer: captured.__setitem__(layer, out))
        for b in blocks
    ]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    mask = batch["attention_mask"].reshape(-1).tolist()
    E = router_of(blocks[0]).num_experts
    counts, sums = {}, {}
    for layer, (_, weights, index) in captured.items():
        counts[layer], sums[layer] = [0] * E, [0.0] * E
        for t, keep in enumerate(mask):
            if keep:
                for j in range(index.shape[1]):
                    counts[layer][int(index[t, j])] += 1
                    sums[layer][int(index[t, j])] += float(weights[t, j])
    return counts, sums


def test_counts_equal_brute_force_and_ignore_padding(family, batch):
    model = tiny_model(family)
    profile = profile_routing(model, [batch], progress=False, model_id="m", data_id="d")
    counts, sums = brute_force_counts(model, batch)
    assert profile.counts == counts
    for layer in sums:
        assert profile.gate_sums[layer] == pytest.approx(sums[layer], rel=1e-6)
    real = int(batch["attention_mask"].sum())
    assert profile.tokens == real and profile.samples == 3
    assert all(sum(c) == real * profile.top_k for c in profile.counts.values())


def test_max_samples_caps_the_calibration_set(batch):
    model = tiny_model("mixtral")
    profile = profile_routing(model, [batch, batch], max_samples=4, progress=False)
    assert profile.samples == 4


def test_empty_calibration_set_fails():
    with pytest.raises(ValueError, match="calibration set is empty"):
        profile_routing(tiny_model("mixtral"), [], progress=False)


def test_save_load_report_and_heatmap(tmp_path, batch):
    profile = profile_routing(tiny_model("qwen2_moe"), [batch], progress=False, model_id="tiny", data_id="rand")
    profile.save(tmp_path / "routing_profile.json")
    raw = json.loads((tmp_path / "routing_profile.json").read_text())
    assert {"counts", "gate_sums", "tokens", "model_id", "data_id"} <= raw.keys()
    assert RoutingProfile.load(tmp_path / "routing_profile.json") == profile
    plot_heatmap(profile, tmp_path / "heat.png")
    assert (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"
    assert "coverage" in format_skew(profile)


def test_skew_statistics_on_hand_made_profile():
    uniform = RoutingProfile(
        counts={0: [5] * 8}, gate_sums={0: [1.0] * 8}, tokens=20, samples=1, num_experts=8, top_k=2
    )
    skewed = RoutingProfile(
        counts={0: [30, 10, 0, 0, 0, 0, 0, 0]}, gate_sums={0: [1.0] * 8}, tokens=20, samples=1, num_experts=8, top_k=2
    )
    assert uniform.skew()[0] == pytest.approx({"top_coverage": 0.25, "entropy": 1.0})
    assert skewed.skew()[0]["top_coverage"] == 1.0 and skewed.skew()[0]["entropy"] < 0.5


def test_corrupt_profile_file_fails(tmp_path):
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a routing profile"):
        RoutingProfile.load(tmp_path / "p.json")


def _profile_on_rank(rank, world, out_dir):
    torch.manual_seed(100 + rank)  # each rank sees its own share of the calibration data
    ids = torch.randint(1, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6 + rank :] = 0
    model = tiny_model("mixtral")  # same seed: identical weights on every rank
    local = brute_force_counts(model, {"input_ids": ids, "attention_mask": mask})[0]
    profile = profile_routing(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    torch.save({"local": local, "global": profile.counts, "tokens": profile.tokens}, f"{out_dir}/rank{rank}.pt")


def test_counts_are_all_reduced_over_ranks(tmp_path):
    run_ranks(_profile_on_rank, world=2, args=(str(tmp_path),))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["global"] == r1["global"]  # every rank selects from the same counts
    for layer in r0["local"]:
        assert r0["global"][layer] == [a + b for a, b in zip(r0["local"][layer], r1["local"][layer])]
    assert r0["tokens"] == r1["tokens"] == (10 + 6) + (10 + 7)
