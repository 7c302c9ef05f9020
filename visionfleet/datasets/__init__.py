"""Datasets: the procedural generator, Parquet storage and ImageFolder import."""

from visionfleet.datasets.synth import CLASSES, Drift, SynthConfig, render_sample

__all__ = ["CLASSES", "Drift", "SynthConfig", "render_sample"]
