"""robaudit: class-wise adversarial robustness audits for image classifiers."""

from __future__ import annotations

__version__ = "0.1.0"
