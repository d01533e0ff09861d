"""qcompiler: an ONNX graph-transform quantization compiler for large language models.

Data flow: ``export`` → ``canonicalize`` → ``calibrate`` → passes (``passes/``) →
target lowering → ``eval``.  See README.md and ../shared/DESIGN.md.
"""

__version__ = "0.1.0"
