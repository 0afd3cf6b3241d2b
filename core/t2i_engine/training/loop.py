"""The Lightning Fabric training loop, as a few small functions: :func:`fit`,
:func:`train_step`, :func:`validate`.

``fit`` builds Fabric from the ``[train]`` table, sets the model and AdamW up, resumes from the
latest checkpoint when asked, then repeats ``train_step`` until ``max_steps``: gradient
accumulation under ``fabric.no_backward_sync``, clipping with ``fabric.clip_gradients``, LR
warm-up/decay, the EMA update, logging, sample grids, validation and periodic checkpoints.
SIGTERM and SIGINT make it save a checkpoint and return. A NaN/inf loss skips its step; too many
in a row stop the run with :class:`~t2i_engine.errors.TrainingError`, leaving the last good
checkpoint as it was. Multi-node runs are started by Fabric's own launchers (torchrun, SLURM).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric import Fabric
from lightning_fabric.fabric import _is_using_cli
from torch import nn

from t2i_engine.checkpoint.io import load_state_dict_strict
from t2i_engine.errors import ConfigError, StorageError, TrainingError
from t2i_engine.kernels import cpu_paths
from t2i_engine.nn.checkpointing import enable_gradient_checkpointing
from t2i_engine.training.batches import batch_stream
from t2i_engine.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from t2i_engine.training.config import TrainConfig
from t2i_engine.training.ema import EMA
from t2i_engine.training.fsdp import check_fsdp, fsdp_strategy, load_fsdp, save_fsdp
from t2i_engine.training.logging import MetricsLogger, peak_memory_mb
from t2i_engine.training.lr import lr_factor
from t2i_engine.training.optim import build_optimizer
from t2i_engine.training.protocol import check_trainable, prompts_list, sample_method
from t2i_engine.utils.cpu_memory import retain_freed_memory

__all__ = ["TrainState", "build_fabric", "fit", "interrupted", "train_step", "validate"]


class TrainState:
    """The mutable state of a run that checkpoints carry besides weights."""

    def __init__(self) -> None:
        self.step = 0  # optimizer steps done
        self.batches = 0  # micro-batches this rank consumed (the data position)
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.stop_requested = False


def build_fabric(cfg: TrainConfig, *, accelerator: str | None = None) -> Fabric:
    """A Fabric for ``cfg`` (``accelerator`` overrides ``cfg.accelerator``); FSDP with full-state
    checkpoints (:mod:`t2i_engine.training.fsdp`)."""
    strategy = fsdp_strategy() if cfg.strategy == "fsdp" else cfg.strategy
    return Fabric(accelerator=accelerator or cfg.accelerator, devices=cfg.devices,
                  num_nodes=cfg.num_nodes, strategy=strategy, precision=cfg.precision)


def _prepare_model(model: nn.Module, cfg: TrainConfig) -> None:
    """Hand the gradient-checkpointing, channels_last and compile switches to the model."""
    if cfg.gradient_checkpointing:
        fn = getattr(model, "enable_gradient_checkpointing", None)
        if fn is not None:
            fn()
        elif enable_gradient_checkpointing(model) == 0:  # the shared blocks it is built of
            raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} has no "
                              "enable_gradient_checkpointing() and no block that supports it "
                              "(t2i_engine.nn.checkpointing)")
    if cfg.channels_last:
        fn = getattr(model, "to_channels_last", None)
        fn() if fn is not None else model.to(memory_format=torch.channels_last)
    if cfg.compile:
        fn = getattr(model, "compile_for_training", None)
        fn() if fn is not None else model.compile()


def _rng_state(fabric: Fabric, generator: torch.Generator) -> dict[str, Any]:
    """RNG states to checkpoint; torch states gathered from every rank (rank order)."""
    own = torch.stack([torch.get_rng_state(), generator.get_state().cpu()]) \
        if generator.device.type == "cpu" else None
    if own is not None and fabric.world_size > 1:
        own = fabric.all_gather(own.to(fabric.device)).cpu()  # (world, 2, n)
    elif own is not None:
        own = own[None]
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch_and_generator": own,
        "generator": generator.get_state().cpu(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(fabric: Fabric, state: Mapping[str, Any], generator: torch.Generator) -> None:
    stacked = state.get("torch_and_generator")
    if stacked is not None and stacked.shape[0] == fabric.world_size:
        torch.set_rng_state(stacked[fabric.global_rank, 0].clone())
        generator.set_state(stacked[fabric.global_rank, 1].clone())
    else:
        generator.set_state(state["generator"].clone())
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def train_step(fabric: Fabric, model: nn.Module, optimizer: Any, batches: Iterator[Any], *,
               cfg: TrainConfig, generator: torch.Generator, state: TrainState) -> dict[str, float] | None:
    """Run one optimizer step over ``cfg.grad_accum`` micro-batches.

    Returns the step's scalars, or None when the step was skipped because the loss (or, outside
    16-mixed, the gradient norm) was not finite. ``model`` is the Fabric-wrapped module.
    """
    losses = []
    for micro in range(cfg.grad_accum):
        batch = fabric.to_device(next(batches))
        state.batches += 1
        with fabric.no_backward_sync(model, enabled=micro < cfg.grad_accum - 1):
            with fabric.autocast():  # Fabric routes a marked method through autocast only under DDP/FSDP
                loss = model.training_loss(batch, generator=generator)
            fabric.backward(loss / cfg.grad_accum)
        losses.append(loss.detach().float())
    loss_mean = torch.stack(losses).mean()
    # One collective per step: mean loss, "some rank saw a non-finite loss", "stop requested".
    flags = torch.stack([torch.nan_to_num(loss_mean, nan=0.0, posinf=0.0, neginf=0.0),
                         (~torch.isfinite(loss_mean)).float(),
                         torch.tensor(float(state.stop_requested), device=loss_mean.device)])
    if fabric.world_size > 1:
        flags = fabric.all_reduce(flags, reduce_op="sum")
        flags[0] = flags[0] / fabric.world_size
    loss_value, nonfinite, stop = flags.tolist()
    state.stop_requested = stop > 0
    grad_norm = math.nan
    if not nonfinite:
        grad_norm = float(fabric.clip_gradients(model, optimizer,
                                                max_norm=cfg.clip_grad_norm or float("inf"),
                                                error_if_nonfinite=False))
        if cfg.precision != "16-mixed" and not math.isfinite(grad_norm):
            nonfinite = 1.0  # fp16's grad scaler skips such steps itself
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_value, "grad_norm": grad_norm}


@torch.no_grad()
def validate(fabric: Fabric, model: nn.Module, batches: Iterator[Any], *, num_batches: int,
             seed: int = 0) -> float:
    """Mean loss over ``num_batches`` batches with a fixed-seed generator (comparable across
    calls, and the training RNG is left alone); averaged over ranks."""
    generator = torch.Generator(device=fabric.device).manual_seed(seed + fabric.global_rank)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=fabric.device)
    for _ in range(num_batches):
        with fabric.autocast():
            total += model.training_loss(fabric.to_device(next(batches)), generator=generator).float()
    model.train(was_training)
    return float(fabric.all_reduce(total / num_batches, reduce_op="mean"))


@contextlib.contextmanager
def _stop_on_signals(state: TrainState) -> Iterator[None]:
    """SIGTERM/SIGINT set ``state.stop_requested``; the loop saves and returns at the next step."""
    def handler(signum: int, _frame: Any) -> None:
        state.stop_requested = True

    old = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _save(fabric: Fabric, wrapped: nn.Module, raw: nn.Module, ema: EMA | None, optimizer: Any, scheduler: Any,
          generator: torch.Generator, state: TrainState, *, checkpoint_dir: str,
          cfg: TrainConfig, hooks: Any) -> str:
    rng = _rng_state(fabric, generator)  # collective: every rank calls it
    train_state = {"step": state.step, "batches": state.batches, "rng": rng, "world_size": fabric.world_size,
                   "nonfinite_total": state.nonfinite_total}
    path, error = "", None
    try:
        if cfg.strategy == "fsdp":  # collective: Fabric gathers the full state onto rank 0
            path = save_fsdp(fabric, wrapped, optimizer, scheduler, train_state, checkpoint_dir=checkpoint_dir,
                             step=state.step, keep_last=cfg.keep_last)
        elif fabric.global_rank == 0:
            train_state |= {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            path = save_checkpoint(checkpoint_dir, state.step, model_state=raw.state_dict(),
                                   ema_state=None if ema is None else ema.state_dict(),
                                   train_state=train_state, keep_last=cfg.keep_last)
    except StorageError as exc:  # rank 0's disk fault: every rank stops with it, none waits
        error = exc
    failed = fabric.broadcast(str(error or "")) if fabric.world_size > 1 else str(error or "")
    if failed:
        raise error or StorageError(failed)
    if fabric.global_rank == 0 and hooks is not None:
        hooks.on_checkpoint_saved(step=state.step, path=path)
    fabric.barrier()
    return path


def fit(model: nn.Module, dataset: Any, train_config: TrainConfig, *, output_dir: str | Path,
        seed: int, hooks: Any = None, val_dataset: Any = None, fabric: Fabric | None = None,
        checkpoint_dir: str | None = None, collate_fn: Any = None,
        copy_ema: bool = False) -> dict[str, Any]:
    """Train ``model`` (a :class:`~t2i_engine.training.protocol.TrainableModel`) on ``dataset``.

    Args:
        model: the module to train; its ``training_loss`` is routed through Fabric.
        dataset: a map-style or iterable dataset of sample dicts.
        train_config: the validated ``[train]`` table.
        output_dir: local folder for ``metrics.jsonl`` and ``tensorboard/``.
        seed: base seed; rank ``r`` draws its noise from a generator seeded ``seed + r``.
        hooks: the pluggy hook relay (``on_train_step_end``, ``on_checkpoint_saved``), or None.
        val_dataset: optional dataset for :func:`validate` every ``val_every`` steps.
        fabric: a ready Fabric (tests); by default one is built from ``train_config``.
        checkpoint_dir: fsspec URL of the checkpoints (default ``<output_dir>/checkpoints``).
        collate_fn: batch collation (default ``torch.utils.data.default_collate``).
        copy_ema: with ``train.ema`` on, copy the EMA weights into ``model`` after the final
            checkpoint (the checkpoint keeps both), so that sampling and export from ``model``
            use them. Off by default: the model keeps its training weights.

    Returns:
        ``{"step", "checkpoint", "interrupted", "nonfinite_skipped", "skipped_samples",
        "first_skipped", "loss"}``: ``skipped_samples`` counts this rank's distinct corrupt samples,
        ``first_skipped`` names the first five.
    """
    cfg = train_config
    check_trainable(model)
    output_dir = Path(output_dir)
    checkpoint_dir = checkpoint_dir or str(output_dir / "checkpoints")
    check_fsdp(cfg, device_type=None if fabric is None else fabric.device.type, checkpoint_dir=checkpoint_dir)
    fabric = fabric or build_fabric(cfg)
    if fabric.device.type == "cpu":
        cpu_paths.select()  # this machine's CPU paths (the oneDNN training linear): cached, timed once
        retain_freed_memory()  # else every step page-faults its freed activations back in (docs/training.md)
    if not _is_using_cli():  # under `fabric run` the CLI has launched the processes already
        fabric.launch()  # a no-op when already launched
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    rank, world = fabric.global_rank, fabric.world_size
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    generator = torch.Generator(device=fabric.device).manual_seed(seed + rank)

    _prepare_model(model, cfg)
    wrapped = fabric.setup_module(model)
    wrapped.mark_forward_method("training_loss")
    raw = model
    optimizer = build_optimizer(raw.trainable_parameters(), cfg)  # type: ignore[operator]
    optimizer = fabric.setup_optimizers(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, schedule=cfg.lr_schedule,
        min_ratio=cfg.min_lr_ratio))
    ema = EMA(raw, decay=cfg.ema_decay, start=cfg.ema_start, interval=cfg.ema_interval) \
        if cfg.ema else None

    state = TrainState()
    if cfg.resume and (last := latest_checkpoint(checkpoint_dir)) is not None:
        if cfg.strategy == "fsdp":
            ts = load_fsdp(fabric, wrapped, optimizer, scheduler, checkpoint_dir=checkpoint_dir, step=last)
        else:
            model_state, ema_state, ts = load_checkpoint(checkpoint_dir, last, with_ema=ema is not None)
            load_state_dict_strict(raw, model_state, source=f"{checkpoint_dir} step {last}")
            if ema is not None and ema_state is not None:
                ema.load_state_dict(ema_state)
            optimizer.load_state_dict(ts["optimizer"])
            scheduler.load_state_dict(ts["scheduler"])
        _restore_rng(fabric, ts["rng"], generator)
        state.step, state.batches = ts["step"], ts["batches"]
        state.nonfinite_total = ts.get("nonfinite_total", 0)
        if ts.get("world_size") != world:
            fabric.print(f"resuming a {ts.get('world_size')}-process run on {world}: "
                         "data order and noise will differ from an uninterrupted run")

    tally = getattr(dataset, "bad_samples", None)  # corrupt samples, counted once (data/bad_samples.py)
    if tally is not None:
        tally.max_fraction = cfg.max_bad_sample_fraction
    batches = batch_stream(dataset, batch_size=cfg.batch_size, rank=rank, world_size=world,
                           seed=seed, start_batch=state.batches, num_workers=cfg.num_workers,
                           collate_fn=collate_fn, pin_memory=fabric.device.type == "cuda")
    val_batches = None
    if val_dataset is not None and cfg.val_every:
        val_batches = batch_stream(val_dataset, batch_size=cfg.batch_size, rank=rank,
                                   world_size=world, seed=seed + 1, start_batch=0,
                                   collate_fn=collate_fn)
    logger = MetricsLogger(output_dir, enabled=rank == 0, total_steps=cfg.max_steps,
                           initial_step=state.step, progress_bar=cfg.progress_bar)
    sampler_fn = sample_method(raw)
    samples_per_step = cfg.batch_size * cfg.grad_accum * world
    last_saved = state.step if cfg.resume else -1
    metrics: dict[str, float] = {}
    wrapped.train()
    try:
        with _stop_on_signals(state):
            while state.step < cfg.max_steps:
                t0 = time.perf_counter()
                out = train_step(fabric, wrapped, optimizer, batches, cfg=cfg,
                                 generator=generator, state=state)
                if out is None:
                    state.nonfinite_in_a_row += 1
                    state.nonfinite_total += 1
                    fabric.print(f"step {state.step + 1}: non-finite loss or gradient, step "
                                 f"skipped ({state.nonfinite_in_a_row} in a row)")
                    if state.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                        raise TrainingError(
                            f"{state.nonfinite_in_a_row} non-finite losses in a row at step "
                            f"{state.step + 1} (train.max_nonfinite_in_a_row = "
                            f"{cfg.max_nonfinite_in_a_row}); stopping. The last good checkpoint "
                            f"in {checkpoint_dir} is intact; lower train.lr or use more precision.")
                    if state.stop_requested:
                        break
                    continue
                state.nonfinite_in_a_row = 0
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                state.step += 1
                if ema is not None:
                    ema.update(raw, state.step)
                dt = time.perf_counter() - t0
                metrics = {**out, "lr": lr, "step_time": dt, "samples_per_sec": samples_per_step / dt,
                           "peak_memory_mb": peak_memory_mb(fabric.device),
                           "nonfinite_skipped": float(state.nonfinite_total)}
                if tally is not None:
                    metrics["skipped_samples"] = float(tally.bad)
                if rank == 0 and hooks is not None:
                    hooks.on_train_step_end(step=state.step, metrics=metrics)
                if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                    logger.log_scalars(state.step, metrics)
                logger.advance()
                if cfg.sample_every and sampler_fn is not None and cfg.sample_prompts \
                        and state.step % cfg.sample_every == 0 and rank == 0:
                    g = torch.Generator(device=fabric.device).manual_seed(cfg.sample_seed)
                    with torch.no_grad(), (ema.swapped_into(raw) if ema is not None
                                           else contextlib.nullcontext()):
                        images = sampler_fn(prompts_list(cfg.sample_prompts), generator=g)
                    logger.log_images(state.step, "samples", images)
                if val_batches is not None and state.step % cfg.val_every == 0:
                    with (ema.swapped_into(raw) if ema is not None else contextlib.nullcontext()):
                        val = validate(fabric, wrapped, val_batches, num_batches=cfg.val_batches,
                                       seed=seed)
                    logger.log_scalars(state.step, {"val/loss": val})
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    _save(fabric, wrapped, raw, ema, optimizer, scheduler, generator, state,
                          checkpoint_dir=checkpoint_dir, cfg=cfg, hooks=hooks)
                    last_saved = state.step
                if state.stop_requested:  # agreed by every rank in train_step
                    break
            if state.step != last_saved:
                _save(fabric, wrapped, raw, ema, optimizer, scheduler, generator, state,
                      checkpoint_dir=checkpoint_dir, cfg=cfg, hooks=hooks)
        skipped = tally.summary() if tally is not None else {"skipped_samples": 0, "first_skipped": []}
        if skipped["skipped_samples"]:
            logger.log_text(state.step, "data/skipped_samples",
                            f"{skipped['skipped_samples']} corrupt samples skipped (this rank); first: "
                            + ", ".join(f"`{k}`" for k in skipped["first_skipped"]))
    finally:
        logger.close()
    if copy_ema and ema is not None:
        ema.copy_to(raw)
    return {"step": state.step, "checkpoint": checkpoint_dir,
            "interrupted": state.step < cfg.max_steps,
            "nonfinite_skipped": state.nonfinite_total, **skipped, "loss": metrics.get("loss", math.nan)}


def interrupted(summary: Mapping[str, Any]) -> bool:
    """Whether ``summary`` (what :func:`fit` returns) is of a run stopped before ``max_steps``
    (SIGTERM, preemption). Its checkpoints hold the progress but its model is partial: a training
    task then writes no export (a partial model must not replace a finished one) and returns;
    resuming the job finishes the run and exports.

    Raises:
        TrainingError: ``summary`` has no ``"interrupted"`` key (``fit`` always returns it: a loop,
            or a stand-in for one, that does not is a bug, and its run must not count as finished).
    """
    if "interrupted" not in summary:
        raise TrainingError(f"the training loop's summary has no 'interrupted' key (it has {sorted(summary)}); "
                            "fit() always returns it, so a stand-in for fit must too")
    return bool(summary["interrupted"])
