"""Fixtures of the serve tests (defined in tests/serve/support.py)."""

from tests.serve.support import gate, served  # noqa: F401 - pytest finds fixtures by name here
