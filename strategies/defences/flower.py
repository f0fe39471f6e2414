"""Flower's own robust aggregators as defences: Krum, MultiKrum, FedMedian, FedTrimmedAvg and
Bulyan (``flwr.serverapp.strategy``).

Each defence here holds an instance of Flower's class (``rule``), built with its own
parameters (Flower's names), and hands it the round's updates: one reply per client whose
single array is the client's update vector in float64 (:class:`~strategies.defences.base.Updates`:
reply minus global over the trainable parameters), weighted by the same weights FedAvg
would use. What Flower's class returns is the aggregate update; the new global arrays are
the global parameters plus it, and BatchNorm running statistics are averaged over the
clients the rule accepted (``include_statistics = True`` puts them into the vectors, and so
into the distances, instead). Flower's classes computed on the models themselves would
rank by distances with float32 rounding errors of the size of the models' squared norms
(~1e-4 on LeNet-5), larger than the squared distance between two updates of norm 0.01.

As with every defence, the wrapped strategy checks the replies and aggregates the train
metrics first (Flower's classes would aggregate the metrics of the selected clients only).
``last_accepted`` lists the clients Krum, MultiKrum or Bulyan's MultiKrum stage selected;
median and trimmed mean work coordinate by coordinate and report every client accepted.

Options that would make a rule no defence are refused: Krum, MultiKrum and Bulyan require
``num_malicious_nodes`` (f), the number of attackers the rule must tolerate, and refuse a
round of fewer clients than their guarantee needs (n >= 2f + 3, Bulyan n >= 4f + 3).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedsim.checks import check, check_bool, check_integer, check_number
from strategies.defences.base import Aggregate, Defence, Updates

UPDATE, WEIGHT = "update", "weight"  # the array and metric keys of the replies Flower's class sees
F_HELP = "f, the number of malicious clients the rule must tolerate"


def update_replies(updates: Updates) -> list[Message]:
    """The round's updates as Flower train replies: one float64 array and its weight each."""
    replies = []
    for index, node in enumerate(updates.node_ids):
        content = RecordDict(
            {
                "arrays": ArrayRecord({UPDATE: Array(np.ascontiguousarray(updates.vectors[index]))}),
                "metrics": MetricRecord({WEIGHT: float(updates.weights[index])}),
            }
        )
        replies.append(Message(content, dst_node_id=node, message_type="train"))
    return replies


class FlowerRule(Defence):
    """A Flower robust strategy's ``aggregate_train`` on the round's update vectors (see the
    module docstring)."""

    flower_class: ClassVar[type[Strategy]]

    def __init__(self, strategy: Strategy, *, seed: int = 0, include_statistics: bool = False, **flower_options):
        super().__init__(strategy, seed=seed)
        self.include_statistics = check_bool("include_statistics", include_statistics)
        self.rule = self.flower_class(weighted_by_key=WEIGHT, **flower_options)
        self._chosen: list[RecordDict] | None = None  # what a selection rule picked, by identity

    def summary(self) -> None:
        self.rule.summary()
        super().summary()

    def select(self, contents: list[RecordDict]) -> list[int] | None:
        """The clients the rule will accept, worked out before it runs (it empties the
        replies); None: every client, or whatever a selection rule records in ``_chosen``."""
        return None

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        replies = update_replies(updates)
        contents = [reply.content for reply in replies]
        self._chosen = None
        accepted = self.select(contents)
        arrays, _ = self.rule.aggregate_train(server_round, replies)
        if arrays is None:  # Bulyan with too few replies: Flower keeps the global model
            return Aggregate(np.zeros(updates.vectors.shape[1]), [])
        if accepted is None:
            accepted = list(range(len(contents))) if self._chosen is None else picked(contents, self._chosen)
        return Aggregate(np.asarray(arrays[UPDATE].numpy(), np.float64), accepted)


def picked(contents: list[RecordDict], chosen: list[RecordDict]) -> list[int]:
    """The indices of ``chosen`` (the same objects) among ``contents``."""
    return [index for index, content in enumerate(contents) if any(content is c for c in chosen)]


class FlowerMultiKrum(FlowerRule):
    """MultiKrum (Blanchard et al., NeurIPS 2017), Flower's ``MultiKrum`` on float64 updates.

    Each update's Krum score is the sum of its squared distances to its n - f - 2 nearest
    neighbours; the ``num_nodes_to_select`` updates with the lowest scores are averaged
    (weighted by examples). ``num_malicious_nodes`` (f) is required: it is what the rule
    tolerates, and the rule needs n >= 2f + 3 clients per round. ``num_nodes_to_select``
    defaults to n - f, the paper's m (every update that is not assumed malicious); a
    selection of every update would be a plain mean, and is refused when it is the default
    (f = 0) or said once when a round's n makes it so.
    """

    name = "multikrum"
    flower_class = MultiKrum
    required_help = {"num_malicious_nodes": F_HELP + "; MultiKrum needs n >= 2f + 3 clients per round"}

    def __init__(
        self, strategy: Strategy, *, num_malicious_nodes: int, num_nodes_to_select: int | None = None, **kwargs
    ) -> None:
        check_integer("num_malicious_nodes", num_malicious_nodes, minimum=0)
        if num_nodes_to_select is None:
            check(
                num_malicious_nodes >= 1,
                "num_malicious_nodes = 0 makes MultiKrum select all n updates (its default selection is n - f): "
                "a plain mean; set num_malicious_nodes >= 1, or num_nodes_to_select",
            )
        else:
            check_integer("num_nodes_to_select", num_nodes_to_select, minimum=1)
        self.num_nodes_to_select = num_nodes_to_select
        super().__init__(strategy, num_malicious_nodes=num_malicious_nodes, num_nodes_to_select=1, **kwargs)

    def min_clients(self) -> int:
        return 2 * self.rule.num_malicious_nodes + 3

    def too_few_clients(self, sampled: int) -> str:
        f = self.rule.num_malicious_nodes
        return (
            f"{self.name} with num_malicious_nodes = {f} needs n >= 2f + 3 = {self.min_clients()} clients per round, "
            f"but a round samples {sampled}; lower num_malicious_nodes or sample more clients"
        )

    def selected(self, n: int) -> int:
        """How many updates a round of ``n`` selects."""
        wanted = n - self.rule.num_malicious_nodes if self.num_nodes_to_select is None else self.num_nodes_to_select
        if wanted >= n:
            self.warn_once(
                f"{self.name}: num_nodes_to_select = {wanted} keeps all {n} updates of a round: a plain mean; "
                "lower num_nodes_to_select"
            )
        return max(1, min(wanted, n))

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        if len(updates) < self.min_clients():
            self.warn_once(
                f"{self.name}: a round has {len(updates)} useful replies, fewer than the {self.min_clients()} "
                f"that num_malicious_nodes = {self.rule.num_malicious_nodes} needs; it is aggregated anyway"
            )
        self.rule.num_nodes_to_select = self.selected(len(updates))
        return super().aggregate_updates(server_round, updates)

    def select(self, contents: list[RecordDict]) -> list[int]:
        # Flower's MultiKrum.aggregate_train selects with this same function and arguments
        return picked(
            contents, select_multikrum(contents, self.rule.num_malicious_nodes, self.rule.num_nodes_to_select)
        )


class FlowerKrum(FlowerMultiKrum):
    """Krum (Blanchard et al., NeurIPS 2017), Flower's ``Krum`` on float64 updates.

    The update with the smallest sum of squared distances to its n - f - 2 nearest
    neighbours is the aggregate. ``num_malicious_nodes`` (f) is required, and the rule
    needs n >= 2f + 3 clients per round.
    """

    name = "krum"
    flower_class = Krum
    required_help = {"num_malicious_nodes": F_HELP + "; Krum needs n >= 2f + 3 clients per round"}

    # no num_nodes_to_select: Krum selects one update
    def __init__(
        self, strategy: Strategy, *, num_malicious_nodes: int, seed: int = 0, include_statistics: bool = False
    ) -> None:
        check_integer("num_malicious_nodes", num_malicious_nodes, minimum=0)
        self.num_nodes_to_select = 1
        FlowerRule.__init__(
            self, strategy, seed=seed, include_statistics=include_statistics, num_malicious_nodes=num_malicious_nodes
        )


class FlowerMedian(FlowerRule):
    """Coordinate-wise median (Yin et al., ICML 2018), Flower's ``FedMedian`` on float64 updates."""

    name = "fedmedian"
    flower_class = FedMedian
    filters = False


class FlowerTrimmedAvg(FlowerRule):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018), Flower's ``FedTrimmedAvg`` on
    float64 updates.

    ``int(beta * n)`` values are cut from each tail before averaging; ``beta`` in (0, 0.5),
    default 0.2 (Flower's). ``beta = 0`` is a plain mean and refused; a round whose n cuts
    nothing (n < 1 / beta) is said once.
    """

    name = "fedtrimmedavg"
    flower_class = FedTrimmedAvg
    filters = False

    def __init__(self, strategy: Strategy, *, beta: float = 0.2, **kwargs) -> None:
        check(isinstance(beta, bool) or beta != 0, "beta = 0 trims nothing: a plain mean; set beta in (0, 0.5)")
        check_number("beta", beta, above=0, below=0.5)
        super().__init__(strategy, beta=beta, **kwargs)

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        if int(self.rule.beta * len(updates)) == 0:
            self.warn_once(
                f"{self.name}: beta = {self.rule.beta} trims int({self.rule.beta} * {len(updates)}) = 0 updates from "
                f"each end of a round of {len(updates)}: a plain mean; raise beta or sample more clients"
            )
        return super().aggregate_updates(server_round, updates)


class FlowerBulyan(FlowerRule):
    """Bulyan (El Mhamdi et al., ICML 2018), Flower's ``Bulyan`` on float64 updates.

    MultiKrum selects n - 2f updates (in one pass; the paper repeats Krum, removing the
    update it picks each time); per coordinate, the n - 4f values closest to their median
    are averaged. ``num_malicious_nodes`` (f) is required and at least 1 (f = 0 keeps all n
    updates and every coordinate: an unweighted mean); the rule needs n >= 4f + 3 clients
    per round, and keeps the global model in a round with fewer useful replies.
    """

    name = "bulyan"
    flower_class = Bulyan
    required_help = {"num_malicious_nodes": F_HELP + " (>= 1); Bulyan needs n >= 4f + 3 clients per round"}

    def __init__(self, strategy: Strategy, *, num_malicious_nodes: int, **kwargs) -> None:
        check_integer("num_malicious_nodes", num_malicious_nodes, minimum=0)
        check(
            num_malicious_nodes >= 1,
            "num_malicious_nodes = 0 makes Bulyan keep every update and every coordinate: an unweighted mean; "
            "set num_malicious_nodes >= 1",
        )
        super().__init__(strategy, num_malicious_nodes=num_malicious_nodes, selection_rule=self._recording, **kwargs)

    def min_clients(self) -> int:
        return 4 * self.rule.num_malicious_nodes + 3

    def too_few_clients(self, sampled: int) -> str:
        f = self.rule.num_malicious_nodes
        return (
            f"bulyan with num_malicious_nodes = {f} needs n >= 4f + 3 = {self.min_clients()} clients per round, "
            f"but a round samples {sampled}; lower num_malicious_nodes or sample more clients"
        )

    def _recording(self, contents: list[RecordDict], num_malicious: int, num_select: int) -> list[RecordDict]:
        """Flower's default selection (MultiKrum), remembered to report the clients it kept."""
        self._chosen = select_multikrum(contents, num_malicious, num_select)
        return self._chosen
