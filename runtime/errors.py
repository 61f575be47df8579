"""User-facing errors.

Every problem a user can cause (a bad path, size, step count, graph, ...) is raised
as an `EdgesdError` whose message is one line naming the problem and a fix.
The CLI prints it without a traceback and exits with code 2.
"""


class EdgesdError(Exception):
    """A problem with the user's input, reported as one line with a fix."""

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if fix is None else f"{problem}; {fix}"
        super().__init__(message.replace("\n", " "))


class Cancelled(Exception):
    """Raised when a progress callback asks the pipeline to stop."""
