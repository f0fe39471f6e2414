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
