"""Option combinations are either refused or honoured, never silently ignored.

For a random recipe, target and set of explicitly given options (values as the command
line would give them), :func:`qcompiler.option_use.check_options` either raises an
:class:`OptionError` naming one of the given options and the recipe, or every given option
is honoured: changing its value changes the pipeline that runs (recipe + target lowering),
or it is a calibration option of a recipe that calibrates, or it is ``--bits`` equal to the
bits the recipe writes; and ``quantization.json``'s options hold exactly the given values.
A few combinations then run end to end through ``qc quantize`` on the tiny model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcompiler.cli import main
from qcompiler.errors import OptionError, QCError
from qcompiler.option_use import applied_options, check_options, flag
from qcompiler.quantize import build_pipeline_text
from qcompiler.recipes import CALIB_OPTIONS, QuantizeOptions, available_recipes, get_recipe
from qcompiler.targets import TARGETS

#: Values each option may take from the command line (two or more, so a value can be changed).
VALUES: dict[str, list] = {
    "bits": [2, 3, 4, 8, 16],
    "group_size": [0, 32, 64, 128],
    "sym": [True, False],
    "clip": ["minmax", "mse"],
    "accuracy_level": [0, 1, 4],
    "lm_head": [True, False],
    "quantize_embeddings": [True, False],
    "calib": ["a.txt", "b.txt"],
    "calib_samples": [4, 16],
    "seq_len": [64, 512],
    "seed": [0, 1],
    "max_memory": ["1GB", "4GB"],
    "alpha": [0.3, 0.5, 0.8],
    "budget": [4.25, 4.5],
    "max_size_mb": [50.0, 100.0],
    "static_shapes": [64, 128],
    "fuse": [True, False],
}
RECIPES = [r for r, rec in available_recipes().items() if rec.options is not None]


@st.composite
def combos(draw):
    recipe = draw(st.sampled_from(RECIPES))
    target = draw(st.sampled_from(TARGETS))
    names = draw(st.lists(st.sampled_from(sorted(VALUES)), max_size=4, unique=True))
    given_ = {n: draw(st.sampled_from(VALUES[n])) for n in names}
    return recipe, target, given_


def _pipeline(recipe: str, options: QuantizeOptions) -> str | None:
    try:
        return build_pipeline_text(recipe, None, options)
    except QCError:
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(combos())
def test_every_option_is_refused_or_honoured(combo) -> None:
    recipe, target, given_ = combo
    options = QuantizeOptions(target=target).with_overrides(**given_)
    explicit = set(given_) | {"target"}
    try:
        check_options(recipe, options, explicit)
    except OptionError as e:
        msg = str(e)
        assert f"recipe '{recipe}'" in msg and any(flag(n) in msg for n in given_), msg
        return
    r = get_recipe(recipe)
    base = _pipeline(recipe, options)
    for name, value in given_.items():
        if name == "bits":
            assert value == r.bits, f"--bits {value} accepted by {recipe} (writes {r.bits})"
            continue
        if name == "max_memory":  # a bound every run checks before its passes: it never changes the pipeline
            continue
        if name in CALIB_OPTIONS:
            assert r.needs_calibration, f"{flag(name)} accepted by {recipe}, which does not calibrate"
            continue
        other = next(v for v in VALUES[name] if v != value)
        changed = _pipeline(recipe, replace(options, **{name: other}))
        assert base is None or changed != base, f"{flag(name)}={value} accepted by {recipe} on {target} but ignored"
    applied = applied_options(recipe, options)
    for name, value in given_.items():
        assert applied.get(name) == value, (name, value, applied)


@pytest.mark.parametrize(("recipe", "extra", "expect"), [
    ("w4a16-rtn", ["--bits", "3"], None),
    ("w4a16-rtn", ["--bits", "4", "--group-size", "64", "--sym"], {"bits": 4, "group_size": 64, "sym": True}),
    ("w8a8-dynamic", ["--clip", "mse", "--lm-head"], {"bits": 8, "clip": "mse", "lm_head": True}),
    ("w8a8-dynamic", ["--sym"], None),
    ("w4a16-hqq", ["--clip", "mse"], None),
    ("w8a16-rtn", ["--target", "npu", "--sym", "--group-size", "0"], {"target": "npu", "sym": True, "group_size": 0}),
])
def test_end_to_end_refused_or_recorded(recipe: str, extra: list[str], expect: dict | None, synthetic_dir,
                                        tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(["quantize", str(synthetic_dir[0]), str(out), "--recipe", recipe, *extra])
    err = capsys.readouterr().err
    if expect is None:
        assert rc == 2 and f"recipe '{recipe}'" in err.strip().splitlines()[-1] and not out.exists(), err[-2000:]
        return
    assert rc == 0, err[-2000:]
    opts = json.loads((out / "quantization.json").read_text())["options"]
    assert {k: opts.get(k) for k in expect} == expect, opts
