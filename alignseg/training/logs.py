"""What a run tells its user: log lines (through tqdm, so the bar stays intact), the metrics file
(``metrics.jsonl``, one JSON object per line) and TensorBoard scalars when the package is installed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("alignseg")


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # logging must never break training
            self.handleError(record)


def setup_logging(is_main: bool = True, verbose: bool = False) -> None:
    """Log lines ``HH:MM:SS message`` from the ``alignseg`` loggers; other ranks only warn."""
    root = logging.getLogger("alignseg")
    for handler in list(root.handlers):
        if isinstance(handler, _TqdmHandler):
            root.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO if is_main else logging.WARNING)
    root.propagate = False


def add_file_log(run_dir: Path) -> None:
    """Also write the log lines to ``run_dir/train.log``."""
    root = logging.getLogger("alignseg")
    target = str((run_dir / "train.log").resolve())
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == target for h in root.handlers):
        return
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl`` and mirrors numbers to TensorBoard when available.

    Every line is strict JSON: a non-finite number (a NaN loss) is written as ``null``. A run resumed at
    ``start_iteration`` first drops the records after it (written after its checkpoint, before a crash)
    and a torn last line, so the file reads as if the run had never stopped.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, start_iteration: int = 0):
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if start_iteration > 0:
            self._truncate_after(start_iteration)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("TensorBoard is not installed (pip install tensorboard); metrics go to %s only", self.path)
            else:
                purge = {"purge_step": start_iteration + 1} if start_iteration > 0 else {}
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), **purge)
                log.info("TensorBoard logs in %s", run_dir / "tensorboard")

    def _truncate_after(self, iteration: int) -> None:
        if not self.path.is_file():
            return
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                keep = record["iteration"] <= iteration
            except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            from ..checkpoint import write_text_atomic

            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
            log.info(
                "%s: dropped %d records written after iteration %d (the run stopped after them)",
                self.path, dropped, iteration,
            )

    def write(self, kind: str, iteration: int, values: dict[str, Any]) -> None:
        record = {"kind": kind, "iteration": iteration, "time": round(time.time(), 3), **json_safe(values)}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{key}", value, iteration)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
