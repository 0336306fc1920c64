"""The benchmark from config to stored per-model arrays: data -> masks -> paired variants -> store.

Each variant trains the same K models (same subsets, initialisations and batches) and differs only
by DP-SGD's clipping and noise. Training proceeds in units of ``chunk_size`` models; each finished
unit is stored atomically, so an interrupted run picks up at the first unfinished unit.

Model k of every unit draws its randomness from its own streams (k is its stream id, the seed is
the run's, the noise seed the variant's), so the arrays do not depend on how the models are split
into units, on the number of threads or workers, or on the order in which units finish.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from dpmem.bench import execution
from dpmem.bench.config import Config
from dpmem.bench.data import Dataset, load_dataset
from dpmem.bench.errors import ConfigError, UsageError
from dpmem.bench.store import Chunk, RunStore, atomic_write_json, data_fingerprint, read_json
from dpmem.bench.subsets import CANARY_MASK_STREAM, make_masks
from dpmem.models import resolve_engine, train_models
from dpmem.models.spec import DPParams, TrainRequest, TrainSpec
from dpmem.privacy import accounting, faults


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Poisson sampling as Opacus sets it up: rate = 1 / (batches per epoch)."""
    expected_subset: float
    steps_per_epoch: int
    sample_rate: float
    steps: int


def schedule(cfg: Config, n_train: int, *, expected: float | None = None) -> Schedule:
    """Steps and rate for subsets of the expected size (default: the config's q of n_train)."""
    if expected is None:
        expected = round(cfg.q * n_train) if cfg.sampling == "fixed" else cfg.q * n_train
    per_epoch = max(1, math.ceil(expected / cfg.batch_size))
    return Schedule(expected_subset=expected, steps_per_epoch=per_epoch, sample_rate=1.0 / per_epoch,
                    steps=cfg.epochs * per_epoch)


def plan_variant(cfg: Config, epsilon: float | None, sched: Schedule) -> dict:
    """What a variant trains with; for DP variants sigma is calibrated by the accountant."""
    plan = {"epsilon": epsilon, "delta": None, "noise_multiplier": None, "max_grad_norm": None,
            "sample_rate": sched.sample_rate, "steps": sched.steps, "accountant": None,
            "epsilon_reported": None}
    if epsilon is not None:
        told_rate = faults.get(cfg.fault).told_sample_rate(sched.sample_rate)
        cal = accounting.calibrate(target_epsilon=epsilon, delta=cfg.delta, sample_rate=told_rate,
                                   steps=sched.steps, accountant=cfg.accountant)
        plan.update(delta=cfg.delta, noise_multiplier=cal.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                    accountant=accounting.accountant_name(cfg.accountant), epsilon_reported=cal.epsilon)
        if cfg.fault != "none":
            plan["fault"] = cfg.fault
    return plan


def _trained_dp_params(plan: dict) -> DPParams | None:
    """The DP-SGD parameters actually used, which differ from the plan only under a planted fault."""
    if plan["noise_multiplier"] is None:
        return None
    sigma, clip = faults.get(plan.get("fault", "none")).trained(plan["noise_multiplier"], plan["max_grad_norm"])
    return DPParams(noise_multiplier=sigma, max_grad_norm=clip)


def train_spec(cfg: Config, ds: Dataset, plan: dict) -> TrainSpec:
    dp = _trained_dp_params(plan)
    canary_norm = cfg.canary_norm
    if dp is not None:  # the auditor sizes its canaries by the claimed clipping bound, not by a faulty one
        canary_norm *= plan["max_grad_norm"] / dp.max_grad_norm
    return TrainSpec(arch=cfg.model, input_shape=tuple(ds.input_shape), n_classes=ds.n_classes,
                     hidden=cfg.hidden, steps=plan["steps"], sample_rate=plan["sample_rate"], lr=cfg.lr,
                     momentum=cfg.momentum, weight_decay=cfg.weight_decay, dp=dp, trainer=cfg.trainer or None,
                     canaries=cfg.gradient_canaries, canary_norm=canary_norm)


def model_inputs(cfg: Config, ds: Dataset, x: np.ndarray) -> np.ndarray:
    """Inputs as every engine takes them: float32, C-contiguous, the dataset's shape (modules flatten)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def check_inputs(cfg: Config) -> Dataset:
    """Load the data and try the model, engine and trainer once, before anything is written.

    Every problem is a ConfigError naming its field: a bad data file, a factory that does not
    import, raises or returns no Module, a module Opacus refuses (BatchNorm), a module that does not
    map the data's inputs to one logit per class, an engine that cannot train it, a trainer that
    does not import. Returns the dataset, so the run does not load it twice."""
    import torch

    from dpmem.bench import resources
    from dpmem.models.batched import resolve_device
    from dpmem.models.nets import build_model
    from dpmem.models.plugins import load_callable, one_line
    try:
        resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError("device", str(e)) from None
    ds = load_dataset(cfg)
    resources.check_arrays_fit(cfg, ds.n_train, ds.n_test)
    sched = schedule(cfg, ds.n_train)
    for epsilon in cfg.epsilons:   # calibration fails for budgets no noise can meet: say so now
        try:
            plan_variant(cfg, epsilon, sched)
        except ValueError as e:
            raise ConfigError("epsilons", f"cannot train for epsilon {epsilon:g}: {e}") from None
    spec = train_spec(cfg, ds, plan_variant(cfg, None, sched))
    if cfg.trainer:
        load_callable(cfg.trainer, "trainer")
        return ds
    parameters = resources.parameter_count(spec)
    if parameters is not None:
        resources.check_model_fits(cfg, parameters)
    module = build_model(spec).eval()
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        frozen = sum(1 for _ in module.parameters())
        raise ConfigError("model", f"{cfg.model} has no trainable parameters"
                                   + (f" (all {frozen} have requires_grad=False)" if frozen else ""))
    probe = torch.as_tensor(model_inputs(cfg, ds, ds.x_train[:2]))
    try:
        with torch.no_grad():
            logits = module(probe)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - sys.exit() in user code included: reported, not raised
        raise ConfigError("model", f"{cfg.model} fails on inputs of shape {tuple(ds.input_shape)}: {one_line(e)}") from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(probe), ds.n_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError("model", f"{cfg.model} maps a batch of {len(probe)} inputs of shape "
                                   f"{tuple(ds.input_shape)} to {shape}, expected ({len(probe)}, {ds.n_classes}) logits")
    try:
        resolve_engine(spec, cfg.engine)
    except ValueError as e:
        raise ConfigError("engine", str(e)) from None
    return ds


def provenance(cfg: Config, spec: TrainSpec) -> dict:
    """Which engine trains a variant, and which architecture or trainer (recorded in its plan)."""
    return {"engine": resolve_engine(spec, cfg.engine), "model": None if cfg.trainer else cfg.model,
            "trainer": cfg.trainer or None}


def run_seed(cfg: Config) -> int:
    """Initialisation and Poisson coins: one seed for the run, shared by every variant, so the
    non-private and DP models of one index start alike and see the same batches."""
    return int(cfg.seed)


def noise_seed(cfg: Config, variant: str) -> int:
    """DP noise: one seed per variant, derived from its name (not its position in a list)."""
    digest = hashlib.sha256(f"dpmem-noise\0{cfg.seed}\0{variant}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def prepare(store: RunStore, cfg: Config, ds: Dataset | None = None) -> tuple[Dataset, np.ndarray]:
    """Load the data and the shared masks (made once; masks and data arrays that are missing or
    damaged are written again, they depend only on the config and the data)."""
    ds = load_dataset(cfg) if ds is None else ds
    info_path = store.root / "data" / "dataset.json"
    if info_path.exists():
        stored = read_json(info_path).get("fingerprint")
        if stored != ds.info.get("fingerprint"):
            raise ConfigError("data_path", f"the data changed since this run started (fingerprint {stored} "
                                           f"stored, {ds.info.get('fingerprint')} now); use another --out")
    else:
        atomic_write_json(info_path, dataset_record(ds))
    fingerprint = data_fingerprint(ds)
    store.check_fingerprint(fingerprint, "the dataset built now")
    store.record_fingerprint(fingerprint)
    if store.run_arrays_intact():
        masks = store.masks()
        if masks.shape != (cfg.models, ds.n_train):
            raise UsageError(f"stored masks have shape {masks.shape}, expected {(cfg.models, ds.n_train)}")
    else:
        masks = make_masks(sampling=cfg.sampling, models=cfg.models, n=ds.n_train, q=cfg.q, seed=cfg.seed)
        store.save_run_arrays(masks, {"y_train": ds.y_train, "g_train": ds.g_train, "y_test": ds.y_test,
                                      "g_test": ds.g_test, "subgroup_label": ds.subgroup_label,
                                      "is_canary": ds.is_canary, "label_noisy": ds.label_noisy})
    return ds, masks


def dataset_record(ds: Dataset) -> dict:
    """What the run records about its data (data/dataset.json, summary.json's run section)."""
    keys = ("source", "fingerprint", "subgroups")
    return {"name": ds.name, "input_shape": list(ds.input_shape), "n_classes": int(ds.n_classes),
            **{k: ds.info[k] for k in keys if k in ds.info}}


def set_threads(threads: int) -> int:
    """Set torch's intra-op thread count once, so that nothing oversubscribes the machine; 0 means
    OMP_NUM_THREADS when the environment sets it, else the cores this process may use. Returns the count."""
    import os

    import torch
    if not threads:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = (int(env) if env.isdigit() and int(env) > 0 else
                   len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def gradient_canary_masks(store: RunStore, cfg: Config) -> np.ndarray | None:
    """bool [K, m]: the gradient canaries' memberships (made once, stored as canary_masks.npy).

    Always independent Bernoulli(q), from their own stream, whatever ``sampling`` the real
    examples use: then each canary's in- and out-models are add/remove neighbours and the
    (model, canary) observations are independent (privacy/canary_audit.py), and the real
    examples' masks are the same with and without canaries."""
    if not cfg.gradient_canaries:
        return None
    stored = store.canary_masks(repairable=True)
    if stored is not None:
        return stored
    masks = make_masks(sampling="bernoulli", models=cfg.models, n=cfg.gradient_canaries, q=cfg.q, seed=cfg.seed,
                       stream=CANARY_MASK_STREAM)
    store.save_canary_masks(masks)   # made anew (or repaired: the same seed gives the same masks)
    return masks


def with_gradient_canaries(x: np.ndarray, y: np.ndarray, masks: np.ndarray,
                           canary_masks: np.ndarray | None) -> dict:
    """Request fields with the canaries appended as placeholder rows (TrainRequest.canary)."""
    if canary_masks is None:
        return {"x_train": x, "y_train": y, "masks": masks}
    m = canary_masks.shape[1]
    return {"x_train": np.concatenate([x, np.zeros((m, *x.shape[1:]), dtype=x.dtype)]),
            "y_train": np.concatenate([y, np.zeros(m, dtype=y.dtype)]),
            "masks": np.concatenate([masks, canary_masks], axis=1),
            "canary": np.concatenate([np.full(len(y), -1, dtype=np.int64), np.arange(m, dtype=np.int64)])}


def flat_outputs(outs: dict) -> dict[str, np.ndarray]:
    """An engine's outputs as flat arrays ("{split}_correct", "{split}_margin", ...)."""
    flat = {}
    for key, value in outs.items():
        if isinstance(value, np.ndarray):
            flat[key] = value
        else:
            flat[f"{key}_correct"], flat[f"{key}_margin"] = value.correct, value.margin
    return flat


# float16's largest finite value: margins beyond it are stored as +-FLOAT16_MAX.
FLOAT16_MAX = float(np.finfo(np.float16).max)


def checked_outputs(cfg: Config, unit: "Unit", arrays: dict[str, np.ndarray],
                    noted: set | None = None) -> dict[str, np.ndarray]:
    """A unit's arrays as they may be stored: NaN outputs (a diverged model) are refused, naming the
    variant, the model and the architecture; infinite margins are clipped to float16's range, said in
    one line (once per variant when ``noted`` collects the variants already noted)."""
    what = f"trainer {cfg.trainer}" if cfg.trainer else f"model {cfg.model}"
    out = dict(arrays)
    for key, value in arrays.items():
        if not np.issubdtype(value.dtype, np.floating):
            continue
        bad = np.isnan(value)
        if bad.any():
            k = unit.chunk.start + int(np.argwhere(bad)[0][0])
            raise UsageError(f"variant {unit.variant}, {what}: model {k} produced NaN {key} (training diverged; "
                             f"try a smaller lr); units stored so far are kept")
        inf = np.isinf(value)
        if inf.any() and key.endswith("_margin"):
            if noted is None or unit.variant not in noted:
                print(f"dpmem: note: variant {unit.variant}: margins beyond float16's range (infinite ones "
                      f"included) are stored as +-{FLOAT16_MAX:g}; first in {key} of models "
                      f"{unit.chunk.start}-{unit.chunk.stop - 1}", file=sys.stderr)
            if noted is not None:
                noted.add(unit.variant)
            out[key] = np.clip(value, -FLOAT16_MAX, FLOAT16_MAX).astype(value.dtype)
        elif inf.any():
            k = unit.chunk.start + int(np.argwhere(inf)[0][0])
            raise UsageError(f"variant {unit.variant}, {what}: model {k} produced infinite {key}")
    return out


@dataclass(frozen=True, kw_only=True)
class Unit:
    """One unit of work: models chunk.start..chunk.stop-1 of one variant."""
    variant: str
    chunk: Chunk
    seed: int
    noise_seed: int
    engine: str       # the engine the variant's plan names


def train_unit(spec: TrainSpec, inputs: dict, masks: np.ndarray, unit: Unit, *, device: str,
               threads: int = 0, progress: Callable[[int], None] | None = None) -> tuple[dict[str, np.ndarray], float]:
    """Train one unit (in this process or a worker): its arrays and seconds."""
    if threads:
        import torch
        torch.set_num_threads(threads)
    req = TrainRequest(x_train=inputs["x_train"], y_train=inputs["y_train"], masks=masks, canary=inputs["canary"],
                       seed=unit.seed, noise_seed=unit.noise_seed, evals=inputs["evals"],
                       stream_ids=np.arange(unit.chunk.start, unit.chunk.stop, dtype=np.int64))
    t0 = time.perf_counter()
    outs = train_models(spec, req, engine=unit.engine, device=device, progress=progress)
    return flat_outputs(outs), time.perf_counter() - t0


def run(store: RunStore, cfg: Config, *, progress: bool = True, ds: Dataset | None = None,
        ray_address: str | None = None) -> dict[str, float]:
    """Train every variant's unfinished units; returns training seconds per variant.

    Units run here one after the other, or as Ray tasks (``cfg.workers`` or ``ray_address``); either
    way this process alone writes the store."""
    set_threads(cfg.threads)
    ds, masks = prepare(store, cfg, ds)
    canary_masks = gradient_canary_masks(store, cfg)
    sched = schedule(cfg, ds.n_train)
    x_train = model_inputs(cfg, ds, ds.x_train)
    # gradient canaries (if any) are placeholder rows after the real ones, members by their own masks
    rows = with_gradient_canaries(x_train, ds.y_train, masks, canary_masks)
    masks = rows["masks"]
    inputs = {"x_train": rows["x_train"], "y_train": rows["y_train"], "canary": rows.get("canary"),
              "evals": {"train": (x_train, ds.y_train), "test": (model_inputs(cfg, ds, ds.x_test), ds.y_test)}}
    specs, todo = {}, []
    for name, epsilon in cfg.variants:
        plan = store.plan(name)
        if plan is None:
            plan = plan_variant(cfg, epsilon, sched)
            plan.update(provenance(cfg, train_spec(cfg, ds, plan)))
            store.save_plan(name, plan)
        specs[name] = train_spec(cfg, ds, plan)
        if store.variant_complete(name) and store.damaged_files(name):
            store.discard_variant(name)   # repair: a damaged finished array is trained again
        pending = store.pending_units(name, cfg.models, cfg.chunk_size)
        if not pending and not store.variant_complete(name) and store.finalize_variant(name, cfg.models):
            pending = store.pending_units(name, cfg.models, cfg.chunk_size)   # killed before finalising
        todo += [Unit(variant=name, chunk=c, seed=run_seed(cfg), noise_seed=noise_seed(cfg, name),
                      engine=plan.get("engine", cfg.engine)) for c in pending]
    total = cfg.models * len(cfg.variants)
    bar = tqdm(total=total, initial=total - sum(u.chunk.size for u in todo), unit="model", desc="training",
               disable=not progress, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} models [{elapsed}<{remaining}]")
    executor = execution.executor(cfg, ray_address)
    noted: set[str] = set()   # variants whose clipped margins were reported
    try:
        while todo:
            outstanding = Counter(unit.variant for unit in todo)
            retry = []
            for unit, arrays, seconds in executor.map(specs, inputs, masks, todo, bar):
                arrays = checked_outputs(cfg, unit, arrays, noted)
                store.write_chunk(unit.variant, unit.chunk, arrays, {"seconds": seconds, "models": unit.chunk.size})
                outstanding[unit.variant] -= 1
                # a variant is finalised as soon as its last unit is stored
                if not outstanding[unit.variant] and store.finalize_variant(unit.variant, cfg.models):
                    # a unit damaged since it was written: train what is missing again
                    again = store.pending_units(unit.variant, cfg.models, cfg.chunk_size)
                    bar.update(-sum(c.size for c in again))
                    retry += [dataclasses.replace(unit, chunk=c) for c in again]
            todo = retry
    finally:
        executor.close()
        bar.close()
    return {name: store.variant_record(name)["train_seconds"] for name, _ in cfg.variants}
