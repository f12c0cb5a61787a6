"""The non-finite guard: an inf/NaN gradient stops training before the update; a training state
whose adapter went NaN is never written, so the last one saved is always good to resume."""

import pytest
import torch

from moe_peft_ds import AdapterConfig, apply_sieve_lora
from moe_peft_ds.data import load_examples, make_train_loader
from moe_peft_ds.models import load_model
from moe_peft_ds.modules import NonFiniteError
from moe_peft_ds.train import Checkpointing, train


def _model_with_inf_gradient_at(step: int):
    """A sieve model whose first adapter gets an inf gradient at the ``step``-th backward."""
    model, tok = load_model("tiny-mixtral")
    apply_sieve_lora(model, {0: [1, 2]}, AdapterConfig())
    first = next(p for p in model.parameters() if p.requires_grad)
    calls = []
    first.register_hook(lambda g: g * float("inf") if len(calls.append(1) or calls) == step else g)
    loader = make_train_loader(load_examples("demo:arithmetic", tok, 32), tok, 2)
    return model, loader


def test_an_inf_gradient_stops_training_before_the_update():
    model, loader = _model_with_inf_gradient_at(3)
    with pytest.raises(
        NonFiniteError, match=r"^the gradient norm is (inf|nan) at a loss of [0-9.]+: training stopped"
    ):
        train(model, loader, 5, 1e-3, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad update never happened


def test_a_state_whose_adapter_went_nan_is_never_saved(tmp_path):
    """Without clipping (no norm computed) the inf gradient reaches AdamW and the adapter goes NaN
    at step 2 with a finite loss; the state of step 2 is refused and step 1's is the last one."""
    model, loader = _model_with_inf_gradient_at(2)
    ckpt = Checkpointing(tmp_path / "checkpoints", every=1)
    with pytest.raises(
        NonFiniteError,
        match=r"adapter parameters hold NaN or inf after step 2, training stopped \(a NaN/inf gradient\?\)",
    ):
        train(model, loader, 5, 1e-3, clip=0.0, progress=False, ckpt=ckpt)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1"]
