"""The training loop: AdamW on the trainable (adapter) parameters, warmup + cosine schedule,
gradient clipping, a progress bar. Components know nothing of the launcher."""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .config import ConfigError
from .data import target_tokens
from .device import model_device, to_device
from .mixlora import mixlora_layers
from .modules import NonFiniteError
from .resume import ResumeError, load_training_state, save_training_state


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def parameters_to_train(model: nn.Module, lr: float) -> list[nn.Parameter]:
    """The parameters to train, once ``lr`` and the model are fit for it."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr={lr!r} must be a finite number > 0")
    params = trainable_parameters(model)
    if not params:
        raise ConfigError("the model has no trainable parameters; inject an adapter first")
    return params


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = parameters_to_train(model, lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def learning_rate_schedule(optimizer, warmup: int, steps: int, restart: int = 0):
    """transformers' warm-up then cosine decay over ``steps``; with ``restart`` (a later segment of a
    reselecting run, whose optimizer starts afresh at that step) a second warm-up from there into
    the same cosine: Adam's first steps move every parameter by about the learning rate, which at
    full rate would undo what the adapters learnt."""
    schedule = get_cosine_schedule_with_warmup(optimizer, min(warmup, steps), steps)
    if not restart:
        return schedule
    cosine = schedule.lr_lambdas[0]
    return LambdaLR(
        optimizer, lambda s: cosine(s) * (1.0 if s < restart else min(1.0, (s - restart + 1) / (warmup + 1)))
    )


def train_step(model: nn.Module, batch: dict, optimizer, scheduler, clip: float, extra_loss=None) -> float:
    """One forward + backward + optimizer step; returns the LM loss (padding/prompt ignored).
    ``extra_loss()``, if given, is added before backward (e.g. continual learning's router KL)."""
    loss = model(**batch).loss
    (loss if extra_loss is None else loss + extra_loss()).backward()
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(model), clip)
        value, norm = torch.stack([loss.detach(), norm.to(loss.device)]).tolist()  # one host sync for both
        if math.isfinite(value) and not math.isfinite(norm):  # (a NaN loss is reported by the caller)
            raise NonFiniteError(
                f"the gradient norm is {norm} at a loss of {value}: training stopped before this update, and no "
                "adapter was written (lower --lr)"
            )
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return value if clip > 0 else loss.item()


@dataclass
class Checkpointing:
    """``--save-every`` / ``--resume``: where training state goes, how often, where to resume from."""

    directory: Path | None = None
    every: int = 0
    resume: Path | None = None
    fingerprint: dict = field(default_factory=dict)  # what the run depends on; a resume must match it


def check_finite_loss(loss: float, step: int, ckpt: Checkpointing | None = None, what: str = "the loss") -> None:
    """Stop at a NaN/inf loss: the adapter it came from (or the one the update made) is garbage,
    and nothing more is saved; the last training state saved before it is named."""
    if math.isfinite(loss):
        return
    saved = sorted(ckpt.directory.glob("step_*"), key=lambda p: int(p.name[5:])) if ckpt and ckpt.directory else []
    last = f"; the last good training state is {saved[-1]} (--resume it with a lower --lr)" if saved else ""
    raise NonFiniteError(
        f"{what} is {loss} at step {step}: training stopped and no adapter was written "
        f"(lower --lr, or clip with --max-grad-norm){last}"
    )


def _run_steps(
    step,
    loader,
    steps: int,
    progress: bool,
    model,
    optimizer,
    scheduler,
    ckpt: Checkpointing | None,
    monitor=None,
    micro: int = 1,
    first_step: int = 0,
) -> list[float]:
    """Call ``step(batches) -> loss`` (``micro`` consecutive batches: gradient accumulation) until
    ``steps`` optimizer steps, cycling over ``loader``,
    with a progress bar; resumes and saves training state as ``ckpt`` asks, and hands every
    step's loss to ``monitor`` (``monitor.TrainingMonitor``: logs, periodic evaluation). Starts
    after step ``first_step`` (the data and the schedule where an earlier segment of the run left
    them), and ends early when the monitor asks for adapters on more experts
    (``monitor.grow_request``: the caller adds them and runs the rest)."""
    ckpt = ckpt or Checkpointing()
    start = first_step
    if ckpt.resume:
        start = load_training_state(ckpt.resume, model, optimizer, scheduler, ckpt.fingerprint)
    elif scheduler is not None and first_step:
        with warnings.catch_warnings():  # "step() before optimizer.step()": the schedule only catches up
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(first_step):
                scheduler.step()
    if start >= steps:
        raise ResumeError(f"--resume {ckpt.resume} is at step {start}, not before the last step {steps}")
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for _ in range(start * micro):  # the data position: the same shuffled order as an uninterrupted run
        next(batches)
    losses = []
    bar = tqdm(range(start, steps), desc="training", disable=not progress, initial=start, total=steps)
    for i in bar:
        losses.append(step([next(batches) for _ in range(micro)]))
        check_finite_loss(losses[-1], i + 1, ckpt)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        grow = monitor.after_step(i + 1, losses[-1], model) if monitor is not None else {}
        if ckpt.every and (i + 1) % ckpt.every == 0 and i + 1 < steps:
            save_training_state(ckpt.directory, model, optimizer, scheduler, i + 1, ckpt.fingerprint)
        if grow and i + 1 < steps:
            monitor.grow_request = (i + 1, grow)
            break
    return losses


def train(
    model: nn.Module,
    loader,
    steps: int,
    lr: float,
    warmup: int = 10,
    clip: float = 1.0,
    progress: bool = True,
    ckpt: Checkpointing | None = None,
    monitor=None,
    extra_loss=None,
    first_step: int = 0,
) -> list[float]:
    """Train for ``steps`` optimizer steps in one process (from ``first_step``, see ``_run_steps``);
    returns the loss of every step run."""
    optimizer = build_optimizer(model, lr)
    scheduler = learning_rate_schedule(optimizer, warmup, steps, restart=first_step)
    model.train()
    device = model_device(model)
    return _run_steps(
        lambda group: train_step(model, to_device(group[0], device), optimizer, scheduler, clip, extra_loss),
        loader,
        steps,
        progress,
        model,
        optimizer,
        scheduler,
        ckpt,
        monitor,
        first_step=first_step,
    )


def train_reselecting(train_segment, model: nn.Module, monitor, log=print, seed: int = 0) -> list[float]:
    """``train_segment(first_step) -> losses`` until the run's last step, where the drift monitor
    (``monitor.drift``, ``--reselect-on-drift``) may stop a segment to ask for adapters on newly hot
    experts: they are added (the trained ones kept; the new ones drawn from ``seed`` and the step)
    and the next segment, with a new optimizer, runs from that step. Returns every step's loss."""
    from .backends.hf import grow_expert_adapters

    losses, first = [], 0
    while True:
        losses += train_segment(first)
        if monitor is None or monitor.grow_request is None:
            return losses
        (first, grow), monitor.grow_request = monitor.grow_request, None
        grow_expert_adapters(model, grow, model.moe_peft_config, seed=seed * 100_003 + first)
        monitor.drift.grew(first, grow)
        log(f"step {first}: adapters added on newly hot experts {grow}; training goes on with a new optimizer")


def train_multi_adapter(
    model: nn.Module,
    loaders: dict,
    steps: int,
    lrs: dict[str, float],
    warmup: int = 10,
    clip: float = 1.0,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train the adapters of a multi-adapter model (``multi_adapter.add_adapter``) together:
    every step concatenates one batch of each adapter's loader into one batch that runs once
    through the frozen base; each adapter has its own loss (per token of its own samples),
    AdamW, warmup + cosine schedule (peak ``lrs[name]``) and clipping norm, so each learns
    what it would learn alone. Returns every adapter's loss per step."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from .data import IGNORE_INDEX
    from .multi_adapter import adapter_parameters

    names = list(loaders)
    params = {n: adapter_parameters(model, n) for n in names}
    optimizers = {n: torch.optim.AdamW(params[n], lr=lrs[n], weight_decay=0.0) for n in names}
    schedules = {n: get_cosine_schedule_with_warmup(optimizers[n], min(warmup, steps), steps) for n in names}
    streams = {n: itertools.chain.from_iterable(itertools.repeat(loaders[n])) for n in names}
    losses = {n: [] for n in names}
    model.train()
    device = model_device(model)
    for _ in tqdm(range(steps), desc="training", disable=not progress):
        batches = {n: to_device(next(streams[n]), device) for n in names}
        width = max(b["input_ids"].shape[1] for b in batches.values())
        pad = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}  # right padding: real tokens never see it
        batch = {
            k: torch.cat([F.pad(b[k], (0, width - b[k].shape[1]), value=v) for b in batches.values()])
            for k, v in pad.items()
        }
        owner = [n for n, b in batches.items() for _ in range(b["input_ids"].shape[0])]
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=owner
        ).logits
        total, start = 0.0, 0
        for n, b in batches.items():
            rows = slice(start, start + b["input_ids"].shape[0])
            start = rows.stop
            loss = ForCausalLMLoss(logits[rows], batch["labels"][rows], logits.shape[-1])
            losses[n].append(loss.item())
            check_finite_loss(losses[n][-1], len(losses[n]), what=f"adapter {n!r}'s loss")
            total = total + loss
        total.backward()
        for n in names:
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params[n], clip)
            optimizers[n].step()
            schedules[n].step()
            optimizers[n].zero_grad(set_to_none=True)
    return losses


def one_gradient_flush(config: dict, params: list[nn.Parameter]) -> dict:
    """``config`` with a ZeRO-1/2 gradient bucket that holds every rank's adapter gradients.

    Under expert parallelism the ranks hold different adapters (the sieve selects different
    experts on each), so a bucket that fills mid-backward would start its reduction at a
    different point on each rank, relative to the backward all-to-alls: on NCCL, collectives on
    one stream in different orders deadlock. With one bucket for everything, each rank reduces
    once, after its last all-to-all. Adapters are small, so the bucket stays small."""
    import torch.distributed as dist

    zero = config.get("zero_optimization", {})
    if zero.get("stage", 0) not in (1, 2):
        return config
    largest = torch.tensor(sum(p.numel() for p in params), device=params[0].device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    bucket = max(int(zero.get("reduce_bucket_size", 500_000_000)), int(largest))  # DeepSpeed's default: 5e8
    return {**config, "zero_optimization": {**zero, "reduce_bucket_size": bucket}}


def train_deepspeed(
    model: nn.Module,
    loader,
    steps: int,
    lr: float,
    config: dict,
    warmup: int = 10,
    progress: bool = True,
    ckpt: Checkpointing | None = None,
    monitor=None,
    extra_loss=None,
    release: bool = False,
    first_step: int = 0,
) -> list[float]:
    """Train under ``deepspeed.initialize`` (from ``first_step``, see ``_run_steps``); returns the
    loss per step, averaged over ranks.
    ``extra_loss()`` is added to each step's loss before backward; ``release`` destroys the engine
    at the end (its gradient hooks go), for a process that trains several engines one after another.

    Adapter parameters go into optimizer groups split by DeepSpeed's MoE helper, so that
    expert-local ones (tagged ``allreduce=False``) are reduced and ZeRO-sharded over the
    expert-data-parallel group; clipping follows the config's ``gradient_clipping``.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from .dispatch import clip_grad_norm_expert_parallel, expert_parallel_group

    params = parameters_to_train(model, lr)
    accumulation = config.get("gradient_accumulation_steps", 1)
    routers = [layer for _, layer in mixlora_layers(model)]  # MixLoRA layers, whose losses are weighted per step
    ep_group, clip = expert_parallel_group(model), config.get("gradient_clipping", 0.0)
    own_clipping = ep_group is not None and config.get("zero_optimization", {}).get("stage", 0) == 0 and clip > 0
    if own_clipping:  # ZeRO-0's clipping norm leaves out the experts of the other ranks; ZeRO-1/2 count them
        config = {**config, "gradient_clipping": 0.0}
    if ep_group is not None:
        config = one_gradient_flush(config, params)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": params, "name": "adapters"})
    groups = [g for g in groups if g["params"]]  # e.g. no replicated adapters at all under expert parallelism
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    if offload:  # DeepSpeed's vectorised CPU Adam (AdamW mode); DeepSpeed refuses torch's with offload
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=lr, weight_decay=0.0, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    # A factory: the schedule must drive the optimizer DeepSpeed hands back (ZeRO wraps it).
    schedule = lambda opt: learning_rate_schedule(opt, warmup, steps, restart=first_step)  # noqa: E731
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=config
    )
    engine.train()

    def step(group: list[dict]) -> float:
        """One optimizer step over ``accumulation`` micro-batches."""
        group = [to_device(b, engine.device) for b in group]
        world = dist.get_world_size()
        # Per token over the global batch of the step (every rank's micro-batches), as one process
        # would compute it: DeepSpeed averages the ranks' gradients and scales each micro-batch's
        # loss by 1/accumulation, so each micro-batch's summed loss is divided by
        # (global tokens / ranks / accumulation). MixLoRA's router losses are means over a
        # micro-batch's real tokens, weighted by its share of the step's real tokens (their
        # gradient bypasses DeepSpeed's loss scaling). One all-reduce for both counts.
        local = torch.stack([torch.stack([target_tokens(b), b["attention_mask"].sum()]) for b in group]).float()
        totals = local.sum(0)
        dist.all_reduce(totals)
        total = torch.zeros((), device=engine.device)
        for batch, (_, real) in zip(group, local):
            for layer in routers:
                layer.aux_loss_scale = real * world / totals[1]  # stays on the device
            loss = engine(**batch, num_items_in_batch=totals[0] / world / len(group)).loss
            engine.backward(loss if extra_loss is None else loss + extra_loss())  # reduced at the last one
            if own_clipping and engine.is_gradient_accumulation_boundary():
                clip_grad_norm_expert_parallel(params, clip, ep_group)
            engine.step()
            total += loss.detach()
        dist.all_reduce(total)
        return total.item() / world / len(group)  # the global batch's loss per token

    losses = _run_steps(
        step,
        loader,
        steps,
        progress and dist.get_rank() == 0,
        model,
        ds_optimizer,
        ds_scheduler,
        ckpt,
        monitor,
        micro=accumulation,
        first_step=first_step,
    )
    if release:
        engine.destroy()
    return losses
