"""Prometheus metrics (prefix ``caveat_``, units in names, counters end in ``_total``).

Besides the usual request, latency, queue and batch series, every answered input feeds per-adapter
histograms of confidence, entropy, mutual information and the OOD p-value, and abstention counters by rule
(``rule="out_of_distribution"`` for the ``ood`` rule): a falling OOD p-value is the drift alarm of an adapter.
Labels that come back (``POST /v1/feedback``) feed per adapter-version counters of accuracy, NLL, calibration
bins and prediction-set coverage (:meth:`Metrics.observe_feedback`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from adapters.bins import NLL_FLOOR, bin_index
from adapters.feedback import LabelledAnswer

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
UNIT_BUCKETS = tuple(i / 20 for i in range(1, 21))  # 0.05 … 1.0
PVALUE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # set for the workers, before they import prometheus_client
MI_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7)


class Metrics:
    """All series of one server, in a registry of its own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "caveat_requests_total", "HTTP requests answered", ["endpoint", "adapter", "status"], registry=r
        )
        self.latency = Histogram(
            "caveat_request_duration_seconds", "Request latency", ["endpoint", "adapter"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "caveat_queue_wait_seconds", "Time from admission to the start of its batch", buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "caveat_queue_depth", "Requests admitted and waiting for the model", registry=r, multiprocess_mode="livesum"
        )
        self.batch_rows = Histogram(
            "caveat_batch_rows", "Rows (inputs × samples) per batched forward", buckets=ROW_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "caveat_batch_requests", "Requests per batched forward", buckets=ROW_BUCKETS, registry=r
        )
        self.forward_seconds = Histogram(
            "caveat_batch_forward_seconds", "Model time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.samples = Histogram(
            "caveat_samples_per_request", "Posterior samples per request", buckets=ROW_BUCKETS, registry=r
        )
        self.adapters = Gauge(
            "caveat_adapters_loaded", "Registered adapters by state (the most of any worker process)", ["state"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.adapter_bytes = Gauge(
            "caveat_adapter_memory_bytes", "Device bytes of resident adapters (all worker processes)", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.adapter_own_bytes = Gauge(
            "caveat_adapter_own_bytes", "Device bytes of one resident adapter beyond the projections it may share",
            ["adapter"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.load_seconds = Histogram(
            "caveat_adapter_load_seconds", "Time to read, validate and place a bundle", buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.load_failures = Counter("caveat_adapter_load_failures_total", "Bundles refused", registry=r)
        self.prediction_failures = Counter(
            "caveat_prediction_failures_total", "Requests whose answer was withheld, by reason", ["reason"], registry=r
        )
        self.dropped = Counter(
            "caveat_requests_dropped_total", "Admitted requests whose remaining work was dropped, by reason",
            ["reason"], registry=r,
        )  # fmt: skip
        self.predictions = Counter("caveat_predictions_total", "Inputs answered", ["adapter"], registry=r)
        self.abstentions = Counter(
            "caveat_abstentions_total", "Inputs flagged to abstain, by first rule that fired", ["adapter", "rule"],
            registry=r,
        )  # fmt: skip
        self.confidence = Histogram(
            "caveat_prediction_confidence", "Top predictive probability", ["adapter"], buckets=UNIT_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.entropy = Histogram(
            "caveat_prediction_entropy_normalized", "Predictive entropy / log C", ["adapter"], buckets=UNIT_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.mutual_information = Histogram(
            "caveat_prediction_mutual_information_nats", "Epistemic uncertainty (mutual information, nats)",
            ["adapter"], buckets=MI_BUCKETS, registry=r,
        )  # fmt: skip

        self.ood_pvalue = Histogram(
            "caveat_prediction_ood_pvalue", "OOD p-value: the fraction of validation inputs at least as far out",
            ["adapter"], buckets=PVALUE_BUCKETS, registry=r,
        )  # fmt: skip

        self._feedback_series(r)

    def _feedback_series(self, r: CollectorRegistry) -> None:
        """Per adapter and version, what labelled answers say: counters, so that Prometheus can sum replicas and
        compute accuracy, NLL, ECE (over :data:`adapters.bins.NUM_BINS` bins) and coverage over any window."""
        version = ["adapter", "version"]
        self.feedback_labelled = Counter(
            "caveat_feedback_labelled_total", "Answers whose label came back", [*version, "abstained"], registry=r
        )
        self.feedback_correct = Counter(
            "caveat_feedback_correct_total", "Labelled answers whose top label was the true one",
            [*version, "abstained"], registry=r,
        )  # fmt: skip
        self.feedback_nll = Counter(
            "caveat_feedback_nll_total", "Sum of −log p(true label) over labelled answers (nats)", version, registry=r
        )
        bins = "(bin b: top probability in (b/15, (b+1)/15])"
        self.feedback_bin_labelled = Counter(
            "caveat_feedback_bin_labelled_total", f"Labelled answers per confidence bin {bins}", [*version, "bin"],
            registry=r,
        )  # fmt: skip
        self.feedback_bin_correct = Counter(
            "caveat_feedback_bin_correct_total", f"Correct labelled answers per confidence bin {bins}",
            [*version, "bin"], registry=r,
        )  # fmt: skip
        self.feedback_bin_confidence = Counter(
            "caveat_feedback_bin_confidence_total", f"Sum of the top probability per confidence bin {bins}",
            [*version, "bin"], registry=r,
        )  # fmt: skip
        self.feedback_sets = Counter(
            "caveat_feedback_sets_total", "Labelled answers with a prediction set, by the coverage it was served at",
            [*version, "target"], registry=r,
        )  # fmt: skip
        self.feedback_covered = Counter(
            "caveat_feedback_covered_total", "Labelled answers whose prediction set held the true label",
            [*version, "target"], registry=r,
        )  # fmt: skip
        self.feedback_target = Gauge(
            "caveat_feedback_coverage_target", "The coverage prediction sets were served at (for alerts: the series' "
            "own target as a number)", [*version, "target"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.feedback_store = Gauge(
            "caveat_feedback_store_answers", "Answers held for feedback", registry=r, multiprocess_mode="livemax"
        )
        self.feedback_dropped = Counter(
            "caveat_feedback_dropped_total", "Answers dropped from the feedback store before a label came", registry=r
        )

    def observe_feedback(self, answer: LabelledAnswer) -> None:
        """One labelled answer (``adapters.feedback.LabelledAnswer``)."""
        key = (answer.adapter, answer.version)
        abstained = "true" if answer.abstained else "false"
        correct = answer.predicted == answer.label
        self.feedback_labelled.labels(*key, abstained).inc()
        if correct:
            self.feedback_correct.labels(*key, abstained).inc()
        self.feedback_nll.labels(*key).inc(-math.log(max(answer.probs[answer.label], NLL_FLOOR)))
        confidence = max(answer.probs)
        index = f"{int(bin_index(torch.tensor([confidence], dtype=torch.float64))[0]):02d}"
        self.feedback_bin_labelled.labels(*key, index).inc()
        self.feedback_bin_confidence.labels(*key, index).inc(confidence)
        if correct:
            self.feedback_bin_correct.labels(*key, index).inc()
        if answer.prediction_set is not None and answer.coverage is not None:
            target = f"{answer.coverage:g}"
            self.feedback_target.labels(*key, target).set(answer.coverage)
            self.feedback_sets.labels(*key, target).inc()
            if answer.label in answer.prediction_set:
                self.feedback_covered.labels(*key, target).inc()

    def observe_predictions(
        self, adapter: str, values: Mapping[str, list], reasons: list[str | None], ood_pvalue: list[float] | None = None
    ) -> None:
        """One answered request: ``values`` holds ``confidence``, ``entropy_normalized`` and
        ``mutual_information`` per input (``service.engine.JobResult.values``)."""
        self.predictions.labels(adapter).inc(len(reasons))
        pvalues, confidence = self.ood_pvalue.labels(adapter), self.confidence.labels(adapter)
        entropy, information = self.entropy.labels(adapter), self.mutual_information.labels(adapter)
        for value in ood_pvalue or []:
            pvalues.observe(value)
        for value in values["confidence"]:
            confidence.observe(value)
        for value in values["entropy_normalized"]:
            entropy.observe(value)
        for value in values["mutual_information"]:
            information.observe(value)
        for reason in reasons:
            if reason is not None:
                self.abstentions.labels(adapter, reason.split(" ", 1)[0]).inc()

    def render(self) -> bytes:
        """This process's series, or every worker's of ``caveat-serve --workers`` (prometheus_client's multiprocess
        mode, on when ``PROMETHEUS_MULTIPROC_DIR`` is set: counters and histograms summed over the workers, live
        and dead; gauges as each says)."""
        if MULTIPROCESS_DIR not in os.environ:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
