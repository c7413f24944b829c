"""`logger=csv` that never erases earlier metrics: a resumed run appends to `metrics.csv`.

Lightning's CSVLogger deletes an existing `metrics.csv` when it starts (it only warns), so resuming
in the same run folder erased the metrics of every step before the checkpoint. Here the file is
append-only: a resumed run adds its rows after the earlier ones; when new columns appear the file
is rewritten with the wider header through a temporary file and a rename, so a kill at any moment
leaves either the old file or the new one, each holding every earlier row.
"""

from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    """ExperimentWriter that keeps an existing `metrics.csv` and continues it."""

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            header = next(csv.reader(file), [])
        self.metrics_keys = sorted(header)  # new keys later widen the header, earlier rows are kept

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        if not isinstance(self.metrics_file_path, str) or "://" in self.metrics_file_path:
            return _ExperimentWriter._rewrite_with_new_header(self, fieldnames)  # remote: as Lightning does
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        tmp = f"{self.metrics_file_path}.{os.getpid()}.tmp"
        with open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, self.metrics_file_path)


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger whose `metrics.csv` is appended to across resumes, never rewritten without its rows."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
