"""The attack interface: the attacks that moved onto it give exactly the figures they gave before,
and a new attack (Square) runs in the same engine."""

from __future__ import annotations

import json

import pytest

from robaudit.audit import scan
from robaudit.config import ScanConfig
from robaudit.reports.json import to_dict

#: Figures of the bundled example under the engine before the attack interface (robaudit at
#: commit 7792fcf): per class, each attack's robust count, the confusion row, the mean margin,
#: and the mean forward passes per attack.
PINNED = json.loads((__import__("conftest").ROOT / "tests" / "data" /
                     "example_figures_v0.json").read_text())


@pytest.mark.parametrize("key", sorted(PINNED))
def test_the_bundled_example_gives_the_figures_it_gave_before_the_interface(digits, key):
    pinned = PINNED[key]
    config = ScanConfig(model=str(digits / "model.pt2"), data=str(digits / "test.npz"),
                        eps=0.2, steps=20, attacks=tuple(pinned["attacks"]),
                        mode=pinned["mode"], schedule=pinned["schedule"])
    doc = to_dict(scan(config))
    attacks = [*pinned["attacks"], "worst"]
    got = {c["name"]: {a: c["robust"][a]["correct"] for a in attacks} for c in doc["classes"]}
    assert got == pinned["robust_correct"]
    assert {c["name"]: c["confusion_row"] for c in doc["classes"]} == pinned["confusion_row"]
    for c in doc["classes"]:
        assert c["mean_adv_margin"] == pytest.approx(pinned["mean_adv_margin"][c["name"]],
                                                     abs=2e-4)
    assert doc["summary"]["mean_forwards"] == pytest.approx(pinned["mean_forwards"], abs=1e-9)
