"""``captioner train``: the training loop, in the shape of torchvision's reference scripts.

``train`` sets everything up and runs epochs of ``train_one_epoch`` then ``validate``. Validation
decodes the validation split for real and scores it; the best epoch by ``early_stopping_metric``
is kept in ``best/``, the latest full state in ``last/``. ``--resume`` restores model, optimiser,
schedule, AMP scaler, epoch and step, RNG states and early-stopping state, so a resumed run ends with
the same weights as one that was never interrupted.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.atomic import check_replaceable, recover_directory
from captioner.data.prepare import PreparedDataset
from captioner.decoding import GenerationConfig
from captioner.errors import CaptionerError, CheckpointError, ConfigError
from captioner.models.captioner import Captioner, CaptionerConfig
from captioner.models.decoder import repeat_state, sort_by_length
from captioner.training.batching import Batch, CaptionBatches
from captioner.training.config import TrainConfig
from captioner.training.distributed import Distributed, cleanup, setup
from captioner.training.evaluation import decode_split, score_split, split_features
from captioner.training.features import ImageFiles, raise_image_errors
from captioner.training.schedule import LearningRateSchedule
from captioner.training.self_critical import CaptionRewards, self_critical_loss
from captioner.training.state import STATE_JSON, dump_state, load_state, rng_state, set_rng_state

VALIDATION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")
TRAIN_CONFIG = "train_config.json"
#: Batches -> (batch, its inputs): cached features (N, P, D) or images (N, 3, S, S), in batch order.
InputLoader = Callable[[list[Batch]], Iterator[tuple[Batch, torch.Tensor]]]


class TrainingError(CaptionerError):
    """Training cannot go on (e.g. the loss stopped being finite)."""


@dataclass
class RunState:
    """Counters and early-stopping state: everything about progress that is not a tensor."""

    epoch: int = 0  # the epoch being run (0-based)
    step_in_epoch: int = 0  # batches of this epoch already done
    global_step: int = 0
    best_score: float | None = None
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    skipped_steps: int = 0  # steps skipped for a non-finite loss
    self_critical: bool = False  # the self-critical phase has started
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


# ----- the per-step computation -----------------------------------------------------------------


class TrainingStep(nn.Module):
    """Wraps the captioner so DDP sees one forward: inputs -> {"loss", and what to log}.

    Cross-entropy steps log "cross_entropy", "attention" (the doubly stochastic term) and count
    "tokens"; self-critical steps (``rewards`` set, ``self_critical=True``) log the mean "reward".
    """

    def __init__(self, model: Captioner, config: TrainConfig, rewards: CaptionRewards | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.label_smoothing = config.label_smoothing
        self.attention_regularization = config.attention_regularization
        self.rewards = rewards

    def forward(
        self,
        inputs: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        seq_per_img: int,
        sampling_probability: float = 0.0,
        positions: list[int] | None = None,
        self_critical: bool = False,
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
            )
            return {"loss": loss, "reward": reward.detach()}
        if sampling_probability > 0:
            logits, alphas = scheduled_sampling_forward(decoder, features, captions, lengths, seq_per_img, sampling_probability)
        else:
            logits, alphas = decoder(features, captions, lengths, seq_per_img)  # (B, T-1, V), (B, T-1, P)
        targets = captions[:, 1 : logits.shape[1] + 1]  # (B, T-1)
        mask = targets != self.model.vocab.pad_id
        cross_entropy = F.cross_entropy(logits[mask].float(), targets[mask], label_smoothing=self.label_smoothing)  # fp32 under autocast
        attention_term = logits.new_zeros(())
        if alphas is not None and self.attention_regularization > 0:
            # Doubly stochastic regularisation (Xu et al. eq. 14): every region gets about one word's worth
            # of attention over the caption; padded steps hold zeros and add nothing.
            attention_term = self.attention_regularization * ((1.0 - alphas.float().sum(dim=1)) ** 2).mean()
        return {"loss": cross_entropy + attention_term, "cross_entropy": cross_entropy.detach(), "attention": attention_term.detach(), "tokens": mask.sum()}


def scheduled_sampling_forward(decoder, features, captions, lengths, seq_per_img, probability):
    """Teacher forcing where each input word is, with ``probability``, the model's own sampled word
    from the previous step instead of the true one (Bengio et al. 2015). Only real steps run."""
    state = repeat_state(decoder.init_state(features), seq_per_img)
    steps = (lengths - 1).clamp(min=0)
    order, inverse = sort_by_length(steps)
    state = {key: value[order] for key, value in state.items()}
    sorted_captions = captions[order]
    sorted_steps = steps[order].tolist()
    total = sorted_steps[0] if sorted_steps else 0
    batch = captions.shape[0]
    logits = features.new_zeros(batch, total, decoder.vocab_size)
    alphas = features.new_zeros(batch, total, features.shape[1]) if decoder.has_attention else None
    previous: torch.Tensor | None = None
    active = batch
    for t in range(total):
        while active > 0 and sorted_steps[active - 1] <= t:
            active -= 1
        state = {key: value[:active] for key, value in state.items()}
        tokens = sorted_captions[:active, t]
        if previous is not None and t > 0:
            use_sample = torch.rand(active, device=tokens.device) < probability
            sampled = torch.multinomial(torch.softmax(previous[:active].detach().float(), dim=-1), 1).squeeze(1)
            tokens = torch.where(use_sample, sampled, tokens)
        step_logits, state, alpha = decoder.step(tokens, state)
        logits[:active, t] = step_logits
        if alphas is not None:
            alphas[:active, t] = alpha
        previous = step_logits
    return logits[inverse], (alphas[inverse] if alphas is not None else None)


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


def train_one_epoch(
    step_module: nn.Module,
    model: Captioner,
    batches: list[Batch],
    load_inputs: "InputLoader",
    optimizer: torch.optim.Optimizer,
    schedule: LearningRateSchedule,
    scaler: torch.amp.GradScaler | None,
    config: TrainConfig,
    state: RunState,
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    sampling_probability: float,
    self_critical: bool,
    dist_info: Distributed,
    on_step: Callable[[], None],
    total_batches: int,
) -> dict[str, float]:
    """One pass over ``batches`` (the rest of the epoch when resuming). Returns mean losses and speed."""
    step_module.train()
    sums = {"loss": 0.0, "reward": 0.0} if self_critical else {"loss": 0.0, "cross_entropy": 0.0, "attention": 0.0}
    count = captions_seen = 0
    start = time.perf_counter()
    bar = tqdm(
        total=total_batches,
        initial=state.step_in_epoch,
        desc=f"epoch {state.epoch + 1}/{config.epochs}",
        unit="batch",
        disable=not (config.progress and dist_info.is_main) or None,
        leave=False,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    for batch, inputs in load_inputs(batches):
        inputs = inputs.to(device, non_blocking=True)
        captions, lengths = batch.captions.to(device), batch.lengths.to(device)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outputs = step_module(
                inputs, captions, lengths, config.seq_per_img, sampling_probability, positions=batch.positions, self_critical=self_critical
            )
        loss = outputs["loss"]
        finite = torch.isfinite(loss.detach()).float()
        all_finite = bool(dist_info.all_reduce_sum(finite) == dist_info.world_size)
        optimizer.zero_grad(set_to_none=True)
        if not all_finite:
            if config.nan_policy == "stop":
                raise TrainingError(
                    f"the loss became {float(loss.detach()):.4g} at epoch {state.epoch + 1}, step {state.step_in_epoch + 1}; "
                    f"the last good checkpoint is in {config.out}/last (try a lower learning rate, or --set nan_policy=skip)"
                )
            if state.skipped_steps + 1 > 100 and state.skipped_steps + 1 > state.global_step // 10:
                raise TrainingError(f"{state.skipped_steps + 1} steps had a non-finite loss; stopping (last good checkpoint: {config.out}/last)")
        else:
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        # The update and the counters that record it happen together or not at all: a Ctrl-C in
        # between would save updated weights with the step not counted, and resume would repeat it.
        with interrupts_deferred():
            if all_finite:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                schedule.after_step()
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
        on_step()
        if config.max_steps and state.global_step >= config.max_steps:
            break
    bar.close()
    elapsed = time.perf_counter() - start
    means = {key: value / max(count, 1) for key, value in sums.items()}
    return {**means, "captions_per_second": captions_seen * dist_info.world_size / max(elapsed, 1e-9), "seconds": elapsed}


@torch.no_grad()
def validation_loss(step_module: nn.Module, batches: list[Batch], load_inputs: "InputLoader", config: TrainConfig, device: torch.device) -> float:
    """Teacher-forced cross-entropy on the validation captions (a curve to watch, not what we select on)."""
    step_module.eval()
    total = tokens = 0.0
    for batch, inputs in load_inputs(batches):
        inputs = inputs.to(device)
        outputs = step_module(inputs, batch.captions.to(device), batch.lengths.to(device), config.seq_per_img)
        total += float(outputs["cross_entropy"]) * float(outputs["tokens"])
        tokens += float(outputs["tokens"])
    return total / max(tokens, 1.0)


# ----- the whole run ----------------------------------------------------------------------------


def build_model(config: TrainConfig, dataset: PreparedDataset, *, word_vectors: bool = True) -> Captioner:
    encoder_settings = config.encoder
    model_config = CaptionerConfig(encoder=encoder_settings, decoder=config.decoder, preprocessing=None, max_length=config.max_length)
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


def autocast_type(config: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed)."""
    if device.type != "cuda" or config.amp == "off":
        if config.amp == "fp16" and device.type != "cuda":
            raise ConfigError(f"amp=fp16 needs a CUDA device; this run is on {device} (amp=bf16 works on CPUs)")
        if config.amp == "bf16":
            # CPUs with bf16 instructions (AVX512-BF16, AMX) run the matrix products about 1.7x faster;
            # elsewhere bf16 is emulated and slower, hence off under "auto".
            return torch.bfloat16, False
        return None, False
    if config.amp == "bf16" or (config.amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def scheduled_sampling_probability(config: TrainConfig, epoch: int) -> float:
    if config.scheduled_sampling_start < 0 or epoch < config.scheduled_sampling_start:
        return 0.0
    rises = (epoch - config.scheduled_sampling_start) // max(config.scheduled_sampling_every, 1)
    return min(config.scheduled_sampling_max, rises * config.scheduled_sampling_increase + config.scheduled_sampling_increase)


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, given: Iterable[str] | None = None) -> RunState:
    """Run (or resume) a training run described by ``config``; returns the final run state.

    When resuming, the settings in ``RESUMABLE_SETTINGS`` that ``given`` names (those the user set
    for this invocation; by default, those that differ from the defaults) replace the run's own.
    """
    dist_info, device = setup(config.device, config.distributed_timeout_minutes)
    try:
        return _train(config, resume=resume, overwrite=overwrite, given=given, dist_info=dist_info, device=device)
    finally:
        cleanup(dist_info)


def _train(config: TrainConfig, *, resume: bool, overwrite: bool, given: Iterable[str] | None, dist_info: Distributed, device: torch.device) -> RunState:
    out = Path(config.out)
    log = print if dist_info.is_main else (lambda *args, **kwargs: None)
    if not config.data and not resume:
        raise ConfigError("no training data: pass --data PREPARED_FOLDER (made by 'captioner prepare')")
    resume_from = _prepare_run_folder(out, resume=resume, overwrite=overwrite, dist_info=dist_info)
    if resume_from is not None:
        saved = json.loads((resume_from / TRAIN_CONFIG).read_text(encoding="utf-8"))
        config = _resumed_config(saved, config, given)
    else:  # checkpoints say where their data is from any folder (captioner evaluate finds it)
        config = replace(config, data=str(Path(config.data).resolve()))
    dataset = PreparedDataset(config.data, image_root=config.images)
    if not dataset.split_images("train"):
        raise ConfigError(f"{config.data} has no training images")
    if not dataset.split_images("val"):
        raise ConfigError(f"{config.data} has no validation images: training selects its best epoch on them")

    torch.manual_seed(config.seed + dist_info.rank)
    np.random.seed(config.seed)
    model = build_model(config, dataset, word_vectors=resume_from is None).to(device)
    state = RunState()

    # The encoder stages that fine-tuning trains go in their own parameter group from the start.
    encoder_parameters: list[nn.Parameter] = []
    if config.fine_tune_encoder:
        model.encoder.fine_tune(config.fine_tune_encoder)
        encoder_parameters = [p for p in model.encoder.parameters() if p.requires_grad]
        model.encoder.fine_tune(0)  # switched on at fine_tune_from_epoch; until then the encoder is the package's
    groups = [{"params": [p for p in model.decoder.parameters() if p.requires_grad], "lr": config.decoder_lr}]
    if encoder_parameters:
        groups.append({"params": encoder_parameters, "lr": config.encoder_lr})
    optimizer = torch.optim.Adam(groups, weight_decay=config.weight_decay)
    schedule = LearningRateSchedule(
        optimizer,
        config.schedule,
        total_epochs=config.epochs,
        warmup_steps=config.warmup_steps,
        step_epochs=config.lr_step_epochs,
        gamma=config.lr_gamma,
        patience=config.plateau_patience,
        factor=config.plateau_factor,
        min_lr=config.min_lr,
    )
    autocast_dtype, needs_scaler = autocast_type(config, device)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None

    if resume_from is not None:
        training_state = load_state(resume_from)
        resumed = Captioner.load(resume_from, device=device)
        model.decoder.load_state_dict(resumed.decoder.state_dict())
        if resumed.encoder_in_checkpoint:
            model.encoder.load_state_dict(resumed.encoder.state_dict())
            model.encoder_in_checkpoint = True
        optimizer.load_state_dict(training_state["optimizer"])
        schedule.load_state_dict(training_state["schedule"])
        if scaler is not None and training_state.get("scaler"):
            scaler.load_state_dict(training_state["scaler"])
        state = RunState(**training_state["run"])
        # --epochs / --set patience may have been raised for the resumed run: it is finished only by them.
        state.finished = state.epoch >= config.epochs or _out_of_patience(config, state)
        log(f"resuming {out} at epoch {state.epoch + 1}, step {state.step_in_epoch} of it (global step {state.global_step})")
    if dist_info.is_main:
        config.save(out / TRAIN_CONFIG)  # a resumed run's too: it may have been given more epochs

    if state.finished:
        log(f"{out} already finished (best epoch {state.best_epoch + 1}, {config.early_stopping_metric} {state.best_score}); nothing to do")
        return state

    # ----- inputs: cached features for a frozen encoder, images when fine-tuning
    def features_for(split: str) -> np.ndarray | None:
        if dist_info.is_main:
            result = split_features(
                model, dataset, split, cache_dir=config.feature_cache, batch_size=config.encode_batch_size, workers=config.workers, device=device, progress=config.progress
            )
        dist_info.barrier()  # rank 0 builds the cache, the others then read it
        if not dist_info.is_main:
            result = split_features(model, dataset, split, cache_dir=config.feature_cache, device=device, progress=False)
        return result

    # Cached features serve every epoch before fine-tuning starts (and validation of those epochs).
    fine_tunes_from_start = bool(config.fine_tune_encoder) and config.fine_tune_from_epoch <= state.epoch
    cache_usable = not model.encoder_in_checkpoint and not fine_tunes_from_start
    train_features = features_for("train") if cache_usable else None
    val_features = features_for("val") if cache_usable else None
    train_paths = [dataset.image_path(i) for i in dataset.split_images("train")]
    val_paths = [dataset.image_path(i) for i in dataset.split_images("val")]

    def loader_for(features: np.ndarray | None, paths: list[Path], fine_tuning: bool) -> InputLoader:
        if features is not None and not fine_tuning:

            def from_cache(batches: list[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
                for batch in batches:
                    yield batch, torch.from_numpy(np.asarray(features[batch.positions], dtype=np.float32))  # (N, P, D)

            return from_cache
        files = ImageFiles(paths, model.preprocessing)

        def from_images(batches: list[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
            # Images are decoded in `workers` processes, in batch order, while the model trains on the
            # batch before. The loader's own generator keeps it from drawing on the global random
            # stream, which resume restores exactly.
            loader = DataLoader(
                files,
                batch_sampler=[[int(p) for p in batch.positions] for batch in batches],
                num_workers=config.workers,
                pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(0),
            )
            for batch, (images, errors) in zip(batches, loader):
                raise_image_errors(errors)
                yield batch, images  # (N, 3, S, S)

        return from_images

    train_captions = dataset.captions("train")
    train_batches = CaptionBatches(
        {index: position for position, index in enumerate(dataset.split_images("train"))},
        train_captions["tokens"],
        train_captions["lengths"],
        train_captions["image_index"],
        batch_size=config.batch_size,
        seq_per_img=config.seq_per_img,
        seed=config.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    val_captions = dataset.captions("val")
    val_plan = CaptionBatches(
        {index: position for position, index in enumerate(dataset.split_images("val"))},
        val_captions["tokens"],
        val_captions["lengths"],
        val_captions["image_index"],
        batch_size=config.batch_size,
        seq_per_img=config.seq_per_img,
        seed=config.seed,
    )
    if len(train_batches) == 0:
        raise ConfigError("no training batches: the training split has no captions to learn from, or fewer images than processes")

    rewards = None
    if config.self_critical_start >= 0:  # CIDEr-D rewards against the training references, set up once
        positions = {index: position for position, index in enumerate(dataset.split_images("train"))}
        rewards = CaptionRewards.from_encoded(
            train_captions["tokens"],
            train_captions["lengths"],
            np.array([positions[int(i)] for i in train_captions["image_index"]], dtype=np.int64),
            len(positions),
            dataset.vocab,
        )
    plain_step = TrainingStep(model, config, rewards)

    def wrapped() -> nn.Module:
        """The module each step runs: under DDP, a wrapper over the parameters that train *now* (DDP
        synchronises only the gradients of parameters that required them when it was built)."""
        if not dist_info.enabled:
            return plain_step
        return nn.parallel.DistributedDataParallel(plain_step, device_ids=[device.index] if device.type == "cuda" else None)

    step_module = wrapped()

    generation = GenerationConfig(
        strategy="beam" if config.val_beam_size > 1 else "greedy", beam_size=config.val_beam_size, max_length=config.max_length, return_attention=False
    )

    def save_last() -> None:
        dist_info.check_same_weights(model)  # what rank 0 saves is every rank's model
        rngs = dist_info.gather(rng_state())  # every rank's random state (a collective: all ranks call it)
        if dist_info.is_main:
            _save_last(model, out, config, state, optimizer, schedule, scaler, rngs)
        dist_info.barrier()

    def on_step() -> None:
        if config.save_every_steps and state.global_step % config.save_every_steps == 0:
            save_last()

    # Random state last, after anything that may draw from it (building a feature cache does), so a
    # resumed run continues the interrupted one's random stream exactly.
    if resume_from is not None:
        set_rng_state(training_state["rng"][min(dist_info.rank, len(training_state["rng"]) - 1)])
    else:
        torch.manual_seed(config.seed + 1000 * (dist_info.rank + 1))
    log(
        f"training {config.decoder.kind} decoder on {len(train_batches.images):,} images x {config.seq_per_img} captions "
        f"({len(train_batches)} batches/epoch{' per rank' if dist_info.enabled else ''}) on {device}"
        + (f", {dist_info.world_size} processes" if dist_info.enabled else "")
    )
    try:
        while state.epoch < config.epochs:
            epoch = state.epoch
            fine_tuning = bool(config.fine_tune_encoder) and epoch >= config.fine_tune_from_epoch
            if fine_tuning and not model.encoder.trainable:
                model.fine_tune_encoder(config.fine_tune_encoder)
                step_module = wrapped()  # the encoder's gradients are synchronised from now on
            if _self_critical_due(config, state):
                _start_self_critical(model, out, config, state, optimizer, schedule, log)
            batches = train_batches.epoch(epoch, skip=state.step_in_epoch)
            stats = train_one_epoch(
                step_module,
                model,
                batches,
                loader_for(train_features, train_paths, fine_tuning),
                optimizer,
                schedule,
                scaler,
                config,
                state,
                device=device,
                autocast_dtype=autocast_dtype,
                sampling_probability=0.0 if state.self_critical else scheduled_sampling_probability(config, epoch),
                self_critical=state.self_critical,
                dist_info=dist_info,
                on_step=on_step,
                total_batches=len(train_batches),
            )
            if config.max_steps and state.global_step >= config.max_steps and state.step_in_epoch < len(train_batches):
                save_last()  # mid-epoch: no validation, so the resumed run matches an uninterrupted one
                log(f"stopped after max_steps={config.max_steps} steps, in epoch {epoch + 1}; --resume continues from here")
                return state
            record: dict[str, Any] = {"epoch": epoch + 1, "step": state.global_step, **{f"train_{k}": round(v, 5) for k, v in stats.items()}}
            if dist_info.is_main:
                val_inputs = loader_for(val_features, val_paths, fine_tuning)
                record["val_loss"] = round(validation_loss(plain_step, val_plan.epoch(0), val_inputs, config, device), 5)
                captions = decode_split(
                    model,
                    dataset,
                    "val",
                    generation,
                    features=None if fine_tuning else val_features,
                    limit=config.val_max_images,
                    workers=config.workers,
                    progress=config.progress,
                )
                metrics = VALIDATION_METRICS + (("METEOR",) if config.early_stopping_metric == "METEOR" else ())
                scores = score_split(dataset, captions, metrics=metrics)
                record.update({f"val_{name}": round(value, 3) for name, value in scores.items()})
                record["learning_rates"] = [float(f"{rate:.3g}") for rate in schedule.rates]
                record["examples"] = [captions[index][0].text for index in list(captions)[:3]]
            record = dist_info.broadcast(record)
            score = record[f"val_{config.early_stopping_metric}"]
            improved = state.best_score is None or score > state.best_score
            if improved:
                state.best_score, state.best_epoch, state.epochs_without_improvement = score, epoch, 0
                if dist_info.is_main:
                    _save_best(model, out, config, record)
            else:
                state.epochs_without_improvement += 1
            schedule.after_epoch(epoch, score)
            state.history.append(record)
            log(_epoch_line(record, config, improved))
            if dist_info.is_main:
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                _plot_curves(out, state.history)
            state.epoch += 1
            state.step_in_epoch = 0
            stop_early = _out_of_patience(config, state)
            state.finished = stop_early or state.epoch >= config.epochs
            save_last()
            if stop_early:
                log(f"early stop: no {config.early_stopping_metric} improvement for {config.patience} epochs")
            if state.finished:
                break
            if config.max_steps and state.global_step >= config.max_steps:
                log(f"stopped after max_steps={config.max_steps} steps")
                return state
    except KeyboardInterrupt:
        if not dist_info.enabled:  # (under DDP the other ranks may be gone: keep the last epoch's checkpoint)
            save_last()  # nothing done is lost: resume continues from this exact batch
        log(f"interrupted; {out / 'last'} holds the latest state (resume with --resume)")
        raise
    log(f"best epoch {state.best_epoch + 1}: {config.early_stopping_metric} {state.best_score:.2f} -> {out / 'best'}")
    return state


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


def _start_self_critical(model: Captioner, out: Path, config: TrainConfig, state: RunState, optimizer, schedule: LearningRateSchedule, log) -> None:
    """Switch to self-critical training: from the best cross-entropy epoch's weights, a fresh optimiser
    at ``self_critical_lr``, the schedule and the patience counter restarted."""
    best = out / "best"
    source = "the current weights"
    if (best / "model.safetensors").is_file():
        model.decoder.load_state_dict(Captioner.load(best, device=model.device).decoder.state_dict())
        source = f"epoch {state.best_epoch + 1}'s weights" if state.best_epoch >= 0 else f"the weights in {best}"
    optimizer.state.clear()  # Adam's moments belong to the other loss
    schedule.restart([config.self_critical_lr] * len(optimizer.param_groups), state.epoch)
    state.self_critical = True
    state.epochs_without_improvement = 0
    log(f"self-critical training from epoch {state.epoch + 1} on, starting from {source}, learning rate {config.self_critical_lr:g}")


def _epoch_line(record: dict[str, Any], config: TrainConfig, improved: bool) -> str:
    metric = config.early_stopping_metric
    return (
        f"epoch {record['epoch']}: loss {record['train_loss']:.3f}"
        + (f" reward {record['train_reward']:.3f}" if "train_reward" in record else "")
        + f" val_loss {record.get('val_loss', float('nan')):.3f} "
        f"BLEU-4 {record.get('val_BLEU-4', float('nan')):.2f} CIDEr-D {record.get('val_CIDEr-D', float('nan')):.2f} "
        f"({record['train_captions_per_second']:.0f} captions/s){'  * best ' + metric if improved else ''}"
    )


def _prepare_run_folder(out: Path, *, resume: bool, overwrite: bool, dist_info: Distributed) -> Path | None:
    """Check the run folder; return the checkpoint to resume from, if resuming."""
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


def _save_last(model, out, config, state, optimizer, schedule, scaler, rngs) -> None:
    training_state = {
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "run": dict(state.__dict__),
        "rng": rngs,
    }
    files = dump_state(training_state)
    files[TRAIN_CONFIG] = json.dumps(config.to_dict(), indent=2).encode()
    model.save(out / "last", extra_files=files)


def _save_best(model: Captioner, out: Path, config: TrainConfig, record: dict[str, Any]) -> None:
    model.save(
        out / "best",
        extra_files={TRAIN_CONFIG: json.dumps(config.to_dict(), indent=2).encode(), "val_scores.json": json.dumps(record, indent=2).encode()},
    )


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
