"""FedAvg with a history of earlier slots' data: the drift baselines that never ask
whether the drift was real.

``history = "keep"``: each client trains on its current data plus a bounded buffer of
earlier slots' samples (:mod:`strategies.history`), whatever the drift; right for
virtual and label drift, wrong for real drift, whose old samples carry the old labels.
``history = "discard"``: current data only, which is plain FedAvg (a test checks they
give the same run). FedDAA chooses between the two per client by detecting real drift.
"""

from __future__ import annotations

from typing import Literal

from fedsim.checks import check_choice, check_integer
from fedsim.trainer import ClientCall, ClientTrainer, TrainResult
from strategies import history
from strategies.fedavg import FedAvg


class HistoryTrainer(ClientTrainer):
    """FedAvg's local training on current data plus (``keep``) the history buffer."""

    can_vectorize = False  # trains on its history buffer, which the vectorised loop does not see

    def train(self, call: ClientCall) -> TrainResult:
        data, config = call.data, call.config
        keep = config.extra.get("history", "keep") == "keep"
        bound = int(config.extra.get("history-size", 0))
        state = history.update(call.state, data, keep=keep, bound=bound)
        result = super().train(call.replace(data=history.merged(state, data) if keep else data, state=state))
        result.metrics["history-samples"] = float(history.history_size(state))
        return result


class FedAvgHistory(FedAvg):
    """FedAvg whose clients keep (or discard) a bounded history of earlier slots' data.

    Parameters beyond Flower's FedAvg: ``history`` ("keep" or "discard") and
    ``history_size`` (samples a client keeps; 0 = as many as its current slot holds, which
    is one slot's worth, as the FedDAA authors' code keeps).
    """

    client_trainer = HistoryTrainer

    def __init__(self, history: Literal["keep", "discard"] = "keep", history_size: int = 0, **kwargs) -> None:
        check_choice("history", history, ("keep", "discard"))
        check_integer("history_size", history_size, minimum=0)
        super().__init__(**kwargs)
        self.history = history
        self.history_size = history_size

    def configure_train(self, server_round, arrays, config, grid):
        config["history"] = self.history
        config["history-size"] = self.history_size
        return super().configure_train(server_round, arrays, config, grid)
