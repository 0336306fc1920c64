"""The benchmark configuration: one frozen dataclass, loaded from TOML/YAML plus key=value overrides.

Every field is validated here, so a bad value fails before any work starts and names its field.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from dpmem.models import ENGINES
from dpmem.models.plugins import is_import_path
from dpmem.models.spec import AUGMENTS
from dpmem.privacy.errors import ConfigError, UsageError
from dpmem.privacy.faults import FAULTS

# The names of datasets, architectures and samplings live in their registries (bench/data.py
# DATASETS, models/nets.py ARCHITECTURES, privacy/audit.py SAMPLINGS); validate() looks them up
# on first use, since those modules import this one or pull in heavy libraries.
DEVICES = ("auto", "cpu", "cuda")
ACCOUNTANTS = ("prv", "rdp", "gdp")
FELDMAN_PRIORS = ("zipf", "uniform")
FELDMAN_INPUTS = ("onehot", "embedding")
# How a run executes, not what it computes: excluded from the config hash, so a run can be resumed
# with other values (every split of the work gives the same arrays: model k's randomness depends
# only on the seed, k and the variant).
EXECUTION = ("unit_size", "threads", "workers", "device", "gpus_per_unit")
# Version of the run directory layout. Format 1 (no marker in config.json) hashed every field,
# execution settings included, and drew seeds per unit.
STORE_FORMAT = 2
# Fields added to the identity after STORE_FORMAT 2, with the value that means "as before".
ADDED_DEFAULTS = {"augment": "none", "augment_multiplicity": 1}


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a run computes from, validated when constructed: a value of the wrong type or out of
    range raises ``ConfigError`` naming its field. Every field is a config key of ``dpmem run``
    (the [Config keys](../reference/config.md) page gives each with its default); build one with
    ``dpmem.load_config`` from a file, a dict or overrides, or directly as ``Config(models=64, ...)``.
    ``hash()`` identifies the run's numbers (execution settings excluded)."""

    # data
    dataset: str = "digits"          # a name in bench/data.py DATASETS; "file" reads data_path
    data_path: str = ""              # dataset = "file": an .npz with x_train, y_train, x_test, y_test
    data_root: str = ""              # local root for torchvision datasets
    download: bool = False           # torchvision datasets only; needs a network
    n_train: int = 0                 # target training-set size after long-tail resampling (0: dataset default)
    n_test: int = 0                  # synthetic only (0: default)
    clusters_per_class: int = 10     # subgroups per class for image datasets
    zipf_a: float = 1.0              # subgroup frequencies ~ 1 / rank**zipf_a (dataset=file: 0 keeps it as given)
    n_subgroups: int = 200           # synthetic: subpopulations; feldman: domain size t (each point its own)
    dim: int = 64                    # synthetic; feldman with feldman_inputs = "embedding"
    feldman_prior: str = "zipf"      # feldman: point frequencies ~ 1 / rank**zipf_a ("zipf") or equal ("uniform")
    feldman_inputs: str = "onehot"   # feldman: a point's input is its one-hot vector or a fixed N(0, I_dim) vector
    noise_scale: float = 1.0         # synthetic only: within-subgroup spread
    label_noise: float = 0.0         # probability a training label is replaced at random
    canaries: int = 0                # mislabeled training examples added to raise audit power
    # model and training
    model: str = "mlp"               # logreg | mlp | cnn, or a factory "package.module:function"
    hidden: tuple[int, ...] = (128,)
    epochs: int = 20
    batch_size: int = 64             # expected Poisson batch size
    lr: float = 0.5
    momentum: float = 0.0
    weight_decay: float = 0.0        # L2 penalty (makes logreg strongly convex)
    max_grad_norm: float = 1.0
    augment: str = "none"            # none | crop | flip | crop-flip: per example and step (models/augment.py)
    augment_multiplicity: int = 1    # augmented copies per example; their gradients are averaged before clipping
    engine: str = "auto"             # auto | batched | opacus | user (models/__init__.py ENGINES)
    trainer: str = ""                # "package.module:fit": user code trains every model (models/user_engine.py)
    # privacy
    epsilons: tuple[float, ...] = (1.0, 4.0, 16.0)
    delta: float = 1e-5
    accountant: str = "prv"          # Opacus's PrivacyEngine default (privacy/accounting.py)
    fault: str = "none"              # privacy/faults.py FAULTS: plant a DP-SGD bug to test the audit
    gradient_canaries: int = 0       # canaries per model whose gradient is chosen (white-box audit; 0: off)
    canary_norm: float = 1.0         # their gradient norm, in units of the claimed max_grad_norm (of 1 without DP)
    # subsets and estimators
    models: int = 1000               # K models per variant
    sampling: str = "bernoulli"
    q: float = 0.7
    mem_threshold: float = 0.25
    infl_threshold: float = 0.15
    alpha: float = 0.05              # audit significance level (family-wise, Bonferroni)
    fdr: float = 0.1                 # false-discovery rate of the listed high-mem examples and influence pairs
    seed: int = 0
    # execution (EXECUTION: not part of the run's identity)
    unit_size: int = 250            # models per stored, resumable unit (and per Ray task)
    # torch threads, set once per process (0: OMP_NUM_THREADS, else the cores; with workers, cores // workers)
    threads: int = 0
    workers: int = 0                 # 0: train in this process; N: N Ray workers (local runtime or cluster)
    device: str = "auto"             # where models train: auto (CUDA when visible), cpu or cuda
    gpus_per_unit: float = 1.0       # with device = cuda on Ray: the GPUs each unit asks for (0.5 packs two per GPU)

    def __post_init__(self) -> None:
        validate(self)

    # -- identity ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def identity(self) -> dict:
        """The fields that change a run's numbers (everything but EXECUTION). Fields added since
        format 2 enter only when set, so runs written before them keep their hash (and resume)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in EXECUTION and not (k in ADDED_DEFAULTS and v == ADDED_DEFAULTS[k])}

    def hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def execution(self) -> dict:
        return {k: getattr(self, k) for k in EXECUTION}

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    @property
    def variants(self) -> list[tuple[str, float | None]]:
        """(name, target epsilon) of every variant, non-private first."""
        return [("nonprivate", None)] + [(variant_name(e), e) for e in self.epsilons]


def variant_name(epsilon: float) -> str:
    return f"dp-eps{epsilon:g}"


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(name, msg)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a tuple of {typing.get_args(hint)[0].__name__}"
    return {int: "an integer", float: "a number", str: "a string", bool: "True or False"}[hint]


def _has_type(value, hint) -> bool:
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_has_type(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_types(c: Config) -> None:
    """Every field holds its declared type: ``Config(models="x")`` is refused naming ``models``
    before a comparison deep inside fails (files and overrides are converted by ``_coerce`` first)."""
    for name, hint in _HINTS.items():
        value = getattr(c, name)
        is_tuple = typing.get_origin(hint) is tuple
        if is_tuple and isinstance(value, list):
            value = tuple(value)             # Config(hidden=[64, 64]) as (64, 64)
        if not _has_type(value, hint):
            example = (" such as (64,)" if typing.get_args(hint)[0] is int else " such as (1.0, 4.0)") if is_tuple else ""
            raise ConfigError(name, f"must be {_type_name(hint)}{example}, got {value!r}")
        # ints where floats are declared become floats, as a file's values do (the same hash either way)
        if hint is float:
            value = float(value)
        elif is_tuple and typing.get_args(hint)[0] is float:
            value = tuple(float(v) for v in value)
        if value is not getattr(c, name):
            object.__setattr__(c, name, value)


def validate(c: Config) -> None:
    from dpmem.bench.data import DATASETS
    from dpmem.privacy.audit import SAMPLINGS
    from dpmem.privacy.one_run import ONE_RUN_MAX_MODELS
    _check_types(c)
    # Infinite or NaN floats pass most range checks below (inf > 0) and then train NaN models.
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            _check(not isinstance(v, float) or math.isfinite(v), f.name, f"must be finite, got {v}")
    _check(c.dataset in DATASETS, "dataset", f"unknown dataset {c.dataset!r}; choose from {', '.join(DATASETS)}")
    _check(c.dataset != "file" or bool(c.data_path), "data_path", "dataset = 'file' needs data_path = PATH.npz")
    _check(c.dataset == "file" or not c.data_path, "data_path", f"only read with dataset = 'file', not {c.dataset!r}")
    if not is_import_path(c.model):
        from dpmem.models.nets import ARCHITECTURES
        _check(c.model in ARCHITECTURES, "model", f"unknown model {c.model!r}; choose from "
               f"{', '.join(ARCHITECTURES)} or give a factory as package.module:function")
    _check(c.sampling in SAMPLINGS, "sampling", f"unknown sampling {c.sampling!r}; choose from {', '.join(SAMPLINGS)}")
    _check(c.engine == "auto" or c.engine in ENGINES, "engine",
           f"unknown engine {c.engine!r}; choose from auto, {', '.join(ENGINES)}")
    _check(not c.trainer or is_import_path(c.trainer), "trainer",
           f"{c.trainer!r} is not of the form package.module:function")
    _check(not c.trainer or c.engine in ("auto", "user"), "engine",
           f"a trainer trains the models itself; engine must be auto or user, not {c.engine!r}")
    _check(c.engine != "user" or bool(c.trainer), "trainer", "engine = 'user' needs trainer = package.module:fit")
    _check(c.accountant in ACCOUNTANTS, "accountant",
           f"unknown accountant {c.accountant!r}; choose from {', '.join(ACCOUNTANTS)}")
    _check(c.fault in FAULTS, "fault", f"unknown fault {c.fault!r}; choose from {', '.join(FAULTS)}")
    _check(0.0 < c.q < 1.0, "q", f"must be in (0, 1), got {c.q}")
    for e in c.epsilons:
        _check(math.isfinite(e) and e > 0, "epsilons", f"every target epsilon must be positive and finite, got {e}")
    _check(len(set(c.epsilons)) == len(c.epsilons), "epsilons", "duplicate target epsilon")
    _check(0.0 < c.delta < 1.0, "delta", f"must be in (0, 1), got {c.delta}")
    _check(0.0 < c.alpha < 1.0, "alpha", f"must be in (0, 1), got {c.alpha}")
    _check(0.0 < c.fdr < 1.0, "fdr", f"must be in (0, 1), got {c.fdr}")
    _check(c.models >= 2 or c.gradient_canaries > 0, "models",
           f"need at least 2 models per variant (or gradient canaries for the one-run audit), got {c.models}")
    _check(c.unit_size >= 1, "unit_size", f"must be >= 1, got {c.unit_size}")
    _check(c.epochs >= 1, "epochs", f"must be >= 1, got {c.epochs}")
    _check(c.batch_size >= 1, "batch_size", f"must be >= 1, got {c.batch_size}")
    _check(c.lr > 0 and math.isfinite(c.lr), "lr", f"must be positive, got {c.lr}")
    _check(0.0 <= c.momentum < 1.0, "momentum", f"must be in [0, 1), got {c.momentum}")
    _check(c.weight_decay >= 0, "weight_decay", f"must be >= 0, got {c.weight_decay}")
    _check(c.noise_scale >= 0, "noise_scale", f"must be >= 0, got {c.noise_scale}")
    _check(c.seed >= 0, "seed", f"must be >= 0, got {c.seed}")
    _check(c.max_grad_norm > 0, "max_grad_norm", f"must be positive, got {c.max_grad_norm}")
    _check(c.augment in AUGMENTS, "augment", f"unknown augment {c.augment!r}; choose from {', '.join(AUGMENTS)}")
    _check(c.augment_multiplicity >= 1, "augment_multiplicity", f"must be >= 1, got {c.augment_multiplicity}")
    _check(c.augment_multiplicity == 1 or c.augment != "none", "augment_multiplicity",
           "copies of an example differ only by augmentation: set augment too")
    _check(c.augment == "none" or not c.trainer, "augment",
           "augmentation is done by dpmem's own engines; a user trainer augments its own data")
    _check(0.0 <= c.label_noise < 1.0, "label_noise", f"must be in [0, 1), got {c.label_noise}")
    _check(c.canaries >= 0, "canaries", f"must be >= 0, got {c.canaries}")
    _check(c.gradient_canaries >= 0, "gradient_canaries", f"must be >= 0, got {c.gradient_canaries}")
    _check(c.gradient_canaries == 0 or c.models > ONE_RUN_MAX_MODELS or c.q == 0.5, "gradient_canaries",
           f"with models <= {ONE_RUN_MAX_MODELS} the canary audit is the one-run audit, whose guessing game needs "
           f"canaries included with probability q = 0.5; got models = {c.models}, q = {c.q:g}")
    _check(c.canary_norm > 0 and math.isfinite(c.canary_norm), "canary_norm",
           f"must be positive and finite, got {c.canary_norm}")
    _check(c.n_train >= 0, "n_train", f"must be >= 0, got {c.n_train}")
    _check(c.n_test >= 0, "n_test", f"must be >= 0, got {c.n_test}")
    _check(c.clusters_per_class >= 1, "clusters_per_class", f"must be >= 1, got {c.clusters_per_class}")
    _check(c.zipf_a >= 0, "zipf_a", f"must be >= 0, got {c.zipf_a}")
    _check(c.n_subgroups >= 1, "n_subgroups", f"must be >= 1, got {c.n_subgroups}")
    _check(c.dim >= 1, "dim", f"must be >= 1, got {c.dim}")
    _check(c.feldman_prior in FELDMAN_PRIORS, "feldman_prior",
           f"unknown prior {c.feldman_prior!r}; choose from {', '.join(FELDMAN_PRIORS)}")
    _check(c.feldman_inputs in FELDMAN_INPUTS, "feldman_inputs",
           f"unknown inputs {c.feldman_inputs!r}; choose from {', '.join(FELDMAN_INPUTS)}")
    if c.dataset == "feldman":
        # Feldman's model has clean labels from one function; noise or mislabeled canaries would change opt.
        _check(c.label_noise == 0, "label_noise", "must be 0 for dataset feldman (labels are a function of the point)")
        _check(c.canaries == 0, "canaries", "must be 0 for dataset feldman (labels are a function of the point)")
    _check(all(h >= 1 for h in c.hidden), "hidden", f"widths must be >= 1, got {list(c.hidden)}")
    _check(0.0 <= c.mem_threshold <= 1.0, "mem_threshold", f"must be in [0, 1], got {c.mem_threshold}")
    _check(0.0 <= c.infl_threshold <= 1.0, "infl_threshold", f"must be in [0, 1], got {c.infl_threshold}")
    _check(c.threads >= 0, "threads", f"must be >= 0, got {c.threads}")
    _check(c.device in DEVICES, "device", f"unknown device {c.device!r}; choose from {', '.join(DEVICES)}")
    _check(c.workers >= 0, "workers", f"must be >= 0, got {c.workers}")
    # Ray schedules fractions of one GPU, or whole GPUs
    _check(c.gpus_per_unit > 0 and (c.gpus_per_unit <= 1 or float(c.gpus_per_unit).is_integer()), "gpus_per_unit",
           f"must be a fraction in (0, 1] or a whole number of GPUs, got {c.gpus_per_unit}")


# -- loading ---------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def _coerce(name: str, value):
    """Turn a file value or a command-line string into the field's type."""
    hint = typing.get_type_hints(Config)[name]
    origin = typing.get_origin(hint)
    try:
        if origin is tuple:
            (item_type, _) = typing.get_args(hint)
            if isinstance(value, str):   # "1,4,16" or, as a TOML list, "[1, 4, 16]"
                text = value.strip()
                if text.startswith("[") and text.endswith("]"):
                    text = text[1:-1]
                value = [v.strip() for v in text.split(",") if v.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            if any(isinstance(v, bool) for v in value):
                raise ValueError(value)
            return tuple(item_type(v) for v in value)
        if hint in (int, float) and isinstance(value, bool):
            raise ValueError(value)     # TOML/YAML `lr = true` is not 1.0
        if hint is str and not isinstance(value, str):
            raise ValueError(value)
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if hint is int and isinstance(value, str):
            return int(float(value)) if float(value).is_integer() else int(value)
        return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(name, f"cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None


# Keys that were renamed: a stored run's config.json may still carry the old name.
RENAMED = {"chunk_size": "unit_size"}


def _apply(values: dict, source: str, *, stored: bool = False) -> dict:
    out = {}
    for key, value in values.items():
        if stored and key in RENAMED:
            key = RENAMED[key]
        elif key in RENAMED:
            raise ConfigError(key, f"renamed to {RENAMED[key]!r} (in {source})")
        if key not in _FIELDS and isinstance(value, dict):
            # a TOML [section] or a nested YAML/JSON table: the config is one flat table
            raise ConfigError(key, f"config files have no sections or nested tables (in {source}); "
                                   f"write the keys of [{key}] at the top level, without the heading")
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, _FIELDS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(_FIELDS)}"
            raise ConfigError(key, f"no such config key (in {source}); {hint}")
        out[key] = _coerce(key, value)
    return out


class _DuplicateKey(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"key {key!r} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"key {key!r} is given twice")
        out[key] = value
    return out


# The configs shipped with the package (bench/configs/*.toml, package data): `dpmem run audit`.
SHIPPED = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> dict[str, Path]:
    """The shipped configs by name (file stem), sorted."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.toml"))}


def describe(path: Path) -> str:
    """A config file's one-line description: the first sentence of its opening comment, cut at its
    first top-level colon when long."""
    lines: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or (lines and not line.strip("# ")):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    sentence = re.split(r"(?<=\.)\s+(?=[A-Z`])", text, maxsplit=1)[0]
    if len(sentence) > 100:
        depth = 0
        for i, ch in enumerate(sentence):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if ch == ":" and depth == 0:
                return sentence[:i]
    return sentence


def resolve_path(path: str | Path) -> Path:
    """A config file: the path itself when it is a file, else a shipped config of that name
    (``audit`` or ``audit.toml``), so an installed wheel runs them from any folder."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name[:-len(".toml")] if path.name.endswith(".toml") else path.name
    if path.parent == Path(".") and name in shipped:
        return shipped[name]
    raise UsageError(f"config file not found: {path} (the shipped configs, by name: {', '.join(shipped)})")


def read_file(path: str | Path) -> dict:
    if not isinstance(path, (str, Path)):
        raise UsageError(f"config: expected a file path (str or Path), a dict or a Config, got {path!r}")
    path = resolve_path(path)
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        elif path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        else:
            raise UsageError(f"config file {path}: use .toml, .yaml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError, _DuplicateKey) as e:
        raise UsageError(f"config file {path} is not valid: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: expected a table of key = value")
    return data


def parse_overrides(items: list[str]) -> dict:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        if key.strip() in out:
            raise UsageError(f"override {key.strip()!r} is given twice ({key.strip()}={out[key.strip()]} and {item})")
        out[key.strip()] = value.strip()
    return out


def load(path: str | Path | None = None, overrides: list[str] | dict | None = None,
         base: Config | None = None) -> Config:
    """Defaults (or ``base``), then the file, then the overrides; validated."""
    values = dict(base.to_dict()) if base is not None else {}
    if path is not None:
        values.update(_apply(read_file(path), str(path)))
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        values.update(_apply(ov, "overrides"))
    return Config(**_apply(values, "config") if base is not None else values)


def from_dict(d: dict) -> Config:
    """The config a run directory stored (config.json)."""
    return Config(**_apply(d, "config.json", stored=True))
