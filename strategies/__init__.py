"""Federated algorithms: one module per method, each an ordinary Flower Strategy.

A strategy whose clients do something other than FedAvg's local SGD names its client
trainer (a :class:`fedsim.trainer.ClientTrainer` subclass) in a ``client_trainer`` class
attribute. Two more optional class attributes tell fedsim about the method:
``model_options`` (model options it requires, e.g. FedWon's ``{"norm": "none"}``) and
``personalized = True`` (clients evaluate their own models, so the global arrays are not
evaluated on the server), and a ``validate_model(model)`` static method that raises
ValueError for a model the method cannot train (FedBN: no BatchNorm).

Each class is an ordinary Flower strategy. In a Flower app of your own, give it its client
half too (:mod:`fedsim.plain_flower`); FedBN and FedWon refuse replies from clients without it.
"""

from fedsim.registry import LazyRegistry

# Each module is imported when its strategy is first used (Flower and PyTorch take a
# second or two to import); `from strategies import FedBN` works as usual.
STRATEGIES = LazyRegistry(
    {
        "fedavg": "strategies.fedavg:FedAvg",
        "fedprox": "strategies.fedprox:FedProx",
        "fedbn": "strategies.fedbn:FedBN",
        "fedwon": "strategies.fedwon:FedWon",
        "fedavg-history": "strategies.fedavg_history:FedAvgHistory",
        "feddaa": "strategies.feddaa:FedDAA",
        "ifca": "strategies.ifca:IFCA",
        "oracle": "strategies.oracle:ConceptOracle",
        "ggeur": "strategies.ggeur:GGEUR",
        "fraug": "strategies.fraug:FRAug",
        "fedccfa": "strategies.fedccfa:FedCCFA",
        "fedem": "strategies.fedem:FedEM",
        "fedrc": "strategies.fedrc:FedRC",
        "feddrift": "strategies.feddrift:FedDrift",
        "feddrift-eager": "strategies.feddrift:FedDriftEager",
        "cfl": "strategies.cfl:CFL",
        "adaptive-fedavg": "strategies.adaptive_fedavg:AdaptiveFedAvg",
        "flash": "strategies.flash:Flash",
    }
)
_CLASSES = {
    "FedAvg": "fedavg",
    "FedProx": "fedprox",
    "FedBN": "fedbn",
    "FedWon": "fedwon",
    "FedAvgHistory": "fedavg-history",
    "FedDAA": "feddaa",
    "IFCA": "ifca",
    "ConceptOracle": "oracle",
    "GGEUR": "ggeur",
    "FRAug": "fraug",
    "FedCCFA": "fedccfa",
    "FedEM": "fedem",
    "FedRC": "fedrc",
    "FedDrift": "feddrift",
    "FedDriftEager": "feddrift-eager",
    "CFL": "cfl",
    "AdaptiveFedAvg": "adaptive-fedavg",
    "Flash": "flash",
}


def __getattr__(name: str):
    if name in _CLASSES:
        return STRATEGIES[_CLASSES[name]]
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")


__all__ = [
    "STRATEGIES",
    "AdaptiveFedAvg",
    "CFL",
    "ConceptOracle",
    "FedAvg",
    "FedAvgHistory",
    "FedBN",
    "FedDAA",
    "FedProx",
    "FedWon",
    "FRAug",
    "FedCCFA",
    "Flash",
    "FedDrift",
    "FedDriftEager",
    "FedEM",
    "FedRC",
    "GGEUR",
    "IFCA",
]
