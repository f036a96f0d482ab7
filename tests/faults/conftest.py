"""Fixtures of the fault tests."""

from tests.faults.helpers import setup  # noqa: F401  (the fixture, for every module here)
