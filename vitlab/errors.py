"""The exception types behind every user-facing error; the CLI prints their message on one line and exits 2.

Anything else that reaches the CLI is a bug and keeps its traceback. The two subclasses are also the built-in types
their sites raised before (``ValueError``, ``KeyError``), so Python callers that catch those keep working.
"""

_WORKER_PREFIX = "Caught "
_WORKER_TRACEBACK = "\nOriginal Traceback"


class VitlabError(Exception):
    """A problem with the user's input (a file, an option, a dataset) described so that they can act on it.

    Raised in a DataLoader worker, the error reaches the main process as ``type(error)(text)`` where the text is
    "Caught ... in DataLoader worker process N" plus the worker's whole traceback; the original one-line message is
    taken back out of it, so that a bad image named in a worker is still one line at the command line.

    ``options`` lists the settings (config fields, keyword arguments) the message names, written ``name=value`` or
    ``name`` as a Python caller spells them; a command rewrites them as the flags that set them
    (``vitlab.cli.train.flag_message``)."""

    options: tuple[str, ...] = ()

    def __init__(self, *args, options: tuple[str, ...] | list[str] = ()):
        if options:
            self.options = tuple(options)
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith(_WORKER_PREFIX) \
                and _WORKER_TRACEBACK in args[0]:
            args = (_original_message(args[0], type(self)),)
        super().__init__(*args)


class InvalidValueError(VitlabError, ValueError):
    """A value that an option, a config field or a function does not accept."""


class UnknownNameError(VitlabError, KeyError):
    """A name that is not in one of vitlab's tables (models, recipes, ...)."""

    def __str__(self) -> str:  # KeyError's str() quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""


class Stopped(Exception):
    """A command that ended early for a reason outside it and that is neither bad input nor a bug (a scheduler's stop
    signal, another process of the run gone). The CLI prints the message on one line, unless ``shown`` (it was
    already printed, or another process prints it), and exits with ``exit_status``."""

    exit_status = 1

    def __init__(self, message: str, exit_status: int | None = None, shown: bool = False):
        super().__init__(message)
        if exit_status is not None:
            self.exit_status = exit_status
        self.shown = shown


def _original_message(text: str, cls: type) -> str:
    """The message of the exception whose formatted traceback ends ``text`` (its last line, less the type name)."""
    last = [line for line in text.splitlines() if line.strip()][-1]
    for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last
