"""The encoder through onnxruntime: an optional faster runtime for the CNN (``pip install captioner[fast]``).

``captioner export MODEL`` (or :func:`export_encoder`) writes the model's encoder as ONNX into the
cache (``CAPTIONER_CACHE``, else ``~/.cache/captioner``), checked against PyTorch on real photos
before it is kept. From then on, wherever onnxruntime is installed, every model with that encoder
(the same backbone, feature layer, input size and installed weights) encodes through it on a CPU:
all views of a batch in one call, on the threads the phase is given (one session per thread count).
Without onnxruntime, without an export, on a GPU, or for an encoder a checkpoint carries
(fine-tuned), PyTorch encodes as before. ``Captioner.load(encoder_runtime="torch")`` (or
``--encoder-runtime torch``) keeps PyTorch; ``"onnx"`` insists on onnxruntime.

``captioner export MODEL --int8`` (``export_encoder(..., int8=True)``) also writes an int8 version
(onnxruntime's static quantization: int8 weights per output channel, uint8 activations over
calibrated ranges), which only ``"onnx-int8"`` uses: about twice as fast, and features within 20-30%
(relative) of float32's, so captions change where two were close (see the README for what that costs
on the Flickr8k dev split). The activation ranges of the shipped model's encoder ship in
:data:`INT8_RANGES_FILE`, measured on Flickr8k training photos (``scripts/calibrate_encoder.py``);
another encoder is calibrated on the photos given to the export (at least :data:`MIN_CALIBRATION_PHOTOS`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy
import torch

from captioner.atomic import write_atomic
from captioner.errors import ConfigError

if TYPE_CHECKING:
    from captioner.models.captioner import Captioner

ENCODER_RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
OPSET = 17
TOLERANCE = 1e-3  # largest |ONNX - PyTorch| feature difference an export may have (features reach ~6; measured 5e-5)
#: Largest relative difference ||int8 - PyTorch|| / ||PyTorch|| of an int8 export's features on the check
#: photos (measured 0.19 on 32 Flickr8k dev photos; a broken quantization gives 0.6 and more).
INT8_TOLERANCE = 0.3
INT8_RANGES_FILE = Path(__file__).with_name("encoder_int8_ranges.json")
MIN_CALIBRATION_PHOTOS = 32


@contextmanager
def _quiet_logging() -> Any:
    """onnxruntime's quantizer logs notes on every tensor it leaves alone; they are not for a user."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


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


def onnx_path(model: Captioner, *, int8: bool = False) -> Path | None:
    """Where the model's exported encoder is (or goes) in the cache; None when none can stand in.
    An int8 export's name also carries a digest of the activation ranges it was rounded with when
    they ship (:data:`INT8_RANGES_FILE`), so new ranges in an upgrade are not met by a stale file."""
    key = encoder_key(model)
    if not key:
        return None
    if not int8:
        return cache_dir() / "encoders" / f"{key}.onnx"
    ranges = shipped_int8_ranges(model)
    digest = f"-{hashlib.sha256(json.dumps(ranges, sort_keys=True).encode()).hexdigest()[:8]}" if ranges is not None else ""
    return cache_dir() / "encoders" / f"{key}{digest}-int8.onnx"


def ranges_key(model: Captioner) -> str:
    """What shipped activation ranges are filed under: the backbone, feature layer and input size."""
    return f"{model.config.encoder.backbone}-{model.config.encoder.feature_layer}-{model.preprocessing.image_size}"


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

    @property
    def name(self) -> str:
        """The ``encoder_runtime`` choice this is: ``"onnx"`` or ``"onnx-int8"``."""
        return "onnx-int8" if self.path.name.endswith("-int8.onnx") else "onnx"

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
    int8 = choice == "onnx-int8"
    runtime = onnxruntime_module()
    path = onnx_path(model, int8=int8)
    missing = (
        "onnxruntime is not installed (pip install 'captioner[fast]')" if runtime is None
        else "the encoder runs on a GPU" if model.device.type != "cpu"
        else "this model's encoder comes with its checkpoint (fine-tuned) or is not an EfficientNet-Lite" if path is None
        else f"its encoder was not exported{' in int8' if int8 else ''} yet (run 'captioner export MODEL{' --int8' if int8 else ''}')" if not path.is_file()
        else None
    )  # fmt: skip
    if missing is None:
        return OnnxEncoder(path, runtime)  # type: ignore[arg-type]
    if choice != "auto":
        raise ConfigError(f"cannot encode with onnxruntime{' in int8' if int8 else ''}: {missing}")
    return None


def export_encoder(model: Captioner, photos: torch.Tensor, *, int8: bool = False) -> tuple[Path, float]:
    """Write the model's encoder as ONNX into the cache, once its features on ``photos`` (B, 3, H, W)
    match PyTorch's within :data:`TOLERANCE`; returns (the file, the largest difference). With
    ``int8``, the int8 version instead (:func:`export_int8_encoder`: the difference is relative)."""
    if int8:
        return export_int8_encoder(model, photos)
    path = export_path(model)
    runtime = exporting_runtime()
    encoder = model.encoder.eval()
    difference = float("inf")

    def export_and_check(temporary: Path) -> None:
        nonlocal difference
        write_onnx(encoder, photos, temporary)
        with torch.inference_mode():
            expected = encoder(photos.cpu())
        difference = float((OnnxEncoder(temporary, runtime)(photos.cpu()) - expected).abs().max())
        if not difference <= TOLERANCE:
            raise ConfigError(f"the exported encoder's features differ from PyTorch's by {difference:.2g} (over {TOLERANCE}): not kept")

    write_atomic(path, export_and_check)  # a file that fails the check is removed, an earlier export kept
    return path, difference


def export_path(model: Captioner, *, int8: bool = False) -> Path:
    """Where the model's encoder is exported to (a one-line error for an encoder that cannot be)."""
    path = onnx_path(model, int8=int8)
    if path is None:
        raise ConfigError("only an EfficientNet-Lite encoder with its installed weights can be exported (this one is fine-tuned or another backbone)")
    return path


def exporting_runtime() -> Any:
    """onnxruntime, once the packages an export needs are known to be installed (else a one-line error)."""
    runtime = onnxruntime_module()
    if runtime is None:
        raise ConfigError("exporting needs onnxruntime to check the export: pip install 'captioner[fast]'")
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise ConfigError("exporting needs the onnx package: pip install 'captioner[fast]'") from None
    return runtime


def write_onnx(encoder: torch.nn.Module, photos: torch.Tensor, path: Path) -> None:
    """``encoder`` (images -> features) as ONNX at ``path``, any batch size."""
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes it fixes (the padding arithmetic): expected
        torch.onnx.export(
            encoder, (photos[:1].cpu(),), str(path), dynamo=False, opset_version=OPSET, input_names=["images"],
            output_names=["features"], dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
        )  # fmt: skip


def quantizable_graph(model: Captioner, photos: torch.Tensor, folder: Path) -> Path:
    """The encoder as the float32 ONNX graph int8 rounding starts from (batch norms folded, SAME
    padding before each convolution: :func:`~captioner.models.efficientnet_lite.folded_for_int8`),
    shape-inferred and simplified by onnxruntime's own preprocessing; its tensor names are what
    activation ranges are filed under."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from captioner.models.efficientnet_lite import folded_for_int8

    encoder = copy.deepcopy(model.encoder).eval()
    encoder.backbone = folded_for_int8(encoder.backbone)
    raw, graph = folder / "float32.onnx", folder / "quantizable.onnx"
    write_onnx(encoder, photos, raw)
    quant_pre_process(str(raw), str(graph))
    return graph


class _Photos:
    """onnxruntime's calibration reader over preprocessed photos, 16 at a time."""

    def __init__(self, photos: torch.Tensor) -> None:
        self.batches = iter(photos.cpu().float().split(16))

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch.contiguous().numpy()}


def calibrate_int8_ranges(model: Captioner, photos: torch.Tensor) -> dict[str, list[float]]:
    """The activation ranges (tensor name -> [lowest, highest]) of the encoder's quantizable graph over ``photos``."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    exporting_runtime()
    with tempfile.TemporaryDirectory() as folder:
        graph = quantizable_graph(model, photos, Path(folder))
        calibrator = create_calibrator(graph, augmented_model_path=str(Path(folder) / "augmented.onnx"), calibrate_method=CalibrationMethod.MinMax)
        calibrator.collect_data(_Photos(photos))
        return {name: [float(numpy.asarray(bound).item()) for bound in data.range_value] for name, data in sorted(calibrator.compute_data().items())}


def shipped_int8_ranges(model: Captioner) -> dict[str, list[float]] | None:
    """The activation ranges :data:`INT8_RANGES_FILE` holds for this model's encoder, if any."""
    encoders = json.loads(INT8_RANGES_FILE.read_text())["encoders"] if INT8_RANGES_FILE.is_file() else {}
    entry = encoders.get(ranges_key(model))
    return entry["ranges"] if entry else None


def export_int8_encoder(model: Captioner, photos: torch.Tensor) -> tuple[Path, float]:
    """Write the int8 version of the model's encoder into the cache, once its features on ``photos``
    are within :data:`INT8_TOLERANCE` (relative) of PyTorch's; returns (the file, that difference).

    Activation ranges come from :data:`INT8_RANGES_FILE` where it has this encoder's (every range
    is then fixed, whatever the photos), else from ``photos`` themselves."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    path = export_path(model, int8=True)
    runtime = exporting_runtime()
    ranges = shipped_int8_ranges(model)
    if ranges is None and len(photos) < MIN_CALIBRATION_PHOTOS:
        raise ConfigError(
            f"no int8 ranges ship for this encoder ({ranges_key(model)}): give at least {MIN_CALIBRATION_PHOTOS} photos like the ones it will see "
            f"to calibrate on (got {len(photos)})"
        )
    difference = float("inf")

    def quantize_and_check(temporary: Path) -> None:
        nonlocal difference
        with tempfile.TemporaryDirectory() as folder:
            graph = quantizable_graph(model, photos, Path(folder))
            if ranges is not None:
                unmatched = sorted(set(calibrate_names(graph)) ^ set(ranges))
                if unmatched:
                    raise ConfigError(
                        f"the shipped int8 ranges do not fit this encoder's graph ({len(unmatched)} tensors differ, e.g. {unmatched[0]!r}; "
                        "another torch version?): export without --int8"
                    )
            overrides = {name: [{"rmin": numpy.float32(low), "rmax": numpy.float32(high)}] for name, (low, high) in (ranges or {}).items()}
            quantize_static(
                str(graph), str(temporary), _Photos(photos), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": False, "TensorQuantOverrides": overrides},
            )  # fmt: skip
        with torch.inference_mode():
            expected = model.encoder.eval()(photos.cpu())
        difference = float((OnnxEncoder(temporary, runtime)(photos.cpu()) - expected).norm() / expected.norm())
        if not difference <= INT8_TOLERANCE:
            raise ConfigError(f"the int8 encoder's features differ from PyTorch's by {difference:.0%} (over {INT8_TOLERANCE:.0%}): not kept")

    with warnings.catch_warnings(), _quiet_logging():
        warnings.simplefilter("ignore")
        write_atomic(path, quantize_and_check)
    return path, difference


def calibrate_names(graph: Path) -> list[str]:
    """The tensors onnxruntime's calibration would range in ``graph``."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    calibrator = MinMaxCalibrater(graph)  # the graph as loaded, before calibration augments it
    return sorted(calibrator.select_tensors_to_calibrate(calibrator.model)[0])
