"""Experiment statistics for A/B tests: assignment, sequential tests, guardrails, bandits, decisions.

Pure functions (numpy, scipy) that the ingress and the CLI call; nothing here imports
torch, ray or pyarrow, and matplotlib is imported only inside :func:`write_report`.
See docs/ab-testing.md for what the statistics guarantee.
"""

from __future__ import annotations

from visionfleet.experiments.assignment import (
    RESOLUTION,
    Allocation,
    Segment,
    assign,
    bucket,
    initial_allocation,
    reweight,
)
from visionfleet.experiments.decision import Action, ArmSummary, Decision, DecisionPolicy, decide
from visionfleet.experiments.report import write_report
from visionfleet.experiments.stats import (
    DEFAULT_MIXTURE_SD,
    GuardrailResult,
    GuardrailStatus,
    MeanStats,
    Metric,
    SequentialPath,
    SequentialResult,
    SRMResult,
    accuracy_test,
    confidence_test,
    detections_guardrail,
    error_rate_guardrail,
    latency_guardrail,
    mean_interval,
    mixture_log_lr,
    mixture_radius,
    sequential_path,
    sequential_test,
    srm_check,
    thompson_weights,
)

__all__ = [
    # assignment
    "RESOLUTION",
    "Allocation",
    "Segment",
    "initial_allocation",
    "reweight",
    "bucket",
    "assign",
    # statistics
    "Metric",
    "MeanStats",
    "SRMResult",
    "srm_check",
    "SequentialResult",
    "SequentialPath",
    "DEFAULT_MIXTURE_SD",
    "mixture_log_lr",
    "mixture_radius",
    "sequential_test",
    "accuracy_test",
    "confidence_test",
    "sequential_path",
    "mean_interval",
    "GuardrailStatus",
    "GuardrailResult",
    "latency_guardrail",
    "error_rate_guardrail",
    "detections_guardrail",
    "thompson_weights",
    # decision and report
    "Action",
    "ArmSummary",
    "DecisionPolicy",
    "Decision",
    "decide",
    "write_report",
]
