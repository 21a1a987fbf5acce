"""The one exception type users see for bad input."""


class KneuronsError(ValueError):
    """Bad input or an unusable model/file. The message is one line naming the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
