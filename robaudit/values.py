"""Numbers and lists as users write them: ``8/255``, ``0.03``, ``pgd,tpgd``.

Below :mod:`robaudit.config`, which reads every setting through here, and the reports, which
write eps back in the same form.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from robaudit.errors import ConfigError


def parse_fraction(text: str | float | int, what: str = "eps") -> float:
    """``0.03``, ``8/255``, ``0.5/255`` (any fraction of two numbers) or a number; ConfigError
    for anything else."""
    if isinstance(text, bool):
        raise ConfigError(f"{what} must be a number like 0.03 or 8/255, not {text!r}", key=what)
    if isinstance(text, (int, float)):
        return finite(float(text), what)
    if not isinstance(text, str):  # a TOML table or date, say
        raise ConfigError(f"{what} must be a number like 0.03 or 8/255, not {text!r}", key=what)
    try:
        # Fraction alone reads "8/255" but not "0.5/255": each side is read on its own.
        numerator, slash, denominator = text.partition("/")
        if "/" in denominator:
            raise ValueError(text)
        value = Fraction(numerator.strip())
        return finite(float(value / Fraction(denominator.strip()) if slash else value), what)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{what} must be a number like 0.03 or 8/255, not {text!r}",
                          key=what) from None
    except OverflowError:
        raise ConfigError(f"{what} {text} is too large for a number; give one like 0.03 or "
                          "8/255", key=what) from None


def finite(value: float, what: str) -> float:
    """``value``, or a ConfigError about ``what`` when it is infinite or NaN."""
    if not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number like 0.03 or 8/255, not {value}",
                          key=what)
    return value


def format_eps(eps: float) -> str:
    """A short decimal (``0.2``) when there is one, else ``8/255`` for whole 8-bit grey levels."""
    short = f"{eps:.4g}"
    if float(short) == eps:
        return short
    levels = eps * 255
    if abs(levels - round(levels)) < 1e-9 and round(levels) > 0:
        return f"{round(levels)}/255"
    return f"{eps:g}"


def split_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]
