#!/usr/bin/env python3
"""Write the synthetic llama whose down_proj overflows fp16 (tests/passes/test_keep_fp32.py) as model folders.

    python tools/overflow_model.py OUT_DIR        # OUT_DIR/fp32 and OUT_DIR/fp16

``models.half.inject_overflow``: layer 0's ``down_proj`` writes 1.5·10⁵ into one residual channel
on the first token (past fp16's 65504).  For trying ``keep-fp32`` from the command line::

    qc quantize OUT_DIR/fp16 OUT --recipe w4a16-rtn --group-size 32 --calib TEXT --calib-samples 4 --seq-len 64
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx_ir as ir
from qcompiler.models.half import inject_overflow, to_float_type
from qcompiler.models.synthetic import SyntheticConfig, build_llama, write_model_dir

CFG = SyntheticConfig(kv_cache=False, massive_dim=None, super_weight=None)

if __name__ == "__main__":
    out = Path(sys.argv[1])
    proto = inject_overflow(build_llama(CFG)[0])
    write_model_dir(proto, out / "fp32", CFG)
    write_model_dir(to_float_type(proto, ir.DataType.FLOAT16), out / "fp16", CFG)
    print(f"wrote {out / 'fp32'} and {out / 'fp16'}")
