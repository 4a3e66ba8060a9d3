"""What the stages share to honour the output contract: records on, rejects tagged.

* :func:`routed` turns a decision ``(record, inference) -> record | Reject`` into a
  ``FlatMap`` body over ``RunInference``'s ``PredictionResult`` s (the model stages);
* :class:`CountingDoFn` is the base of a per-record stage's DoFn: one Beam counter per
  outcome (``stage``/``name``), and :meth:`CountingDoFn.emit` routes a ``Reject`` to the
  ``rejects`` output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import apache_beam as beam

from pipelines.records import REJECTS, Reject, reject_row


def routed(decide: Callable[[dict[str, Any], Any], dict[str, Any] | Reject]
           ) -> Callable[[Any], Iterator[Any]]:
    """A ``FlatMap`` body: ``PredictionResult`` → ``decide(example, inference)``, a ``Reject``
    as its reject row under ``rejects``."""

    def route(result: Any) -> Iterator[Any]:
        out = decide(result.example, result.inference)
        if isinstance(out, Reject):
            yield beam.pvalue.TaggedOutput(REJECTS, reject_row(result.example, out))
        else:
            yield out

    return route


class CountingDoFn(beam.DoFn):
    """A DoFn with a Beam counter per outcome, in the namespace ``stage``."""

    stage = ""

    def __init__(self) -> None:
        self._counters: dict[str, Any] = {}

    def count(self, name: str) -> None:
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = beam.metrics.Metrics.counter(self.stage, name)
        counter.inc()

    def emit(self, record: dict[str, Any], result: dict[str, Any] | Reject) -> Iterator[Any]:
        """``result``, or ``record``'s reject row under ``rejects`` (counted by reason)."""
        if isinstance(result, Reject):
            self.count(result.reason)
            yield beam.pvalue.TaggedOutput(REJECTS, reject_row(record, result))
        else:
            yield result
