# No `from __future__ import annotations` here: FastAPI must see real annotation
# objects on the route methods that @serve.ingress rewrites.
"""The HTTP ingress deployment.

Per request: parse the body (``serve_apps.inputs``), choose the route (``routing``:
experiment arm, explicit version or ``@production``), decode and resize the image
once (``visionfleet.imaging``), call the ModelReplica through an ingress-side batch
(one replica call carries many requests), shape the response, and hand a telemetry
event to the non-blocking client. Experiments and batch knobs arrive through
``reconfigure(user_config)``: no restart, no dropped request.
"""

import asyncio
import logging
import random
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np
from fastapi import Request
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_apps.api import api
from serve_apps.batching import AdaptiveBatcher
from serve_apps.config import AppConfig, IngressUserConfig
from serve_apps.inputs import ApiError, parse_batch, parse_predict, read_body, request_id_from, status_for_image_error
from serve_apps.runner import LocalModels, ReplicaOutput
from serve_apps.routing import CompiledExperiment, Route, choose_route, compile_experiment
from visionfleet.imaging import ImageError, ResizeInfo, load_for_model
from visionfleet.inference import classification_result, confidence_stats
from visionfleet.registry import NotFound, Registry, ResolvedModel
from visionfleet.spec import ModelCard, Task, parse_ref
from visionfleet.telemetry import input_stats, make_event

__all__ = ["Ingress"]

logger = logging.getLogger("ray.serve")

# Route modules register on `api` when imported.
import serve_apps.routes_admin  # noqa: E402,F401
import serve_apps.routes_edge  # noqa: E402,F401
import serve_apps.routes_v2  # noqa: E402,F401
import serve_apps.routes_stream  # noqa: E402,F401


class _CardCache:
    """Alias lookups cached for ``ttl`` seconds; cards (immutable) cached LRU."""

    def __init__(self, registry: Registry, ttl: float, size: int = 64) -> None:
        self._registry = registry
        self._ttl = ttl
        self._aliases: dict[tuple[str, str], tuple[int, float]] = {}
        self._cards: "OrderedDict[tuple[str, int], ModelCard]" = OrderedDict()
        self._size = size

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
            self._cards[key] = card
            if len(self._cards) > self._size:
                self._cards.popitem(last=False)
        else:
            self._cards.move_to_end(key)
        return card

    def forget_aliases(self) -> None:
        self._aliases.clear()


def _metrics():
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
            "vf_ingress_batch_size", "Requests per replica call", boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("model",)
        ),
        "telemetry_dropped": metrics.Gauge("vf_telemetry_dropped", "Events dropped because the sink was behind"),
        "retries": metrics.Counter("vf_replica_retries", "Predictions retried on another replica", tag_keys=("model",)),
        "rejected": metrics.Counter("vf_rejected", "Requests refused to protect the service", tag_keys=("model", "reason")),
    }


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict, replica: "DeploymentHandle | None") -> None:
        self.cfg = AppConfig.model_validate(config)
        self.registry = Registry(f"{self.cfg.home}/registry", cache_dir=f"{self.cfg.home}/cache/registry")
        self.cards = _CardCache(self.registry, self.cfg.ingress.alias_ttl_s)
        self.replica = replica
        self._decode_pool = ThreadPoolExecutor(self.cfg.ingress.decode_threads, thread_name_prefix="decode")
        self.experiments: dict[str, CompiledExperiment] = {}
        self._rng = random.Random()
        self.sink = None
        self.telemetry = None
        if self.cfg.telemetry:
            from serve_apps.telemetry import TelemetryClient, get_or_create_sink

            self.sink = get_or_create_sink(self.cfg.home, self.cfg.ray_namespace)
            self.telemetry = TelemetryClient(self.sink)
            self.sink.configure.remote(self.cfg.monitoring.model_dump(), self.cfg.sampling.model_dump())
        self._m = _metrics()
        self._telemetry_on = self.telemetry is not None
        self._shadow_tasks: set[asyncio.Task] = set()
        self._ingress_batches = 0
        self._ingress_batched = 0
        self.in_flight = 0  # inference requests inside this replica (admission control in serve_apps.api)
        # Models run in ModelReplica deployments (a Ray handle call per batch) or here, in
        # this process (no hop; one ONNX Runtime worker thread, which releases the GIL).
        self._local: LocalModels | None = None
        if self.cfg.ingress.inference_in == "ingress":
            from visionfleet.inference import RuntimeOptions

            self._local = LocalModels(self.registry, RuntimeOptions(threads=self.cfg.replica.ort_threads),
                                      self.cfg.replica.max_models_per_replica)
            self._ort_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
        self._batcher = AdaptiveBatcher(
            self._replica_batch,
            max_batch_size=self.cfg.ingress.max_batch_size,
            batch_wait_timeout_s=self.cfg.ingress.batch_wait_timeout_s,
            # one worker thread runs the local sessions: a second batch in flight would only
            # wait in its queue instead of growing in ours
            max_concurrent=self.cfg.ingress.max_concurrent_batches or (1 if self._local is not None else 2),
        )

    def reconfigure(self, user_config: dict) -> None:
        """Experiments and batch knobs, applied in place (Serve calls this, no restart)."""
        uc = IngressUserConfig.model_validate(user_config or {})
        compiled = {}
        for exp in uc.experiments:
            if exp.status != "running":
                continue
            if exp.model in compiled:
                raise ValueError(f"two running experiments on model {exp.model!r}")
            compiled[exp.model] = compile_experiment(exp)
        self.experiments = compiled  # one atomic swap: a request sees the old or the new set
        self.cards.forget_aliases()  # a stop may have moved @production
        if self.sink is not None:
            # Experiments given in a Serve config file (not started through the API) get
            # recorded so the coordinator watches them too; already-known ones are a no-op.
            for exp in uc.experiments:
                if exp.status == "running":
                    self.sink.exp_adopt.remote(exp.model_dump(mode="json"))
        if uc.telemetry is not None:
            self._telemetry_on = uc.telemetry and self.telemetry is not None
        if uc.max_batch_size is not None:
            self._batcher.set_max_batch_size(uc.max_batch_size)
        if uc.batch_wait_timeout_s is not None:
            self._batcher.set_batch_wait_timeout_s(uc.batch_wait_timeout_s)
        if uc.max_concurrent_batches is not None:
            self._batcher.set_max_concurrent(uc.max_concurrent_batches)

    # ------------------------------------------------------------------ helpers
    async def body(self, request: Request) -> bytes:
        return await read_body(request.stream(), request.headers.get("content-length"), self.cfg.max_body_bytes)

    def target(self, ref: str) -> "tuple[ResolvedModel, ModelCard]":
        resolved = self.cards.resolve(ref)
        return resolved, self.cards.card(resolved.name, resolved.version)

    def route(self, request: Request, model: Optional[str], version: Optional[str]) -> Route:
        try:
            return choose_route(
                model, version, self.cfg.default_model, self.experiments, request.headers.get("x-client-id"), self._rng
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def _decode(self, data: bytes, card: ModelCard) -> "tuple[np.ndarray, ResizeInfo]":
        try:
            return load_for_model(data, card.input_size, card.resize, max_pixels=self.cfg.max_pixels)
        except ImageError as exc:
            raise ApiError(status_for_image_error(exc), str(exc)) from None

    async def decode_many(self, images: "list[bytes]", card: ModelCard, per_item: bool) -> list:
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._decode_pool, self._decode, b, card) for b in images]
        return list(await asyncio.gather(*futures, return_exceptions=per_item))

    async def _replica_batch(self, mid: str, arrays: "list[np.ndarray]") -> "list[Any]":
        """One replica call for the requests the batcher grouped under one model version.

        Returns per request its outputs, or the ApiError that request gets.
        """
        self._ingress_batches += 1
        self._ingress_batched += len(arrays)
        batch = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        self._m["batch"].observe(len(arrays), tags={"model": mid})
        try:
            if self._local is not None:
                out = await self._local.run(mid, batch, self._ort_pool)
            else:
                out = await self._call_replica(mid, batch)
        except ApiError as exc:
            return [exc] * len(arrays)
        if out.error is not None:
            return [ApiError(out.status, out.error)] * len(arrays)
        results: list[Any] = []
        start = 0
        for a in arrays:
            k = len(a)
            results.append([o[start : start + k] for o in out.outputs])
            start += k
        return results

    def count_rejected(self, reason: str) -> None:
        self._m["rejected"].inc(tags={"model": "", "reason": reason})

    async def _call_replica(self, mid: str, batch: np.ndarray) -> ReplicaOutput:
        """Call a model replica; retry a prediction whose replica died on another one.

        Predictions are idempotent and telemetry is keyed by request id (recorded once,
        by the ingress, after the final outcome), so a retry never counts twice.
        """
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        delays = self.cfg.ingress.retry_backoff_s
        for attempt in range(len(delays) + 1):
            try:
                return await self.replica.options(multiplexed_model_id=mid).predict.remote(batch)
            except BackPressureError:
                self._m["rejected"].inc(tags={"model": mid, "reason": "replica_queue_full"})
                raise ApiError(503, "model replicas are at capacity; retry later",
                               {"Retry-After": str(self.cfg.ingress.retry_after_s)}) from None
            except (RayActorError, DeploymentUnavailableError) as exc:
                if attempt == len(delays):
                    logger.warning("replica call failed after %d retries: %r", attempt, exc)
                    break
                self._m["retries"].inc(tags={"model": mid})
                await asyncio.sleep(delays[attempt])
            except Exception as exc:  # noqa: BLE001 - anything else: the caller's request still gets JSON
                logger.warning("replica call failed: %r", exc)
                break
        raise ApiError(503, "model replica unavailable; retry later", {"Retry-After": str(self.cfg.ingress.retry_after_s)})

    async def infer(self, resolved: ResolvedModel, batch: np.ndarray) -> "list[np.ndarray]":
        out = await self._batcher.submit(f"{resolved.name}:{resolved.version}", batch)
        if isinstance(out, ApiError):
            raise out
        return out

    def result(self, card: ModelCard, outputs: "list[np.ndarray]", i: int, top_k: int, info: ResizeInfo) -> "dict[str, Any]":
        if card.task is Task.CLASSIFICATION:
            return classification_result(outputs[0][i], card.labels, top_k)
        from visionfleet.detection import detection_result

        boxes, scores, classes = (o[i] for o in outputs[:3])
        return detection_result(boxes, scores, classes, card.labels, info)

    def record(self, *, request_id: str, role: str, route: Route, resolved: "ResolvedModel | None", card: "ModelCard | None",
               status: int, latency_ms: float, result: "dict | None" = None, outputs_row: "np.ndarray | None" = None,
               img: "np.ndarray | None" = None, info: "ResizeInfo | None" = None, client_key: "str | None" = None,
               error: "str | None" = None, data: "bytes | None" = None) -> None:
        """Metrics and a telemetry event (unless telemetry is paused). Never raises."""
        if not self._telemetry_on:
            return
        try:
            model = resolved.name if resolved else parse_ref(route.ref).name
            version = str(resolved.version) if resolved else ""
            tags = {"model": model, "model_version": version, "variant": route.variant if role == "primary" else "shadow"}
            if role == "primary":
                self._m["requests"].inc(tags={**tags, "status": str(status)})
                if status == 200:
                    self._m["latency"].observe(latency_ms, tags=tags)
            if result is not None and role == "primary":
                self._m["confidence"].observe(float(result.get("score") or 0.0), tags=tags)
            ev: dict[str, Any] = {
                "request_id": request_id,
                "role": role,
                "source": "server",
                "model": model,
                "version": resolved.version if resolved else None,
                "variant": route.variant if role == "primary" else "shadow",
                "experiment": route.experiment,
                "client_key": client_key,
                "status": status,
                "error": error,
                "latency_ms": latency_ms,
                "task": card.task.value if card else None,
            }
            if result is not None:
                ev["label"] = result.get("label")
                ev["class_id"] = result.get("class_id")
                ev["confidence"] = result.get("score")
                if card is not None and card.task is Task.DETECTION:
                    ev["detections"] = result.get("count")
                elif outputs_row is not None:
                    st = confidence_stats(outputs_row)
                    ev["margin"], ev["entropy"] = st["margin"], st["entropy"]
            if info is not None:
                ev["width"], ev["height"] = info.original_width, info.original_height
            if img is not None:
                ev.update(input_stats(img))
            self.telemetry.add(make_event(**ev))
            if role == "primary" and result is not None and img is not None:
                self._maybe_sample(ev, data, img)
            self._m["telemetry_dropped"].set(self.telemetry.dropped)
        except Exception:  # noqa: BLE001 - telemetry must never fail a request
            logger.exception("telemetry record failed")

    def _maybe_sample(self, ev: dict, data: "bytes | None", img: np.ndarray) -> None:
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
        image = data if data is not None and len(data) <= sc.max_image_bytes else encode_image(img, "png")
        self.telemetry.add_sample({  # type: ignore[union-attr]
            "sample_id": ev["request_id"], "ts": ev.get("ts") or time.time(), "source": ev.get("source"),
            "model": ev.get("model"), "version": ev.get("version"), "predicted": ev.get("label"),
            "confidence": ev.get("confidence"), "margin": ev.get("margin"), "reason": reason, "image": image,
            "width": ev.get("width"), "height": ev.get("height"),
        })

    def shadow(self, route: Route, request_id: str, data: bytes, primary: "tuple[ModelCard, np.ndarray, ResizeInfo]",
               client_key: "str | None") -> None:
        """Mirror to the shadow model in the background; the caller never waits for it."""
        primary_card, primary_img, primary_info = primary

        async def go() -> None:
            t0 = time.perf_counter()
            resolved = card = None
            try:
                resolved, card = self.target(route.shadow_ref)  # type: ignore[arg-type]
                if tuple(card.input_size) == tuple(primary_card.input_size) and card.resize == primary_card.resize:
                    img, info = primary_img, primary_info  # same preprocessing: reuse the decoded input
                else:
                    loop = asyncio.get_running_loop()
                    img, info = await loop.run_in_executor(self._decode_pool, self._decode, data, card)
                outputs = await self.infer(resolved, img[None])
                res = self.result(card, outputs, 0, 1, info)
                self.record(request_id=request_id, role="shadow", route=route, resolved=resolved, card=card, status=200,
                            latency_ms=(time.perf_counter() - t0) * 1000, result=res,
                            outputs_row=outputs[0][0] if card.task is Task.CLASSIFICATION else None, client_key=client_key)
            except ApiError as exc:
                self.record(request_id=request_id, role="shadow", route=route, resolved=resolved, card=card,
                            status=exc.status, latency_ms=(time.perf_counter() - t0) * 1000, error=exc.message)
            except Exception as exc:  # noqa: BLE001 - the shadow must never affect the caller
                logger.warning("shadow request failed: %r", exc)

        task = asyncio.get_running_loop().create_task(go())
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    # ------------------------------------------------------------------ routes
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "default_model": self.cfg.default_model, "experiments": sorted(self.experiments)}

    @api.get("/v1/stats")
    async def stats(self) -> dict:
        """Batching and telemetry figures of this ingress replica and one model replica."""
        if self._local is not None:
            m = self._local
            replica = {"inference_in": "ingress", "batches": m.runs, "images": m.images,
                       "avg_batch_images": m.images / m.runs if m.runs else 0.0,
                       "loaded": m.loaded, "loads": m.loads, "evictions": m.evictions}
        else:
            try:
                replica = await self.replica.stats.remote()
            except Exception as exc:  # noqa: BLE001 - report, do not fail
                replica = {"error": repr(exc)}
        return {
            "ingress": {
                "inference_in": self.cfg.ingress.inference_in,
                "replica_calls": self._ingress_batches,
                "requests": self._ingress_batched,
                "avg_requests_per_call": self._ingress_batched / self._ingress_batches if self._ingress_batches else 0.0,
                "max_batch_size": self._batcher.max_batch_size,
                "batch_wait_timeout_s": self._batcher.batch_wait_timeout_s,
                "max_concurrent_batches": self._batcher.max_concurrent,
                "queued": self._batcher.queued,
            },
            "replica": replica,
            "telemetry": None if self.telemetry is None else {"sent": self.telemetry.sent, "dropped": self.telemetry.dropped},
            "experiments": sorted(self.experiments),
        }

    @api.get("/v1/models")
    async def list_models(self) -> dict:
        out = []
        for name in self.registry.list_models():
            out.append({"name": name, "versions": self.registry.versions(name), "aliases": self.registry.aliases(name)})
        return {"models": out}

    @api.get("/v1/models/{name}")
    async def get_model(self, name: str, version: Optional[str] = None) -> dict:
        from serve_apps.inputs import model_ref_from

        resolved, card = self.target(model_ref_from(name, version, self.cfg.default_model))
        return {"model": resolved.name, "version": resolved.version, "card": card.model_dump(mode="json")}

    @api.post("/v1/predict")
    async def predict(self, request: Request, model: Optional[str] = None, version: Optional[str] = None,
                      top_k: Optional[int] = None):
        t0 = time.perf_counter()
        request_id = request_id_from(request.headers.get("x-request-id"), uuid.uuid4().hex)
        client_key = request.headers.get("x-client-id")
        body = await self.body(request)
        inp = await parse_predict(request.headers.get("content-type"), body)
        route = self.route(request, inp.model or model, inp.version or version)
        resolved = card = None
        try:
            resolved, card = self.target(route.ref)
            (img, info), = await self.decode_many(inp.images, card, per_item=False)
            outputs = await self.infer(resolved, img[None])
            res = self.result(card, outputs, 0, inp.top_k or top_k or self.cfg.top_k, info)
        except ApiError as exc:
            self.record(request_id=request_id, role="primary", route=route, resolved=resolved, card=card,
                        status=exc.status, latency_ms=(time.perf_counter() - t0) * 1000, client_key=client_key,
                        error=exc.message)
            raise
        latency_ms = (time.perf_counter() - t0) * 1000
        if route.shadow_ref is not None:
            self.shadow(route, request_id, inp.images[0], (card, img, info), client_key)
        self.record(request_id=request_id, role="primary", route=route, resolved=resolved, card=card, status=200,
                    latency_ms=latency_ms, result=res,
                    outputs_row=outputs[0][0] if card.task is Task.CLASSIFICATION else None,
                    img=img, info=info, client_key=client_key, data=inp.images[0])
        return {
            "request_id": request_id,
            "model": resolved.name,
            "version": resolved.version,
            "variant": route.variant,
            "latency_ms": round(latency_ms, 3),
            **res,
        }

    @api.post("/v1/predict/batch")
    async def predict_batch(self, request: Request, model: Optional[str] = None, version: Optional[str] = None,
                            top_k: Optional[int] = None):
        t0 = time.perf_counter()
        request_id = request_id_from(request.headers.get("x-request-id"), uuid.uuid4().hex)
        body = await self.body(request)
        inp = await parse_batch(request.headers.get("content-type"), body, self.cfg.ingress.max_batch_items)
        route = self.route(request, inp.model or model, inp.version or version)
        resolved, card = self.target(route.ref)
        decoded = await self.decode_many(inp.images, card, per_item=True)
        ok = [i for i, d in enumerate(decoded) if not isinstance(d, BaseException)]
        outputs = None
        if ok:
            outputs = await self.infer(resolved, np.stack([decoded[i][0] for i in ok]))
        k = inp.top_k or top_k or self.cfg.top_k
        pos = {i: j for j, i in enumerate(ok)}
        results: list[dict[str, Any]] = []
        for i, d in enumerate(decoded):
            if isinstance(d, ApiError):
                results.append({"index": i, "error": d.message, "status": d.status})
            elif isinstance(d, BaseException):
                results.append({"index": i, "error": f"could not process image ({type(d).__name__})", "status": 400})
            else:
                results.append({"index": i, **self.result(card, outputs, pos[i], k, d[1])})  # type: ignore[arg-type]
        latency_ms = (time.perf_counter() - t0) * 1000
        for i in ok:
            r = results[i]
            self.record(request_id=f"{request_id}#{i}", role="primary", route=route, resolved=resolved, card=card,
                        status=200, latency_ms=latency_ms, result=r,
                        outputs_row=outputs[0][pos[i]] if card.task is Task.CLASSIFICATION else None,  # type: ignore[index]
                        img=decoded[i][0], info=decoded[i][1], client_key=request.headers.get("x-client-id"))
        return {
            "request_id": request_id,
            "model": resolved.name,
            "version": resolved.version,
            "variant": route.variant,
            "latency_ms": round(latency_ms, 3),
            "results": results,
        }
