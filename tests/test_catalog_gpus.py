"""The second datasheet table (hardware_more.csv) and device names as vLLM records them."""
import csv
from pathlib import Path

import pytest

from offloadlab.catalog import get_gpu, gpu_for_device, gpu_names
from offloadlab.errors import UnknownNameError
from offloadlab.specs import GiB

CATALOG = Path(__file__).resolve().parents[1] / "offloadlab" / "catalog"


def test_more_gpus_share_the_shared_tables_columns_and_have_a_source():
    with open(CATALOG / "hardware.csv") as f:
        columns = next(csv.reader(f))
    with open(CATALOG / "hardware_more.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == columns
    for r in rows:
        assert len(r["note"]) > 40, f"{r['gpu']}: the note must say where its figures come from"
    names = {r["gpu"] for r in rows}
    assert names <= set(gpu_names())
    assert not names & {r["gpu"] for r in csv.DictReader(open(CATALOG / "hardware.csv"))}


def test_rtx_4090_datasheet_row():
    g = get_gpu("rtx4090")
    assert g.memory_bytes == 24 * GiB
    assert g.hbm_bw == 1008e9
    assert g.peak_flops == 165.2e12  # Ada whitepaper: bf16 with FP32 accumulate, dense
    assert g.host_link == "PCIe Gen4 x16" and g.host_link_bw == 32e9
    assert g.gpu_link_bw == 0


@pytest.mark.parametrize("device,name", [
    ("NVIDIA GeForce RTX 4090", "RTX-4090-24GB"),
    ("NVIDIA GeForce RTX 5090", "RTX-5090-32GB"),
    ("NVIDIA RTX 6000 Ada Generation", "RTX-6000-Ada-48GB"),
    ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "RTX-PRO-6000-Blackwell-96GB"),
    ("NVIDIA L4", "L4-24GB"),
    ("NVIDIA L40", "L40-48GB"),
    ("NVIDIA L40S", "L40S-48GB"),
    ("NVIDIA A10G", "A10G-24GB"),
    ("NVIDIA H100 NVL", "H100-NVL-94GB"),
    ("NVIDIA H20", "H20-96GB"),
    ("NVIDIA H100 80GB HBM3", "H100-SXM5-80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100-SXM4-40GB"),
    ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB"),
    ("NVIDIA A100 80GB PCIe", "A100-PCIe-80GB"),
    ("NVIDIA A100-PCIE-40GB", "A100-PCIe-40GB"),
    ("NVIDIA H100 PCIe", "H100-PCIe-80GB"),
    ("NVIDIA H200", "H200-SXM-141GB"),
    ("NVIDIA H200 NVL", "H200-NVL-141GB"),
    ("NVIDIA RTX A6000", "RTX-A6000-48GB"),  # once matched to the RTX 4090 by its "RTX" alone
    ("NVIDIA A10", "A10-24GB"),
    ("NVIDIA GH200 480GB", "GH200-96GB"),
    ("NVIDIA GH200 144G HBM3e", "GH200-144GB"),  # was the 96 GB part, at its HBM3's 4.0 TB/s
    ("AMD Instinct MI300X", "MI300X-192GB"),
    ("NVIDIA GeForce RTX 3090", "RTX-3090-24GB"),
])
def test_device_names_map_to_their_catalog_row(device, name):
    assert gpu_for_device(device).name == name


@pytest.mark.parametrize("device", ["NVIDIA Quadro P400", "NVIDIA RTX A4000", "Tesla V100-SXM2-32GB",
                                    "NVIDIA GeForce RTX 3080", "NVIDIA L40 NVL"])
def test_unknown_device_is_an_error(device):
    """A device is never matched to a GPU it does not name (RTX alone is not an RTX 4090), nor to
    another form of one it does ("L40 NVL" is no L40 row)."""
    with pytest.raises(UnknownNameError, match=device.split()[-1]):
        gpu_for_device(device)


def test_every_catalog_gpu_is_found_from_its_own_name_and_its_device_names():
    """Each row is what its own name (as a device would print it) refers to, and every known device
    name maps to a GPU whose identifying tokens it contains."""
    from offloadlab.catalog import _DEVICE_NAMES, _FORM, _tokens

    for name in gpu_names():
        assert gpu_for_device("NVIDIA " + name.replace("-", " ")).name == name
    for device, name in _DEVICE_NAMES.items():
        ident = {t for t in _tokens(name) if not _FORM.match(t)}
        assert ident <= set(_tokens(device)), (device, name)
