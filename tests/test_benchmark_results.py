"""Benchmark results are appended under benchmarks/results/: a rerun never overwrites an earlier file."""
from __future__ import annotations

import datetime
import json

from benchmarks import common

DAY = datetime.date(2026, 12, 7)
XEON = {"cpu": "Intel(R) Xeon(R) Processor", "gpu": None}
EPYC = {"cpu": "AMD EPYC", "gpu": None}


def _write(path, machine):
    path.write_text(json.dumps({"machine": machine}))
    return path.name


def test_reruns_and_other_machines_get_their_own_files(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    names = [_write(common.result_path("versus", "cpu", XEON, DAY), XEON) for _ in range(3)]
    assert names == ["versus-2026-12-07.json", "versus-2026-12-07-run2.json", "versus-2026-12-07-run3.json"]
    other = [_write(common.result_path("versus", "cpu", EPYC, DAY), EPYC) for _ in range(2)]
    assert other == ["versus-2026-12-07-amd-epyc.json", "versus-2026-12-07-amd-epyc-run2.json"]
    assert common.result_path("versus", "cuda", XEON, DAY).name == "versus-cuda-2026-12-07.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + other)
