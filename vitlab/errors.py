"""The exception type behind every user-facing error; the CLI prints its message on one line and exits non-zero."""


class VitlabError(Exception):
    """A problem with the user's input (a file, an option, a dataset) described so that they can act on it."""
