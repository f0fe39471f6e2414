"""Flash (Panchal, Choudhary, Mitra, Mukherjee, Sarkhel, Mitra & Guan, "Flash: Concept
Drift Adaptation in Federated Learning", ICML 2023): clients stop their local epochs
early, and the server runs an adaptive optimiser whose drift-aware term reacts when the
updates' second moment changes.

The rule read in wenwenwenwenti/FedCCFA at commit 647d8b097509e05278b7a68f116d2e84e106c72c
(``entities/Flash.py``, ``methods/Flash.py``, ``configs/Flash.yaml``), whose server update
agrees with VectorInstitute/FL4Health's ``fl4health/strategies/flash.py``:

- Client: after each local epoch e = 0, 1, ... the client computes its validation loss;
  with delta = (its previous validation loss) - (this one), it stops when
  0 < delta < ``loss_decrement`` / (e + 1). The previous loss is the client's last one,
  from this round or an earlier round it trained in (client state).
- Server, per coordinate, with Delta the clients' update averaged by training examples:
      m_t  = b1 m_{t-1} + (1 - b1) Delta
      v_t  = b2 v_{t-1} + (1 - b2) Delta^2
      b3   = |v_{t-1}| / (|Delta^2 - v_t| + |v_{t-1}|)
      d_t  = b3 d_{t-1} + (1 - b3) (Delta^2 - v_t)
      x_{t+1} = x_t + server_lr m_t / (sqrt(v_t) - d_t + tau)
  with m_0 = d_0 = 0, v_0 = tau^2 (FedCCFA's start; FL4Health starts v at 0). When the
  updates' squared size jumps above its running average (a drift), b3 falls towards 0
  and d_t takes the jump at once: the denominator shrinks and the effective step grows;
  while the updates shrink, d_t < 0 damps the step.

Neither code keeps the denominator positive, and neither does this one: in the first
round it is about 0.1 |Delta| - 0.99 Delta^2 + tau, negative for a coordinate whose update
exceeds about 0.11, which then steps the wrong way, and far. Clients whose per-round
updates are that large (an MLP on the 8x8 digits at lr 0.1 or more) make the run diverge;
FedCCFA's configuration keeps them small (lr 0.01).

The server's train metrics report the coordinates' mean b3 and d_t (``flash-beta3``,
``flash-d``) and the mean effective step size ``flash-step`` = mean of server_lr /
(sqrt(v_t) - d_t + tau).

Departures: ``validation = "held-out"`` (default) uses the client's local held-out split,
as FedCCFA's clients use their test set; ``"train"`` uses the loss on the client's
training data, which keeps the held-out split for evaluation only. The model returns to
train mode after each validation (FedCCFA's stays in eval mode for later epochs, which
only matters with dropout or BatchNorm). The optimiser runs on every floating-point array
of the model (its state dict; FedCCFA's on ``model.parameters()``), in float64; other
arrays take FedAvg's average. With ``[client] local_epochs = 1`` the early stop cannot
shorten training: FedCCFA's configuration trains 5 local epochs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from fedsim.checks import check_choice, check_fraction, check_number, check_positive
from fedsim.data import ClientData
from fedsim.errors import UserError
from fedsim.trainer import ClientCall, ClientState, ClientTrainer, RoundConfig, TrainResult
from fedsim.training import batches
from strategies.fedavg import FedAvg

LOSS_DECREMENT = "flash-loss-decrement"
VALIDATION = "flash-validation"
PREVIOUS_LOSS = "flash/previous-val-loss"  # client state: its last validation loss (absent: none yet)


# -- the client -----------------------------------------------------------------------------
def validation_loss(model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device) -> float:
    """Mean cross-entropy on (x, y), in eval mode, without gradients (FedCCFA's ``get_loss``)."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(x).to(device))
        return float(nn.functional.cross_entropy(logits, torch.as_tensor(y).to(device)))


def stops_early(previous: float | None, loss: float, loss_decrement: float, epoch: int) -> bool:
    """FedCCFA's rule: 0 < previous - loss < loss_decrement / (epoch + 1)."""
    if previous is None:
        return False
    delta = previous - loss
    return 0 < delta < loss_decrement / (epoch + 1)


class FlashTrainer(ClientTrainer):
    """Flash's client: local SGD epochs that stop once the validation loss stalls."""

    can_vectorize = False  # the epochs a client trains depend on its own validation loss

    def train(self, call: ClientCall) -> TrainResult:
        self.receive(call.model, call.arrays, call.state)
        call.model.to(call.device)
        metrics, state = self.fit_early_stopping(
            call.model, call.data, call.config, call.state, call.generator, call.device
        )
        reply, state = self.send(call.model, state)
        return TrainResult(reply, metrics, state)

    def fit_early_stopping(
        self,
        model: nn.Module,
        data: ClientData,
        config: RoundConfig,
        state: ClientState,
        generator: torch.Generator,
        device: torch.device,
    ) -> tuple[dict[str, float], ClientState]:
        """FedAvg's local epochs with one optimiser, and the validation check after each."""
        if any(isinstance(m, nn.BatchNorm1d) for m in model.modules()) and config.batch_size == 1:
            raise UserError(
                "[client] batch_size = 1 cannot train the model's BatchNorm1d layers; "
                "use a larger batch_size or [model] norm = 'gn', 'ln' or 'none'"
            )
        decrement = float(config.extra.get(LOSS_DECREMENT, 0.0))
        on_train = config.extra.get(VALIDATION, "held-out") == "train"
        x_val, y_val = (data.x_train, data.y_train) if on_train else (data.x_test, data.y_test)
        x = torch.as_tensor(data.x_train).to(device)
        y = torch.as_tensor(data.y_train).to(device)
        optimizer = self.make_optimizer(model, config)
        previous = float(state[PREVIOUS_LOSS]) if PREVIOUS_LOSS in state else None
        total_loss, seen, epochs = 0.0, 0, 0
        for epoch in range(config.local_epochs):
            model.train()
            for xb, yb in batches(x, y, config.batch_size, generator):
                if len(yb) == 1 and any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
                    continue
                optimizer.zero_grad()
                loss = self.batch_loss(model, xb, yb)
                loss.backward()
                self.before_step(model, config)
                optimizer.step()
                total_loss += float(loss.detach()) * len(yb)
                seen += len(yb)
            epochs = epoch + 1
            if len(y_val) == 0:  # no validation data: every epoch runs
                continue
            loss_now = validation_loss(model, x_val, y_val, device)
            if stops_early(previous, loss_now, decrement, epoch):
                break
            previous = loss_now
        model.train()
        state = dict(state)
        if previous is not None:
            state[PREVIOUS_LOSS] = np.array(previous, np.float64)
        metrics = {"train_loss": total_loss / max(seen, 1), "local-epochs": float(epochs)}
        return metrics, state


# -- the server -----------------------------------------------------------------------------
class FlashOptimizer:
    """The server's update (see the module docstring), per array, in float64."""

    def __init__(self, server_lr: float, beta1: float, beta2: float, tau: float) -> None:
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.d: dict[str, np.ndarray] = {}
        self.last: dict[str, float] = {}  # the last step's figures

    def step(self, current: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new values of ``current`` given the aggregated update ``delta`` (float64)."""
        b1, b2, tau = self.beta1, self.beta2, self.tau
        out, beta3s, ds, steps = {}, [], [], []
        for key, change in delta.items():
            m = self.m.get(key, np.zeros_like(change))
            v_prev = self.v.get(key, np.full_like(change, tau**2))
            d = self.d.get(key, np.zeros_like(change))
            squared = np.square(change)
            m = b1 * m + (1 - b1) * change
            v = b2 * v_prev + (1 - b2) * squared
            beta3 = np.abs(v_prev) / (np.abs(squared - v) + np.abs(v_prev))
            d = beta3 * d + (1 - beta3) * (squared - v)
            denominator = np.sqrt(v) - d + tau
            out[key] = current[key] + self.server_lr * m / denominator
            self.m[key], self.v[key], self.d[key] = m, v, d
            beta3s.append(beta3.ravel())
            ds.append(d.ravel())
            steps.append((self.server_lr / denominator).ravel())
        if out:
            self.last = {
                "flash-beta3": float(np.mean(np.concatenate(beta3s))),
                "flash-d": float(np.mean(np.concatenate(ds))),
                "flash-step": float(np.mean(np.concatenate(steps))),
            }
        return out


class Flash(FedAvg):
    """Flash (Panchal et al., 2023): early-stopping clients, drift-aware adaptive server.

    Parameters beyond Flower's FedAvg (FedCCFA's configuration as defaults): ``server_lr``
    (0.01), ``beta1`` (0.9), ``beta2`` (0.99), ``tau`` (0.001), ``loss_decrement`` (0.004),
    ``validation`` ("held-out" or "train").
    """

    client_trainer = FlashTrainer

    def __init__(
        self,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 0.001,
        loss_decrement: float = 0.004,
        validation: Literal["held-out", "train"] = "held-out",
        **kwargs,
    ) -> None:
        self.server_lr = check_positive("server_lr", server_lr)
        self.beta1 = check_fraction("beta1", beta1, allow_zero=True)
        self.beta2 = check_fraction("beta2", beta2, allow_zero=True)
        self.tau = check_positive("tau", tau)
        self.loss_decrement = check_number("loss_decrement", loss_decrement, at_least=0)
        self.validation = check_choice("validation", validation, ("held-out", "train"))
        super().__init__(**kwargs)
        self.optimizer = FlashOptimizer(self.server_lr, self.beta1, self.beta2, self.tau)
        self.current: ArrayRecord | None = None

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        def record(values: dict[str, np.ndarray]) -> ArrayRecord:
            return ArrayRecord({key: Array(np.asarray(value)) for key, value in values.items()})

        return {"m": record(self.optimizer.m), "v": record(self.optimizer.v), "d": record(self.optimizer.d)}

    def load_state_dict(self, state: dict) -> None:
        for name in ("m", "v", "d"):
            setattr(self.optimizer, name, {key: array.numpy() for key, array in state[name].items()})

    # -- the round ------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays
        config[LOSS_DECREMENT] = self.loss_decrement
        config[VALIDATION] = self.validation
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None or self.current is None:
            return averaged, metrics
        floating = [key for key, array in self.current.items() if np.issubdtype(array.dtype, np.floating)]
        current = {key: self.current[key].numpy().astype(np.float64) for key in floating}
        delta = {key: averaged[key].numpy().astype(np.float64) - current[key] for key in floating}
        stepped = self.optimizer.step(current, delta)
        out = ArrayRecord(
            {
                key: Array(stepped[key].astype(array.dtype)) if key in stepped else averaged[key]
                for key, array in self.current.items()
            }
        )
        return out, MetricRecord({**dict(metrics or {}), **self.optimizer.last})
