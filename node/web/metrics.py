"""Prometheus ``/metrics``, read from the job table at each scrape.

The job table is the truth shared by every process of the node, so the numbers are
the same whichever web process is scraped, and nothing is lost on a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from node import overview
from node.context import NodeContext
from node.destination_checks import DestinationCheck
from node.jobs import JobQueries, JobState
from node.jobs.states import DeliveryState

PREFIX = "denoise_node"
SLICE_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
NOISE_DROP_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: Each kind of destination is checked its own way.
DESTINATION_UP_HELP = "1 when the destination answers C-ECHO (DICOM) or a QIDO-RS query (DICOMweb)"


def _gauge(name: str, text: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", text, labels=labels)


def destination_states(counts: dict[tuple[str, str], int], names: set[str]) -> Metric:
    """Job destinations per delivery state: ``failed`` counts the deliveries that ended."""
    family = _gauge(
        "job_destinations", "Job destinations by delivery state", ["destination", "state"]
    )
    for name in sorted(names | {destination for destination, _ in counts}):
        for state in DeliveryState:
            family.add_metric([name, state], counts.get((name, state), 0))
    return family


def slice_seconds_histogram(timings: list[tuple[float, int]]) -> HistogramMetricFamily:
    """Each denoised slice counts once, with its job's mean seconds per slice."""
    counts = [0] * len(SLICE_SECONDS_BUCKETS)
    total, slices_seen = 0.0, 0
    for seconds, slices in timings:
        per_slice = seconds / slices
        total += seconds
        slices_seen += slices
        for index, bound in enumerate(SLICE_SECONDS_BUCKETS):
            if per_slice <= bound:
                counts[index] += slices
    buckets = [(repr(b), c) for b, c in zip(SLICE_SECONDS_BUCKETS, counts, strict=True)]
    return HistogramMetricFamily(
        f"{PREFIX}_denoise_seconds_per_slice",
        "Denoising time per slice (claim to hand-over, over the job's slices)",
        buckets=[*buckets, ("+Inf", slices_seen)],
        sum_value=total,
    )


def noise_drop_histogram(drops: list[float]) -> HistogramMetricFamily:
    """Each measured series counts once with its relative noise drop (0.4: 40 % less)."""
    buckets = [
        (repr(bound), sum(1 for drop in drops if drop <= bound)) for bound in NOISE_DROP_BUCKETS
    ]
    return HistogramMetricFamily(
        f"{PREFIX}_noise_drop_ratio",
        "Relative drop of the series' noise in flat soft tissue, per measured job",
        buckets=[*buckets, ("+Inf", len(drops))],
        sum_value=sum(drops),
    )


def _job_histograms(queries: JobQueries) -> Iterable[Metric]:
    """Time per slice and noise drop per series, from the job table."""
    yield slice_seconds_histogram(queries.denoise_timings())
    yield noise_drop_histogram(queries.noise_drops())


class NodeCollector(Collector):
    """Jobs, instances, timings, queue age, workers, destinations and spool."""

    def __init__(
        self, ctx: NodeContext, destinations: Callable[[], list[DestinationCheck]]
    ) -> None:
        self.ctx = ctx
        self.destinations = destinations

    def describe(self) -> Iterable[Metric]:
        return []  # collected live; registering must not query the database

    def collect(self) -> Iterable[Metric]:
        queries = self.ctx.queries
        jobs = _gauge("jobs", "Jobs in the job table by state", ["state"])
        counts = queries.state_counts()
        for state in JobState:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs

        received, derived, sent = queries.instance_totals()
        yield GaugeMetricFamily(
            f"{PREFIX}_instances_received", "Received instances recorded", value=received
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_instances_derived", "Denoised instances written", value=derived
        )
        delivered = _gauge("instances_sent", "Derived instances acknowledged", ["destination"])
        names = self.ctx.settings.destinations
        for name in sorted(set(sent) | set(names)):
            delivered.add_metric([name], sent.get(name, 0))
        yield delivered
        yield destination_states(queries.destination_state_counts(), set(sent) | set(names))

        yield from _job_histograms(queries)
        age = overview.queue_age_seconds(self.ctx)
        yield GaugeMetricFamily(
            f"{PREFIX}_oldest_queued_job_age_seconds",
            "How long the oldest queued job has waited (0 when none)",
            value=age or 0.0,
        )

        heartbeat = _gauge(
            "worker_heartbeat_timestamp_seconds", "Last heartbeat", ["worker", "roles"]
        )
        alive = _gauge("worker_up", "1 when the process heartbeats in time", ["worker", "roles"])
        provider = _gauge(
            "worker_provider_info",
            "The onnxruntime execution provider in use",
            ["worker", "provider"],
        )
        for worker in overview.worker_views(self.ctx):
            if worker.stopped_at is not None:
                continue
            labels = [worker.name, worker.roles]
            heartbeat.add_metric(labels, worker.heartbeat_at.timestamp())
            alive.add_metric(labels, 1.0 if worker.alive else 0.0)
            if worker.provider:
                provider.add_metric([worker.name, worker.provider], 1.0)
        yield from (heartbeat, alive, provider)

        reachable = _gauge("destination_up", DESTINATION_UP_HELP, ["destination"])
        for check in self.destinations():
            reachable.add_metric([check.name], 1.0 if check.reachable else 0.0)
        yield reachable
        yield GaugeMetricFamily(
            f"{PREFIX}_spool_free_bytes",
            "Free bytes on the spool's disk",
            value=self.ctx.spool.free_bytes(),
        )


def router(ctx: NodeContext, destinations: Callable[[], list[DestinationCheck]]) -> APIRouter:
    """``GET /metrics`` with a registry of its own (several apps may live in one process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(ctx, destinations))
    routes = APIRouter()

    @routes.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return routes
