"""pytest plugin for scripts/doc-numbers.py: after collection, writes how many tests the build under test has and
which of them are skipped, with their reasons, to the JSON file named by $DOC_NUMBERS_OUT."""
from __future__ import annotations

import json
import os


def pytest_collection_finish(session):
    skipped: dict[str, int] = {}
    for item in session.items:
        for mark in item.iter_markers("skip"):
            reason = mark.kwargs.get("reason") or (mark.args[0] if mark.args else "")
            skipped[reason] = skipped.get(reason, 0) + 1
            break
    with open(os.environ["DOC_NUMBERS_OUT"], "w", encoding="utf-8") as f:
        json.dump({"collected": len(session.items), "skipped": skipped}, f)
