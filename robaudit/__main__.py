"""``python -m robaudit``: what ``torchrun ... -m robaudit`` runs."""

from __future__ import annotations

from robaudit.cli import entry_point

if __name__ == "__main__":
    entry_point()
