"""fedsim: a federated-learning simulator for label and feature skew, native to Flower."""

__version__ = "0.1.0"
