"""``captioner train``: the training loop, in the shape of torchvision's reference scripts.

:func:`train` reads top to bottom: the run folder, the data, the model, the optimisation, resume,
then per epoch :func:`train_one_epoch`, :func:`validate` and the checkpoints. Validation decodes the
validation split for real and scores it; the best epoch by ``early_stopping_metric`` is kept in
``best/``, the latest full state in ``last/``. ``--resume`` restores model, optimiser, schedule, AMP
scaler, epoch and step, RNG states and early-stopping state, so a resumed run ends with the same
weights as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from captioner.atomic import check_replaceable, recover_directory
from captioner.data.prepare import PreparedDataset
from captioner.decoding import GenerationConfig
from captioner.errors import CaptionerError, CheckpointError, ConfigError
from captioner.evaluation import decode_split, score_split
from captioner.locking import FolderInUse, exclusive_writer
from captioner.models.captioner import Captioner, CaptionerConfig
from captioner.threads import on_free_cores
from captioner.training.config import TrainConfig
from captioner.training.data import TrainingData, load_dataset
from captioner.training.distributed import Distributed, cleanup, setup, wrap_for_ddp
from captioner.training.hard_attention import batch_reading, caption_log_likelihood, next_baseline, reinforce_term
from captioner.training.language import pretrain_language
from captioner.training.optimization import Optimization
from captioner.training.self_critical import CaptionRewards, SentenceRules, self_critical_loss
from captioner.training.state import STATE_JSON, TRAIN_CONFIG, Checkpoints, RunState, set_rng_state

VALIDATION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")


class TrainingError(CaptionerError):
    """Training cannot go on (e.g. the loss stopped being finite)."""


@dataclass(frozen=True)
class Run:
    """The fixed parts of one training run: its settings, where it runs, how it logs and saves."""

    config: TrainConfig
    dist_info: Distributed
    device: torch.device
    checkpoints: Checkpoints
    log: Callable[[str], None]


# ----- the per-step computation -----------------------------------------------------------------


class TrainingStep(nn.Module):
    """Wraps the captioner so DDP sees one forward: inputs -> {"loss", and what to log}.

    Cross-entropy steps log "cross_entropy", "attention" (the doubly stochastic term) and count
    "tokens"; a hard-attention decoder's training steps also give the summed "log_likelihood" of
    the "sampled" captions (0 and 0 in a batch that read the expected feature), for the baseline.
    Self-critical steps (``rewards`` set, ``self_critical=True``) log the mean "reward".
    """

    def __init__(self, model: Captioner, config: TrainConfig, rewards: CaptionRewards | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.rewards = rewards

    def forward(
        self,
        inputs: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        sampling_probability: float = 0.0,
        positions: list[int] | None = None,
        self_critical: bool = False,
        hard_attention_baseline: float | None = None,
    ) -> dict[str, torch.Tensor]:
        features = inputs.float() if inputs.dim() == 3 else self.model.encode(inputs)  # (N, P, D)
        decoder = self.model.decoder
        if self_critical:
            if self.rewards is None or positions is None:
                raise RuntimeError("self-critical steps need the training references' rewards and the batch's image positions")
            loss, reward = self_critical_loss(
                decoder,
                features,
                positions,
                self.rewards,
                self.model.vocab,
                samples=self.config.self_critical_samples,
                max_length=self.config.self_critical_max_length,
                rules=SentenceRules(self.model.vocab, bad_endings=self.config.block_bad_endings, doubled_words=self.config.block_doubled_words),
            )
            return {"loss": loss, "reward": reward.detach()}
        hard = self.training and decoder.config.attention == "hard"
        reading = batch_reading(self.config.hard_attention_expected) if hard else None
        logits, alphas, locations = decoder(features, captions, lengths, sampling_probability, reading)  # (B, T-1, V), (B, T-1, P), (B, T-1)
        targets = captions[:, 1 : logits.shape[1] + 1]  # (B, T-1)
        mask = targets != self.model.vocab.pad_id
        cross_entropy = F.cross_entropy(logits[mask].float(), targets[mask], label_smoothing=self.config.label_smoothing)  # fp32 under autocast
        attention_term = logits.new_zeros(())
        if alphas is not None and self.config.attention_regularization > 0:
            # Doubly stochastic regularisation (Xu et al. eq. 14): every region gets about one word's worth
            # of attention over the caption; padded steps hold zeros and add nothing.
            attention_term = self.config.attention_regularization * ((1.0 - alphas.float().sum(dim=1)) ** 2).mean()
        outputs = {"loss": cross_entropy + attention_term, "cross_entropy": cross_entropy.detach(), "attention": attention_term.detach(), "tokens": mask.sum()}
        if not hard:
            return outputs
        log_likelihood_sum = sampled = cross_entropy.new_zeros(())
        if locations is not None:  # this batch sampled its regions
            log_likelihood = caption_log_likelihood(logits, targets, mask)  # (B,)
            baseline = float(log_likelihood.mean()) if hard_attention_baseline is None else hard_attention_baseline
            outputs["loss"] = outputs["loss"] + reinforce_term(
                alphas, locations, log_likelihood, baseline,
                reinforce_weight=self.config.hard_attention_reinforce, entropy_weight=self.config.hard_attention_entropy, words=int(mask.sum()),
            )
            log_likelihood_sum, sampled = log_likelihood.sum(), cross_entropy.new_tensor(float(len(log_likelihood)))
        return {**outputs, "log_likelihood": log_likelihood_sum, "sampled": sampled}


# ----- epochs -----------------------------------------------------------------------------------


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """A Ctrl-C (SIGINT) inside the block takes effect when the block ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            os.kill(os.getpid(), signal.SIGINT)  # delivered now, to whatever handled it before


def train_one_epoch(run: Run, model: Captioner, step_module: nn.Module, data: TrainingData, optimization: Optimization, state: RunState) -> dict[str, float]:
    """One pass over this rank's batches of ``state.epoch`` (the rest of it when resuming). Returns mean losses and speed."""
    config, dist_info = run.config, run.dist_info
    batches = data.train_batches.epoch(state.epoch, skip=state.step_in_epoch)
    self_critical = state.self_critical
    sampling_probability = 0.0 if self_critical else scheduled_sampling_probability(config, state.epoch)
    step_module.train()
    sums = {"loss": 0.0, "reward": 0.0} if self_critical else {"loss": 0.0, "cross_entropy": 0.0, "attention": 0.0}
    count = captions_seen = 0
    start = time.perf_counter()
    bar = tqdm(
        total=len(data.train_batches),
        initial=state.step_in_epoch,
        desc=f"epoch {state.epoch + 1}/{config.epochs}",
        unit="batch",
        disable=not (config.progress and dist_info.is_main) or None,
        leave=False,
    )
    for batch, inputs in on_free_cores(data.inputs("train", batches, fine_tuning(config, state.epoch))):  # each step on the cores that are free
        inputs = inputs.to(run.device, non_blocking=True)
        captions, lengths = batch.captions.to(run.device), batch.lengths.to(run.device)
        with optimization.precision.autocast:
            outputs = step_module(
                inputs, captions, lengths, sampling_probability, positions=batch.positions, self_critical=self_critical, hard_attention_baseline=state.hard_attention_baseline
            )
        loss = outputs["loss"]
        all_finite = bool(dist_info.all_reduce_sum(torch.isfinite(loss.detach()).float()) == dist_info.world_size)
        if all_finite:
            optimization.backward(loss)
        else:
            check_nan_policy(config, state, loss)
        baseline = state.hard_attention_baseline
        if "sampled" in outputs:  # a hard-attention step: every rank's sampled captions move the baseline
            baseline = next_baseline(baseline, outputs["log_likelihood"], outputs["sampled"], config.hard_attention_baseline_decay, dist_info)
        # The update and the counters that record it happen together or not at all: a Ctrl-C in
        # between would save updated weights with the step not counted, and resume would repeat it.
        with interrupts_deferred():
            if all_finite:
                optimization.step()
                state.hard_attention_baseline = baseline
                for key in sums:
                    sums[key] += float(outputs[key].detach())
                count += 1
            else:
                state.skipped_steps += 1
            # captions the step learnt from: the references, or in self-critical steps the sampled ones
            captions_seen += len(batch.positions) * config.self_critical_samples if self_critical else len(captions)
            state.step_in_epoch += 1
            state.global_step += 1
        elapsed = time.perf_counter() - start
        shown = {"reward": f"{sums['reward'] / max(count, 1):.3f}"} if self_critical else {}
        bar.set_postfix(loss=f"{sums['loss'] / max(count, 1):.3f}", **shown, caps_per_s=f"{captions_seen * dist_info.world_size / max(elapsed, 1e-9):.0f}")
        bar.update(1)
        if config.save_every_steps and state.global_step % config.save_every_steps == 0:
            run.checkpoints.save_last(model, config, optimization, state)
        if config.max_steps and state.global_step >= config.max_steps:
            break
    bar.close()
    elapsed = time.perf_counter() - start
    means = {key: value / max(count, 1) for key, value in sums.items()}
    return {**means, "captions_per_second": captions_seen * dist_info.world_size / max(elapsed, 1e-9), "seconds": elapsed}


def check_nan_policy(config: TrainConfig, state: RunState, loss: torch.Tensor) -> None:
    """A step with a non-finite loss: stop (``nan_policy = "stop"``, or far too many skipped), else skip it."""
    if config.nan_policy == "stop":
        raise TrainingError(
            f"the loss became {float(loss.detach()):.4g} at epoch {state.epoch + 1}, step {state.step_in_epoch + 1}; "
            f"the last good checkpoint is in {config.out}/last (try a lower learning rate, or --set nan_policy=skip)"
        )
    if state.skipped_steps + 1 > 100 and state.skipped_steps + 1 > state.global_step // 10:
        raise TrainingError(f"{state.skipped_steps + 1} steps had a non-finite loss; stopping (last good checkpoint: {config.out}/last)")


def fine_tuning(config: TrainConfig, epoch: int) -> bool:
    """Whether the encoder trains in ``epoch`` (then steps read images, not cached features)."""
    return bool(config.fine_tune_encoder) and epoch >= config.fine_tune_from_epoch


def scheduled_sampling_probability(config: TrainConfig, epoch: int) -> float:
    if config.scheduled_sampling_start < 0 or epoch < config.scheduled_sampling_start:
        return 0.0
    rises = (epoch - config.scheduled_sampling_start) // max(config.scheduled_sampling_every, 1)
    return min(config.scheduled_sampling_max, rises * config.scheduled_sampling_increase + config.scheduled_sampling_increase)


@torch.no_grad()
def validation_loss(step_module: nn.Module, data: TrainingData, fine_tuning: bool, device: torch.device) -> float:
    """Teacher-forced cross-entropy on the validation captions (a curve to watch, not what we select on)."""
    step_module.eval()
    total = tokens = 0.0
    for batch, inputs in on_free_cores(data.inputs("val", data.val_batches.epoch(0), fine_tuning)):
        outputs = step_module(inputs.to(device), batch.captions.to(device), batch.lengths.to(device))
        total += float(outputs["cross_entropy"]) * float(outputs["tokens"])
        tokens += float(outputs["tokens"])
    return total / max(tokens, 1.0)


def validate(run: Run, model: Captioner, plain_step: TrainingStep, data: TrainingData, optimization: Optimization, state: RunState) -> dict[str, Any]:
    """The epoch's validation (on rank 0, shared with every rank): teacher-forced loss, then the
    validation images decoded for real and scored, the learning rates and a few example captions."""
    config = run.config
    record: dict[str, Any] = {}
    if run.dist_info.is_main:
        fine = fine_tuning(config, state.epoch)
        record["val_loss"] = round(validation_loss(plain_step, data, fine, run.device), 5)
        generation = GenerationConfig.for_captions(config.val_beam_size, max_length=config.max_length, return_attention=False)
        captions = decode_split(
            model, data.dataset, "val", generation,
            features=data.decoding_features("val", fine), limit=config.val_max_images, workers=config.workers, progress=config.progress,
        )
        metrics = VALIDATION_METRICS + (("METEOR",) if config.early_stopping_metric == "METEOR" else ())
        record.update({f"val_{name}": round(value, 3) for name, value in score_split(data.dataset, captions, metrics=metrics).items()})
        record["learning_rates"] = [float(f"{rate:.3g}") for rate in optimization.schedule.rates]
        record["examples"] = [captions[index].text for index in list(captions)[:3]]
    return run.dist_info.broadcast(record)


# ----- the whole run ----------------------------------------------------------------------------


def build_model(config: TrainConfig, dataset: PreparedDataset, *, word_vectors: bool = True) -> Captioner:
    model_config = CaptionerConfig(
        encoder=config.encoder,
        decoder=config.decoder,
        preprocessing=None,
        max_length=config.max_length,
        block_bad_endings=config.block_bad_endings,
        block_doubled_words=config.block_doubled_words,
    )
    model = Captioner(model_config, dataset.vocab)
    if config.image_size is not None or config.resize != model.preprocessing.resize:
        from captioner.data.images import Preprocessing

        native = model.encoder.preprocessing
        model.preprocessing = Preprocessing(
            image_size=config.image_size or native.image_size, resize=config.resize, crop_padding=native.crop_padding, mean=native.mean, std=native.std
        )
        model.config.preprocessing = model.preprocessing
    if config.word_vectors and word_vectors:  # a resumed run takes its embedding from the checkpoint instead
        from captioner.models.embeddings import load_word_vectors

        vectors, found = load_word_vectors(config.word_vectors, dataset.vocab, config.decoder.embed_dim)
        model.decoder.load_embeddings(vectors, found)
    return model


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, given: Iterable[str] | None = None) -> RunState:
    """Run (or resume) a training run described by ``config``; returns the final run state.

    When resuming, the settings in ``RESUMABLE_SETTINGS`` that ``given`` names (those the user set
    for this invocation; by default, those that differ from the defaults) replace the run's own.
    """
    dist_info, device = setup(config.device, config.distributed_timeout_minutes)
    try:
        out = Path(config.out)
        log = print if dist_info.is_main else (lambda *args, **kwargs: None)
        with one_writer(out, dist_info):
            return _train(config, out, log, resume=resume, overwrite=overwrite, given=given, dist_info=dist_info, device=device)
    finally:
        cleanup(dist_info)


def one_writer(out: Path, dist_info: Distributed) -> contextlib.ExitStack:
    """The run folder's one-writer lock, held by rank 0 for the whole run (every rank learns if it is taken)."""
    held, refused = contextlib.ExitStack(), None
    if dist_info.is_main:
        try:
            held.enter_context(exclusive_writer(out))
        except FolderInUse as error:
            refused = str(error)
    refused = dist_info.broadcast(refused)
    if refused:
        held.close()
        raise FolderInUse(refused)
    return held


def _train(config: TrainConfig, out: Path, log: Callable[[str], None], *, resume: bool, overwrite: bool, given: Iterable[str] | None, dist_info: Distributed, device: torch.device) -> RunState:
    """:func:`train` with the run folder locked."""
    resume_from = _prepare_run_folder(config, out, resume=resume, overwrite=overwrite, dist_info=dist_info)
    config = _resumed_config(json.loads((resume_from / TRAIN_CONFIG).read_text(encoding="utf-8")), config, given) if resume_from else _new_run_config(config)
    run = Run(config, dist_info, device, Checkpoints(out, dist_info), log)
    dataset = load_dataset(config)
    torch.manual_seed(config.seed + dist_info.rank)
    np.random.seed(config.seed)
    model = build_model(config, dataset, word_vectors=resume_from is None).to(device)
    # Language pretraining: only in a new run, before anything is saved (every checkpoint comes after
    # it), and on rank 0 alone; DDP gives every rank rank 0's weights when it wraps the model.
    if config.language_text and resume_from is None and dist_info.is_main:
        pretrain_language(model, config, dataset, device, log, progress=config.progress)
    optimization = Optimization.for_run(model, config, device)
    state, saved_rngs = run.checkpoints.restore(resume_from, model, optimization) if resume_from else (RunState(), None)
    if resume_from:
        # --epochs / --set patience may have been raised for the resumed run: it is finished only by them.
        state.finished = state.epoch >= config.epochs or _out_of_patience(config, state)
        log(f"resuming {out} at epoch {state.epoch + 1}, step {state.step_in_epoch} of it (global step {state.global_step})")
    if dist_info.is_main:
        config.save(out / TRAIN_CONFIG)  # a resumed run's too: it may have been given more epochs
    if state.finished:
        log(f"{out} already finished (best epoch {state.best_epoch + 1}, {config.early_stopping_metric} {state.best_score}); nothing to do")
        return state
    data = TrainingData(model, dataset, config, dist_info, device, epoch=state.epoch)
    plain_step = TrainingStep(model, config, CaptionRewards.for_split(dataset, "train") if config.self_critical_start >= 0 else None)
    # Random state last, after anything that may draw from it (building a feature cache does), so a
    # resumed run continues the interrupted one's random stream exactly.
    if saved_rngs is not None:
        set_rng_state(saved_rngs[min(dist_info.rank, len(saved_rngs) - 1)])
    else:
        torch.manual_seed(config.seed + 1000 * (dist_info.rank + 1))
    log(
        f"training {config.decoder.kind} decoder{' (hard attention)' if config.decoder.attention == 'hard' else ''} on {len(data.train_batches.images):,} images x {config.seq_per_img} captions "
        f"({len(data.train_batches)} batches/epoch{' per rank' if dist_info.enabled else ''}) on {device}"
        + (f", {dist_info.world_size} processes" if dist_info.enabled else "")
    )
    return run_epochs(run, model, plain_step, data, optimization, state)


def run_epochs(run: Run, model: Captioner, plain_step: TrainingStep, data: TrainingData, optimization: Optimization, state: RunState) -> RunState:
    """Epochs until the last one, early stopping or ``max_steps``: each trains, validates, keeps the best
    and saves ``last/``. A Ctrl-C saves ``last/`` at the batch it reached."""
    config, log = run.config, run.log
    step_module = wrap_for_ddp(plain_step, run.dist_info, run.device)
    try:
        while not state.finished:
            step_module = begin_epoch(run, model, plain_step, step_module, optimization, state)
            stats = train_one_epoch(run, model, step_module, data, optimization, state)
            if config.max_steps and state.global_step >= config.max_steps and state.step_in_epoch < len(data.train_batches):
                run.checkpoints.save_last(model, config, optimization, state)  # mid-epoch: no validation, so the resumed run matches an uninterrupted one
                log(f"stopped after max_steps={config.max_steps} steps, in epoch {state.epoch + 1}; --resume continues from here")
                return state
            record = {"epoch": state.epoch + 1, "step": state.global_step, **{f"train_{k}": round(v, 5) for k, v in stats.items()}}
            end_epoch(run, model, optimization, state, {**record, **validate(run, model, plain_step, data, optimization, state)})
            if not state.finished and config.max_steps and state.global_step >= config.max_steps:
                log(f"stopped after max_steps={config.max_steps} steps")
                return state
    except KeyboardInterrupt:
        if not run.dist_info.enabled:  # (under DDP the other ranks may be gone: keep the last epoch's checkpoint)
            run.checkpoints.save_last(model, config, optimization, state)  # nothing done is lost: resume continues from this exact batch
        log(f"interrupted; {run.checkpoints.out / 'last'} holds the latest state (resume with --resume)")
        raise
    log(f"best epoch {state.best_epoch + 1}: {config.early_stopping_metric} {state.best_score:.2f} -> {run.checkpoints.out / 'best'}")
    return state


def begin_epoch(run: Run, model: Captioner, plain_step: TrainingStep, step_module: nn.Module, optimization: Optimization, state: RunState) -> nn.Module:
    """Start the phases due at this epoch: encoder fine-tuning (DDP then wraps the encoder's
    parameters too) and self-critical training. Returns the module the steps run."""
    config = run.config
    if fine_tuning(config, state.epoch) and not model.encoder.trainable:
        model.fine_tune_encoder(config.fine_tune_encoder)
        step_module = wrap_for_ddp(plain_step, run.dist_info, run.device)  # the encoder's gradients are synchronised from now on
    if _self_critical_due(config, state):
        _start_self_critical(run, model, optimization, state)
    return step_module


def end_epoch(run: Run, model: Captioner, optimization: Optimization, state: RunState, record: dict[str, Any]) -> None:
    """Early-stopping bookkeeping, ``best/`` when the epoch improved, the schedule, the logs and ``last/``."""
    config, out = run.config, run.checkpoints.out
    score = record[f"val_{config.early_stopping_metric}"]
    improved = state.best_score is None or score > state.best_score
    if improved:
        state.best_score, state.best_epoch, state.epochs_without_improvement = score, state.epoch, 0
        run.checkpoints.save_best(model, config, record)
    else:
        state.epochs_without_improvement += 1
    optimization.schedule.after_epoch(state.epoch, score)
    state.history.append(record)
    run.log(_epoch_line(record, config, improved))
    if run.dist_info.is_main:
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        _plot_curves(out, state.history)
    state.epoch += 1
    state.step_in_epoch = 0
    stop_early = _out_of_patience(config, state)
    state.finished = stop_early or state.epoch >= config.epochs
    run.checkpoints.save_last(model, config, optimization, state)
    if stop_early:
        run.log(f"early stop: no {config.early_stopping_metric} improvement for {config.patience} epochs")


def _self_critical_due(config: TrainConfig, state: RunState) -> bool:
    """Whether the self-critical phase starts now (at the start of ``state.epoch``)."""
    if config.self_critical_start < 0 or state.self_critical or state.step_in_epoch:
        return False
    patience_spent = bool(config.patience) and state.epochs_without_improvement >= config.patience
    return state.epoch >= config.self_critical_start or patience_spent


def _out_of_patience(config: TrainConfig, state: RunState) -> bool:
    """Early stopping; cross-entropy running out of patience moves on to a pending self-critical phase instead."""
    if not config.patience or state.epochs_without_improvement < config.patience:
        return False
    return config.self_critical_start < 0 or state.self_critical


def _start_self_critical(run: Run, model: Captioner, optimization: Optimization, state: RunState) -> None:
    """Switch to self-critical training: from the best cross-entropy epoch's weights, a fresh optimiser
    at ``self_critical_lr``, the schedule and the patience counter restarted."""
    config, best = run.config, run.checkpoints.out / "best"
    source = "the current weights"
    if (best / "model.safetensors").is_file():
        model.decoder.load_state_dict(Captioner.load(best, device=model.device).decoder.state_dict())
        source = f"epoch {state.best_epoch + 1}'s weights" if state.best_epoch >= 0 else f"the weights in {best}"
    optimization.optimizer.state.clear()  # Adam's moments belong to the other loss
    optimization.schedule.restart([config.self_critical_lr] * len(optimization.optimizer.param_groups), state.epoch)
    state.self_critical = True
    state.epochs_without_improvement = 0
    run.log(f"self-critical training from epoch {state.epoch + 1} on, starting from {source}, learning rate {config.self_critical_lr:g}")


def _epoch_line(record: dict[str, Any], config: TrainConfig, improved: bool) -> str:
    metric = config.early_stopping_metric
    return (
        f"epoch {record['epoch']}: loss {record['train_loss']:.3f}"
        + (f" reward {record['train_reward']:.3f}" if "train_reward" in record else "")
        + f" val_loss {record.get('val_loss', float('nan')):.3f} "
        f"BLEU-4 {record.get('val_BLEU-4', float('nan')):.2f} CIDEr-D {record.get('val_CIDEr-D', float('nan')):.2f} "
        f"({record['train_captions_per_second']:.0f} captions/s){'  * best ' + metric if improved else ''}"
    )


# ----- the run folder and its config ------------------------------------------------------------


def _prepare_run_folder(config: TrainConfig, out: Path, *, resume: bool, overwrite: bool, dist_info: Distributed) -> Path | None:
    """Check the run folder; return the checkpoint to resume from, if resuming."""
    if not config.data and not resume:
        raise ConfigError("no training data: pass --data PREPARED_FOLDER (made by 'captioner prepare')")
    last = out / "last"
    if resume:
        if dist_info.is_main:  # checkpoints a killed process was still writing: never complete, never read
            for leftover in out.glob(".*.building"):
                shutil.rmtree(leftover, ignore_errors=True)
        if dist_info.is_main:  # a crash between the two renames of a checkpoint swap
            recover_directory(last, marker=STATE_JSON)
            recover_directory(out / "best", marker="model.safetensors")
        dist_info.barrier()
        if not (last / STATE_JSON).is_file():
            raise CheckpointError(f"nothing to resume in {out}: no {last} with a training state")
        return last
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CaptionerError(f"{out} already holds a run; pass --resume to continue it, --overwrite to start again, or another --out")
        check_replaceable(out, overwrite=True, marker=TRAIN_CONFIG, what="a training run")  # never delete a folder that is not a run
        if dist_info.is_main:
            shutil.rmtree(out)
        dist_info.barrier()
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist_info.barrier()
    return None


def _new_run_config(config: TrainConfig) -> TrainConfig:
    """A new run's config: its data (and language text) named by absolute path, so checkpoints say where their data is from any folder."""
    language_text = str(Path(config.language_text).resolve()) if config.language_text else None
    return replace(config, data=str(Path(config.data).resolve()), language_text=language_text)


#: Settings of this invocation, not of the run: a resumed run always takes them as given now.
INVOCATION_SETTINGS = ("out", "progress", "workers", "device", "max_steps")
#: Settings a resumed run may change where they are given; everything else (model, optimiser, data
#: order) is the run's own.
RESUMABLE_SETTINGS = ("epochs", "patience", "save_every_steps", "images", "data", "feature_cache", "distributed_timeout_minutes")


def _resumed_config(saved: dict[str, Any], invocation: TrainConfig, given: Iterable[str] | None) -> TrainConfig:
    """The run's own config, with this invocation's settings and the resumable ones it gives."""
    config = TrainConfig.from_dict(saved, source=TRAIN_CONFIG)
    defaults = TrainConfig()
    named = set(given) if given is not None else {name for name in RESUMABLE_SETTINGS if getattr(invocation, name) != getattr(defaults, name)}
    for name in INVOCATION_SETTINGS:
        setattr(config, name, getattr(invocation, name))
    for name in RESUMABLE_SETTINGS:
        if name in named:
            setattr(config, name, getattr(invocation, name))
    config.validate()
    return config


def _plot_curves(out: Path, history: list[dict[str, Any]]) -> None:
    """curves.png: training/validation loss and validation BLEU-4 / CIDEr-D per epoch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is a convenience; metrics.jsonl has the numbers
        return
    from captioner.atomic import write_atomic

    epochs = [r["epoch"] for r in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(epochs, [r.get("train_cross_entropy", math.nan) for r in history], "o-", label="train cross-entropy")
    left.plot(epochs, [r.get("val_loss", math.nan) for r in history], "o-", label="val cross-entropy (teacher forced)")
    left.set_xlabel("epoch")
    left.legend()
    right.plot(epochs, [r.get("val_BLEU-4", math.nan) for r in history], "o-", label="val BLEU-4")
    right.plot(epochs, [r.get("val_CIDEr-D", math.nan) for r in history], "o-", label="val CIDEr-D")
    if any("train_reward" in r for r in history):  # the self-critical phase: its reward on the same 0-100 scale
        right.plot(epochs, [100 * r.get("train_reward", math.nan) for r in history], "o--", label="train reward (sampled CIDEr-D)")
        start = next(r["epoch"] for r in history if "train_reward" in r)
        for axes in (left, right):
            axes.axvline(start - 0.5, color="grey", linestyle=":", linewidth=1)
    right.set_xlabel("epoch")
    right.legend()
    figure.tight_layout()
    write_atomic(out / "curves.png", lambda temp: figure.savefig(temp, format="png", dpi=90))
    plt.close(figure)
