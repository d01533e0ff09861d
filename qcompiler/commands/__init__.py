"""Sub-commands of ``qc`` (one module each, discovered by ``qcompiler.cli``)."""
