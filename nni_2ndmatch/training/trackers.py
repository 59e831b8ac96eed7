"""Experiment trackers for a run (``finetune.report_to``, diffusers' values), through Accelerate's.

Each logged step sends the total loss, each term as it enters it (weight x term), the learning
rate, the gradient norm, seconds per step and samples per second; the resolved config goes in as
the run's hyperparameters. Only the main process logs. A tracker that fails during the run is
reported once and dropped; training goes on (``metrics.jsonl`` is written as always).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: ``report_to`` value -> (the module it needs, the package extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio"), "mlflow": ("mlflow", "mlflow"), "comet_ml": ("comet_ml", "comet_ml")}


def tracker_names(report_to: str | list[str]) -> list[str]:
    """The trackers ``report_to`` asks for ("none": none), each known and installed, or a ValueError
    naming the value and what is allowed, or the extra that installs it."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names == ["none"]:
        return []
    allowed = ", ".join(["none", *TRACKERS])
    for name in names:
        if name == "none":
            raise ValueError(f"'none' is not allowed in a list of trackers ({names!r}): it means no tracker, so "
                             f"give it alone; allowed in a list: {', '.join(TRACKERS)}")
        if name not in TRACKERS:
            raise ValueError(f"{name!r} is not a tracker; allowed: {allowed} (or a list of them; none alone)")
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"{name!r} needs the {module} package, which is not installed: "
                             f"pip install 'nni-2ndmatch[{extra}]'")
    if len(set(names)) != len(names):
        raise ValueError("list each tracker once")
    return names


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config values as flat ``a.b`` keys of bool, int, float or str (lists as text)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = "null" if value is None else value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class Trackers:
    """The run's trackers; ``log`` is the loop's ``on_log`` callback."""

    def __init__(self, names: list[str], logging_dir: Path, run_name: str, config: dict[str, Any],
                 weights: dict[str, float], batch_size: int) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.weights, self.batch_size = weights, batch_size
        self.trackers: list[Any] = []
        self.previous: dict[str, float] | None = None
        logging_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            tracker = cls(run_name, logging_dir=str(logging_dir)) if cls.requires_logging_directory \
                else cls(run_name)
            if self._call(tracker, tracker.start) and \
                    self._call(tracker, tracker.store_init_configuration, _flat(config)):
                self.trackers.append(tracker)

    def _call(self, tracker: Any, method: Any, *args: Any, **kwargs: Any) -> bool:
        try:
            method(*args, **kwargs)
            return True
        except Exception as e:  # any tracker failure (a full disk, a lost connection) must not stop the run
            logger.warning("tracker %s failed (%s: %s); the run goes on without it", tracker.name,
                           type(e).__name__, e)
            if tracker in self.trackers:
                self.trackers.remove(tracker)
            return False

    def values(self, record: dict[str, float]) -> dict[str, float]:
        """What one logged step sends: the loss, each term weighted as in the loss, lr, grad norm
        and, from the previous logged step, seconds per step and samples per second."""
        values = {"loss": record["loss"], "lr": record["lr"]}
        values.update({f"loss/{k}": w * record[k] for k, w in self.weights.items() if k in record})
        if "grad_norm" in record:
            values["grad_norm"] = record["grad_norm"]
        if self.previous is not None and record["step"] > self.previous["step"]:
            seconds = (record["seconds"] - self.previous["seconds"]) / (record["step"] - self.previous["step"])
            values.update({"seconds_per_step": seconds, "samples_per_second": self.batch_size / seconds})
        self.previous = record
        return values

    def log(self, record: dict[str, float]) -> None:
        values = self.values(record)
        for tracker in list(self.trackers):
            self._call(tracker, tracker.log, values, step=int(record["step"]))

    def log_images(self, images: dict[str, Any], step: int) -> None:
        """Image batches [N, C, H, W] in [-1, 1], each sent as one grid-like batch in [0, 1]."""
        values = {k: (v.clamp(-1, 1) * 0.5 + 0.5).numpy() for k, v in images.items()}
        for tracker in list(self.trackers):
            if hasattr(tracker, "log_images"):
                self._call(tracker, tracker.log_images, values, step=step)

    def finish(self) -> None:
        for tracker in list(self.trackers):
            self._call(tracker, tracker.finish)
