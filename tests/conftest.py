from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PROBE = SHARED_DATA / "h100_llama8b_probe.json"


@pytest.fixture
def probe_path():
    if not PROBE.exists():
        pytest.skip("shared/data/h100_llama8b_probe.json not beside the checkout")
    return PROBE

import os

from hypothesis import settings

# CI explores the same examples every run (a failure there is reproducible); local runs keep searching.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
