"""`visionfleet scenario drift`: the whole closed loop, end to end, on the embedded cluster.

serve v1 -> steady traffic -> the input distribution shifts (darker, low contrast,
blurred, color cast: the generator's drift knobs) -> confidence drops -> the
controller detects it -> sampled inputs are labeled (the generator knows the truth; in
real use a person does) and the labels travel over HTTP (/v1/feedback) -> Ray Train
fine-tune -> gate -> INT8 compression -> canary experiment with automatic decision ->
promotion -> recovery, scored on a fresh drifted holdout nobody labeled or trained on.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from visionfleet.cli._common import cli_errors, err, out, print_json, progress

app = typer.Typer(help="Scenarios that exercise the whole system end to end.", no_args_is_help=True)

# Darker, lower contrast, slightly blurred, with a color cast: v1 drops from ~96% to
# ~84% top-1 and its mean confidence from ~0.89 to ~0.76 (measured on the demo model).
DRIFT = {"brightness": -70.0, "contrast": 0.5, "blur": 0.6, "color_cast": (35.0, 10.0, -35.0)}


def _score(model_dir: Path, seed: int, start: int, n: int, size: int, drift) -> float:
    """Top-1 of a registered model on fresh generated images (optionally drifted)."""
    from visionfleet.datasets.synth import apply_drift, render_sample
    from visionfleet.imaging import encode_image, load_for_model
    from visionfleet.inference import RuntimeOptions, load_model_dir

    m = load_model_dir(model_dir, RuntimeOptions(threads=2))
    xs, ys = [], []
    for i in range(n):
        img, y = render_sample(seed, start + i, size)
        if drift is not None:
            img = apply_drift(img, drift, np.random.default_rng([seed, start + i]))
        x, _ = load_for_model(encode_image(img, "png"), m.card.input_size, m.card.resize)
        xs.append(x)
        ys.append(y)
    x = np.stack(xs)
    pred = np.concatenate([m.run(x[i : i + 256])[0].argmax(1) for i in range(0, len(x), 256)])
    return float((pred == np.array(ys)).mean())


class _Traffic:
    """Rate-limited traffic with known truth, an oracle labeler and user feedback."""

    def __init__(self, base: str, token: str, size: int, seed: int, rate: float, feedback_share: float, labels: list[str]):
        from visionfleet.datasets.synth import Drift

        self.base, self.token, self.size, self.seed, self.rate = base, token, size, seed, rate
        self.feedback_share = feedback_share
        self.labels = labels
        self.drift = None
        self.drift_obj = Drift(**DRIFT)
        self.truth: dict[str, str] = {}
        self.sent = {"clean": 0, "drift": 0}
        self.errors = 0
        self.labeled = 0
        self.versions: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._index = 0
        self._rng = random.Random(seed)

    def start(self, workers: int = 3) -> None:
        self._threads = [threading.Thread(target=self._worker, args=(w,), daemon=True) for w in range(workers)]
        self._threads.append(threading.Thread(target=self._labeler, daemon=True))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _next(self) -> tuple[int, bool]:
        with self._lock:
            i = self._index
            self._index += 1
            drifted = self.drift is not None
            self.sent["drift" if drifted else "clean"] += 1
            return i, drifted

    def _worker(self, w: int) -> None:
        import httpx

        from visionfleet.datasets.synth import CLASSES, apply_drift, render_sample
        from visionfleet.imaging import encode_image

        interval = 3.0 / self.rate  # 3 workers share the rate
        with httpx.Client(base_url=self.base, timeout=60) as c:
            nxt = time.monotonic()
            while not self._stop.is_set():
                nxt += interval
                time.sleep(max(0.0, nxt - time.monotonic()))
                i, drifted = self._next()
                img, y = render_sample(self.seed, 20_000_000 + i, 64)
                if drifted:
                    img = apply_drift(img, self.drift_obj, np.random.default_rng([self.seed, i]))
                rid = f"sc-{uuid.uuid4().hex[:16]}"
                with self._lock:
                    self.truth[rid] = CLASSES[y]
                try:
                    r = c.post("/v1/predict", content=encode_image(img, "png"),
                               headers={"Content-Type": "image/png", "X-Request-Id": rid})
                except httpx.HTTPError:
                    with self._lock:
                        self.errors += 1
                    continue
                if r.status_code != 200:
                    with self._lock:
                        self.errors += 1
                    continue
                v = str(r.json()["version"])
                with self._lock:
                    self.versions[v] = self.versions.get(v, 0) + 1
                if self._rng.random() < self.feedback_share:  # users who tell us what it was
                    self._feedback(c, rid)

    def _feedback(self, c: Any, rid: str) -> None:
        r = c.post("/v1/feedback", json={"request_id": rid, "label": self.truth[rid]})
        if r.status_code == 202:
            with self._lock:
                self.labeled += 1

    def _labeler(self) -> None:
        """The labeling team: labels what the active-learning sampler queued."""
        import httpx

        done: set[str] = set()
        with httpx.Client(base_url=self.base, timeout=60, headers={"Authorization": f"Bearer {self.token}"}) as c:
            while not self._stop.wait(2.0):
                try:
                    pending = c.get("/v1/labeling/pending", params={"limit": 2000}).json()["pending"]
                except (httpx.HTTPError, KeyError, ValueError):
                    continue
                for p in pending:
                    sid = p["sample_id"]
                    if sid in done or sid not in self.truth:
                        continue
                    done.add(sid)
                    self._feedback(c, sid)


@app.command()
@cli_errors
def drift(
    quick: Annotated[bool, typer.Option(help="smaller data and model (a smoke run; targets not expected)")] = False,
    rate: Annotated[float, typer.Option(help="requests per second of the traffic generator")] = 30.0,
    clean_requests: Annotated[int, typer.Option(help="requests before the drift starts")] = 700,
    feedback_share: Annotated[float, typer.Option(help="share of requests whose users send the true label")] = 0.3,
    seed: Annotated[int, typer.Option(help="data seed")] = 0,
    timeout_min: Annotated[float, typer.Option(help="give up after this many minutes")] = 15.0,
    home: Annotated[Optional[Path], typer.Option(help="fresh state dir for the run (default: <state>/scenarios/drift-<time>)")] = None,
    check: Annotated[bool, typer.Option(help="exit 1 unless the targets hold")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the figures as JSON")] = False,
) -> None:
    """Drift -> detection -> labels -> retrain -> canary -> promotion -> recovery, with a timeline."""
    import os

    import ray
    from ray import serve

    from cluster.local import free_port, init_embedded, wait_http
    from serve_apps.app import APP_NAME
    from serve_apps.config import AppConfig, MonitoringConfig, SamplingConfig
    from serve_apps.deploy import deploy
    from train.controller import ControllerConfig, get_or_create_controller, read_timeline
    from visionfleet.cli._common import settings as current_settings
    from visionfleet.cli.train import run_training
    from visionfleet.datasets.store import synthesize
    from visionfleet.datasets.synth import Drift
    from visionfleet.state import open_registry
    from visionfleet.report import write_loop_report
    from visionfleet.settings import Settings

    t_start = time.time()
    run_home = (home or current_settings().home / "scenarios" / f"drift-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if run_home.exists() and any(run_home.iterdir()):
        raise FileExistsError(f"{run_home} is not empty; the scenario starts from an empty state dir")
    os.environ["VISIONFLEET_HOME"] = str(run_home)
    s = Settings.from_env(run_home).ensure()
    n_train, n_hold, size, epochs = (4000, 500, 48, 8) if quick else (12000, 2500, 64, 12)
    timeline: list[tuple[float, str]] = []

    def mark(text: str) -> None:
        timeline.append((time.time() - t_start, text))
        err.print(f"[bold cyan]+{time.time() - t_start:5.0f}s[/] {text}")

    # 1. data and v1 -------------------------------------------------------------------
    ds = s.datasets_dir / "base"
    with progress() as p:
        task = p.add_task("generating data", total=n_train + n_hold, info="base")
        synthesize(ds, n_train=n_train, n_holdout=n_hold, size=size, seed=seed, progress=lambda k: p.advance(task, k))
    init_embedded(s, metrics_port=free_port())
    card, _ = run_training(dataset=str(ds), model_name="demo", arch="resnet", width=16, depths="1,1,1,1", stem_stride=2,
                           input_size=size, resize="stretch", epochs=epochs, batch_size=128, lr=0.2, workers=2,
                           cpus_per_worker=0.5, seed=seed, wandb=True, address=None)
    reg = open_registry(s)
    v1_dir = reg.local_dir("demo", card.version)  # type: ignore[arg-type]
    pre = _score(v1_dir, seed + 101, 0, 1000, size, None)
    drift_obj = Drift(**DRIFT)
    v1_drifted = _score(v1_dir, seed + 102, 0, 1000, size, drift_obj)
    mark(f"v1 {card.ref} registered: pre-drift top-1 {pre:.4f} on 1,000 fresh images; on drifted images {v1_drifted:.4f}")

    # 2. serve, controller ------------------------------------------------------------
    port = free_port()
    token = uuid.uuid4().hex
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(AppConfig(home=str(s.home), default_model="demo", admin_token=token,
                     sampling=SamplingConfig(low_confidence=0.6, margin=0.2, random_share=0.02),
                     monitoring=MonitoringConfig(reference_size=300, window_size=300)),
           http={"host": "127.0.0.1", "port": port})
    if not wait_http(f"{base}/healthz", timeout=120):
        raise TimeoutError("the Serve app did not become healthy")
    ctl_cfg = ControllerConfig(model="demo", interval_s=3.0, debounce=3, min_samples=200, cooldown_s=3600,
                               min_labels=150 if quick else 600, epochs=3 if quick else 5, new_data_share=0.4,
                               canary_share=0.3, canary_min_samples=60)
    controller = get_or_create_controller(str(s.home), ctl_cfg)
    ray.get(controller.status.remote(), timeout=60)
    mark(f"serving on {base}; retraining controller watching demo@production")

    traffic = _Traffic(base, token, size, seed, rate, feedback_share, card.labels)
    traffic.start()
    figures: dict[str, Any] = {"pre_drift_top1": pre, "v1_drifted_top1": v1_drifted}
    outcome = None
    seen_kinds: set[str] = set()
    try:
        while traffic.sent["clean"] < clean_requests:
            time.sleep(0.5)
        traffic.drift = drift_obj
        onset_at = time.time()
        mark(f"drift starts after {traffic.sent['clean']} clean requests: {DRIFT}")
        deadline = t_start + timeout_min * 60
        while time.time() < deadline:
            for e in read_timeline(s.home):
                kind = e["kind"]
                if e["at"] < onset_at and kind in ("degraded", "triggered"):
                    continue
                key = kind if not kind.startswith("step:") else f"{kind}:{e.get('at')}"
                if key in seen_kinds:
                    continue
                seen_kinds.add(key)
                if kind == "degraded":
                    figures["detected_after_drift_requests"] = traffic.sent["drift"]
                    mark(f"degradation detected after {traffic.sent['drift']} drifted requests: {e.get('reasons')}")
                elif kind == "triggered":
                    figures["labels_at_trigger"] = e.get("labels")
                    mark(f"retrain triggered ({e.get('labels')} new labels): {e.get('reasons') or e.get('reason')}")
                elif kind == "step:data":
                    mark(f"retrain data: {e.get('labeled')} labeled field samples ({e.get('train')} train, {e.get('gate')} gate)")
                elif kind == "step:gate":
                    mark(f"gate {e.get('version')}: recent {e.get('candidate_recent', 0):.4f} vs {e.get('production_recent', 0):.4f}, "
                         f"base {e.get('candidate_base', 0):.4f} vs {e.get('production_base', 0):.4f} -> {'pass' if e.get('passed') else 'FAIL'}")
                elif kind == "candidate":
                    mark(f"candidate {e.get('candidate')} (from {e.get('fp32')}) after {e.get('seconds')}s of retraining")
                elif kind == "canary_started":
                    mark(f"canary {e.get('experiment')}: {e.get('control')} vs {e.get('treatment')} at {e.get('share'):.0%}")
                elif kind in ("promoted", "rolled_back", "retrain_failed", "canary_stopped"):
                    outcome = e
                    if kind == "retrain_failed":
                        mark(f"retrain FAILED at {e.get('step')}: {e.get('reason')} (production untouched)")
                    else:
                        d = e.get("decision") or {}
                        mark(f"canary decision: {kind} — {d.get('reason')}; samples {e.get('samples')}")
            if outcome is not None:
                break
            time.sleep(1.0)
        else:
            mark("timed out before the loop finished")
    finally:
        traffic.stop()
    figures.update(requests=dict(traffic.sent), http_errors=traffic.errors, labels_sent=traffic.labeled,
                   answered_by_version=traffic.versions)
    prod = reg.resolve("demo@production")
    figures["production_after"] = str(prod)
    post = _score(reg.local_dir(prod.name, prod.version), seed + 103, 0, 1000, size, drift_obj)
    figures["post_promotion_drifted_top1"] = post
    figures["recovery_gap_pt"] = round((pre - post) * 100, 2)
    figures["outcome"] = outcome["kind"] if outcome else "timeout"
    figures["total_s"] = round(time.time() - t_start, 1)
    mark(f"production is {prod}: top-1 on 1,000 fresh drifted images {post:.4f} (pre-drift {pre:.4f}, v1 drifted {v1_drifted:.4f})")
    try:
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
    report = write_loop_report(s.home, s.home / "report.html", model="demo", extra=figures)
    figures["report"] = str(report)
    figures["timeline"] = [{"t": round(t, 1), "event": text} for t, text in timeline]
    targets = {
        "pre_drift_top1 >= 0.90": pre >= 0.90,
        "detected within 500 drifted requests": figures.get("detected_after_drift_requests", 10**9) <= 500,
        "promoted": figures["outcome"] == "promoted",
        "post within 3 pt of pre-drift": post >= pre - 0.03,
        "under 15 minutes": figures["total_s"] < 15 * 60,
        "no failed requests": traffic.errors == 0,
    }
    figures["targets"] = targets
    if as_json:
        print_json(figures)
    else:
        out.print("\n".join(f"+{t:5.0f}s  {text}" for t, text in timeline))
        for k, ok in targets.items():
            out.print(f"{'[green]✓[/]' if ok else '[red]✗[/]'} {k}")
        out.print(f"report: {report}")
    if check and not all(targets.values()):
        err.print("[bold red]scenario targets missed:[/] " + ", ".join(k for k, ok in targets.items() if not ok))
        raise typer.Exit(1)
