"""What ``captioner serve`` can be asked for: server-wide settings and the per-request decoding settings.

Every bound is checked here and named by its field; ``captioner serve`` calls the fields by its flags.

Besides decoding and batching, :class:`ServeConfig` bounds what one client can hold on to:
``max_upload_mb`` (the body size, 413), ``body_timeout_s`` (the time to send the whole body, 408),
``header_timeout_s`` (the time to send a request's headers, 408, or the connection is just closed
when nothing was sent) and ``max_connections`` (connections open at once, 503 beyond it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from captioner import ranges
from captioner.data.images import MAX_IMAGE_PIXELS
from captioner.decoding import GenerationConfig
from captioner.limits import DEFAULT_BEAM_SIZE

#: Largest beam a request may ask for: a request's cost grows with it, and wider beams rarely help.
#: (Decoding itself allows wider beams, up to ``captioner.decoding.MAX_BEAM_SIZE``; a server bounds
#: what one client may ask of it.)
MAX_BEAM_SIZE = 20
#: Most alternative captions a request may ask for.
MAX_N_BEST = 10
#: Multipart framing around the uploaded file (boundaries, part headers, small fields) allowed on top
#: of the file size limit when the whole request body is counted.
MULTIPART_SLACK_BYTES = 64 * 1024


@dataclass(frozen=True)
class DecodeSettings:
    """How one request wants its image decoded (within the serving limits). Requests are only batched
    with equal settings; ``beam_size`` is the beam that runs (widened to ``n_best``, as every way of
    captioning widens it: :meth:`GenerationConfig.for_captions`)."""

    beam_size: int
    n_best: int

    def __post_init__(self) -> None:
        ranges.whole_number("beam_size", self.beam_size, 1, MAX_BEAM_SIZE)
        ranges.whole_number("n_best", self.n_best, 1, MAX_N_BEST)
        object.__setattr__(self, "beam_size", self.generation.beam_size)

    @property
    def generation(self) -> GenerationConfig:
        return GenerationConfig.for_captions(self.beam_size, self.n_best)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class ServeConfig:
    """Server-wide settings, each checked here (a :class:`~captioner.ranges.SettingError` names the field)."""

    beam_size: int = DEFAULT_BEAM_SIZE  # default beam for requests that do not ask
    n_best: int = 3  # default length of the n-best list
    max_batch: int = 16  # most images run through the model together
    batch_wait_ms: float = 20.0  # how long the first request of a batch waits for others
    max_upload_mb: float = 10.0  # largest upload accepted, in MB (10**6 bytes)
    max_pending: int = 256  # requests waiting for the model beyond this are refused (503)
    body_timeout_s: float = 30.0  # the whole request body must arrive within this, from its headers (408)
    header_timeout_s: float = 10.0  # a request's headers must arrive within this, from the connection or the last answer
    max_connections: int = 64  # connections open at once (idle and slow ones too); a request on one more gets 503
    max_image_pixels: int = 4096 * 4096  # largest image decoded (after a JPEG's reduced-size decoding), in pixels (422 beyond)
    decode_workers: int = 2  # uploads decoded at once: with max_image_pixels, what bounds the memory of decoding
    allowed_hosts: tuple[str, ...] = ()  # host names served besides IP addresses and localhost ("*": any)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        DecodeSettings(self.beam_size, self.n_best)
        ranges.whole_number("max_batch", self.max_batch, 1, 1024)
        ranges.number("batch_wait_ms", self.batch_wait_ms, 0, 10_000)
        ranges.number("max_upload_mb", self.max_upload_mb, 0.001, 1000)  # 1 kB: below it no image fits
        ranges.whole_number("max_pending", self.max_pending, 1, 1_000_000)
        ranges.number("body_timeout_s", self.body_timeout_s, 0, 3600, low_open=True)
        ranges.number("header_timeout_s", self.header_timeout_s, 0, 3600, low_open=True)
        ranges.whole_number("max_connections", self.max_connections, 1, 100_000)
        ranges.whole_number("max_image_pixels", self.max_image_pixels, 64 * 64, MAX_IMAGE_PIXELS)
        ranges.whole_number("decode_workers", self.decode_workers, 1, 64)
        object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))
        for host in self.allowed_hosts:
            if not isinstance(host, str) or not host.strip() or any(ch in host for ch in " /\\:@"):
                raise ranges.SettingError("allowed_hosts", f"must be host names (or *), not {ranges.shown(host)}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def max_body_bytes(self) -> int:
        """The largest request body read: the file limit plus room for the multipart framing."""
        return self.max_upload_bytes + MULTIPART_SLACK_BYTES

    @property
    def default_settings(self) -> DecodeSettings:
        return DecodeSettings(self.beam_size, self.n_best)

    def limits(self) -> dict[str, Any]:
        return {
            "max_beam_size": MAX_BEAM_SIZE,
            "max_n_best": MAX_N_BEST,
            "max_upload_mb": self.max_upload_mb,
            "max_upload_bytes": self.max_upload_bytes,
            "body_timeout_s": self.body_timeout_s,
            "header_timeout_s": self.header_timeout_s,
            "max_connections": self.max_connections,
            "max_image_pixels": self.max_image_pixels,
            "decode_workers": self.decode_workers,
        }
