from pathlib import Path

import pytest

from offloadlab import catalog

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# the H100 development set: the shared copy when it is beside the checkout, else the stored one
# (tests/test_validation.py keeps the two byte-identical whenever both are here)
PROBE = next((p for p in (SHARED_DATA / "h100_llama8b_probe.json", ROOT / "validation" / "traces" /
                          "h100_llama8b_probe.json") if p.exists()), None)


@pytest.fixture
def probe_path():
    if PROBE is None:
        pytest.skip("no h100_llama8b_probe.json, shared or stored")
    return PROBE


@pytest.fixture
def clean_user_catalog():
    """User catalog files register names process-wide; restore the tables after each test."""
    models, gpus = dict(catalog._user_models), dict(catalog._user_gpus)
    yield
    catalog._user_models.clear()
    catalog._user_models.update(models)
    catalog._user_gpus.clear()
    catalog._user_gpus.update(gpus)


import os

from hypothesis import settings

# CI explores the same examples every run (a failure there is reproducible); local runs keep searching.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
