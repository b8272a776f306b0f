"""Shared fixtures for the core's Python tests.

Random inputs are fresh on every run: the session seed is drawn at start-up (or taken from
CHUNKVALE_TEST_SEED to replay a failure) and printed in pytest's header; every test derives
its own seed from it and its node id.
"""

from __future__ import annotations

import hashlib
import os
import random

import pytest

try:
    from hypothesis import HealthCheck, Phase, settings

    # "default" does not shrink (a failing state machine can take minutes to shrink on this
    # 2-core machine); rerun a failure with CHUNKVALE_HYPOTHESIS_PROFILE=debug for a minimal
    # example.
    settings.register_profile(
        "default",
        max_examples=25,
        deadline=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile(
        "debug",
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile(
        "thorough",
        max_examples=300,
        deadline=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile(os.environ.get("CHUNKVALE_HYPOTHESIS_PROFILE", "default"))
except ImportError:  # pragma: no cover
    pass

SESSION_SEED = int(os.environ.get("CHUNKVALE_TEST_SEED", random.SystemRandom().randrange(2**31)))


# tests/vllm run inside vLLM's own environment (scripts/test_vllm.sh, which scripts/test.sh
# calls); the main environment has no vLLM (it pins transformers <5.20).
collect_ignore = [] if os.environ.get("CHUNKVALE_VLLM_TESTS") == "1" else ["vllm"]


def pytest_report_header(config):
    where = "here" if not collect_ignore else "by scripts/test_vllm.sh in vLLM's environment"
    return f"chunkvale test seed: CHUNKVALE_TEST_SEED={SESSION_SEED}; tests/vllm run {where}"


@pytest.fixture
def seed(request):
    """A fresh seed per test (replay a run with CHUNKVALE_TEST_SEED=<header value>)."""
    h = hashlib.blake2b(f"{SESSION_SEED}:{request.node.nodeid}".encode(), digest_size=4)
    return int.from_bytes(h.digest(), "little")


@pytest.fixture(scope="session")
def cv():
    """The chunkvale module; a hard failure (not a skip) when the core is not installed."""
    try:
        import chunkvale
    except ImportError as e:  # pragma: no cover
        pytest.fail(f"chunkvale is not importable ({e}); pip install -e . first")
    return chunkvale


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")


def pytest_runtest_makereport(item, call):
    """Print the session seed next to every failure so it can be replayed."""
    if call.excinfo is not None and call.when == "call":
        item.add_report_section("call", "seed", f"CHUNKVALE_TEST_SEED={SESSION_SEED}")
