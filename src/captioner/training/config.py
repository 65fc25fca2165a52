"""The training configuration: one typed dataclass, read from TOML/YAML, overridden from the command line.

Precedence: defaults < config file < ``--set key=value`` and named flags. The resolved config is
saved as ``config.toml``-equivalent JSON (``train_config.json``) in the run folder and in every
checkpoint, so ``--resume`` and ``captioner evaluate`` know exactly what was run.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from captioner import ranges
from captioner.data.images import MAX_INPUT_SIZE
from captioner.errors import ConfigError
from captioner.limits import MAX_BEAM_SIZE, MAX_LENGTH
from captioner.models.decoder import DecoderConfig
from captioner.models.encoder import EncoderConfig

SCHEDULES = ("constant", "step", "plateau", "cosine")
METRICS_FOR_STOPPING = ("CIDEr-D", "BLEU-4", "METEOR", "ROUGE-L")
#: (setting, lowest, highest) of every whole-number setting (see also validate()).
WHOLE_NUMBER_RANGES = (
    ("epochs", 1, 10_000),
    ("batch_size", 1, 4096),
    ("seq_per_img", 1, 100),
    ("warmup_steps", 0, 10**9),
    ("lr_step_epochs", 1, 10_000),
    ("plateau_patience", 0, 10_000),
    ("scheduled_sampling_start", -1, 10_000),
    ("scheduled_sampling_every", 1, 10_000),
    ("self_critical_start", -1, 10_000),
    ("self_critical_samples", 2, 100),
    ("fine_tune_encoder", 0, 100),
    ("fine_tune_from_epoch", 0, 10_000),
    ("val_max_images", 0, 10**9),
    ("patience", 0, 10_000),
    ("seed", 0, 2**32 - 1),  # numpy's seeds are 32-bit
    ("workers", 0, 64),
    ("encode_batch_size", 1, 4096),
    ("save_every_steps", 0, 10**9),
    ("max_steps", 0, 10**12),
    ("language_epochs", 1, 1000),
    ("language_batch_size", 1, 65536),
)
#: (setting, lowest, highest, lowest excluded) of every real-number setting: all must be finite.
NUMBER_RANGES = (
    ("decoder_lr", 0.0, 1.0, True),
    ("encoder_lr", 0.0, 1.0, True),
    ("weight_decay", 0.0, 1.0, False),
    ("grad_clip", 0.0, 1e6, False),
    ("label_smoothing", 0.0, 1.0, False),
    ("attention_regularization", 0.0, 1000.0, False),
    ("hard_attention_reinforce", 0.0, 1000.0, False),
    ("hard_attention_entropy", 0.0, 1000.0, False),
    ("hard_attention_baseline_decay", 0.0, 1.0, False),
    ("hard_attention_expected", 0.0, 1.0, False),
    ("lr_gamma", 0.0, 1.0, True),
    ("plateau_factor", 0.0, 1.0, True),
    ("min_lr", 0.0, 1.0, False),
    ("scheduled_sampling_increase", 0.0, 1.0, False),
    ("scheduled_sampling_max", 0.0, 1.0, False),
    ("self_critical_lr", 0.0, 1.0, True),
    ("distributed_timeout_minutes", 0.0, 7 * 24 * 60, True),
)


@dataclass
class TrainConfig:
    # ----- data and output
    data: str = ""  # a prepared folder (captioner prepare)
    out: str = "runs/captioner"
    images: str | None = None  # the image folder, if it moved since prepare
    # ----- model
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    image_size: int | None = None  # encoder input side; None: the backbone's native size
    resize: str = "squash"  # "squash" (whole image, aspect ignored) or "crop" (short side + centre crop)
    max_length: int = 30  # longest caption generated (validation and the saved model's default)
    block_bad_endings: bool = True  # no caption ends on what the training captions never end on ("a", "in a blue"): in validation,
    #                                 self-critical sampling, and as the saved model's own decoding setting
    block_doubled_words: bool = True  # no word twice in a row ("are are") or around "and" / "or" ("red and red"), likewise
    word_vectors: str | None = None  # GloVe-format text file for the embedding (embed_dim must match)
    language_text: str | None = None  # sentences, one per line (e.g. Flickr30k's captions): a new run first learns the language
    #                                    from them alone, as captions of a blank image (training/language.py)
    language_epochs: int = 1  # passes over language_text before the first image epoch
    language_batch_size: int = 256  # sentences per language step
    # ----- optimisation
    epochs: int = 20
    batch_size: int = 32  # images per batch; each brings seq_per_img captions
    seq_per_img: int = 5
    decoder_lr: float = 4e-4
    encoder_lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 5.0  # max gradient norm; 0 turns clipping off
    label_smoothing: float = 0.0
    attention_regularization: float = 1.0  # lambda of the doubly stochastic attention term (Xu et al.)
    # hard attention (decoder.attention = "hard"), Xu et al. section 4.1, with the values of the authors' code:
    hard_attention_reinforce: float = 0.1  # lambda_r: weight of the REINFORCE term for the sampled regions
    hard_attention_entropy: float = 0.002  # lambda_e: weight of the attention's entropy bonus
    hard_attention_baseline_decay: float = 0.9  # the reward baseline: b <- decay * b + (1 - decay) * batch mean
    hard_attention_expected: float = 0.5  # probability that a batch reads the expected feature instead of sampling
    schedule: str = "plateau"  # constant | step | plateau (on the validation metric) | cosine
    warmup_steps: int = 0  # linear warm-up of every learning rate over this many steps
    lr_step_epochs: int = 3  # step: decay every this many epochs
    lr_gamma: float = 0.8  # step: decay factor
    plateau_patience: int = 1  # plateau: epochs without improvement before decaying
    plateau_factor: float = 0.5
    min_lr: float = 1e-6
    scheduled_sampling_start: int = -1  # epoch at which scheduled sampling starts (-1: never)
    scheduled_sampling_increase: float = 0.05  # probability added every scheduled_sampling_every epochs
    scheduled_sampling_every: int = 2
    scheduled_sampling_max: float = 0.25
    self_critical_start: int = -1  # epoch (0-based) at which self-critical training replaces cross-entropy (-1: never);
    #                                earlier if cross-entropy runs out of patience. It starts from the best epoch so far.
    self_critical_lr: float = 5e-5  # decoder learning rate of the self-critical phase
    self_critical_samples: int = 5  # captions sampled per image; each one's baseline is the mean reward of the others
    self_critical_max_length: int = 16  # most words per sampled caption
    fine_tune_encoder: int = 0  # encoder stages to train (0: frozen, features are cached)
    fine_tune_from_epoch: int = 0  # start fine-tuning the encoder at this epoch
    amp: str = "auto"  # auto (bf16 on a GPU that has it, else fp16 on GPU, off on CPU) | off | bf16 (GPU or CPU) | fp16 (GPU)
    nan_policy: str = "skip"  # a non-finite loss: skip the step, or stop the run
    # ----- validation and stopping
    val_beam_size: int = 3  # 1 decodes greedily
    val_max_images: int = 0  # 0: the whole validation split
    early_stopping_metric: str = "CIDEr-D"
    patience: int = 5  # epochs without improvement before stopping (0: never stop early)
    # ----- runtime
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int = 2  # image-loading processes (feature caching and fine-tuning)
    feature_cache: str | None = None  # folder for cached features; default: <data>/features
    encode_batch_size: int = 64
    distributed_timeout_minutes: float = 180  # longest wait in a collective under torchrun (rank 0 caching or validating)
    save_every_steps: int = 0  # also save last/ every this many steps (0: at epoch ends only)
    max_steps: int = 0  # stop after this many optimiser steps in total (0: no limit); for smoke runs
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every setting in its range (a :class:`~captioner.ranges.SettingError` names the first that is not),
        and the combinations that cannot work refused."""
        whole, number = ranges.whole_number, ranges.number
        for name, low, high in WHOLE_NUMBER_RANGES + (("val_beam_size", 1, MAX_BEAM_SIZE), ("max_length", 1, MAX_LENGTH), ("self_critical_max_length", 1, MAX_LENGTH)):
            whole(name, getattr(self, name), low, high)
        for name, low, high, low_open in NUMBER_RANGES:
            number(name, getattr(self, name), low, high, low_open=low_open)
        ranges.optional_whole_number("image_size", self.image_size, 32, MAX_INPUT_SIZE)
        choices = [
            ("schedule", SCHEDULES),
            ("resize", ("squash", "crop")),
            ("amp", ("auto", "off", "bf16", "fp16")),
            ("nan_policy", ("skip", "stop")),
            ("early_stopping_metric", METRICS_FOR_STOPPING),
        ]
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ranges.SettingError(name, f"must be one of {', '.join(allowed)}, not {ranges.shown(getattr(self, name))}")
        checks = [
            (self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.self_critical_start < 0 or self.fine_tune_encoder == 0, "self-critical training runs on cached features: it cannot be combined with fine_tune_encoder"),
            (self.word_vectors or not self.decoder.freeze_embeddings, "decoder.freeze_embeddings keeps pretrained word vectors fixed: it needs word_vectors (a GloVe-format file)"),
            (not self.word_vectors or self.decoder.word_space == "learned", 'word_vectors loads a file into a learned embedding; decoder.word_space = "glove-50d" brings its own vectors'),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    # ----- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        return _build(cls, values, source)

    def save(self, path: Path) -> None:
        from captioner.atomic import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (or YAML, if PyYAML is installed) file -> nested dict, tables as sections."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            raise ConfigError(f"{path} is YAML, which needs PyYAML (pip install pyyaml); or use TOML") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON: {error}") from None
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a table of settings")
    return data


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["decoder.hidden_dim=1024", "epochs=5"]`` -> merged into a copy of ``values``.

    Values are parsed as TOML values where possible (numbers, booleans, quoted strings), else kept
    as strings, then converted to the field's type when the config is built.
    """
    merged = json.loads(json.dumps(values))
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, not {override!r}")
        target = merged
        parts = key.strip().split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
        target[parts[-1]] = raw.strip()
    return merged


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table of settings")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s) in {where}: {', '.join(unknown)} (known: {', '.join(known)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}" if where != "config" else name)
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from None


def _convert(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _convert(value, options[0], name)
    if is_dataclass(hint):
        if isinstance(value, hint):
            return value
        try:
            return _build(hint, value, name)
        except ranges.SettingError as error:  # a section's setting is named by its path: decoder.hidden_dim
            raise ranges.SettingError(f"{name.split('.')[-1]}.{error.setting}", error.requirement) from None
    if origin is tuple:
        return tuple(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{name} must be true or false, not {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, not {value!r}")
        if isinstance(value, str) and not value.strip().isascii():  # int() and float() also read Arabic-Indic and other digits
            raise ConfigError(f"{name} must be {'an integer' if hint is int else 'a number'} in ASCII digits, not {value!r}")
        try:
            number = float(value) if hint is float else int(str(value).strip(), 10) if isinstance(value, str) else value
        except (ValueError, OverflowError):
            raise ConfigError(f"{name} must be {'an integer' if hint is int else 'a number'}, not {value!r}") from None
        if hint is int and isinstance(number, float):
            if not number.is_integer():
                raise ConfigError(f"{name} must be an integer, not {value!r}")
            number = int(number)
        return hint(number)
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name} must be a string")
        text = str(value)
        return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" else text
    return value

