"""The GPU benchmark's CPU smoke mode: every code path of benchmarks/gpu.py, on tiny images."""
import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("hrnetdet_gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(text: str) -> dict:
    return {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| "))}


def test_smoke_mode_writes_the_gpu_section_and_keeps_the_rest(gpu_bench, tmp_path):
    out = tmp_path / "results.md"
    cpu_tables = "# Benchmarks\n\nintro\n\n## Inference, CPU\n\n| model | x |\n|---|---|\n| keep me | 1 |\n"
    out.write_text(cpu_tables)
    assert gpu_bench.main(["--smoke", "--out", str(out)]) == 0
    first = out.read_text()
    assert first.startswith(cpu_tables.rstrip("\n"))
    section = first[first.index("## GPU"):]
    rows = _rows(section[:section.index("### Training")])
    for name in ("faster_rcnn_hrnetv2p_w18", "mask_rcnn_hrnetv2p_w18", "fasterrcnn_resnet50_fpn"):
        fps32, fps16, b8_32, b8_16 = (float(v) for v in rows[name][:4])
        assert min(fps32, fps16, b8_32, b8_16) > 0
    assert float(rows["faster_rcnn_hrnetv2p_w18"][4]) == 13.4  # the reference's V100 fps, from the registry
    train = _rows(section[section.index("### Training"):section.index("### Targets")])
    assert float(train["faster_rcnn_hrnetv2p_w18"][0]) > 0
    assert float(train["faster_rcnn_hrnetv2p_w18"][2]) == 6.6
    assert re.search(r"W18 Faster R-CNN bf16 batch 2 / fasterrcnn_resnet50_fpn .*: \d+\.\d\dx", section)

    # A second run replaces its section instead of appending another.
    gpu_bench.update_section(str(out), "## GPU\n\nnew table\n")
    second = out.read_text()
    assert "new table" in second and "faster_rcnn_hrnetv2p_w18" not in second
    assert second.count("## GPU") == 1 and second.count("keep me") == 1
