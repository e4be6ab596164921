"""Errors a user can fix (bad spec, data, checkpoint, key...): the CLI prints them and exits 2.

Kept free of heavy imports so that every command can catch them cheaply.
"""


class UserError(ValueError):
    """Bad input. The message says what is wrong and how to fix it."""
