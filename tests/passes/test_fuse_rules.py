"""fuse-rules: the rmsnorm, skip-rmsnorm and silu rewrite rules in one sweep write the graph the separate passes wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qcompiler.models.synthetic import SyntheticConfig

from qcompiler.errors import QCError
from qcompiler.pipeline import make_config, run_passes
from tests.passes.fusion_util import (
    ALL_FUSIONS,
    SEPARATE_FUSIONS,
    WINDOW,
    assert_same_decoder,
    count,
    graph_nodes,
    passes,
    run,
    runner,
    synthetic,
)

CFG = SyntheticConfig(layers=2)


def _norms(model) -> int:  # type: ignore[no-untyped-def]
    return count(model, "SimplifiedLayerNormalization") + count(model, "com.microsoft.SkipSimplifiedLayerNormalization")


def test_sweep_writes_the_graph_of_the_separate_passes(tmp_path: Path) -> None:
    swept = run(synthetic(CFG), ALL_FUSIONS)
    assert graph_nodes(swept) == graph_nodes(run(synthetic(CFG), SEPARATE_FUSIONS))
    assert count(swept, "com.microsoft.SkipSimplifiedLayerNormalization") >= 2 * CFG.layers
    assert _norms(swept) == 2 * CFG.layers + 1
    assert count(swept, "com.microsoft.QuickGelu") == CFG.layers
    assert count(swept, "com.microsoft.GroupQueryAttention") == CFG.layers
    assert_same_decoder(runner(synthetic(CFG), tmp_path / "ref"), runner(swept, tmp_path / "swept"), WINDOW, steps=16)


@pytest.mark.parametrize(("subset", "separate"), [("rmsnorm", "fuse-rmsnorm"), ("silu", "fuse-silu"),
                                                   ("rmsnorm:skip-rmsnorm", "fuse-rmsnorm,fuse-skip-rmsnorm")])
def test_subset_is_its_passes(subset: str, separate: str, tmp_path: Path) -> None:
    swept = run(synthetic(CFG), f"fuse-rules{{rules={subset}}}")
    assert graph_nodes(swept) == graph_nodes(run(synthetic(CFG), separate))
    assert _norms(swept) == (2 * CFG.layers + 1 if "rmsnorm" in subset else 0)
    assert count(swept, "com.microsoft.QuickGelu") == (CFG.layers if "silu" in subset else 0)
    assert_same_decoder(runner(synthetic(CFG), tmp_path / "ref"), runner(swept, tmp_path / "swept"), WINDOW)


def test_report_keeps_each_fusion_name() -> None:
    [sweep] = passes("fuse-rules")
    run_passes(synthetic(CFG), [sweep])  # canonicalize first, in the same context
    fusion = sweep.context.report["fusion"]
    assert sorted(fusion) == ["fuse-rmsnorm", "fuse-silu", "fuse-skip-rmsnorm"]
    assert (fusion["fuse-rmsnorm"], fusion["fuse-silu"]) == (2 * CFG.layers + 1, CFG.layers)
    assert fusion["fuse-skip-rmsnorm"] >= 2 * CFG.layers


def test_unknown_group_is_refused() -> None:
    from qcompiler.passes.fuse_rules import FuseRules

    with pytest.raises(QCError, match="unknown rule group"):
        make_config(FuseRules, {"rules": "rmsnorm:gelu"})


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_smollm2_sweep_writes_the_same_graph(dtype: str, smollm2_kv: Path, smollm2_kv_fp16: Path,
                                             tmp_path: Path) -> None:
    export = smollm2_kv if dtype == "fp32" else smollm2_kv_fp16
    swept = run(export, ALL_FUSIONS)
    assert graph_nodes(swept) == graph_nodes(run(export, SEPARATE_FUSIONS))
    assert count(swept, "com.microsoft.SkipSimplifiedLayerNormalization") == 60
    ids = (np.arange(32) * 997 + 13) % 20000 + 100
    assert_same_decoder(runner(export, tmp_path / "ref", threads=2), runner(swept, tmp_path / "swept", threads=2), ids,
                        tol=1e-4 if dtype == "fp32" else 2e-2)
