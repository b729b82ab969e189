"""Errors a user causes and can fix; the entry point prints them as one line and exits with status 2."""


class UserError(ValueError):
  """Bad input: a config value, a file, a workdir. The message names the problem and the fix."""
