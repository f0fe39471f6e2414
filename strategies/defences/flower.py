"""Flower's own robust aggregators, wired in as they are: Krum, MultiKrum, FedMedian,
FedTrimmedAvg and Bulyan (``flwr.serverapp.strategy``).

Each defence here holds an instance of Flower's class (``rule``), built with its own
parameters (Flower's names) and the wrapped strategy's ``weighted_by_key``, and hands it
the replies: the new global arrays are exactly what Flower's class returns. As with every
defence, the wrapped strategy checks the replies and aggregates the train metrics first
(Flower's classes would aggregate the metrics of the selected clients only). Flower's
FedMedian, FedTrimmedAvg and Bulyan pop the arrays out of the replies they aggregate, so
they get copies and the replies stay whole. ``last_accepted`` lists the clients Krum,
MultiKrum or Bulyan's MultiKrum stage selected; median and trimmed mean work coordinate by
coordinate and report every client as accepted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy
from flwr.serverapp.strategy.multikrum import select_multikrum

from strategies.defences.base import Defence, check, copy_replies


def _count(value: object, name: str, least: int) -> None:
    check(
        isinstance(value, int) and not isinstance(value, bool) and value >= least,
        f"{name} must be an integer >= {least}, got {value!r}",
    )


class FlowerRule(Defence):
    """A Flower robust strategy's ``aggregate_train`` as a defence (see the module docstring)."""

    flower_class: ClassVar[type[Strategy]]

    def __init__(self, strategy: Strategy, *, seed: int = 0, **flower_options) -> None:
        super().__init__(strategy, seed=seed)
        self.rule = self.flower_class(
            weighted_by_key=getattr(strategy, "weighted_by_key", "num-examples"), **flower_options
        )
        self._chosen: list[RecordDict] | None = None  # what a selection rule picked, by identity

    def summary(self) -> None:
        self.rule.summary()
        super().summary()

    def preselect(self, contents: list[RecordDict]) -> list[int] | None:
        """The clients the rule will accept, worked out before it runs (it may empty the
        replies); None: every client, or whatever a selection rule records in ``_chosen``."""
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        reference, metrics = self.strategy.aggregate_train(server_round, replies)
        valid = copy_replies([reply for reply in replies if not reply.has_error()])
        if reference is None or not valid:
            self.last_accepted = []
            return None, metrics
        contents = [reply.content for reply in valid]
        node_ids = [int(reply.metadata.src_node_id) for reply in valid]
        self._chosen = None
        accepted = self.preselect(contents)
        arrays, _ = self.rule.aggregate_train(server_round, valid)
        if arrays is None:  # Bulyan with too few replies: Flower keeps the global model
            accepted = []
        elif accepted is None:
            accepted = list(range(len(contents))) if self._chosen is None else picked(contents, self._chosen)
        return arrays, self.report(node_ids, accepted, metrics)


def picked(contents: list[RecordDict], chosen: list[RecordDict]) -> list[int]:
    """The indices of ``chosen`` (the same objects) among ``contents``."""
    return [index for index, content in enumerate(contents) if any(content is c for c in chosen)]


class FlowerMultiKrum(FlowerRule):
    """MultiKrum (Blanchard et al., NeurIPS 2017), Flower's ``MultiKrum`` as it is.

    Each update's Krum score is the sum of its squared distances to its n - f - 2 nearest
    neighbours; the ``num_nodes_to_select`` updates with the lowest scores are averaged
    (weighted by examples). Defaults: ``num_malicious_nodes`` (f) = 0,
    ``num_nodes_to_select`` = 1 (Krum).
    """

    name = "multikrum"
    flower_class = MultiKrum

    def __init__(
        self, strategy: Strategy, *, num_malicious_nodes: int = 0, num_nodes_to_select: int = 1, **kwargs
    ) -> None:
        _count(num_malicious_nodes, "num_malicious_nodes", 0)
        _count(num_nodes_to_select, "num_nodes_to_select", 1)
        super().__init__(
            strategy, num_malicious_nodes=num_malicious_nodes, num_nodes_to_select=num_nodes_to_select, **kwargs
        )

    def preselect(self, contents: list[RecordDict]) -> list[int]:
        # Flower's MultiKrum.aggregate_train selects with this same function and arguments
        return picked(
            contents, select_multikrum(contents, self.rule.num_malicious_nodes, self.rule.num_nodes_to_select)
        )


class FlowerKrum(FlowerMultiKrum):
    """Krum (Blanchard et al., NeurIPS 2017), Flower's ``Krum`` as it is.

    The update with the smallest sum of squared distances to its n - f - 2 nearest
    neighbours becomes the new global model. ``num_malicious_nodes`` is f (default 0).
    """

    name = "krum"
    flower_class = Krum

    # no **kwargs: MultiKrum's num_nodes_to_select is not Krum's to take
    def __init__(self, strategy: Strategy, *, num_malicious_nodes: int = 0, seed: int = 0) -> None:
        _count(num_malicious_nodes, "num_malicious_nodes", 0)
        FlowerRule.__init__(self, strategy, seed=seed, num_malicious_nodes=num_malicious_nodes)


class FlowerMedian(FlowerRule):
    """Coordinate-wise median (Yin et al., ICML 2018), Flower's ``FedMedian`` as it is."""

    name = "fedmedian"
    flower_class = FedMedian
    filters = False


class FlowerTrimmedAvg(FlowerRule):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018), Flower's ``FedTrimmedAvg`` as it is.

    A fraction ``beta`` of the values is cut from each tail before averaging; ``beta`` in
    [0, 0.5), default 0.2 (Flower's).
    """

    name = "fedtrimmedavg"
    flower_class = FedTrimmedAvg
    filters = False

    def __init__(self, strategy: Strategy, *, beta: float = 0.2, **kwargs) -> None:
        check(isinstance(beta, (int, float)) and 0 <= beta < 0.5, f"beta must be in [0, 0.5), got {beta!r}")
        super().__init__(strategy, beta=beta, **kwargs)


class FlowerBulyan(FlowerRule):
    """Bulyan (El Mhamdi et al., ICML 2018), Flower's ``Bulyan`` as it is.

    MultiKrum selects n - 2f updates; per coordinate, the n - 4f values closest to their
    median are averaged. Needs n >= 4f + 3 replies, else Flower keeps the global model.
    ``num_malicious_nodes`` is f (default 0).
    """

    name = "bulyan"
    flower_class = Bulyan

    def __init__(self, strategy: Strategy, *, num_malicious_nodes: int = 0, **kwargs) -> None:
        _count(num_malicious_nodes, "num_malicious_nodes", 0)
        super().__init__(strategy, num_malicious_nodes=num_malicious_nodes, selection_rule=self._recording, **kwargs)

    def _recording(self, contents: list[RecordDict], num_malicious: int, num_select: int) -> list[RecordDict]:
        """Flower's default selection (MultiKrum), remembered to report the clients it kept."""
        self._chosen = select_multikrum(contents, num_malicious, num_select)
        return self._chosen
