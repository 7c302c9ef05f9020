"""The ingress's request path: route -> images -> one prediction step -> outcomes -> record.

Every route that predicts (``/v1/predict``, ``/v1/predict/batch``, the v2 ``infer``
routes, the WebSocket stream, and shadow traffic) calls :meth:`PredictionService.run`,
which decodes and resizes the images once (``visionfleet.imaging``), sends them through
the adaptive batcher to the model (a ModelReplica, or the sessions this process holds),
turns the outputs into typed predictions (``visionfleet.predict``, the path the edge
agent and the batch jobs share) and records one :class:`Outcome` per image. The routes
only parse their protocol and shape their answer.

Pure Python over an injected model runner and telemetry client: the Serve deployment
(``serve_apps.ingress``) is the thin shell that builds it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from serve_apps.batching import AdaptiveBatcher
from serve_apps.config import AppConfig
from serve_apps.inputs import ApiError, status_for_image_error
from serve_apps.routing import CompiledExperiment, Route, choose_route
from serve_apps.runner import ReplicaOutput, store_unavailable_message
from visionfleet.imaging import ImageError, ResizeInfo, SizeNotServed, choose_size, preprocess
from visionfleet.predict import Prediction, event_fields, predictions
from visionfleet.registry import NotFound, Registry, ResolvedModel
from visionfleet.spec import ModelCard, parse_ref
from visionfleet.store import StoreError
from visionfleet.telemetry import make_event

__all__ = ["Outcome", "PredictionService", "CardCache", "RunBatch", "store_unavailable"]

logger = logging.getLogger("ray.serve")

# (model id "NAME:VERSION", uint8 [k, H, W, 3]) -> one batch's outputs or its error
RunBatch = Callable[[str, np.ndarray], Awaitable[ReplicaOutput]]


@dataclass(frozen=True)
class Outcome:
    """What became of one image of one request: its prediction, or its error."""

    request_id: str
    role: str  # "primary" or "shadow"
    route: Route
    status: int  # 200, or the HTTP status of the error
    latency_ms: float
    resolved: ResolvedModel | None = None
    card: ModelCard | None = None
    prediction: Prediction | None = None
    outputs: tuple[np.ndarray, ...] | None = None  # this image's rows of the model outputs
    img: np.ndarray | None = None  # the model input (input statistics, labeling samples)
    info: ResizeInfo | None = None
    source: Any = None  # the image as the client sent it (bytes or pixels)
    client_key: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


def store_unavailable(exc: StoreError, retry_after_s: float = 1.0) -> ApiError:
    """The 503 of a request that needed the model store or the database while it was down."""
    return ApiError(503, store_unavailable_message(exc), {"Retry-After": f"{retry_after_s:g}"})


class CardCache:
    """Alias lookups cached for ``ttl`` seconds; cards (immutable) cached LRU.

    While the store (or the database) does not answer, an alias looked up before keeps its
    last version, so requests for a loaded model keep being served; a lookup that has nothing
    to fall back on is a 503.
    """

    def __init__(self, registry: Registry, ttl: float, size: int = 64, retry_after_s: float = 1.0) -> None:
        self._registry = registry
        self._ttl = ttl
        self._aliases: dict[tuple[str, str], tuple[int, float]] = {}
        self._cards: OrderedDict[tuple[str, int], ModelCard] = OrderedDict()
        self._size = size
        self._retry_after_s = retry_after_s

    def resolve(self, ref: str) -> ResolvedModel:
        try:
            r = parse_ref(ref)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        if r.version is not None:
            self.card(r.name, r.version)  # 404 when missing
            return ResolvedModel(r.name, r.version)
        key = (r.name, r.alias or "production")
        hit = self._aliases.get(key)
        now = time.monotonic()
        if hit and hit[1] > now:
            return ResolvedModel(r.name, hit[0])
        try:
            resolved = self._registry.resolve(r)
        except NotFound as exc:
            raise ApiError(404, str(exc)) from None
        except StoreError as exc:
            if hit:  # expired, but the last answer beats an error while the store is away
                logger.warning("alias %s@%s: store unavailable, keeping version %d: %s", *key, hit[0], exc)
                self._aliases[key] = (hit[0], now + self._ttl)  # ask again after a TTL, not on every request
                return ResolvedModel(r.name, hit[0])
            raise store_unavailable(exc, self._retry_after_s) from None
        self._aliases[key] = (resolved.version, now + self._ttl)
        return resolved

    def card(self, name: str, version: int) -> ModelCard:
        key = (name, version)
        card = self._cards.get(key)
        if card is None:
            try:
                card = self._registry.card(name, version)
            except NotFound as exc:
                raise ApiError(404, str(exc)) from None
            except StoreError as exc:
                raise store_unavailable(exc, self._retry_after_s) from None
            self._cards[key] = card
            if len(self._cards) > self._size:
                self._cards.popitem(last=False)
        else:
            self._cards.move_to_end(key)
        return card

    def forget_aliases(self) -> None:
        self._aliases.clear()


def _metrics() -> dict[str, Any]:
    from ray.serve import metrics

    tags = ("model", "model_version", "variant")
    return {
        "requests": metrics.Counter("vf_requests", "Predictions served", tag_keys=tags + ("status",)),
        "latency": metrics.Histogram(
            "vf_latency_ms",
            "End-to-end prediction latency in the ingress (ms)",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000],
            tag_keys=tags,
        ),
        "confidence": metrics.Histogram(
            "vf_confidence",
            "Top-1 confidence (detection: highest box score)",
            boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
            tag_keys=tags,
        ),
        "batch": metrics.Histogram(
            "vf_ingress_batch_size", "Requests per model call", boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("model",)
        ),
        "telemetry_dropped": metrics.Gauge("vf_telemetry_dropped", "Events dropped because the sink was behind"),
        "rejected": metrics.Counter("vf_rejected", "Requests refused to protect the service", tag_keys=("model", "reason")),
    }


class PredictionService:
    """Routing, the one prediction step and its record, for one ingress replica.

    Args:
        cfg: the app's config.
        registry: the model registry.
        run_batch: runs one batch on a version (a ModelReplica call or local sessions).
        telemetry: the non-blocking telemetry client (``None``: telemetry off).
        max_concurrent: batches in flight at once (the batcher's slots).
    """

    def __init__(self, cfg: AppConfig, registry: Registry, run_batch: RunBatch, *, telemetry: Any = None,
                 max_concurrent: int = 2) -> None:
        self.cfg = cfg
        self.registry = registry
        self.cards = CardCache(registry, cfg.ingress.alias_ttl_s, retry_after_s=cfg.ingress.retry_after_s)
        self.experiments: dict[str, CompiledExperiment] = {}
        self.telemetry = telemetry
        self.telemetry_on = telemetry is not None
        self.in_flight = 0  # inference requests inside this replica (admission control, serve_apps.api)
        self._run_batch = run_batch
        self._decode_pool = ThreadPoolExecutor(cfg.ingress.decode_threads, thread_name_prefix="decode")
        self._rng = random.Random()
        self._m = _metrics()
        self._shadow_tasks: set[asyncio.Task] = set()
        self.batcher = AdaptiveBatcher(
            self._batch,
            max_batch_size=cfg.ingress.max_batch_size,
            batch_wait_timeout_s=cfg.ingress.batch_wait_timeout_s,
            max_concurrent=cfg.ingress.max_concurrent_batches or max_concurrent,
            size=len,  # the cap counts images, not requests
        )

    # ------------------------------------------------------------------ lookups
    def target(self, ref: str) -> tuple[ResolvedModel, ModelCard]:
        resolved = self.cards.resolve(ref)
        return resolved, self.cards.card(resolved.name, resolved.version)

    def route(self, headers: Any, model: str | None, version: str | None) -> Route:
        try:
            return choose_route(model, version, self.cfg.default_model, self.experiments, headers.get("x-client-id"),
                                self._rng)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def count_rejected(self, reason: str) -> None:
        self._m["rejected"].inc(tags={"model": "", "reason": reason})

    # ------------------------------------------------------------------ the step
    async def run(self, route: Route, images: Sequence[Any], *, request_ids: Sequence[str], t0: float,
                  top_k: int | None = None, client_key: str | None = None, per_item: bool = False,
                  name: str | None = None, role: str = "primary", size: str | None = None) -> list[Outcome]:
        """Predict every image of one request on the route's version; one outcome per image.

        Args:
            route: where the request goes (``route``).
            images: encoded images (bytes) or decoded RGB uint8 ``[H, W, 3]`` pixels (an
                ``(img, info)`` pair is taken as already preprocessed for this model).
            request_ids: one id per image (the telemetry key).
            t0: ``time.perf_counter()`` when the request arrived (latency is measured from it).
            top_k: classes kept in ``probs`` (default: the app's).
            per_item: an image that does not decode is that image's error (batch route);
                otherwise the request fails with it.
            name: the input's name, prefixed to per-image errors (``images[2]: ...``).
            role: ``primary``, or ``shadow`` for mirrored traffic.
            size: the model-input size asked for (``320`` or ``320x320``; one of the card's
                ``input_sizes``, else a 400); ``None``: each image goes to the listed size
                nearest its own (:func:`visionfleet.imaging.choose_size`).
        Raises:
            ApiError: the request fails (unknown model, bad image unless ``per_item``,
                model unavailable); its outcomes are recorded first.
        """
        resolved = card = None
        try:
            resolved, card = self.target(route.ref)
            if size is not None:
                try:
                    choose_size(card.sizes, None, size)  # before decoding: the whole request is refused
                except ValueError as exc:  # SizeNotServed, or not a size at all
                    raise ApiError(400, str(exc)) from None
            decoded = await self._decode_many(images, card, size)
            if not per_item:
                for i, d in enumerate(decoded):
                    if isinstance(d, ApiError):
                        prefix = f"{name}[{i}]: " if name else ""
                        raise ApiError(d.status, prefix + d.message, d.headers)
            ok = [i for i, d in enumerate(decoded) if not isinstance(d, ApiError)]
            # Images of different sizes never share a batch tensor: one batcher call per size.
            groups: dict[tuple[int, int], list[int]] = {}
            for i in ok:
                groups.setdefault(tuple(decoded[i][0].shape[:2]), []).append(i)
            runs = await asyncio.gather(*(self._infer(resolved, hw, np.stack([decoded[i][0] for i in idx]))
                                          for hw, idx in groups.items()))
            preds: dict[int, Prediction] = {}
            rows: dict[int, tuple[np.ndarray, ...]] = {}
            for idx, outputs in zip(groups.values(), runs):
                try:
                    got = predictions(card, outputs, [decoded[i][1] for i in idx], top_k=top_k or self.cfg.top_k)
                except ValueError as exc:  # the model, not the client: its outputs do not fit its card
                    raise ApiError(500, f"{resolved} returned outputs its card does not describe: {exc}") from None
                for j, i in enumerate(idx):
                    preds[i], rows[i] = got[j], tuple(o[j] for o in outputs)
        except ApiError as exc:
            ms = (time.perf_counter() - t0) * 1000
            for rid in request_ids:
                self.record(Outcome(request_id=rid, role=role, route=route, status=exc.status, latency_ms=ms,
                                    resolved=resolved, card=card, client_key=client_key, error=exc.message))
            raise
        latency_ms = (time.perf_counter() - t0) * 1000
        result: list[Outcome] = []
        for i, (rid, d) in enumerate(zip(request_ids, decoded)):
            base = dict(request_id=rid, role=role, route=route, latency_ms=latency_ms, resolved=resolved, card=card,
                        source=images[i], client_key=client_key)
            if isinstance(d, ApiError):
                result.append(Outcome(status=d.status, error=d.message, **base))
                continue
            result.append(Outcome(status=200, prediction=preds[i], outputs=rows[i], img=d[0], info=d[1], **base))
        for o in result:
            self.record(o)
        if role == "primary" and route.shadow_ref is not None:
            for o in result:
                if o.ok:
                    self._shadow(o, size)
        return result

    def _decode(self, image: Any, card: ModelCard, size: str | None) -> tuple[np.ndarray, ResizeInfo]:
        if isinstance(image, tuple):  # already decoded for this preprocessing (a shadow's input)
            return image
        try:
            return preprocess(image, card.sizes, card.resize, size=size, max_pixels=self.cfg.max_pixels)
        except ImageError as exc:
            raise ApiError(status_for_image_error(exc), str(exc)) from None
        except SizeNotServed as exc:
            raise ApiError(400, str(exc)) from None

    async def _decode_many(self, images: Sequence[Any], card: ModelCard, size: str | None = None) -> list[Any]:
        """Decoded ``(img, info)`` per image, or the ApiError it gets (decoded off the event loop)."""
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._decode_pool, self._decode, b, card, size) for b in images]
        out = await asyncio.gather(*futures, return_exceptions=True)
        return [d if not isinstance(d, BaseException) or isinstance(d, ApiError)
                else ApiError(400, f"could not process image ({type(d).__name__})") for d in out]

    async def _infer(self, resolved: ResolvedModel, hw: tuple[int, int], batch: np.ndarray) -> list[np.ndarray]:
        # Batches are keyed by (version, size): the batcher's slots stay shared by every key.
        out = await self.batcher.submit((f"{resolved.name}:{resolved.version}", hw), batch)
        if isinstance(out, ApiError):
            raise out
        return out

    async def _batch(self, key: tuple[str, tuple[int, int]], arrays: list[np.ndarray]) -> list[Any]:
        """One model call for the requests the batcher grouped under one version and input size.

        Returns per request its outputs, or the ApiError that request gets.
        """
        model_id = key[0]
        self._m["batch"].observe(len(arrays), tags={"model": model_id})
        batch = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        try:
            out = await self._run_batch(model_id, batch)
        except ApiError as exc:
            return [exc] * len(arrays)
        if out.error is not None:
            return [ApiError(out.status, out.error)] * len(arrays)
        results: list[Any] = []
        start = 0
        for a in arrays:
            results.append([o[start : start + len(a)] for o in out.outputs])  # type: ignore[union-attr]
            start += len(a)
        return results

    def _shadow(self, primary: Outcome, size: str | None = None) -> None:
        """Mirror one image to the shadow version in the background; the caller never waits.

        The shadow gets the size the request asked for when it serves it, else its own
        nearest size (a shadow never turns a request the primary accepted into an error).
        """

        async def go() -> None:
            try:
                t0 = time.perf_counter()
                route = primary.route
                _, card = self.target(route.shadow_ref)  # type: ignore[arg-type]
                same = card.sizes == primary.card.sizes and card.resize == primary.card.resize
                # same preprocessing: reuse the decoded input rather than decode again
                image = (primary.img, primary.info) if same else primary.source
                asked = size
                if asked is not None:
                    try:
                        choose_size(card.sizes, None, asked)
                    except ValueError:
                        asked = None
                shadow_route = Route(ref=route.shadow_ref, variant=route.variant, experiment=route.experiment)  # type: ignore[arg-type]
                await self.run(shadow_route, [image], request_ids=[primary.request_id], t0=t0, top_k=1,
                               client_key=primary.client_key, role="shadow", size=asked)
            except ApiError:
                pass  # recorded by run()
            except Exception as exc:  # noqa: BLE001 - the shadow must never affect the caller
                logger.warning("shadow request failed: %r", exc)

        task = asyncio.get_running_loop().create_task(go())
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    # ------------------------------------------------------------------ record
    def record(self, o: Outcome) -> None:
        """Metrics and a telemetry event for one outcome (unless telemetry is paused). Never raises."""
        if not self.telemetry_on:
            return
        try:
            model = o.resolved.name if o.resolved else parse_ref(o.route.ref).name
            variant = o.route.variant if o.role == "primary" else "shadow"
            tags = {"model": model, "model_version": str(o.resolved.version) if o.resolved else "", "variant": variant}
            if o.role == "primary":
                self._m["requests"].inc(tags={**tags, "status": str(o.status)})
                if o.ok:
                    self._m["latency"].observe(o.latency_ms, tags=tags)
                if o.prediction is not None:
                    self._m["confidence"].observe(o.prediction.score, tags=tags)
            ev: dict[str, Any] = {
                "request_id": o.request_id, "role": o.role, "source": "server", "model": model,
                "version": o.resolved.version if o.resolved else None, "variant": variant,
                "experiment": o.route.experiment, "client_key": o.client_key, "status": o.status, "error": o.error,
                "latency_ms": o.latency_ms, "task": o.card.task.value if o.card else None,
            }
            if o.prediction is not None:
                ev.update(event_fields(o.prediction, o.img))
            self.telemetry.add(make_event(**ev))
            if o.role == "primary" and o.prediction is not None and o.img is not None:
                self._maybe_sample(ev, o)
            self._m["telemetry_dropped"].set(self.telemetry.dropped)
        except Exception:  # noqa: BLE001 - telemetry must never fail a request
            logger.exception("telemetry record failed")

    def _maybe_sample(self, ev: dict, o: Outcome) -> None:
        """Offer an unsure prediction (or a random share) to the active-learning sampler."""
        from visionfleet.imaging import encode_image
        from visionfleet.sampling import SamplingPolicy, is_candidate

        sc = self.cfg.sampling
        if not sc.enabled:
            return
        reason = is_candidate(
            SamplingPolicy(low_confidence=sc.low_confidence, margin=sc.margin, random_share=sc.random_share),
            float(ev.get("confidence") or 0.0), ev.get("margin"), self._rng.random(),
        )
        if reason is None:
            return
        # Keep the original when it is small; else the model input (the label still applies).
        data = o.source if isinstance(o.source, bytes) and len(o.source) <= sc.max_image_bytes else None
        image = data if data is not None else encode_image(o.img, "png")  # type: ignore[arg-type]
        self.telemetry.add_sample({
            "sample_id": ev["request_id"], "ts": ev.get("ts") or time.time(), "source": ev.get("source"),
            "model": ev.get("model"), "version": ev.get("version"), "predicted": ev.get("label"),
            "confidence": ev.get("confidence"), "margin": ev.get("margin"), "reason": reason, "image": image,
            "width": ev.get("width"), "height": ev.get("height"),
        })
