"""``benchmarks/library.py --quick`` runs as users run it and its request counts hold: a
whole-library ls/select costs two requests, an add four, an index-less ls one per adapter,
and the concurrent writers end with every entry. (Counts only: never a timing.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_library_benchmark_quick(tmp_path: Any) -> None:
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "library.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Library of 300 adapters on S3 (moto)" in done.stdout
    with open(tmp_path / "library.json") as f:
        payload = json.load(f)
    assert payload["study"] == "library" and payload["mode"] == "quick" and payload["args"]["n"] == 300
    rows = {r["operation"]: r for r in payload["rows"]}
    assert rows["ls without manifest (adapterkit.ls)"]["requests"] >= 300
    assert rows["ls (Library.entries)"]["requests"] == 2 and rows["ls (Library.entries)"]["entries"] == 300
    assert rows["select (task + tag)"]["requests"] == 2
    assert rows["add one (to the N-entry library)"]["requests"] == 4
    assert rows["ls after add (1 record)"]["requests"] == 3 and rows["ls after add (1 record)"]["entries"] == 301
    assert all(math.isfinite(r["seconds"]) and r["seconds"] > 0 for r in payload["rows"])
    concurrent = payload["concurrent"]
    assert concurrent["all_present"] and concurrent["entries"] == concurrent["expected"] == 40
    assert payload["manifest_bytes"] > 300 * 200
