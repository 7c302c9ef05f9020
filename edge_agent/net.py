"""HTTP for the device with the standard library only (urllib): JSON posts and TUF downloads.

The light install has no httpx or requests. ``UrllibFetcher`` plugs urllib into
``tuf.ngclient`` (instead of its default urllib3 fetcher, which retries with backoff
on its own: the agent has its own retry policy with jitter, and a dead network must
fail fast so inference never waits on it).
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from typing import Any, Iterator

from tuf.ngclient import FetcherInterface

__all__ = ["HttpError", "post_json", "get_bytes", "UrllibFetcher", "Backoff"]

_CHUNK = 256 * 1024


class HttpError(RuntimeError):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener()


def post_json(url: str, doc: dict[str, Any], *, timeout: float = 15.0, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """POST ``doc`` as JSON and return the JSON answer.

    Raises:
        HttpError: a 4xx/5xx answer (with the server's ``error`` message).
        OSError: the server is unreachable or the connection broke (``URLError`` is one).
    """
    body = json.dumps(doc, separators=(",", ":")).encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with _opener().open(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        text = exc.read()[:2000].decode("utf-8", "replace")
        try:
            text = json.loads(text).get("error", text)
        except ValueError:
            pass
        raise HttpError(exc.code, text) from None
    except ValueError as exc:  # a non-JSON answer from something that is not our server
        raise HttpError(502, f"invalid JSON answer: {exc}") from None


def get_bytes(url: str, *, timeout: float = 15.0, max_bytes: int = 64 * 1024 * 1024) -> bytes:
    """GET a URL (bounded size)."""
    try:
        with _opener().open(url, timeout=timeout) as resp:
            data = resp.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise HttpError(exc.code, exc.reason or "") from None
    if len(data) > max_bytes:
        raise HttpError(413, f"answer larger than {max_bytes} bytes")
    return data


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And Jitter").

    Full jitter spreads a fleet that lost the server at the same moment, so it does not
    come back as one synchronized wave.
    """

    def __init__(self, base_s: float = 1.0, cap_s: float = 60.0, rng: random.Random | None = None) -> None:
        if base_s <= 0 or cap_s < base_s:
            raise ValueError(f"Got base {base_s}, cap {cap_s}; expected 0 < base <= cap")
        self.base_s, self.cap_s = base_s, cap_s
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        self.failures += 1
        return self._rng.uniform(0, min(self.cap_s, self.base_s * 2 ** (self.failures - 1)))

    def reset(self) -> None:
        self.failures = 0


class UrllibFetcher(FetcherInterface):
    """A ``tuf.ngclient`` fetcher on urllib: one try, a socket timeout, HTTP errors typed."""

    def __init__(self, timeout: float = 15.0) -> None:
        self.timeout = timeout

    def _fetch(self, url: str) -> Iterator[bytes]:
        from tuf.api import exceptions

        try:
            resp = _opener().open(url, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise exceptions.DownloadHTTPError(f"HTTP {exc.code} for {url}", exc.code) from None
        except TimeoutError as exc:
            raise exceptions.SlowRetrievalError(f"timeout fetching {url}") from exc
        except OSError as exc:
            raise exceptions.DownloadError(f"cannot fetch {url}: {exc}") from exc
        return self._chunks(resp)

    @staticmethod
    def _chunks(resp: Any) -> Iterator[bytes]:
        from tuf.api import exceptions

        try:
            while chunk := resp.read(_CHUNK):
                yield chunk
        except TimeoutError as exc:
            raise exceptions.SlowRetrievalError("timeout while downloading") from exc
        except OSError as exc:
            raise exceptions.DownloadError(f"download broke off: {exc}") from exc
        finally:
            resp.close()
