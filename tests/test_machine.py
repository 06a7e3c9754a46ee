"""Which CPU a figure came from (mmaccel.machine)."""
from pathlib import Path

import mmaccel.machine as machine

TWO_PROCESSORS = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu avx2 avx512f avx512_bf16

processor\t: 1
model name\t: Some Other CPU
flags\t\t: fpu
"""


def test_cpuinfo_reads_the_first_processor(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text(TWO_PROCESSORS)
    monkeypatch.setattr(machine, "CPUINFO", path)
    info = machine.cpuinfo()
    assert info["model name"] == "AMD EPYC" and info["processor"] == "0"
    assert machine.cpu_flags(info) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "missing")
    assert machine.cpuinfo() == {} and machine.cpu_flags({}) == set()


def test_machine_line_names_the_cpu_and_its_speed_flags(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text(TWO_PROCESSORS)
    monkeypatch.setattr(machine, "CPUINFO", path)
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    assert machine.machine_line() == "AMD EPYC, 2 cores; avx512f yes, avx512_bf16 yes, amx_bf16 no"


def test_cpu_flags_reads_this_machine():
    flags = machine.cpu_flags()
    assert isinstance(flags, set)
    if Path("/proc/cpuinfo").exists():
        assert flags and all(" " not in f for f in flags)
        assert machine.cpuinfo().get("model name", "") in machine.machine_line()
