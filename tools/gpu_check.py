"""The pieces of ``tools/gpu_check.sh`` that Python does: what the machine is, what each part
found (one JSON file a part, written as soon as the part ends, so a partial run still says
what it found), and the summary table against the targets.

    python3 tools/gpu_check.py versions OUT
    python3 tools/gpu_check.py record OUT PART RC SECONDS [FIGURES.json | JUNIT.xml]
    python3 tools/gpu_check.py summary OUT
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

TARGETS = {
    "snapshot": "window snapshot >= 0.9x the device's copy bandwidth; offload copy >= 0.8x a "
    "plain pinned D2H copy",
    "compressed": "encode <= 2x a copy; merge <= the exact ring's",
    "overhead": "time inside PMA < 1% of the 1B step at a snapshot every 50 steps",
    "tests": "every GPU test passes (no host sync in a window snapshot or a running fold)",
    "demo": "the demo runs on CUDA in bf16 and PMA recovers annealing's gain",
}
"""What each part is measured against (the GPU issue's targets)."""


def versions(out: Path) -> dict:
    """torch, CUDA, Triton, the driver and the device, written to ``OUT/versions.json``."""
    info: dict = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch

        info |= {"torch": torch.__version__, "cuda": torch.version.cuda}
        info["cuda_available"] = torch.cuda.is_available()
        props = torch.cuda.get_device_properties(0)
        info |= {"device": props.name, "memory_GB": props.total_memory / 1e9}
        info["multiprocessors"] = props.multi_processor_count
    except ImportError as err:
        info["torch"] = f"missing: {err}"
    except (AssertionError, RuntimeError) as err:  # no device to describe
        info["device_error"] = str(err)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=20)
        info["driver"] = done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    _write(out / "versions.json", info)
    return info


def record(out: Path, part: str, rc: int, seconds: float, source: Path | None) -> dict:
    """``OUT/PART.json``: the part's status (passed, failed, timed out, skipped) and its figures,
    read from the JSON a benchmark wrote or the JUnit XML pytest wrote."""
    status = {0: "passed", 124: "timed out", 137: "timed out", 75: "skipped"}.get(rc, "failed")
    result: dict = {"part": part, "status": status, "rc": rc, "seconds": round(seconds, 1)}
    result["target"] = TARGETS.get(part)
    if source is not None and source.is_file():
        if source.suffix == ".xml":
            result["figures"] = _junit(source)
        else:
            try:
                result["figures"] = json.loads(source.read_text())
            except ValueError as err:
                result["figures"] = {"unreadable": str(err)}
    result["verdict"] = _verdict(part, result)
    _write(out / f"{part}.json", result)
    return result


def _junit(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(case.get("name"))
    return {**counts, "failed": failed}


def _verdict(part: str, result: dict) -> str:
    """Whether the part's figures meet its target: "met", "missed: ..." or "no figures"."""
    figures = result.get("figures")
    if result["status"] != "passed" or not isinstance(figures, dict):
        return "no figures" if result["status"] == "passed" else result["status"]
    misses = []
    if part == "tests":
        misses = [f"{n} failed" for n in figures.get("failed", [])]
    elif part == "snapshot":
        for row in figures.get("rows", []):
            size = f"{row.get('params_millions')}M"
            window = row.get("window_checked_bandwidth_vs_copy", 1)
            offload = row.get("window_offload_bandwidth_vs_d2h", 1)
            if window < 0.9:
                misses.append(f"{size} snapshot at {window:.2f}x copy")
            if offload < 0.8:
                misses.append(f"{size} offload at {offload:.2f}x D2H")
    elif part == "compressed":
        speed = figures.get("speed", {})
        for code in ("bf16", "fp8"):
            if speed.get("snapshot_vs_copy", {}).get(code, 0) > 2:
                misses.append(f"{code} encode {speed['snapshot_vs_copy'][code]:.2f}x copy")
            if speed.get("merge_vs_exact", {}).get(code, 0) > 1:
                misses.append(f"{code} merge {speed['merge_vs_exact'][code]:.2f}x ring")
    elif part == "overhead":
        for row in figures.get("rows", [figures]):
            share = row.get("snapshot_share_of_interval")
            if share is not None and share >= 0.01:
                misses.append(f"offload {row.get('offload')}: {share:.2%} of the steps")
    elif part == "demo":
        if not figures.get("recovery", 0) > 0:
            misses.append(f"recovery {figures.get('recovery')}")
    return "met" if not misses else "missed: " + "; ".join(misses)


def summary(out: Path) -> str:
    """The parts' results as a table (and ``OUT/summary.json``), the machine first."""
    info = _read(out / "versions.json") or {}
    rows = [_read(p) for p in sorted(out.glob("*.json"))]
    rows = [r for r in rows if r and "part" in r]
    lines = [
        f"gpu check on {info.get('device', 'no device')}: torch {info.get('torch')}, CUDA "
        f"{info.get('cuda')}, Triton {info.get('triton')}, driver {info.get('driver')}",
        "| part | status | seconds | against the target |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['part']} | {r['status']} | {r['seconds']} | {r['verdict']} |" for r in rows]
    text = "\n".join(lines)
    _write(out / "summary.json", {"versions": info, "parts": rows})
    return text


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))


def main(argv: list[str]) -> int:
    verb, out = argv[0], Path(argv[1])
    if verb == "versions":
        print(json.dumps(versions(out)))
    elif verb == "record":
        part, rc, seconds = argv[2], int(argv[3]), float(argv[4])
        record(out, part, rc, seconds, Path(argv[5]) if len(argv) > 5 else None)
    elif verb == "summary":
        print(summary(out))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
