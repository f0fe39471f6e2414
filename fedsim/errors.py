"""The one error type a user should ever see from fedsim."""


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2, no traceback.

    Raise it with a message that names the bad key or value and says how to fix it.
    """


class ClientFailure(RuntimeError):
    """A simulated client raised an exception: one line, exit code 1.

    ``details`` keeps what the engine reported in full (the client's traceback).
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def raised_user_error(reason: str) -> str | None:
    """The message of a UserError that a client raised, from its error reply's reason, or
    None. Engines report a client's exception as text (Ray: with its whole traceback,
    wrapped as <class ...>:<'...'>)."""
    marker = f"{UserError.__module__}.{UserError.__name__}: "
    if marker not in reason:
        return None
    return reason.split(marker)[-1].splitlines()[0].removesuffix("'>")
