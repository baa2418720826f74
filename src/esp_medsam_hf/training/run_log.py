"""``RunLog``: the log files of a training run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..models.esp_medsam.fileio import atomic_file


class RunLog:
    """``log.csv`` (one row per logged optimizer step) and ``log.jsonl`` (every event, validation included)."""

    FIELDS = ("time", "task", "epoch", "step", "loss", "lr")

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.csv_path, self.jsonl_path = output_dir / "log.csv", output_dir / "log.jsonl"
        self.history: list[dict] = []

    def truncate_after(self, step: int) -> None:
        """Drop the events logged after ``step`` (by a run that went on past the checkpoint now resumed)."""
        if not self.enabled:
            return
        if self.jsonl_path.exists():
            lines = [line for line in self.jsonl_path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if int(json.loads(line).get("step", 0)) <= step]
            if len(kept) != len(lines):
                with atomic_file(self.jsonl_path) as temporary:
                    temporary.write_text("".join(line + "\n" for line in kept))
        if self.csv_path.exists():
            with self.csv_path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            kept_rows = [row for row in rows if int(row["step"]) <= step]
            if len(kept_rows) != len(rows):
                with atomic_file(self.csv_path) as temporary, temporary.open("w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=self.FIELDS, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(kept_rows)

    def write(self, event: dict) -> None:
        self.history.append(event)
        if not self.enabled:
            return
        with self.jsonl_path.open("a") as handle:
            handle.write(json.dumps(event) + "\n")
        if event.get("event") == "train":
            new = not self.csv_path.exists()
            with self.csv_path.open("a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.FIELDS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(event)

