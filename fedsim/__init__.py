"""fedsim: a federated-learning simulator for label and feature skew, native to Flower.

From Python: ``fedsim.run(experiment, **settings)`` runs an experiment and
``fedsim.load_run(folder)`` reads a finished one back (:mod:`fedsim.api`).
"""

__version__ = "0.1.0"
__all__ = ["Run", "load_run", "run"]


def __getattr__(name: str):
    """``run``, ``load_run`` and ``Run``, imported when first used."""
    if name in __all__:
        # lazy: `import fedsim` stays cheap; the API loads pandas, and running loads torch and Flower
        from fedsim import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
