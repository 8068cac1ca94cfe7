"""Hypothesis profiles, chosen by MINIRWKV_HYPOTHESIS_PROFILE (default ``ci``):

    ci        derandomized (same examples every run), no deadline, few examples: the gate every submission passes
    dev       random, more examples: for local work
    thorough  many examples: before a release or after touching a kernel
"""
import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, for the test files in every subfolder

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=50, print_blob=True, **_common)
settings.register_profile("dev", max_examples=60, print_blob=True, **_common)
settings.register_profile("thorough", max_examples=600, print_blob=True, **_common)
settings.load_profile(os.environ.get("MINIRWKV_HYPOTHESIS_PROFILE", "ci"))
