"""The versioned JSON schema of ``report.json`` (written beside it as ``report.schema.json``).

``schema_version`` changes when a field is removed or changes meaning; new optional
fields do not change it.  :func:`validate_report` checks a report with ``jsonschema``
(a test dependency) when it is installed.
"""

from __future__ import annotations

from typing import Any

from qcompiler.errors import QCError

SCHEMA_ID = "qcompiler-analysis-report"
SCHEMA_VERSION = 1

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_NUM_OR_NULL = {"type": ["number", "null"]}


def _obj(props: dict[str, Any], required: list[str] | None = None, desc: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props, "required": required or list(props)}
    if desc:
        out["description"] = desc
    return out


def _arr(items: dict[str, Any], desc: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "array", "items": items}
    if desc:
        out["description"] = desc
    return out


_ERROR = _obj({
    "mse": {**_NUM, "description": "mean squared error of the linear's output Y = X·W"},
    "snr_db": {**_NUM, "description": "10·log10(ΣY² / Σ(Ŷ−Y)²) over all sampled rows"},
    "cosine": {**_NUM, "description": "mean over rows of cos(Y_t, Ŷ_t)"},
    "rel": {**_NUM, "description": "mean over rows of ‖Ŷ_t−Y_t‖²/‖Y_t‖²"},
})

_CONFIG_POINT = _obj({
    "label": _STR,
    "kind": {"enum": ["uniform", "mixed"]},
    "budget": _NUM_OR_NULL,
    "avg_bits": {**_NUM, "description": "nominal average bits per quantized weight (scales and zero points included)"},
    "size_mb": {**_NUM, "description": "estimated model size in MB (10^6 bytes): float parts + stored quantized weights"},
    "predicted_error": {**_NUM, "description": "Σ_j S_j of the assignment (sum of predicted layer-output errors)"},
    "kl": {**_NUM_OR_NULL, "description": "measured mean KL(p_float ‖ p_quant) of the final logits, or null"},
    "pareto": {"type": "boolean", "description": "not dominated in (size_mb, kl or predicted_error)"},
}, ["label", "kind", "avg_bits", "size_mb", "predicted_error"])

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": f"https://qcompiler/{SCHEMA_ID}/v{SCHEMA_VERSION}",
    "title": "qcompiler analysis report (qc analyze)",
    **_obj({
        "schema": {"const": SCHEMA_ID},
        "schema_version": {"const": SCHEMA_VERSION},
        "qcompiler_version": _STR,
        "model": _obj({
            "path": _STR, "num_layers": _INT, "hidden": _INT, "linears": _INT,
            "params": {**_INT, "description": "weights of the analyzed linears"},
            "float_mb": {**_NUM, "description": "size of all float initializers in MB"},
        }),
        "calibration": _obj({
            "source": _STR, "samples": _INT, "seq_len": _INT, "rows": _INT,
            "block_windows": _INT, "block_seq_len": _INT,
        }, desc="statistics windows, sampled rows, and the full windows used to rerun layers"),
        "config": {"type": "object", "description": "the analysis options"},
        "outliers": _obj({
            "llm_int8": _obj({
                "criteria": {"type": "object"},
                "inputs": _arr(_obj({"layer": _INT, "value": _STR})),
                "dims": _arr(_obj({"dim": _INT, "layer_fraction": _NUM, "layers": _arr(_INT),
                                   "mean_token_fraction": _NUM, "max_abs": _NUM})),
            }, desc="hidden dims with |x| ≥ threshold on ≥ min_token_fraction of tokens in ≥ min_layer_fraction of layers"),
            "massive": _obj({
                "criteria": {"type": "object"},
                "dims": _arr(_INT, "every dim holding a massive activation in some residual value"),
                "positions": _arr(_INT, "every window position holding one"),
                "by_value": _arr(_obj({
                    "value": _STR, "layer": _INT, "median_abs": _NUM, "max_abs": _NUM, "limit": _NUM,
                    "dims": _arr(_INT), "rows": _INT, "row_fraction": _NUM,
                    "positions": {"type": "object", "additionalProperties": _INT}, "windows": _INT,
                })),
                "examples": _arr(_obj({
                    "value": _STR, "layer": _INT, "window": _INT, "position": _INT, "dim": _INT, "x": _NUM,
                    "ratio": _NUM, "token_id": _INT, "token": _STR,
                })),
            }, desc="residual-stream entries > massive_abs and ≥ massive_ratio × the value's median |x|"),
            "super_weights": _arr(_obj({
                "layer": _INT, "linear": _STR, "row": _INT, "col": _INT, "weight": _NUM, "weight_z": _NUM,
                "input_absmax": _NUM, "input_spike": _NUM, "output_absmax": _NUM, "output_spike": _NUM,
                "contribution_share": _NUM,
            }), "entries W[row, col] of down_proj's W[K, N]"),
            "severity": _arr(_obj({
                "value": _STR, "layer": _INT, "linears": _arr(_STR), "absmax": _NUM, "std": _NUM, "ratio": _NUM,
                "class": {"enum": ["mild", "moderate", "high", "severe"]}, "kurtosis": _NUM,
                "outlier_channels": _INT,
            })),
            "fp16_range": _obj({
                "limit": _NUM, "headroom": _NUM, "max_abs": _NUM, "fp16_safe": {"type": "boolean"},
                "overflow": _arr(_obj({"label": _STR, "layer": _INT, "value": _STR, "absmax": _NUM})),
                "near": _arr(_obj({"label": _STR, "layer": _INT, "value": _STR, "absmax": _NUM})),
                "keep_fp32": _obj({"limit": _NUM, "ops": _arr(_STR)},
                                  desc="the ops keep-fp32 would keep in float32 in an fp16 graph (from these values)"),
            }, desc="residual-stream values and linear inputs past (overflow) or within headroom× of fp16's 65504"),
        }),
        "candidates": _arr(_obj({
            "name": _STR, "description": _STR, "weight": {"type": ["object", "null"]},
            "activation": {"enum": ["tensor", "token", None]}, "bits_per_weight": _NUM_OR_NULL,
        })),
        "reference": {**_STR, "description": "the candidate the sensitivity ranking and the end-to-end check use"},
        "layers": _arr(_obj({
            "key": _STR, "layer": _INT, "role": _STR, "shape": _arr(_INT), "params": _INT,
            "errors": {"type": "object", "additionalProperties": _ERROR, "description": "local error per candidate"},
            "gain": {**_NUM_OR_NULL, "description": "G_j = final_error / rel at the reference candidate"},
            "block_error": {**_NUM_OR_NULL, "description": "mean_t ‖Δr_out‖²/‖r_out‖² of the layer rerun (reference)"},
            "skip_error": {**_NUM_OR_NULL, "description": "mean_t ‖Δr_out‖²/‖r_final‖²: the rerun's error "
                                                          "relative to the residual the final norm reads"},
            "final_error": {**_NUM_OR_NULL, "description": "block_error^(1−β)·skip_error^β: predicted relative "
                                                           "error at the final norm"},
            "sensitivity": {"type": "object", "additionalProperties": _NUM,
                            "description": "predicted error S_j(c) = gain · rel_j(c) per candidate"},
            "rank": _INT, "e2e_kl": _NUM_OR_NULL,
            "recommendation": _obj({"weight": _STR, "weight_spec": _STR, "activation": _STR, "method": _STR,
                                    "reason": _STR}),
        })),
        "ranking": _arr(_STR, "linear keys, most sensitive first (by S at the reference candidate)"),
        "e2e": _obj({
            "candidate": _STR, "windows": _INT, "tokens": _INT,
            "results": _arr(_obj({"key": _STR, "predicted": _NUM, "kl": _NUM})),
            "spearman": _NUM_OR_NULL,
        }),
        "mixed": _obj({
            "options": _arr(_STR), "budget": _NUM, "avg_bits": _NUM, "size_mb": _NUM, "predicted_error": _NUM,
            "minimum_avg_bits": _NUM, "assignment": {"type": "object", "additionalProperties": _STR},
        }),
        "pareto": _arr(_CONFIG_POINT),
        "error_vs_bits": _arr(_obj({
            "candidate": _STR, "bits_per_weight": _NUM, "median_snr_db": _NUM, "p10_snr_db": _NUM,
            "p90_snr_db": _NUM, "median_sensitivity": _NUM,
        })),
        "timing": {"type": "object", "additionalProperties": _NUM},
    }),
}


def validate_report(report: dict[str, Any]) -> None:
    """Raise :class:`QCError` if ``report`` does not match :data:`SCHEMA` (no-op without jsonschema)."""
    try:
        import jsonschema
    except ImportError:
        return
    try:
        jsonschema.validate(report, SCHEMA)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise QCError(f"internal error: report.json does not match its schema at {where}: {e.message}") from None
