"""Metric sinks, `logger=NAME` or `logger=[NAME,...]`: where each logged record goes besides metrics.jsonl.

metrics.jsonl stays the source of truth: the trainer always writes it (a resume truncates it, the report reads
it) and `jsonl` names it so that a list reads naturally. The other sinks get the same records' numbers, on
rank 0 only. Each needs its own package, checked when the config is validated, so a missing one is a config
error naming the key and the pip command before anything trains. MLflow and W&B write offline, into the run
directory: nothing here talks to a server.

A sink opens at the first record, so a Trainer that never logs (the smoke test's) leaves nothing behind, and
a sink that fails later is dropped with a warning: a dashboard must never stop a run.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from greenrun.core import fields, fs
from greenrun.core.registry import Registry

log = logging.getLogger(__name__)

# Record fields that are not series: the step is the x axis, time the wall clock of the record.
_NOT_SCALARS = ("step", "time")


class Sink(Protocol):
    """One destination of the logged numbers."""

    def write(self, step: int, scalars: dict[str, float], walltime: float | None) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SinkOption:
    packages: tuple[str, ...]  # the modules the sink imports beyond greenrun's own dependencies
    pip: str  # what installs them
    # (run directory, the run's config as flat data, the first step this process logs) -> the open sink;
    # None for jsonl, which the trainer writes itself.
    open: Callable[[Path, dict[str, Any], int], Sink] | None


SINKS: Registry[SinkOption] = Registry("logger")


# --- the sinks -------------------------------------------------------------------------------------------


class TensorBoard:
    """RUN_DIR/tensorboard/, through torch.utils.tensorboard; `tensorboard --logdir RUN_DIR` shows it."""

    def __init__(self, run_dir: Path, params: dict[str, Any], first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(run_dir) / "tensorboard"
        fs.refuse_symlink(folder)  # never write event files where a planted link points
        # A resume redoes the steps a killed process logged after its last checkpoint; purge_step makes
        # TensorBoard drop the older events from there on, as the resume truncates metrics.jsonl.
        self._writer = SummaryWriter(str(folder), purge_step=first_step)

    def write(self, step: int, scalars: dict[str, float], walltime: float | None) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step, walltime=walltime)
        self._writer.flush()  # one flush per log line: a killed run keeps what it logged

    def close(self) -> None:
        self._writer.close()


class MLflow:
    """An MLflow run in RUN_DIR/mlflow.db, MLflow's own local backend (SQLite; 3.x refuses a plain folder
    store): `mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db` shows it."""

    def __init__(self, run_dir: Path, params: dict[str, Any], first_step: int) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir).resolve()
        fs.refuse_symlink(run_dir / "mlflow.db")
        # A client of its own, so neither MLFLOW_TRACKING_URI nor a process-wide active run is touched.
        self._client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
        found = self._client.get_experiment_by_name("greenrun")
        experiment = (
            found.experiment_id
            if found
            else self._client.create_experiment(
                "greenrun", artifact_location=(run_dir / "mlartifacts").as_uri()
            )
        )
        run = self._client.create_run(experiment, run_name=run_dir.name)
        self._run_id = run.info.run_id
        # MLflow caps a parameter value at a few hundred characters and a batch at 100 parameters.
        items = [Param(key, str(value)[:250]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self._run_id, params=items[start : start + 100])

    def write(self, step: int, scalars: dict[str, float], walltime: float | None) -> None:
        from mlflow.entities import Metric

        ms = int(1000 * walltime) if walltime is not None else 0
        self._client.log_batch(self._run_id, metrics=[Metric(k, v, ms, step) for k, v in scalars.items()])

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


class WandB:
    """A Weights & Biases run in offline mode under RUN_DIR/wandb/ (upload later with `wandb sync`)."""

    def __init__(self, run_dir: Path, params: dict[str, Any], first_step: int) -> None:
        import wandb

        fs.refuse_symlink(Path(run_dir) / "wandb")
        # A new W&B run per process: W&B wants steps to grow within a run, and a resume redoes some.
        self._run = wandb.init(
            mode="offline", dir=str(run_dir), project="greenrun", name=Path(run_dir).name, config=params
        )

    def write(self, step: int, scalars: dict[str, float], walltime: float | None) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


SINKS.add("jsonl", SinkOption((), "", None))
SINKS.add("tensorboard", SinkOption(("tensorboard",), "pip install 'greenrun[tensorboard]'", TensorBoard))
# mlflow-skinny lacks the SQLite backend's sqlalchemy and alembic; the full package has them.
SINKS.add("mlflow", SinkOption(("mlflow", "sqlalchemy", "alembic"), "pip install mlflow", MLflow))
SINKS.add("wandb", SinkOption(("wandb",), "pip install wandb", WandB))


# --- config -------------------------------------------------------------------------------------------


def names(value: Any) -> list[str]:
    """`logger` as a list of names: one name, a list, or a comma-separated string; duplicates once."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    out: list[str] = []
    for item in items:
        name = str(item).strip()
        if name and name not in out:
            out.append(name)
    return out


def installed(module: str) -> bool:
    """Whether `module` could be imported, without importing it (mlflow and wandb take seconds)."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None: imports of it are blocked
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def validate(value: Any) -> list[str]:
    """Unknown sink names (with the closest one) and sinks whose package is missing, with its pip command."""
    if not isinstance(value, str) and not (
        isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
    ):
        return [f"logger: a sink name or a list of them (e.g. logger=[jsonl,tensorboard]), got {value!r}"]
    problems = []
    for name in names(value):
        found = SINKS.problems(name)
        if found:
            problems += found
            continue
        option = SINKS.get(name)
        missing = [p for p in option.packages if not installed(p)]
        if missing:
            are = "is" if len(missing) == 1 else "are"
            problems.append(
                f"logger={name}: {', '.join(missing)} {are} not installed here; {option.pip} "
                f"(or leave {name} out of logger)"
            )
    return problems


# --- the trainer's side ----------------------------------------------------------------------------------


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers as series: booleans, strings, nulls and nested values stay in metrics.jsonl."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in _NOT_SCALARS and isinstance(value, int | float) and not isinstance(value, bool)
    }


class Sinks:
    """The sinks of `logger` for one process: `begin(step)`, then `write(record)` per log line, `close()`.

    Disabled (writes nothing) on ranks other than 0 and for `logger=jsonl` alone.
    """

    def __init__(self, logger: Any, run_dir: Path, cfg: Any, *, enabled: bool = True) -> None:
        wanted = [n for n in names(logger) if n in SINKS and SINKS.get(n).open is not None]
        self._wanted = wanted if enabled else []
        self._run_dir, self._cfg = Path(run_dir), cfg
        self._open: dict[str, Sink] | None = None  # opened at the first record
        self._first_step = 0

    def begin(self, step: int) -> None:
        """The loop starts at `step` (0, or a resumed checkpoint's): what this process logs comes after."""
        self._first_step = step + 1 if step > 0 else 0

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        values = scalars(record)
        if not self._wanted or not isinstance(step, int) or not values:
            return
        if self._open is None:
            self._open = {}
            params = fields.flatten(self._cfg) if self._cfg is not None else {}
            for name in list(self._wanted):
                self._try(name, lambda n=name: self._start(n, params))
        walltime = record.get("time")
        walltime = float(walltime) if isinstance(walltime, int | float) else None
        for name, sink in list(self._open.items()):
            self._try(name, lambda s=sink: s.write(step, values, walltime))

    def _start(self, name: str, params: dict[str, Any]) -> None:
        opener = SINKS.get(name).open
        assert opener is not None
        self._open[name] = opener(self._run_dir, params, self._first_step)

    def _try(self, name: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as e:  # a dashboard must never end a run: metrics.jsonl holds every record anyway
            log.warning(f"logger={name}: {type(e).__name__}: {e}; it is off for the rest of this run")
            self._wanted.remove(name)
            sink = (self._open or {}).pop(name, None)
            if sink is not None:
                self._close(name, sink)

    def close(self) -> None:
        for name, sink in (self._open or {}).items():
            self._close(name, sink)
        self._open, self._wanted = {}, []

    @staticmethod
    def _close(name: str, sink: Sink) -> None:
        try:
            sink.close()
        except Exception as e:  # closing is the end of the run: say so, and let the run end as it would
            log.warning(f"logger={name}: closing failed: {type(e).__name__}: {e}")
