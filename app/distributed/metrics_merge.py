"""One Prometheus exposition for all replicas, each sample labelled with the replica that produced it.

Why: behind the Ray Serve router a scrape of ``/metrics`` would land on a random replica, so counters
would jump between replicas' values and look like resets. The router asks every replica for its own
exposition (a Ray Serve broadcast) and serves the union, with a ``replica`` label that keeps the series
apart; ``sum without (replica)`` in PromQL gives the service-wide figure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

REPLICA_LABEL = "replica"


class _Families:
    """A collector that yields a fixed list of metric families."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_expositions(texts: Mapping[str, str]) -> bytes:
    """``{replica: exposition text}`` -> one exposition; each family once, every sample labelled."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(sample._replace(labels={**sample.labels, REPLICA_LABEL: replica})
                                  for sample in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)


__all__ = ["REPLICA_LABEL", "merge_expositions"]
