"""The exception types behind every user-facing error; the CLI prints their message on one line and exits 2.

Anything else that reaches the CLI is a bug and keeps its traceback. The two subclasses are also the built-in types
their sites raised before (``ValueError``, ``KeyError``), so Python callers that catch those keep working.
"""


class VitlabError(Exception):
    """A problem with the user's input (a file, an option, a dataset) described so that they can act on it."""


class InvalidValueError(VitlabError, ValueError):
    """A value that an option, a config field or a function does not accept."""


class UnknownNameError(VitlabError, KeyError):
    """A name that is not in one of vitlab's tables (models, recipes, ...)."""

    def __str__(self) -> str:  # KeyError's str() quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""
