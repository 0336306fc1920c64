"""The benchmark from config to stored per-model arrays: data -> masks -> paired variants -> units.

Each variant trains the same K models (same subsets, initialisations and batches) and differs only
by DP-SGD's clipping and noise (plan.py). The variants' units train and are stored by the one unit
loop (units.py), so an interrupted run picks up at the first unfinished unit.
"""
from __future__ import annotations

import sys

import numpy as np

from dpmem.bench.config import Config
from dpmem.bench.data import Dataset, load_dataset
from dpmem.bench.run import execution, resources, units
from dpmem.bench.run.plan import (
    as_inputs,
    noise_seed,
    plan_variant,
    provenance,
    random_scheme,
    run_seed,
    schedule,
    stored_random_scheme,
    train_spec,
)
from dpmem.bench.run.subsets import CANARY_MASK_STREAM, make_masks
from dpmem.bench.store.files import atomic_write_json, read_json
from dpmem.bench.store.run_store import RunStore, data_fingerprint
from dpmem.models import resolve_engine
from dpmem.privacy.errors import ConfigError, UsageError


def check_inputs(cfg: Config, *, on_ray: bool = False) -> tuple[Dataset, str]:
    """Load the data and try the model, engine and trainer once, before anything is written.

    Every problem is a ConfigError naming its field: a bad data file, a factory that does not
    import, raises or returns no Module, a module Opacus refuses (BatchNorm), a module that does not
    map the data's inputs to one logit per class, an engine that cannot train it, a trainer that
    does not import (``on_ray``: the device is the Ray workers', checked by the executor). Returns the
    dataset and the engine that will train it, so the run neither loads
    the data nor resolves the engine again."""
    import torch

    from dpmem.models.nets import build_model
    from dpmem.models.plugins import load_callable, one_line
    from dpmem.models.runtime import resolve_device
    # on Ray the workers train, so a driver without a GPU may ask them for one (execution.check_gpus)
    try:
        if not on_ray:
            resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError("device", str(e)) from None
    ds = load_dataset(cfg)
    resources.check_arrays_fit(cfg, ds.n_train, ds.n_test)
    sched = schedule(cfg, ds.n_train)
    if cfg.batch_size > ds.n_train:   # (between the subset and n_train: rate 1, as the audit configs mean it)
        print(f"dpmem: note: batch_size {cfg.batch_size} is larger than the training set ({ds.n_train} examples): "
              f"every step takes each example of a model's subset (sample rate 1, {sched.steps_per_epoch} step per "
              "epoch, no amplification by sampling)", file=sys.stderr)
    for epsilon in cfg.epsilons:   # calibration fails for budgets no noise can meet: say so now
        try:
            plan_variant(cfg, epsilon, sched)
        except ValueError as e:
            raise ConfigError("epsilons", f"cannot train for epsilon {epsilon:g}: {e}") from None
    spec = train_spec(cfg, ds, plan_variant(cfg, None, sched))
    if cfg.trainer:
        load_callable(cfg.trainer, "trainer")
        return ds, "user"
    parameters = resources.parameter_count(spec)
    if parameters is not None:
        resources.check_model_fits(cfg, parameters)
    module = build_model(spec).eval()
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        frozen = sum(1 for _ in module.parameters())
        raise ConfigError("model", f"{cfg.model} has no trainable parameters"
                                   + (f" (all {frozen} have requires_grad=False)" if frozen else ""))
    probe = torch.as_tensor(as_inputs(ds.x_train[:2]))
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
        return ds, resolve_engine(spec, cfg.engine)
    except ValueError as e:
        raise ConfigError("engine", str(e)) from None


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


def check_resume(store: RunStore, cfg: Config) -> None:
    """Refuse, before training, to finish a variant on a device that draws coins and noise by another
    scheme than the one it began with (models/philox.py): its models would no longer share their
    batches with the other variants' models of the same index."""
    for name, _ in cfg.variants:
        plan = store.plan(name)
        if plan is None or store.variant_complete(name):
            continue
        stored, now = stored_random_scheme(plan), random_scheme(cfg, plan.get("engine", cfg.engine))
        if stored != now:
            raise UsageError(f"{store.root}: variant {name} drew its coins and noise with the {stored} scheme, and "
                             f"device {cfg.device!r} draws them with the {now} scheme (models/philox.py); resume "
                             "it on the device it started on, or use another --out")


def run(store: RunStore, cfg: Config, *, progress: bool = True, ds: Dataset | None = None,
        engine: str | None = None, ray_address: str | None = None) -> dict[str, float]:
    """Train every variant's unfinished units; returns training seconds per variant.

    ``ds`` and ``engine`` are what ``check_inputs`` found (loaded and resolved here when not given)."""
    check_resume(store, cfg)
    execution.set_threads(cfg.threads)
    ds, masks = prepare(store, cfg, ds)
    canary_masks = gradient_canary_masks(store, cfg)
    sched = schedule(cfg, ds.n_train)
    x_train = as_inputs(ds.x_train)
    # gradient canaries (if any) are placeholder rows after the real ones, members by their own masks
    rows = with_gradient_canaries(x_train, ds.y_train, masks, canary_masks)
    inputs = {"x_train": rows["x_train"], "y_train": rows["y_train"], "canary": rows.get("canary"),
              "evals": {"train": (x_train, ds.y_train), "test": (as_inputs(ds.x_test), ds.y_test)}}
    cells = []
    for name, epsilon in cfg.variants:
        plan = store.plan(name)
        if plan is None:
            plan = plan_variant(cfg, epsilon, sched)
            spec = train_spec(cfg, ds, plan)
            engine = engine or resolve_engine(spec, cfg.engine)   # one architecture, one engine for every variant
            plan.update(provenance(cfg, engine))
            store.save_plan(name, plan)
        cells.append(units.Cell(name=name, spec=train_spec(cfg, ds, plan), models=cfg.models, seed=run_seed(cfg),
                                noise_seed=noise_seed(cfg, name), engine=plan.get("engine", cfg.engine),
                                masks=rows["masks"]))
    units.train_units(store, cells, inputs, cfg, ray_address=ray_address, progress=progress, desc="training")
    return {name: store.variant_record(name)["train_seconds"] for name, _ in cfg.variants}
