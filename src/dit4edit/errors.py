"""The one exception type users see: its message is a single line naming the problem."""


class DiT4EditError(Exception):
    """A problem with the user's input (file, prompt, size, model folder, option); the CLI prints it in one line."""
