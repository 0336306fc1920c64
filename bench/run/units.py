"""The one unit loop: every study that trains models goes through ``train_units``.

A *cell* is a set of models stored under one name in a store: a run's variant, a cell of the
marginal-utility study, the leave-one-out repeats. Its models train in *units* of at most
``unit_size`` (a unit is the stored, resumable piece; models that share one training step inside an
engine are a *group*, an engine's business). For every cell this loop

1. repairs a finished cell whose files no longer match their record (trains it again),
2. plans the units still missing (a resume keeps every finished unit, whatever its size),
3. trains them here or on Ray workers (execution.py), on the configured device,
4. stores each unit atomically with its completion record as soon as it arrives, and
5. finalises the cell once its last unit is stored, training again any unit damaged meanwhile.

Only this process writes the store, so its guarantees do not depend on how many processes train.
"""
from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from dpmem.bench.config import Config
from dpmem.bench.run import execution
from dpmem.bench.run.execution import Unit
from dpmem.bench.store.run_store import ModelRange, RunStore
from dpmem.models.spec import TrainSpec
from dpmem.privacy.errors import UsageError

# float16's largest finite value: margins beyond it are stored as +-FLOAT16_MAX.
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True, kw_only=True)
class Cell:
    """Models stored together under one name, trained from one spec and one pair of seeds.

    ``masks`` has ``rows_per_model`` rows per stored model (a LOO repeat trains the model on S and
    one model per left-out example); ``stream_ids`` gives each row its random streams (default: row
    k is model k). ``stored`` turns a unit's engine outputs into the arrays the store keeps."""
    name: str
    spec: TrainSpec
    models: int
    seed: int
    noise_seed: int
    engine: str
    masks: np.ndarray
    rows_per_model: int = 1
    stream_ids: np.ndarray | None = None
    stored: Callable[[ModelRange, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None

    def unit(self, models: ModelRange) -> Unit:
        rows = slice(models.start * self.rows_per_model, models.stop * self.rows_per_model)
        streams = (np.arange(models.start, models.stop, dtype=np.int64) if self.stream_ids is None
                   else self.stream_ids[rows])
        return Unit(cell=self.name, models=models, masks=self.masks[rows], stream_ids=streams, seed=self.seed,
                    noise_seed=self.noise_seed, engine=self.engine)


def checked_outputs(cfg: Config, unit: Unit, arrays: dict[str, np.ndarray],
                    noted: set | None = None) -> dict[str, np.ndarray]:
    """A unit's arrays as they may be stored: NaN outputs (a diverged model) are refused, naming the
    cell, the model and the architecture; infinite margins are clipped to float16's range, said in
    one line (once per cell when ``noted`` collects the cells already noted)."""
    what = f"trainer {cfg.trainer}" if cfg.trainer else f"model {cfg.model}"
    out = dict(arrays)
    for key, value in arrays.items():
        if not np.issubdtype(value.dtype, np.floating):
            continue
        bad = np.isnan(value)
        if bad.any():
            k = unit.models.start + int(np.argwhere(bad)[0][0]) // (len(unit.masks) // unit.models.size)
            raise UsageError(f"variant {unit.cell}, {what}: model {k} produced NaN {key} (training diverged; "
                             f"try a smaller lr); units stored so far are kept")
        inf = np.isinf(value)
        if inf.any() and key.endswith("_margin"):
            if noted is None or unit.cell not in noted:
                print(f"dpmem: note: variant {unit.cell}: margins beyond float16's range (infinite ones "
                      f"included) are stored as +-{FLOAT16_MAX:g}; first in {key} of models "
                      f"{unit.models.start}-{unit.models.stop - 1}", file=sys.stderr)
            if noted is not None:
                noted.add(unit.cell)
            out[key] = np.clip(value, -FLOAT16_MAX, FLOAT16_MAX).astype(value.dtype)
        elif inf.any():
            k = unit.models.start + int(np.argwhere(inf)[0][0]) // (len(unit.masks) // unit.models.size)
            raise UsageError(f"variant {unit.cell}, {what}: model {k} produced infinite {key}")
    return out


def pending(store: RunStore, cell: Cell, unit_size: int) -> list[ModelRange]:
    """The model ranges of ``cell`` still to train (repairing a damaged or unfinalised cell first)."""
    if store.variant_complete(cell.name) and store.damaged_files(cell.name):
        store.discard_variant(cell.name)   # repair: a damaged finished array is trained again
    todo = store.pending_units(cell.name, cell.models, unit_size)
    if not todo and not store.variant_complete(cell.name) and store.finalize_variant(cell.name, cell.models):
        todo = store.pending_units(cell.name, cell.models, unit_size)   # killed before finalising
    return todo


def train_units(store: RunStore, cells: list[Cell], inputs: dict, cfg: Config, *, ray_address: str | None = None,
                progress: bool = True, desc: str = "training", counting: str = "model") -> None:
    """Train and store every unfinished unit of ``cells`` (``inputs``: x_train, y_train, canary, evals).

    ``cfg`` gives the execution settings (unit_size, workers, threads, device); the bar counts
    ``counting`` (the cells' stored models, or LOO repeats)."""
    by_name = {cell.name: cell for cell in cells}
    specs = {cell.name: cell.spec for cell in cells}
    todo = [cell.unit(models) for cell in cells for models in pending(store, cell, cfg.unit_size)]
    total = sum(cell.models for cell in cells)
    bar = tqdm(total=total, initial=total - sum(u.models.size for u in todo), unit=counting, desc=desc,
               disable=not progress, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} " + counting + "s [{elapsed}<{remaining}]")
    if not todo:
        bar.close()
        return
    executor = execution.executor(cfg, ray_address)
    noted: set[str] = set()   # cells whose clipped margins were reported
    try:
        while todo:
            outstanding = Counter(unit.cell for unit in todo)
            retry = []
            for unit, arrays, seconds in executor.map(specs, inputs, todo, bar):
                cell = by_name[unit.cell]
                arrays = checked_outputs(cfg, unit, arrays, noted)
                kept = cell.stored(unit.models, arrays) if cell.stored else arrays
                store.write_unit(cell.name, unit.models, kept, {"seconds": seconds, "models": unit.models.size})
                outstanding[cell.name] -= 1
                # a cell is finalised as soon as its last unit is stored
                if not outstanding[cell.name] and store.finalize_variant(cell.name, cell.models):
                    # a unit damaged since it was written: train what is missing again
                    again = store.pending_units(cell.name, cell.models, cfg.unit_size)
                    bar.update(-sum(r.size for r in again))
                    retry += [cell.unit(r) for r in again]
            todo = retry
    finally:
        executor.close()
        bar.close()
