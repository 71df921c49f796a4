"""Ctrl-C latency (issue 14): how long the bundled example's scan takes to exit after SIGINT
(or SIGTERM), on an idle machine and with two CPU-burning processes beside it.

The scan is the issue's command (``--steps 200 --batch-size 8``, all three reports), run as
``python -m robaudit`` from this checkout. The signal goes when the scan reports its first
attacked examples. Each round prints the seconds from the signal to the last report written
(the HTML file's modification time) and to the exit; the gap between the two is the process's
own teardown.

    python benchmarks/bench_interrupt.py [--rounds 3] [--signal TERM] [--burners 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"


def scan_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "robaudit", "scan", str(DIGITS / "model.onnx"),
            "--data", str(DIGITS / "test.npz"), "--config", str(DIGITS / "robaudit.toml"),
            "--steps", "200", "--batch-size", "8", "--json", str(out / "r.json"),
            "--junit", str(out / "r.xml"), "--html", str(out / "r.html"), "-v"]


def one_round(sig: signal.Signals) -> dict[str, float]:
    """One interrupted scan: seconds to its first progress, and from the signal to the reports
    and to the exit."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        env = {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT)}
        started = time.monotonic()
        proc = subprocess.Popen(scan_command(out), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)
        assert proc.stderr is not None
        for line in proc.stderr:  # -v off a TTY: one line whenever examples finish
            if line.startswith("robaudit: attacking "):
                break
        sent, sent_wall = time.monotonic(), time.time()
        proc.send_signal(sig)
        proc.stderr.read()
        code = proc.wait()
        exited = time.monotonic()
        doc = json.loads((out / "r.json").read_text())
        if code != 2 or not doc["partial"]:
            raise SystemExit(f"expected exit 2 and a partial report, got {code}")
        return {
            "startup_s": sent - started,
            "reports_s": (out / "r.html").stat().st_mtime - sent_wall,
            "exit_s": exited - sent,
            "audited": doc["data"]["audited"],
        }


def burners(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--signal", choices=["INT", "TERM"], default="INT")
    parser.add_argument("--burners", type=int, default=2)
    args = parser.parse_args()
    sig = signal.Signals[f"SIG{args.signal}"]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}; SIG{args.signal} after the first progress line")
    for load in (0, args.burners):
        running = burners(load)
        try:
            rounds = [one_round(sig) for _ in range(args.rounds)]
        finally:
            for burner in running:
                burner.kill()
                burner.wait()
        label = "idle" if load == 0 else f"{load} CPU burners"
        for name in ("startup_s", "reports_s", "exit_s"):
            values = [r[name] for r in rounds]
            print(f"{label:>14}  {name:<10} median {statistics.median(values):6.2f} s  "
                  f"max {max(values):6.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
        print(f"{label:>14}  audited    {[r['audited'] for r in rounds]} of 540")


if __name__ == "__main__":
    main()
