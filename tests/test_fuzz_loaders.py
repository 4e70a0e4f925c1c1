"""Fuzzing every file loader: whatever the bytes, only the project's typed errors come out.

Loaders: catalog files (YAML/JSON), probe files (ProbeFile.load and Profile.from_probe, and validate's
prediction when they load), Profile files, workload CSV and JSONL, vLLM benchmark results, serving runs. Inputs are raw bytes, and near-valid
documents with one field replaced by an arbitrary JSON value (where the interesting bugs live).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offloadlab import catalog
from offloadlab.errors import OffloadLabError
from offloadlab.profile import Profile
from offloadlab.sim.workload import from_file, from_serving_run, from_vllm_result
from offloadlab.specs import HardwareSpec, ModelSpec
from offloadlab.validation import ProbeFile, error_summary, predict_probe
from offloadlab.validation.memory_profiles import load as load_memory_profiles
from offloadlab.validation.serving_run import load_serving_run

ROOT = Path(__file__).resolve().parents[1]
PROBE = json.loads((ROOT / "validation" / "traces" / "h100_llama8b_probe.json").read_text())
SERVING_RUN = ROOT / "validation" / "traces" / "serving" / "rtx4090_llama-3.1-8b"
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from([0, 1, -1, 2, 32, 64, 0.5, "32", "nan", "", "llama-3.1-8b"]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                      max_leaves=12)


_DIR = tempfile.TemporaryDirectory(prefix="offloadlab-fuzz-")  # removed when the test process ends


def _write(name: str, data: bytes) -> Path:
    p = Path(_DIR.name) / name  # one file per name, rewritten by each example
    p.write_bytes(data)
    return p


def _only_typed_errors(fn, *args):
    try:
        return fn(*args)
    except OffloadLabError:
        return None


class _CatalogState:
    def __enter__(self):
        self.saved = dict(catalog._user_models), dict(catalog._user_gpus)

    def __exit__(self, *exc):
        catalog._user_models.clear()
        catalog._user_models.update(self.saved[0])
        catalog._user_gpus.clear()
        catalog._user_gpus.update(self.saved[1])


# ---------------------------------------------------------------- raw bytes, every loader
@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".json", ".yaml", ".csv", ".jsonl"]))
def test_any_bytes_give_typed_errors_only(data, suffix):
    p = _write("f" + suffix, data)
    with _CatalogState():
        _only_typed_errors(catalog.load_catalog_file, p)
    _only_typed_errors(Profile.load, p)
    _only_typed_errors(ProbeFile.load, p)
    _only_typed_errors(from_file, p)
    _only_typed_errors(from_vllm_result, p)
    _only_typed_errors(load_serving_run, p)  # a .json file: read as a vLLM benchmark result
    _only_typed_errors(load_memory_profiles, p)


# ---------------------------------------------------------------- vLLM benchmark result files (validate RESULT.json)
RESULT = {"model_id": "meta-llama/Llama-3.1-8B", "request_rate": 2.0, "burstiness": 1.0, "max_concurrency": None,
          "duration": 3.0, "input_lens": [12, 30], "output_lens": [3, 0], "ttfts": [0.1, 0.0],
          "itls": [[0.01, 0.02], []], "errors": ["", "failed"]}
SIDE = {"model": "meta-llama/Llama-3.1-8B", "vllm_version": "0.8.3", "benchmark_seed": 0,
        "hardware": {"device_name": "NVIDIA H100 80GB HBM3", "device_count": 8}}
result_paths = ([("r", k) for k in RESULT] + [("r", k, 0) for k in ("input_lens", "output_lens", "ttfts", "itls",
                                                                     "errors")]
                + [("r", "itls", 0, 1), ("s", "vllm_version"), ("s", "benchmark_seed"), ("s", "hardware"),
                   ("s", "hardware", "device_count"), ("s", "engine_kwargs")])


@FUZZ
@given(path=st.sampled_from(result_paths), value=values)
def test_result_files_with_one_field_replaced_give_typed_errors_only(path, value):
    doc = {"r": RESULT, "s": SIDE}
    d = _mutated(doc, path, value)
    p = _write("res.json", json.dumps(d["r"]).encode())
    _write("res.meta.json", json.dumps(d["s"]).encode())
    run = _only_typed_errors(load_serving_run, p)
    if run is not None:
        assert len(run.columns["ttft"]) >= 1 and np.isfinite(run.columns["arrival"]).all()
    from offloadlab.validation.serving_run import plan_replay

    _only_typed_errors(plan_replay, p)
    (Path(_DIR.name) / "res.meta.json").unlink()


@FUZZ
@given(data=st.binary(max_size=400), which=st.sampled_from(["meta.json", "requests.jsonl", "timeseries.csv"]))
def test_serving_run_files_of_any_bytes_give_typed_errors_only(data, which):
    """A serving-run directory (the stored run's files) with one of them replaced by arbitrary bytes."""
    d = Path(_DIR.name) / "run"
    d.mkdir(exist_ok=True)
    for name in ("meta.json", "requests.jsonl", "timeseries.csv"):
        (d / name).write_bytes(data if name == which else (SERVING_RUN / name).read_bytes())
    _only_typed_errors(load_serving_run, d)
    _only_typed_errors(from_serving_run, d)


# ---------------------------------------------------------------- catalogs
model_fields = [f.name for f in dataclasses.fields(ModelSpec) if f.name != "name"] + ["base"]
gpu_fields = [f.name for f in dataclasses.fields(HardwareSpec) if f.name != "name"] + ["base"]


@FUZZ
@given(models=st.dictionaries(st.text(min_size=1, max_size=10) | st.sampled_from(["llama-3.1-8b", "h100"]),
                              st.dictionaries(st.sampled_from(model_fields), values, max_size=6) | values, max_size=2),
       gpus=st.dictionaries(st.text(min_size=1, max_size=10),
                            st.dictionaries(st.sampled_from(gpu_fields), values, max_size=6) | values, max_size=2),
       as_yaml=st.booleans())
def test_catalog_files_give_typed_errors_only(models, gpus, as_yaml):
    doc = {"models": models, "gpus": gpus}
    text = yaml.safe_dump(doc) if as_yaml else json.dumps(doc)
    p = _write("c.yaml" if as_yaml else "c.json", text.encode())
    with _CatalogState():
        added = _only_typed_errors(catalog.load_catalog_file, p)
        if added is not None:  # what loads is usable: every added spec says its bytes
            for name in added[0]:
                assert catalog.get_model(name).weight_total_bytes > 0


# ---------------------------------------------------------------- probe files
probe_paths = ([(k,) for k in PROBE] + [("forward", i, f) for i in (0, 1, 5) for f in PROBE["forward"][0]]
               + [("layer", 0, f) for f in PROBE["layer"][0]] + [("h2d_bandwidth", 0, f) for f in PROBE["h2d_bandwidth"][0]]
               + [("forward", 2), ("layer", 1), ("h2d_bandwidth", 1)])


def _mutated(base: dict, path: tuple, value) -> dict:
    d = copy.deepcopy(base)
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return d


@FUZZ
@given(path=st.sampled_from(probe_paths), value=values)
def test_probe_files_give_typed_errors_only_and_finite_predictions(path, value):
    p = _write("p.json", json.dumps(_mutated(PROBE, path, value)).encode())
    _only_typed_errors(Profile.from_probe, p)
    probe = _only_typed_errors(ProbeFile.load, p)
    if probe is not None:  # validate on a file that loads: every prediction is a number (no NaN MAPE)
        df = _only_typed_errors(predict_probe, probe)
        if df is not None:
            assert df["predicted_ms"].map(math.isfinite).all()
            assert math.isfinite(error_summary(df)["mape"])


# ---------------------------------------------------------------- Profile files
GOOD_PROFILE = {"schema": "offloadlab.profile/1", "model": "llama-3.1-8b", "gpu": "x", "layers": 32,
                "h2d": [[1048576, 3.0e10], [268435456, 5.2e10]], "layer_times": [[1, 2048, 0, 0.0017]],
                "launch_per_layer": None, "copy_slowdown": 1.0, "meta": {}}
profile_paths = [(k,) for k in GOOD_PROFILE] + [("h2d", 0), ("h2d", 0, 1), ("layer_times", 0), ("layer_times", 0, 0),
                                                  ("layer_times", 0, 3)]


@FUZZ
@given(path=st.sampled_from(profile_paths), value=values, as_yaml=st.booleans())
def test_profile_files_give_typed_errors_only(path, value, as_yaml):
    doc = _mutated(GOOD_PROFILE, path, value)
    try:
        text = yaml.safe_dump(doc) if as_yaml else json.dumps(doc)
    except (ValueError, yaml.YAMLError):  # not representable in that format
        return
    prof = _only_typed_errors(Profile.load, _write("p.yaml" if as_yaml else "p.json", text.encode()))
    if prof is not None:
        assert all(math.isfinite(x) and x > 0 for row in prof.h2d for x in row)
        assert all(math.isfinite(r[3]) and r[3] > 0 for r in prof.layer_times)


# ---------------------------------------------------------------- workload files
cells = scalars | st.sampled_from(["1", "100", "0", "-1", "1.5", "nan", "inf", " 7 ", "1e3", "0x10"])
columns = st.lists(st.sampled_from(["id", "prompt_len", "output_len", "arrival", "note", ""]), min_size=1, max_size=5)


@FUZZ
@given(cols=columns, rows=st.lists(st.lists(cells, min_size=0, max_size=6), max_size=5), jsonl=st.booleans())
def test_workload_files_give_typed_errors_only(cols, rows, jsonl):
    if jsonl:
        text = "\n".join(json.dumps(dict(zip(cols, r))) for r in rows) + "\n"
    else:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if v is None else v for v in r])
        text = buf.getvalue()
    wl = _only_typed_errors(from_file, _write("w.jsonl" if jsonl else "w.csv", text.encode()))
    if wl is not None:
        assert all(r.prompt_len >= 1 and r.output_len >= 1 and math.isfinite(r.arrival) for r in wl.requests)
