"""Hypothesis profiles of the property tests (tests/test_properties_*.py), registered by conftest.py.

- ``ci`` (the default): derandomized (the same inputs on every run, so a failure in CI is a real one and
  reproduces), a modest number of inputs per test, no example database: a few seconds per file.
- ``fuzz``: random inputs, many of them, for long runs (``make fuzz``, bench/fuzz.py, or
  ``pytest --hypothesis-profile=fuzz tests/test_properties_*.py``).

``counted`` counts the inputs each property is called with, for bench/fuzz.py's figures.
"""

from __future__ import annotations

import functools
import os
from collections import Counter

from hypothesis import HealthCheck, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile("ci", derandomize=True, max_examples=int(os.environ.get("DPE_PROPERTY_EXAMPLES", "60")),
                          deadline=None, database=None, print_blob=True, suppress_health_check=_QUIET)
settings.register_profile("fuzz", derandomize=False, max_examples=5000, deadline=None, database=None,
                          print_blob=True, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: property name -> inputs it was called with in this process
TRIED: Counter = Counter()


def counted(fn):
    """Under ``@given``: count each call of the property (what bench/fuzz.py reports as inputs tried)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        TRIED[fn.__name__] += 1
        return fn(*args, **kwargs)

    return wrapper


def json_values(max_leaves: int = 20, text=None, floats=None):
    """JSON-like values: None, booleans, integers (some beyond 64 bits), floats, text, lists and objects."""
    from hypothesis import strategies as st

    text = st.text(max_size=20) if text is None else text
    floats = st.floats() if floats is None else floats
    scalars = st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63) | floats | text
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                        max_leaves=max_leaves)
