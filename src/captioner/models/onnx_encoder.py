"""The encoder through onnxruntime: an optional faster runtime for the CNN (``pip install captioner[fast]``).

``captioner export MODEL`` (or :func:`export_encoder`) writes the model's encoder as ONNX into the
cache (``CAPTIONER_CACHE``, else ``~/.cache/captioner``), checked against PyTorch on real photos
before it is kept. From then on, wherever onnxruntime is installed, every model with that encoder
(the same backbone, feature layer, input size and installed weights) encodes through it on a CPU:
all views of a batch in one call, on the threads the phase is given (one session per thread count).
Without onnxruntime, without an export, on a GPU, or for an encoder a checkpoint carries
(fine-tuned), PyTorch encodes as before. ``Captioner.load(encoder_runtime="torch")`` (or
``--encoder-runtime torch``) keeps PyTorch; ``"onnx"`` insists on onnxruntime.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from captioner.atomic import write_atomic
from captioner.errors import ConfigError

if TYPE_CHECKING:
    from captioner.models.captioner import Captioner

ENCODER_RUNTIMES = ("auto", "torch", "onnx")
OPSET = 17
TOLERANCE = 1e-3  # largest |ONNX - PyTorch| feature difference an export may have (features reach ~6; measured 5e-5)


def cache_dir() -> Path:
    return Path(os.environ.get("CAPTIONER_CACHE") or Path.home() / ".cache" / "captioner")


def encoder_key(model: Captioner) -> str | None:
    """A name for the model's encoder that changes with anything its output depends on; None for
    an encoder ONNX cannot stand in for (one a checkpoint carries, or not an EfficientNet-Lite)."""
    from captioner.models.efficientnet_lite import SPECS, weights_path

    config = model.config.encoder
    if model.encoder_in_checkpoint or config.backbone not in SPECS:
        return None
    weights = Path(weights_path(config.backbone))
    stamp = f"{weights.resolve()}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}:{model.preprocessing.image_size}:{torch.__version__}:{OPSET}"
    return f"{config.backbone}-{config.feature_layer}-{model.preprocessing.image_size}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"


def onnx_path(model: Captioner) -> Path | None:
    key = encoder_key(model)
    return cache_dir() / "encoders" / f"{key}.onnx" if key else None


def onnxruntime_module() -> Any | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


class OnnxEncoder:
    """Preprocessed images (B, 3, H, W) -> region features (B, P, D), as the PyTorch encoder gives them."""

    def __init__(self, path: Path, runtime: Any) -> None:
        self.path, self.runtime = path, runtime
        self.sessions: dict[int, Any] = {}

    def session(self, threads: int) -> Any:
        if threads not in self.sessions:
            options = self.runtime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # errors only
            # Its worker threads sleep when a run ends instead of spinning for more work: spinning, they
            # kept the cores from the decoding that follows the encoder (a one-photo caption took
            # 152 ms with the export vs 143 ms with PyTorch's slower encoder; 118 ms without spinning).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                self.sessions[threads] = self.runtime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            except Exception as error:  # onnxruntime raises its own types for a damaged file
                raise ConfigError(f"cannot load the exported encoder {self.path} ({str(error).splitlines()[0][:200]}); export it again with 'captioner export'") from None
        return self.sessions[threads]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.session(torch.get_num_threads()).run(None, {"images": images.float().contiguous().numpy()})
        return torch.from_numpy(features)


def check_encoder_runtime(choice: str) -> None:
    if choice not in ENCODER_RUNTIMES:
        raise ConfigError(f"encoder runtime must be one of {', '.join(ENCODER_RUNTIMES)}, not {str(choice)[:40]!r}")


def find_encoder_runtime(model: Captioner, choice: str) -> OnnxEncoder | None:
    """The onnxruntime encoder ``choice`` asks for: ``"auto"`` uses one when it can, ``"onnx"``
    requires it (a one-line error says what is missing), ``"torch"`` never."""
    check_encoder_runtime(choice)
    if choice == "torch":
        return None
    runtime = onnxruntime_module()
    path = onnx_path(model)
    missing = (
        "onnxruntime is not installed (pip install 'captioner[fast]')" if runtime is None
        else "the encoder runs on a GPU" if model.device.type != "cpu"
        else "this model's encoder comes with its checkpoint (fine-tuned) or is not an EfficientNet-Lite" if path is None
        else "its encoder was not exported yet (run 'captioner export MODEL')" if not path.is_file()
        else None
    )  # fmt: skip
    if missing is None:
        return OnnxEncoder(path, runtime)  # type: ignore[arg-type]
    if choice == "onnx":
        raise ConfigError(f"cannot encode with onnxruntime: {missing}")
    return None


def export_encoder(model: Captioner, photos: torch.Tensor) -> tuple[Path, float]:
    """Write the model's encoder as ONNX into the cache, once its features on ``photos`` (B, 3, H, W)
    match PyTorch's within :data:`TOLERANCE`; returns (the file, the largest difference)."""
    path = onnx_path(model)
    if path is None:
        raise ConfigError("only an EfficientNet-Lite encoder with its installed weights can be exported (this one is fine-tuned or another backbone)")
    runtime = onnxruntime_module()
    if runtime is None:
        raise ConfigError("exporting needs onnxruntime to check the export: pip install 'captioner[fast]'")
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise ConfigError("exporting needs the onnx package: pip install 'captioner[fast]'") from None
    encoder = model.encoder.eval()
    difference = float("inf")

    def export_and_check(temporary: Path) -> None:
        nonlocal difference
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes it fixes (the padding arithmetic): expected
            torch.onnx.export(
                encoder, (photos[:1].cpu(),), str(temporary), dynamo=False, opset_version=OPSET, input_names=["images"],
                output_names=["features"], dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            )  # fmt: skip
            expected = encoder(photos.cpu())
        difference = float((OnnxEncoder(temporary, runtime)(photos.cpu()) - expected).abs().max())
        if not difference <= TOLERANCE:
            raise ConfigError(f"the exported encoder's features differ from PyTorch's by {difference:.2g} (over {TOLERANCE}): not kept")

    write_atomic(path, export_and_check)  # a file that fails the check is removed, an earlier export kept
    return path, difference
