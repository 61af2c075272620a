"""Where a run's numbers go: ``metrics.jsonl`` in the run folder and the experiment trackers of
``logging.report_to`` (wandb, tensorboard, mlflow, ...), through accelerate's trackers.

``trackers(cfg)`` names the trackers for ``Accelerator(log_with=...)`` (each checked to be installed);
``MetricsLog`` starts them with ``accelerator.init_trackers``, sends each row with ``accelerator.log``
and finishes them with ``accelerator.end_training``. ``metrics.jsonl`` is written as before, row for
row; the run folder's other readers (``run.read_metrics``) read it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from stella_distill.config import ExperimentConfig
from stella_distill.errors import UserError
from stella_distill.logs import get_logger
from stella_distill.run import METRICS_FILE, writing

logger = get_logger(__name__)

# accelerate's tracker names and the modules that make each available.
TRACKER_MODULES = {
    "wandb": ("wandb",),
    "tensorboard": ("tensorboard", "tensorboardX"),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "aim": ("aim",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "swanlab": ("swanlab",),
    "trackio": ("trackio",),
}
LOGS = "logs"  # trackers that write files (tensorboard, aim) write under output_dir/logs/<project>


def trackers(cfg: ExperimentConfig) -> list[str]:
    """The accelerate trackers of ``logging.report_to`` that this run uses, each checked to be installed.

    wandb is left out when ``logging.wandb.mode`` or ``WANDB_MODE`` is ``disabled``. A tracker whose
    package is missing is an error now, before any work: accelerate would drop it without a word.
    """
    names = []
    for name in cfg.logging.report_to:
        if name == "wandb" and "disabled" in (cfg.logging.wandb.mode, os.environ.get("WANDB_MODE")):
            continue
        if not any(importlib.util.find_spec(module) for module in TRACKER_MODULES[name]):
            raise UserError(
                f"logging.report_to: {name} is not installed (pip install {TRACKER_MODULES[name][0]}), "
                f"or remove it from the list"
            )
        names.append(name)
    return names


def tracker_config(cfg: ExperimentConfig) -> dict[str, bool | int | float | str]:
    """The resolved config as the flat ``section.field`` values every tracker accepts (lists of values
    and nulls as their JSON text), for ``init_trackers``."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        else:
            flat[key] = json.dumps(value)

    walk(cfg.to_dict(), "")
    return flat


class MetricsLog:
    """``metrics.jsonl`` in the run folder and the accelerator's trackers (``logging.report_to``).

    The accelerator must have been made with ``log_with=trackers(cfg)``. Every row goes to
    ``metrics.jsonl`` as it is (main process only); its numbers go to the trackers through
    ``accelerator.log`` at the row's ``step``, with ``@`` in names written ``_dim`` (MLflow refuses
    ``@``: ``eval/similarity_mse@256`` becomes ``eval/similarity_mse_dim256``).
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, accelerator):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = Path(run_dir) / METRICS_FILE
        wanted = trackers(cfg)
        from accelerate.tracking import GeneralTracker

        got = [str(t) for t in accelerator.log_with if not isinstance(t, GeneralTracker)]
        missing = [name for name in wanted if name not in got]
        if missing:
            raise UserError(f"logging.report_to: accelerate cannot use {', '.join(missing)} here")
        init_kwargs = {}
        if "wandb" in wanted:
            init_kwargs["wandb"] = {
                "name": cfg.name,
                "entity": cfg.logging.wandb.entity,
                "dir": str(run_dir),
                "mode": self._wandb_mode(cfg),
                "resume": "allow",
            }
        accelerator.init_trackers(
            cfg.logging.wandb.project, config=tracker_config(cfg), init_kwargs=init_kwargs
        )
        if "wandb" in wanted and self.main:
            run = accelerator.get_tracker("wandb", unwrap=True)
            if run is not None and run.offline:
                folder = Path(run.dir).parent
                logger.info(f"wandb: offline run in {folder} (to upload it: wandb sync {folder})")

    def _wandb_mode(self, cfg: ExperimentConfig) -> str:
        mode = cfg.logging.wandb.mode
        if mode != "online" or not self.main or os.environ.get("WANDB_API_KEY"):
            return mode
        import wandb

        try:
            logged_in = bool(wandb.api.api_key)
        except Exception:
            logged_in = False
        if not logged_in:
            logger.warning("wandb: no API key set; logging offline (sync later with `wandb sync`)")
            return "offline"
        return mode

    def log(self, row: dict) -> None:
        """Append one row to ``metrics.jsonl`` and send its numbers to the trackers."""
        if not self.main:
            return
        with writing(self.path), self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        values = {
            k.replace("@", "_dim"): v
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if values and self.accelerator.trackers:
            self.accelerator.log(values, step=row.get("step"))

    def close(self) -> None:
        """Finish every tracker (``accelerator.end_training``). Every process calls it, together: it ends
        the job's process group too."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
