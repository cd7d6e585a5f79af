"""Quantized base models by name: `NAME@nf4` serves NAME with 4-bit NF4 weights.

This module holds only the vocabulary (no torch), so settings, the engine and job clients share
one spelling. Loading and guarding quantized models is `engine/quantized.py`.
"""

from __future__ import annotations

from tuneforge.errors import UserError

QUANTIZATIONS = ("nf4", "fp4", "int8")
"""nf4 / fp4: bitsandbytes 4-bit (double quantization by default); int8: LLM.int8() weights."""

SEPARATOR = "@"


def check(quantization: str | None, field: str = "quantization") -> str | None:
    """The quantization name, or None for full precision; an unknown one is a UserError."""
    if quantization in (None, "none"):
        return None
    if quantization not in QUANTIZATIONS:
        raise UserError(f"{field}: unknown quantization {quantization!r}; known: "
                        f"{', '.join(QUANTIZATIONS)} (or none)")
    return quantization


def split(name: str) -> tuple[str, str | None]:
    """`NAME@nf4` → (`NAME`, `nf4`); a name without a qualifier → (name, None)."""
    base, sep, qualifier = name.rpartition(SEPARATOR)
    if not sep or not base or "/" in qualifier:
        return name, None
    return base, check(qualifier, f"base_model '{name}': quantization")


def served_name(base: str, quantization: str | None) -> str:
    """The name under which `base` is served with `quantization` (unchanged for none)."""
    quantization = check(quantization)
    return base if quantization is None else f"{base}{SEPARATOR}{quantization}"
