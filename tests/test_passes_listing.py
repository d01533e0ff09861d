"""qc passes lists every option's default as a pipeline text writes it: each line reads back as the defaults."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from qcompiler.pipeline import available_passes, get_pass, make_config, split_pipeline


def test_listed_defaults_read_back() -> None:
    out = subprocess.run([sys.executable, "-m", "qcompiler", "passes"], capture_output=True, text=True, check=True).stdout
    listed = [line.strip() for line in out.splitlines() if line.startswith("  ") and not line.startswith("      ")]
    lines = [line for line in listed if line.split("{")[0] in available_passes()]
    assert len(lines) == len(available_passes())
    assert "options=w4g128:w4g64:w4g32:w8c" in out and "('" not in out and "=None" not in out
    for line in lines:
        ((name, options),) = split_pipeline(line)
        cls = get_pass(name)
        if dataclasses.fields(cls.Config):
            assert make_config(cls, options) == cls.Config(), line
