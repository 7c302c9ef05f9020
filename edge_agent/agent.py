"""The edge agent: infer offline, keep every result in the outbox, sync and update when it can.

Two threads:

* the **inference loop** (main thread) reads frames, runs the current model, and
  commits each record (and a sampled low-confidence image) to the SQLite outbox in one
  transaction with the frame's key. It never touches the network, so it runs the same
  with the server gone, the metadata expired or the link cut.
* the **network loop** uploads outbox batches (``POST /v1/edge/sync``; backoff with
  full jitter when the server is away) and polls for updates (TUF-verified, at a
  jittered interval so a fleet does not poll in lockstep). A verified, healthy bundle
  is swapped into the inference loop between two frames; a failed one is reported and
  the current model stays.

A model that fails at run time right after an update (several frames in a row) is
rolled back to the last good one.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edge_agent.outbox import DEFAULT_MAX_BYTES, DEFAULT_RETENTION_S, MIN_MAX_BYTES, Outbox
from edge_agent.store import ActiveModel, InstallResult, ModelStore

__all__ = ["AgentConfig", "Agent", "AGENT_VERSION"]

AGENT_VERSION = "visionfleet-edge/0.1.0"
_MODEL_ERRORS_BEFORE_ROLLBACK = 3
_PRUNE_EVERY_S = 60.0  # how often the network loop removes acknowledged rows past the retention


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``visionfleet-edge run`` is told; validated when built."""

    device_id: str
    home: Path
    source: str | None = None
    server: str | None = None
    model: str | None = None  # the channel's model name (default: the installed bundle's)
    target: str | None = None  # default: the installed bundle's, else guessed from the machine
    threads: int | None = None
    sample_below: float = 0.5
    sample_rate: float = 1.0
    sync_interval_s: float = 10.0
    sync_batch: int = 256
    ota_interval_s: float = 300.0
    ota_jitter: float = 0.2
    poll_s: float = 1.0
    stride: int = 1
    watch: bool = True
    max_frames: int | None = None
    top_k: int = 5
    timeout_s: float = 15.0
    max_unsent_samples: int = 2000
    outbox_max_bytes: int = DEFAULT_MAX_BYTES  # database + WAL; over it: acked rows, old images, old records go
    outbox_retention_s: float = DEFAULT_RETENTION_S  # acknowledged rows are kept this long
    seed: int | None = None

    def __post_init__(self) -> None:
        import re

        from visionfleet.fleet import DEVICE_ID_PATTERN

        if not re.match(DEVICE_ID_PATTERN, self.device_id or ""):
            raise ValueError(f"Got {self.device_id!r} for --device-id; expected letters, digits, '_', '.', '-' (max 64)")
        if self.server is not None and not self.server.startswith(("http://", "https://")):
            raise ValueError(f"Got {self.server!r} for --server; expected an http:// or https:// URL")
        if not 0.0 <= self.sample_below <= 1.0 or not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"Got sample_below {self.sample_below}, sample_rate {self.sample_rate}; expected 0..1")
        if self.sync_interval_s <= 0 or self.ota_interval_s <= 0 or self.poll_s <= 0 or self.timeout_s <= 0:
            raise ValueError("Got a non-positive interval; expected sync, OTA, poll intervals and timeout > 0")
        if not 0.0 <= self.ota_jitter < 1.0:
            raise ValueError(f"Got {self.ota_jitter} for ota_jitter; expected 0 <= j < 1")
        if self.sync_batch < 1 or self.stride < 1 or (self.threads is not None and self.threads < 1):
            raise ValueError("Got sync_batch, stride or threads < 1; expected >= 1")
        if self.outbox_max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"Got {self.outbox_max_bytes / 2**20:g} MiB for --outbox-max-mb; expected >= "
                             f"{MIN_MAX_BYTES // 2**20} MiB")
        if self.outbox_retention_s < 0:
            raise ValueError(f"Got {self.outbox_retention_s} for --outbox-retention; expected seconds >= 0")
        if self.max_frames is not None and self.max_frames < 0:
            raise ValueError(f"Got {self.max_frames} for max_frames; expected >= 0")
        if self.target is not None:
            from visionfleet.targets import Target

            try:
                Target(self.target)
            except ValueError:
                raise ValueError(f"Got {self.target!r} for --target; expected one of {[t.value for t in Target]}") from None


@dataclass
class _Shared:
    """State the two threads share, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    active: ActiveModel | None = None
    generation: int = 0
    ota: dict[str, Any] = field(default_factory=dict)
    sync: dict[str, Any] = field(default_factory=dict)
    frames: int = 0
    model_errors: int = 0


class Agent:
    """Run a device: ``Agent(config).run()`` until stopped (``stop()``, SIGTERM) or the source ends."""

    def __init__(self, cfg: AgentConfig, *, root: bytes | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.home = Path(cfg.home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.stop_event = threading.Event()
        self.idle_event = threading.Event()  # set when a non-watching source is exhausted
        self.log = log or (lambda m: None)
        self.store = ModelStore(self.home, threads=cfg.threads)
        self.shared = _Shared()
        self.rng = random.Random(cfg.seed)
        self.started = time.time()
        self._root = root
        self.ota_client = None
        self._sync_batch = cfg.sync_batch  # halved when the server says a batch is too large

    # ------------------------------------------------------------------ helpers
    def stop(self) -> None:
        self.stop_event.set()

    def _channel(self) -> tuple[str | None, str]:
        from edge_agent.sources import guess_target

        active = self.shared.active
        model = self.cfg.model or (active.manifest.model if active else None)
        target = self.cfg.target or (active.manifest.target if active else None) or guess_target()
        return model, target

    def status(self, outbox: Outbox) -> dict[str, Any]:
        """The status document sent with every sync."""
        with self.shared.lock:
            active = self.shared.active
            ota = dict(self.shared.ota)
            frames = self.shared.frames
            errors = self.shared.model_errors
        m = active.manifest if active else None
        return {
            "model": m.model if m else self.cfg.model,
            "version": m.version if m else None,
            "bundle_id": m.bundle_id if m else None,
            "target": m.target if m else self._channel()[1],
            "health": "no_model" if active is None else ("degraded" if errors else "ok"),
            "backlog": outbox.backlog(),
            "outbox": outbox.stats(),
            "agent": AGENT_VERSION,
            "uptime_s": round(time.time() - self.started, 1),
            "frames": frames,
            "ota": ota or None,
        }

    def _record_id(self, key: str, stable: bool) -> str:
        if stable:
            return hashlib.sha256(f"{self.cfg.device_id}|{key}".encode()).hexdigest()[:32]
        return uuid.uuid4().hex

    def _outbox(self) -> Outbox:
        return Outbox(self.home / "outbox.sqlite", max_unsent_samples=self.cfg.max_unsent_samples,
                      max_bytes=self.cfg.outbox_max_bytes, retention_s=self.cfg.outbox_retention_s)

    def _swap(self, active: ActiveModel) -> None:
        with self.shared.lock:
            self.shared.active = active
            self.shared.generation += 1
            self.shared.model_errors = 0

    # ------------------------------------------------------------------ inference loop
    def run(self) -> dict[str, Any]:
        """Run until stopped; returns a summary (frames, records, backlog)."""
        from edge_agent.sources import open_source

        active = self.store.open()
        if active is not None:
            for note in active.notes:
                self.log(note)
            self.log(f"serving {active.bundle_id} ({active.health.golden.message if active.health and active.health.golden else ''})")
        else:
            self.log("no verified model installed yet; waiting for an update")
        if active is not None:
            self._swap(active)
        outbox = self._outbox()
        net = None
        if self.cfg.server:
            net = threading.Thread(target=self._network_loop, name="vf-edge-net", daemon=True)
            net.start()
        produced = 0
        try:
            if self.cfg.source:
                frames = open_source(self.cfg.source, stop=self.stop_event, seen=outbox.has_frame,
                                     watch=self.cfg.watch, stride=self.cfg.stride, poll_s=self.cfg.poll_s)
                for frame in frames:
                    if not self._wait_for_model():
                        break
                    if self._infer(outbox, frame):
                        produced += 1
                    if self.cfg.max_frames is not None and produced >= self.cfg.max_frames:
                        break
            self.idle_event.set()
            if net is not None and not self.cfg.watch:
                # A one-shot run: let the network loop empty the outbox; give up only when
                # it stops making progress (the server is away), never while it drains.
                patience = max(5.0, self.cfg.timeout_s * 2)
                deadline = time.monotonic() + patience
                last = None
                while not self.stop_event.is_set() and time.monotonic() < deadline:
                    b = outbox.backlog()
                    left = b["records"] + b["samples"] + b["reports"]
                    if left == 0 and self.shared.sync.get("ok"):
                        break
                    if left != last:
                        last, deadline = left, time.monotonic() + patience
                    self.stop_event.wait(0.2)
            elif net is not None:
                self.stop_event.wait()
        finally:
            self.stop_event.set()
            if net is not None:
                net.join(timeout=self.cfg.timeout_s + 5)
            outbox.prune()
            summary = {"frames": produced, "backlog": outbox.backlog(), "totals": outbox.totals(),
                       "outbox": outbox.stats(),
                       "model": self.shared.active.bundle_id if self.shared.active else None}
            outbox.close()
        return summary

    def _wait_for_model(self) -> bool:
        # A one-shot run must end: it waits for a first model at most a couple of update checks.
        deadline = None if self.cfg.watch else time.monotonic() + max(60.0, 2.5 * self.cfg.ota_interval_s)
        while self.shared.active is None:
            if self.stop_event.wait(0.5):
                return False
            if deadline is not None and time.monotonic() > deadline:
                self.log("no model installed and none arrived over the air; stopping (--once)")
                return False
        return True

    def _infer(self, outbox: Outbox, frame: Any) -> bool:
        from edge_agent.predict import predict_bytes, predict_rgb
        from visionfleet.imaging import ImageError

        with self.shared.lock:
            active = self.shared.active
        assert active is not None
        card = active.model.card
        rid = self._record_id(frame.key, frame.stable)
        now = time.time()
        record: dict[str, Any] = {"id": rid, "ts": now, "model": card.name, "version": card.version}
        sample = None
        try:
            pred = (predict_bytes(active.model, frame.data, self.cfg.top_k) if frame.data is not None
                    else predict_rgb(active.model, frame.rgb, self.cfg.top_k))
        except ImageError as exc:
            record.update(status=400, error=str(exc)[:500], latency_ms=None)
        except Exception as exc:  # noqa: BLE001 - a model failing at run time: count it, maybe roll back
            self._model_error(outbox, active, exc)
            return False
        else:
            with self.shared.lock:
                self.shared.model_errors = 0
            record.update(status=200, latency_ms=round(pred.latency_ms, 3), **pred.fields)
            if pred.confidence < self.cfg.sample_below and self.rng.random() < self.cfg.sample_rate:
                sample = (self._sample_bytes(frame), {
                    "id": rid, "record_id": rid, "ts": now, "model": card.name, "version": card.version,
                    "predicted": pred.fields.get("label"), "confidence": pred.confidence,
                    "margin": pred.fields.get("margin"), "reason": "low_confidence",
                    "width": pred.fields.get("width"), "height": pred.fields.get("height"),
                })
        stored = outbox.add(record, frame_key=frame.key if frame.stable else None, sample=sample)
        if stored:
            with self.shared.lock:
                self.shared.frames += 1
        return stored

    @staticmethod
    def _sample_bytes(frame: Any) -> bytes:
        from visionfleet.imaging import ImageFormat, encode_image

        if frame.data is not None and len(frame.data) <= 2 * 1024 * 1024:
            return frame.data
        import cv2

        rgb = frame.rgb
        if rgb is None:
            from visionfleet.imaging import decode_image

            rgb = decode_image(frame.data)
        h, w = rgb.shape[:2]
        scale = min(1.0, 1024 / max(h, w))
        if scale < 1.0:
            rgb = cv2.resize(rgb, (int(w * scale), int(h * scale)), interpolation=cv2.INTER_AREA)
        return encode_image(rgb, ImageFormat.JPEG, quality=90)

    def _model_error(self, outbox: Outbox, active: ActiveModel, exc: Exception) -> None:
        with self.shared.lock:
            self.shared.model_errors += 1
            n = self.shared.model_errors
        self.log(f"model error on {active.bundle_id} ({n} in a row): {type(exc).__name__}: {exc}")
        if n < _MODEL_ERRORS_BEFORE_ROLLBACK:
            return
        prev = self.store.rollback(f"{n} run-time errors in a row: {exc}")
        restored = self.store.open() if prev else None
        outbox.add_report({"id": uuid.uuid4().hex, "ts": time.time(), "kind": "rollback", "outcome": "rolled_back",
                           "bundle_id": active.bundle_id, "model": active.manifest.model,
                           "version": active.manifest.version, "target": active.manifest.target,
                           "from_bundle": prev, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        if restored is not None:
            self.log(f"rolled back to {restored.bundle_id}")
            self._swap(restored)
        else:
            with self.shared.lock:
                self.shared.model_errors = 0  # nothing to go back to: keep trying the current one

    # ------------------------------------------------------------------ network loop
    def _network_loop(self) -> None:
        from edge_agent.net import Backoff

        outbox = self._outbox()
        sync_backoff = Backoff(1.0, max(2.0, min(60.0, self.cfg.sync_interval_s * 6)), self.rng)
        now = time.monotonic()
        next_sync = now
        next_prune = now
        dropped = self._note_drops(outbox, None)
        # First OTA check soon after start (jittered), then every interval +- jitter.
        next_ota = now + self.rng.uniform(0, min(5.0, self.cfg.ota_interval_s))
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                if now >= next_sync:
                    ok, more = self._sync_once(outbox)
                    if ok:
                        sync_backoff.reset()
                        next_sync = now if more else now + self.cfg.sync_interval_s
                    else:
                        next_sync = now + sync_backoff.next_delay()
                if now >= next_prune:
                    outbox.prune()
                    dropped = self._note_drops(outbox, dropped)
                    next_prune = now + _PRUNE_EVERY_S
                if now >= next_ota:
                    self._ota_once(outbox)
                    j = self.cfg.ota_jitter
                    next_ota = time.monotonic() + self.cfg.ota_interval_s * self.rng.uniform(1 - j, 1 + j)
                wait = max(0.0, min(next_sync, next_ota, next_prune) - time.monotonic())
                if wait:
                    self.stop_event.wait(min(wait, 1.0))
            # Stopping: one last sync so a clean shutdown leaves as little as possible behind.
            self._sync_once(outbox)
        finally:
            outbox.close()

    def _note_drops(self, outbox: Outbox, before: tuple[int, int] | None) -> tuple[int, int]:
        """Log the unsent rows the outbox dropped since ``before`` (they are counted in the status too)."""
        b = outbox.backlog()
        now = (b["dropped_samples"], b["dropped_records"])
        if before is not None and now != before:
            self.log(f"outbox full ({outbox.stats()['max_bytes'] // 2**20} MiB) or over its image cap: dropped "
                     f"{now[0] - before[0]} unsent images and {now[1] - before[1]} unsent records "
                     f"(oldest first; {now[0]} images and {now[1]} records in all)")
        return now

    def _sync_once(self, outbox: Outbox) -> tuple[bool, bool]:
        """Send one batch; returns (succeeded, more waiting)."""
        import base64

        from edge_agent.net import HttpError, post_json

        batch = outbox.pending(max_records=self._sync_batch)
        doc = {
            "device_id": self.cfg.device_id,
            "sent_at": time.time(),
            "status": self.status(outbox),
            "records": batch.records,
            "samples": [{**{k: v for k, v in s.items() if k != "image"}, "image": base64.b64encode(s["image"]).decode()}
                        for s in batch.samples],
            "reports": batch.reports,
        }
        try:
            res = post_json(f"{self.cfg.server.rstrip('/')}/v1/edge/sync", doc, timeout=self.cfg.timeout_s)  # type: ignore[union-attr]
        except HttpError as exc:
            self._note_sync(False, f"{exc}")
            if exc.status == 413 and self._sync_batch > 1:
                self._sync_batch = max(1, self._sync_batch // 2)
            return False, False
        except OSError as exc:
            self._note_sync(False, f"{type(exc).__name__}: {exc}")
            return False, False
        acked = res.get("acked") or {}
        outbox.ack(records=acked.get("records", ()), samples=acked.get("samples", ()), reports=acked.get("reports", ()))
        for rej in res.get("rejected") or []:
            self.log(f"server rejected {rej.get('kind')} {rej.get('id')}: {rej.get('error')}")
        self._note_sync(True, None, sent=len(batch))
        left = outbox.backlog()
        return True, bool(len(batch)) and (left["records"] + left["samples"] + left["reports"]) > 0

    def _note_sync(self, ok: bool, error: str | None, sent: int = 0) -> None:
        was_ok = self.shared.sync.get("ok", True)
        if was_ok and not ok:
            self.log(f"sync failed (records stay in the outbox): {error}")
        elif ok and not was_ok:
            self.log("sync ok again")
        with self.shared.lock:
            s = self.shared.sync
            s["ok"] = ok
            s["at"] = time.time()
            if ok:
                s["sent"] = s.get("sent", 0) + sent
                s.pop("error", None)
            else:
                s["error"] = error
                s["failures"] = s.get("failures", 0) + 1

    def _ota_once(self, outbox: Outbox) -> None:
        from edge_agent.ota import OtaClient, OtaFailure

        model, target = self._channel()
        if model is None:
            self._note_ota(result="no_channel", error="no model name: pass --model NAME or install a bundle first")
            return
        try:
            if self.ota_client is None or (self.ota_client.model, self.ota_client.target) != (model, target):
                self.ota_client = OtaClient(self.home, self.cfg.server, model=model, target=target,  # type: ignore[arg-type]
                                            device_id=self.cfg.device_id, root=self._root, timeout=self.cfg.timeout_s)
            active = self.shared.active
            decision = self.ota_client.check(active.bundle_id if active else None,
                                             active.manifest.version if active else None)
        except OtaFailure as exc:
            self._note_ota(result=exc.kind, error=str(exc))
            if exc.kind == "refused":
                self._report_refusal(outbox, str(exc))
            return
        except ValueError as exc:
            self._note_ota(result="refused", error=str(exc))
            return
        offered = decision.custom.get("bundle_id")
        if decision.action == "install" and offered in self.store.failed_ids():
            self._note_ota(result="failed_before", error=None, offered=offered)
            return  # it failed its health check here already; a fixed bundle comes with a new id
        self._note_ota(result=decision.action, error=None, offered=offered)
        if decision.action != "install":
            return
        self.log(f"update: {decision.reason}")
        try:
            archive = self.ota_client.download(decision)
        except OtaFailure as exc:
            self._note_ota(result=exc.kind, error=str(exc))
            if exc.kind == "refused":
                self._report_refusal(outbox, str(exc))
            return
        loaded: list = []
        result = self.store.install_archive(
            archive,
            expect={"bundle_id": decision.custom.get("bundle_id"), "model": model, "target": target,
                    "version": decision.version},
            loaded=loaded,
        )
        archive.unlink(missing_ok=True)
        self._report_install(outbox, result, target)
        if result.outcome == "installed" and loaded:
            m = self.store.manifest(result.bundle_id)  # type: ignore[arg-type]
            self._swap(ActiveModel(loaded[0], m, self.store.models / m.bundle_id))
            self.log(f"installed {result.bundle_id} (was {result.previous})")
        elif not result.ok:
            self.log(f"update {result.bundle_id} refused: {result.outcome}: {result.error}")

    def _note_ota(self, **fields: Any) -> None:
        with self.shared.lock:
            self.shared.ota.update(fields, at=time.time())

    def _report_install(self, outbox: Outbox, result: InstallResult, target: str) -> None:
        outbox.add_report({
            "id": uuid.uuid4().hex, "ts": time.time(), "kind": "install", "outcome": result.outcome,
            "bundle_id": result.bundle_id, "model": result.model, "version": result.version, "target": target,
            "from_bundle": result.previous, "error": (result.error or "")[:2000] or None,
        })

    def _report_refusal(self, outbox: Outbox, error: str) -> None:
        """Tell the server once per distinct refusal (a tampered mirror, expired metadata…)."""
        with self.shared.lock:
            if self.shared.ota.get("reported_refusal") == error:
                return
            self.shared.ota["reported_refusal"] = error
        model, target = self._channel()
        outbox.add_report({"id": uuid.uuid4().hex, "ts": time.time(), "kind": "ota", "outcome": "refused",
                           "model": model, "target": target, "error": error[:2000]})
