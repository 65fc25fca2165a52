"""What ``captioner serve`` can be asked for: server-wide settings and the per-request decoding settings.

Besides decoding and batching, :class:`ServeConfig` bounds what one client can hold on to:
``max_upload_mb`` (the body size, 413), ``body_timeout_s`` (the time to send the whole body, 408),
``header_timeout_s`` (the time to send a request's headers, 408, or the connection is just closed
when nothing was sent) and ``max_connections`` (connections open at once, 503 beyond it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from captioner.errors import ConfigError

#: Largest beam a request may ask for: decoding cost grows with it, and wider beams rarely help.
MAX_BEAM_SIZE = 20
#: Most alternative captions a request may ask for.
MAX_N_BEST = 10
#: Multipart framing around the uploaded file (boundaries, part headers, small fields) allowed on top
#: of the file size limit when the whole request body is counted.
MULTIPART_SLACK_BYTES = 64 * 1024


@dataclass(frozen=True)
class DecodeSettings:
    """How one request wants its image decoded. Requests are only batched with equal settings."""

    beam_size: int
    n_best: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class ServeConfig:
    """Server-wide settings; :meth:`check` turns a bad value into a one-line :class:`ConfigError`."""

    beam_size: int = 5  # default beam for requests that do not ask
    n_best: int = 3  # default length of the n-best list
    max_batch: int = 16  # most images run through the model together
    batch_wait_ms: float = 20.0  # how long the first request of a batch waits for others
    max_upload_mb: float = 10.0  # largest upload accepted, in MB (10**6 bytes)
    max_pending: int = 256  # requests waiting for the model beyond this are refused (503)
    body_timeout_s: float = 30.0  # the whole request body must arrive within this, from its headers (408)
    header_timeout_s: float = 10.0  # a request's headers must arrive within this, from the connection or the last answer
    max_connections: int = 64  # connections open at once (idle and slow ones too); a request on one more gets 503

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if not 1 <= self.beam_size <= MAX_BEAM_SIZE:
            raise ConfigError(f"--beam must be between 1 and {MAX_BEAM_SIZE}, not {self.beam_size}")
        if not 1 <= self.n_best <= MAX_N_BEST:
            raise ConfigError(f"--n-best must be between 1 and {MAX_N_BEST}, not {self.n_best}")
        if not 1 <= self.max_batch <= 1024:
            raise ConfigError(f"--max-batch must be between 1 and 1024, not {self.max_batch}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ConfigError(f"--batch-wait-ms must be between 0 and 10000, not {self.batch_wait_ms:g}")
        if not 0 < self.max_upload_mb <= 1000:
            raise ConfigError(f"--max-upload-mb must be above 0 and at most 1000, not {self.max_upload_mb:g}")
        if self.max_pending < 1:
            raise ConfigError(f"max_pending must be at least 1, not {self.max_pending}")
        if not 0 < self.body_timeout_s <= 3600:
            raise ConfigError(f"--body-timeout-s must be above 0 and at most 3600, not {self.body_timeout_s:g}")
        if not 0 < self.header_timeout_s <= 3600:
            raise ConfigError(f"--header-timeout-s must be above 0 and at most 3600, not {self.header_timeout_s:g}")
        if not 1 <= self.max_connections <= 100_000:
            raise ConfigError(f"--max-connections must be between 1 and 100000, not {self.max_connections}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def max_body_bytes(self) -> int:
        """The largest request body read: the file limit plus room for the multipart framing."""
        return self.max_upload_bytes + MULTIPART_SLACK_BYTES

    @property
    def default_settings(self) -> DecodeSettings:
        return DecodeSettings(beam_size=max(self.beam_size, self.n_best), n_best=self.n_best)

    def limits(self) -> dict[str, Any]:
        return {
            "max_beam_size": MAX_BEAM_SIZE,
            "max_n_best": MAX_N_BEST,
            "max_upload_mb": self.max_upload_mb,
            "max_upload_bytes": self.max_upload_bytes,
            "body_timeout_s": self.body_timeout_s,
            "header_timeout_s": self.header_timeout_s,
            "max_connections": self.max_connections,
        }
