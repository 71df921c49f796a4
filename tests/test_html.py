"""The HTML report, checked in a real headless Chromium driven over the DevTools protocol.

The browser speaks CDP over ``--remote-debugging-pipe`` (file descriptors 3 and 4, messages ended
by NUL), so the tests need no websocket library and no network. Chromium is Debian's ``chromium``
package, which ``make test`` installs when it is missing.
"""

from __future__ import annotations

import base64
import copy
import fcntl
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import DIGITS, ROOT

from robaudit.audit import scan
from robaudit.cli import main
from robaudit.config import ScanConfig
from robaudit.reports.html import GALLERY_BUDGET, TOP_K, render_html, write_html
from robaudit.reports.json import to_dict, write_json

HOSTILE = "<script>alert(1)</script>"
QUOTED = 'a&b "quoted"'
MAX_BYTES = 5 * 1024 * 1024


# --- a small DevTools-protocol client ------------------------------------------------------------


def _chromium_path() -> str | None:
    for name in (os.environ.get("ROBAUDIT_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


def _high_fd(fd: int) -> int:
    """A close-on-exec copy of ``fd`` numbered 10 or more, so it cannot clash with 3 and 4."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


@dataclass
class Page:
    """What a page did while it loaded: its text, errors, requests and dialogs."""

    url: str
    session: str
    load_ms: float
    text: str = ""
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


class Chromium:
    """Headless Chromium over ``--remote-debugging-pipe``."""

    def __init__(self, executable: str, profile: Path) -> None:
        commands_r, self._commands = map(_high_fd, os.pipe())
        self._replies, replies_w = map(_high_fd, os.pipe())

        def wire_pipes() -> None:  # in the child: Chromium reads fd 3 and writes fd 4
            os.dup2(commands_r, 3)
            os.dup2(replies_w, 4)

        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
             "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "about:blank"],
            close_fds=False, preexec_fn=wire_pipes,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(commands_r)
        os.close(replies_w)
        self._buffer = b""
        self._last_id = 0
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        os.close(self._commands)
        os.close(self._replies)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe (it crashed or exited)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def _wait_for(self, method: str, session: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("method") == method and e.get("sessionId") == session
                   for e in self.events):
                return
            self.events.append(self._receive())
        raise TimeoutError(f"no {method} within {timeout}s")

    def open(self, path: Path, width: int = 1280, height: int = 2000) -> Page:
        """Load ``path`` in a fresh tab and record what happened."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        # A script that escaped the escaper would most likely call alert: count such calls.
        self.send("Page.addScriptToEvaluateOnNewDocument", session, source=(
            "window.__dialogs = [];"
            "for (const f of ['alert', 'confirm', 'prompt'])"
            "  window[f] = (m) => { window.__dialogs.push(f + ':' + m); };"))
        self.events.clear()
        url = path.resolve().as_uri()
        start = time.monotonic()
        self.send("Page.navigate", session, url=url)
        self._wait_for("Page.loadEventFired", session)
        page = Page(url=url, session=session, load_ms=(time.monotonic() - start) * 1000)
        page.text = self.evaluate(page, "document.body.innerText")
        page.dialogs = self.evaluate(page, "window.__dialogs")
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                page.errors.append(" ".join(str(a.get("value")) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                page.errors.append(params["exceptionDetails"]["text"])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                page.errors.append(params["entry"]["text"])
            elif method == "Network.requestWillBeSent":
                page.requests.append(params["request"]["url"])
            elif method == "Page.javascriptDialogOpening":
                page.dialogs.append(params["message"])
        return page

    def evaluate(self, page: Page, expression: str) -> Any:
        result = self.send("Runtime.evaluate", page.session, expression=expression,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']['text']}")
        return result["result"].get("value")

    def screenshot(self, page: Page, path: Path) -> None:
        """The whole page, 1280 pixels wide."""
        height = self.evaluate(page, "document.documentElement.scrollHeight")
        self.send("Emulation.setDeviceMetricsOverride", page.session, width=1280,
                  height=int(height), deviceScaleFactor=1, mobile=False)
        shot = self.send("Page.captureScreenshot", page.session, format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    executable = _chromium_path()
    if executable is None:
        pytest.fail("Chromium is not installed, and the HTML report is tested in a real browser: "
                    "run `make test`, which installs it (apt-get install chromium), or set "
                    "ROBAUDIT_CHROMIUM to a Chromium or Chrome binary")
    chromium = Chromium(executable, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield chromium
    finally:
        chromium.close()


def _local_only(page: Page) -> list[str]:
    """Requests other than the page itself and inline ``data:`` images."""
    return [u for u in page.requests if u != page.url and not u.startswith("data:")]


# --- report documents --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_doc() -> dict[str, Any]:
    config = ScanConfig(model=str(DIGITS / "model.onnx"), data=str(DIGITS / "test.npz"),
                        eps=0.2, steps=5, per_class=8, min_class_robust=0.4)
    return to_dict(scan(config))


def _png(width: int, height: int, rng: random.Random, noise: bool = False) -> str:
    """A real PNG as a data URI (grey noise when ``noise``: incompressible, so it costs bytes)."""
    rows = b"".join(
        b"\0" + (rng.randbytes(width) if noise else bytes([rng.randrange(256)]) * width)
        for _ in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                             0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _rate(correct: int, n: int) -> dict[str, Any]:
    acc = correct / n
    spread = 1.96 * (max(acc * (1 - acc), 0.01) / n) ** 0.5  # near enough to Wilson's here
    return {"acc": acc, "correct": correct, "n": n,
            "ci95": [max(0.0, acc - spread), min(1.0, acc + spread)]}


def synthetic_doc(num_classes: int, *, seed: int = 0, sweep: bool = False,
                  gallery_classes: int = 0, image_size: int = 8,
                  names: list[str] | None = None) -> dict[str, Any]:
    """A report document shaped like ``to_dict``'s, with the lead's ``sweep`` and ``gallery``."""
    rng = random.Random(seed)
    attacks = ["pgd", "tpgd"]
    floor = 0.3
    names = names or [f"class {i:04d}" for i in range(num_classes)]
    classes, rows = [], {a: [] for a in attacks}
    for i, name in enumerate(names):
        n = 50
        clean = rng.randint(40, 50)
        pgd = rng.randint(0, clean)
        tpgd = max(0, pgd - rng.randint(0, 3))
        worst = min(pgd, tpgd)
        row = {a: [0] * num_classes for a in attacks}
        for a, robust in (("pgd", pgd), ("tpgd", tpgd)):
            for _ in range(clean - robust):  # broken examples go to a few close classes
                row[a][(i + rng.choice((1, 1, 2, 7))) % num_classes] += 1
        for a in attacks:
            rows[a].append(row[a])
        flagged = worst / n < floor
        failures = [{"policy": "min_class_robust", "value": worst / n, "threshold": floor,
                     "message": f"robust accuracy {worst / n:.1%} is below the floor 30.0%"}]
        verdict = {"passed": not flagged, "failures": failures if flagged else []}
        classes.append({
            "index": i, "name": name, "n": n, "clean": _rate(clean, n),
            "robust": {"pgd": _rate(pgd, n), "tpgd": _rate(tpgd, n), "worst": _rate(worst, n)},
            "runtime_robust": _rate(worst, n), "mean_clean_margin": 3.0, "mean_adv_margin": 1.0,
            "confusion_row": row["tpgd"], "verdict": verdict,
            "verdict_by_figure": {a: verdict for a in [*attacks, "worst"]},
        })
    worst_accs = [c["robust"]["worst"]["acc"] for c in classes]
    weakest = min(range(num_classes), key=lambda i: worst_accs[i])
    best = max(range(num_classes), key=lambda i: worst_accs[i])
    flagged = [c["name"] for c in classes if not c["verdict"]["passed"]]
    gains = [c["robust"]["pgd"]["correct"] - c["robust"]["tpgd"]["correct"] for c in classes]
    doc: dict[str, Any] = {
        "schema": "robaudit.scan", "schema_version": 1, "created": "2026-01-01T00:00:00+00:00",
        "partial": False,
        "verdict": {"passed": not flagged, "exit_code": 1 if flagged else 0, "flagged": flagged,
                    "gate": {"on": "worst", "min_class_robust": floor, "min_ratio": None,
                             "max_gap": None, "significance": False}},
        "config": {"eps": 8 / 255, "eps_text": "8/255", "seed": 0, "steps": 20, "restarts": 1,
                   "attacks": attacks, "sources": ["defaults", "command line"],
                   "gate_eps": 8 / 255},
        "model": {"path": "resnet50.onnx", "format": "onnx",
                  "description": "resnet50.onnx (ONNX opset 18)"},
        "data": {"spec": "imagenet", "description": "ImageNet val", "size": 50 * num_classes,
                 "selected": 50 * num_classes, "audited": 50 * num_classes},
        "environment": {"robaudit": "0.1.0", "python": "3.11", "torch": "2.14.1",
                        "device": "cuda", "device_name": "NVIDIA H100"},
        "attacks": [
            {"name": "pgd", "description": "PGD on cross-entropy", "eps": 8 / 255, "steps": 20,
             "step_size": 0.00039, "restarts": 1},
            {"name": "tpgd", "description": "Temperature-PGD", "eps": 8 / 255, "steps": 20,
             "step_size": 0.00039, "restarts": 1, "temperatures": [0.5]},
        ],
        "class_names": names,
        "classes": classes,
        "summary": {
            "n": 50 * num_classes, "clean_acc": 0.9,
            "robust_acc": {a: sum(c["robust"][a]["correct"] for c in classes) / (50 * num_classes)
                           for a in [*attacks, "worst"]},
            "mean_class_robust": {a: sum(c["robust"][a]["acc"] for c in classes) / num_classes
                                  for a in [*attacks, "worst"]},
            "worst_class": {"name": names[weakest], "robust_acc": worst_accs[weakest]},
            "best_class": {"name": names[best], "robust_acc": worst_accs[best]},
            "gap": worst_accs[best] - worst_accs[weakest], "std": 0.2,
            "rank_correlation": {"pgd~tpgd": 0.97},
            "gain_split": {"weakest": "pgd", "strongest": "tpgd", "total_broken": sum(gains),
                           "per_class": gains, "vulnerable_half_share": 0.7},
            "runtime_clean_acc": 0.9, "runtime_robust_acc": 0.4,
            "bad_gradient_share": {a: 0.0 for a in attacks},
            "mean_forwards": {a: 10.0 for a in attacks},
        },
        "confusion": rows,
        "timings": {"load_s": 3.0, "attack_s": 120.0, "total_s": 123.4},
        "warnings": ["T-PGD broke 3 examples PGD did not: consider more steps"],
    }
    if sweep:
        doc["sweep"] = []
        for k, eps in enumerate((2 / 255, 4 / 255, 8 / 255, 16 / 255)):
            scale = (1.6, 1.3, 1.0, 0.5)[k]

            def at(v: float | None, scale: float = scale) -> float | None:
                return None if v is None else min(1.0, v * scale)

            doc["sweep"].append({
                "eps": eps, "eps_text": f"{2 ** (k + 1)}/255",
                "robust_acc": {a: at(v) for a, v in doc["summary"]["robust_acc"].items()},
                "mean_class_robust": {a: at(v) for a, v in
                                      doc["summary"]["mean_class_robust"].items()},
                "classes": [{"name": c["name"],
                             "robust": {a: at(r["acc"]) for a, r in c["robust"].items()}}
                            for c in classes],
            })
    if gallery_classes:
        image = _png(image_size, image_size, rng, noise=image_size > 8)
        doc["gallery"] = {
            name: [{"index": 100 * j, "true": name, "pred": names[0], "confidence": 0.93,
                    "attack": "tpgd", "clean": image, "adversarial": image,
                    "perturbation": image} for j in range(10)]
            for name in flagged[:gallery_classes]
        }
    return doc


# --- tests --------------------------------------------------------------------------------------


def test_the_browser_harness_sees_errors_and_requests(browser: Chromium, tmp_path: Path) -> None:
    # A negative control: without it, a harness that saw nothing would pass every test below.
    page = tmp_path / "bad.html"
    page.write_text("<p>x</p><img src='http://127.0.0.1:9/x.png'><script>"
                    "console.error('boom'); alert('hi')</script>")
    loaded = browser.open(page)
    assert "http://127.0.0.1:9/x.png" in _local_only(loaded)
    assert "boom" in loaded.errors
    assert loaded.dialogs == ["alert:hi"]


def test_example_report_in_chromium(browser: Chromium, digits_doc: dict[str, Any],
                                    tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(path, digits_doc)
    page = browser.open(path)
    assert page.errors == []
    assert _local_only(page) == []
    assert page.dialogs == []
    flagged = digits_doc["verdict"]["flagged"]
    assert flagged, "the example at eps 0.2 flags classes: the test expects a failing verdict"
    assert "FAILED" in page.text
    assert f"{len(flagged)} of 10 classes flagged" in page.text
    assert "exit code\n1" in page.text
    table = browser.evaluate(page, "[...document.querySelectorAll('#classes tbody td.name')]"
                                   ".map(td => td.innerText)")
    assert table == [c["name"] for c in digits_doc["classes"]]
    marked = browser.evaluate(page, "[...document.querySelectorAll('#classes tr.flagged "
                                    "td.name')].map(td => td.innerText)")
    assert sorted(marked) == sorted(flagged)
    for c in digits_doc["classes"]:
        worst = c["robust"]["worst"]["acc"]
        assert f"{worst * 100:.1f}%" in page.text
    # The ORT column (ONNX), the charts (clean, pgd, tpgd, the dlr-t finish and the worst case
    # per class) and one heatmap per figure.
    assert "ORT" in page.text
    assert browser.evaluate(page, "document.querySelectorAll('#bars rect.bar').length") == 50
    assert browser.evaluate(page, "document.querySelectorAll('#heat-1-svg rect.cell').length") \
        == 100
    assert browser.evaluate(page, "document.querySelectorAll('[role=tab]').length") == 4
    shot = tmp_path / "report.png"
    browser.screenshot(page, shot)
    assert shot.stat().st_size > 20_000


def test_the_table_sorts_by_any_column(browser: Chromium, digits_doc: dict[str, Any],
                                       tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(path, digits_doc)
    page = browser.open(path)
    names = "[...document.querySelectorAll('#classes tbody td.name')].map(td => td.innerText)"
    headers = browser.evaluate(page, "[...document.querySelectorAll('#classes th')]"
                                     ".map(th => th.innerText.replace(/\\W+$/, ''))")
    # The finish ran on pgd's and tpgd's survivors: its column is cumulative, and says so.
    assert headers[3:7] == ["pgd", "tpgd", "+dlr-t", "worst"]
    by_worst = sorted(digits_doc["classes"], key=lambda c: (c["robust"]["worst"]["acc"]))
    col = headers.index("worst")
    click = f"document.querySelectorAll('#classes th button')[{col}].click()"
    browser.evaluate(page, click)
    ascending = browser.evaluate(page, names)
    assert [c["robust"]["worst"]["acc"] for c in by_worst] == sorted(
        c["robust"]["worst"]["acc"] for c in digits_doc["classes"])
    accs = {c["name"]: c["robust"]["worst"]["acc"] for c in digits_doc["classes"]}
    assert [accs[n] for n in ascending] == sorted(accs.values())
    browser.evaluate(page, click)
    assert [accs[n] for n in browser.evaluate(page, names)] == sorted(accs.values(),
                                                                      reverse=True)
    # The verdict column puts flagged classes first.
    browser.evaluate(page, f"document.querySelectorAll('#classes th button')"
                           f"[{headers.index('verdict')}].click()")
    first = browser.evaluate(page, names)[: len(digits_doc["verdict"]["flagged"])]
    assert sorted(first) == sorted(digits_doc["verdict"]["flagged"])
    # The confusion tabs switch between the worst case and each attack.
    shown = "[...document.querySelectorAll('[role=tabpanel]')].map(p => !p.hidden)"
    assert browser.evaluate(page, shown) == [True, False, False, False]
    browser.evaluate(page, "document.querySelectorAll('[role=tab]')[1].click()")
    assert browser.evaluate(page, shown) == [False, True, False, False]
    assert page.errors == [] and browser.evaluate(page, "window.__dialogs") == []


def _rename(doc: dict[str, Any], old: str, new: str) -> None:
    for c in doc["classes"]:
        if c["name"] == old:
            c["name"] = new
    doc["class_names"] = [new if n == old else n for n in doc["class_names"]]
    doc["verdict"]["flagged"] = [new if n == old else n for n in doc["verdict"]["flagged"]]
    for key in ("worst_class", "best_class"):
        if doc["summary"][key]["name"] == old:
            doc["summary"][key]["name"] = new


def test_hostile_class_names_render_as_text(browser: Chromium, digits_doc: dict[str, Any],
                                            tmp_path: Path) -> None:
    doc = copy.deepcopy(digits_doc)
    flagged = doc["verdict"]["flagged"][0]
    _rename(doc, flagged, HOSTILE)  # a flagged class: it shows in every section
    _rename(doc, doc["classes"][0]["name"], QUOTED)
    doc["warnings"] = [f"class {HOSTILE} looks odd"]
    doc["model"]["description"] = f'<img src=x onerror="alert(2)">{QUOTED}'
    doc["gallery"] = {HOSTILE: [{
        "index": 1, "true": HOSTILE, "pred": QUOTED, "confidence": 0.5, "attack": "pgd",
        "clean": "data:image/png;base64,AAAA\" onerror=\"alert(3)", "adversarial": "x",
        "perturbation": "javascript:alert(4)"}]}
    html = render_html(doc)
    assert HOSTILE not in html and "onerror=\"alert" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "a&amp;b &#34;quoted&#34;" in html
    path = tmp_path / "hostile.html"
    path.write_text(html, encoding="utf-8")
    page = browser.open(path)
    assert page.dialogs == [] and page.errors == [] and _local_only(page) == []
    assert browser.evaluate(page, "document.querySelectorAll('body script').length") == 1
    assert browser.evaluate(page, "document.title").startswith("robaudit: FAILED")
    names = browser.evaluate(page, "[...document.querySelectorAll('#classes td.name')]"
                                   ".map(td => td.textContent)")
    assert HOSTILE in names and QUOTED in names
    assert HOSTILE in page.text and QUOTED in page.text
    # The gallery entry whose images are not inline data URIs is dropped, not rendered.
    assert browser.evaluate(page, "document.querySelectorAll('#gallery img').length") == 0


def test_sweep_and_gallery_render(browser: Chromium, tmp_path: Path) -> None:
    doc = synthetic_doc(10, seed=3, sweep=True, gallery_classes=10)
    flagged = doc["verdict"]["flagged"]
    assert flagged
    path = tmp_path / "sweep.html"
    write_html(path, doc)
    page = browser.open(path)
    assert page.errors == [] and _local_only(page) == []
    assert browser.evaluate(page, "document.querySelectorAll('#sweep polyline.series').length") \
        == 10
    assert "gate ε" in page.text and "16/255" in page.text
    sections = browser.evaluate(page, "document.querySelectorAll('#gallery figure').length")
    assert sections == 8 * len(flagged)  # 10 examples each, 8 shown
    loaded = browser.evaluate(page, "[...document.querySelectorAll('#gallery img')]"
                                    ".every(i => i.complete && i.naturalWidth === 8)")
    assert loaded
    assert "vulnerable half" in page.text and "Spearman" in page.text
    browser.screenshot(page, tmp_path / "sweep.png")


def test_thousand_classes_stay_small_and_fast(browser: Chromium, tmp_path: Path) -> None:
    doc = synthetic_doc(1000, seed=1, sweep=True, gallery_classes=60, image_size=64)
    flagged = doc["verdict"]["flagged"]
    assert len(flagged) > TOP_K
    path = tmp_path / "imagenet.html"
    write_html(path, doc)
    size = path.stat().st_size
    assert size < MAX_BYTES
    gallery_bytes = sum(len(e["clean"]) * 3 for v in doc["gallery"].values() for e in v)
    assert gallery_bytes > GALLERY_BUDGET  # the budget, not the input, kept the page small
    page = browser.open(path)
    assert page.errors == [] and _local_only(page) == []
    assert page.load_ms < 5000, f"the 1000-class report took {page.load_ms:.0f} ms to load"
    # Flagged and weakest classes are expanded; the rest folded in a closed <details>.
    main_rows = browser.evaluate(page, "document.querySelectorAll('#classes tbody tr').length")
    rest_rows = browser.evaluate(page, "document.querySelectorAll('#classes-rest tbody tr')"
                                       ".length")
    assert main_rows == len(flagged) and main_rows + rest_rows == 1000
    assert browser.evaluate(page, "document.getElementById('rest').open") is False
    assert browser.evaluate(page, "document.querySelectorAll('#bars g > text').length") == TOP_K
    assert browser.evaluate(page, "document.querySelectorAll('#heat-1-svg rect.cell').length") \
        == TOP_K * (TOP_K + 1)  # 20 rows by the 20 most frequent destinations and "other"
    for name in flagged[:TOP_K]:
        assert name in page.text
    browser.screenshot(page, tmp_path / "imagenet.png")


def test_partial_and_passed_verdicts() -> None:
    doc = synthetic_doc(10, seed=3)
    doc["partial"] = True
    doc["verdict"]["exit_code"] = 2
    doc["data"]["audited"] = 120
    html = render_html(doc)
    assert "PARTIAL: the scan was interrupted" in html and "120 of 500" in html
    passed = synthetic_doc(10, seed=3)
    for c in passed["classes"]:
        c["verdict"] = {"passed": True, "failures": []}
    passed["verdict"].update(passed=True, exit_code=0, flagged=[])
    html = render_html(passed)
    assert "All 10 classes passed" in html and "PARTIAL" not in html
    assert 'id="flagged"' not in html and 'class="badge passed"' in html


def test_cli_writes_html_from_scan_and_from_saved_json(tmp_path: Path) -> None:
    html, json_path = tmp_path / "scan.html", tmp_path / "r.json"
    code = main(["scan", str(DIGITS / "model.pt2"), "--data", str(DIGITS / "test.npz"),
                 "--per-class", "2", "--steps", "1", "--attacks", "fgsm", "--eps", "0.2",
                 "--min-class-robust", "0.99", "--json", str(json_path), "--html", str(html),
                 "-q"])
    assert code == 1
    assert "FAILED" in html.read_text(encoding="utf-8")
    again = tmp_path / "again.html"
    assert main(["report", str(json_path), "--html", str(again), "-q"]) == 1

    def table(page: Path) -> str:
        text = page.read_text(encoding="utf-8")
        return text[text.index('<table class="sortable classes"'):text.index("</table>")]

    # The saved JSON may leave the gallery's images out; the figures render the same.
    assert table(again) == table(html)


def test_the_wheel_ships_the_templates(tmp_path: Path, digits_doc: dict[str, Any]) -> None:
    # Build the wheel, install it into a fresh venv that sees the test venv's dependencies but
    # not the checkout, and render from there: the templates must come from inside the wheel.
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(dist), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(dist.glob("robaudit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("report.html.j2", "charts.html.j2", "report.css", "report.js"):
        assert f"robaudit/templates/{name}" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = subprocess.run([sys.executable, "-c", "import jinja2, os; "
                           "print(os.path.dirname(os.path.dirname(jinja2.__file__)))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # A path line in a .pth adds the directory without running that directory's own .pth files,
    # so the test venv's editable hook (which points at the checkout) stays out.
    Path(site, "deps.pth").write_text(deps + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True)
    report = tmp_path / "r.json"
    write_json(report, digits_doc)
    out = tmp_path / "wheel.html"
    script = ("import sys, robaudit.reports.html as h; from robaudit.reports.json import read_json;"
              "h.write_html(sys.argv[2], read_json(sys.argv[1])); print(h._template_dirs()[0])")
    done = subprocess.run([python, "-c", script, str(report), str(out)], check=True, cwd=tmp_path,
                          capture_output=True, text=True)
    assert Path(done.stdout.strip()).is_relative_to(Path(site))
    assert out.read_text(encoding="utf-8") == render_html(digits_doc)


def test_after_load_templates_a_page_compiles_nothing(digits_doc, monkeypatch):
    # The CLI compiles the templates before a scan: after a Ctrl-C the partial page is due at
    # once, and compiling was most of its time (issue 14).
    from robaudit.reports import html

    html.load_templates()

    def compile_again(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a template was compiled while writing the page")

    monkeypatch.setattr(html.template_environment(), "compile", compile_again)
    partial = copy.deepcopy(digits_doc)
    partial["partial"] = True
    assert "PARTIAL" in render_html(partial)
