"""Example galleries: the papers' pictures of examples, from a run's own numbers.

Three selections, each a DataFrame (``select``) and a figure (``draw``), written as PNG and PDF
next to the run's other figures by ``write_galleries``:

- ``memorized`` (Feldman & Zhang): per variant, the training examples with the highest
  memorization estimate, each beside typical examples of its class.
- ``pairs`` (Feldman & Zhang): per variant, high-influence pairs that passed false-discovery
  control: a training example beside the test example it raises.
- ``hardest_dp`` (Feldman 2020, Figure 2): per DP variant, the test examples whose accuracy drops
  most from the non-private models to the DP models, beside the easiest of their class.

Intervals are 95% Newcombe (Wilson score) intervals for a difference of two proportions
(statsmodels): mem and infl compare the in-models with the out-models; the accuracy loss compares
the K non-private models with the K DP models.

Inputs are drawn as images (``[C, H, W]`` with 1 or 3 channels, or ``[H, W]``), as line plots
(``[1, L]`` or ``[C, L]`` with C <= 3, e.g. MNIST-1D) or not at all (flat feature vectors: the
synthetic mixtures, Feldman's model, a user's vectors). Where inputs cannot be drawn, or the data
rebuilt now is not the data the run was trained on (its fingerprint differs), the galleries exist
only as tables and the page says why in one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

KINDS = ("memorized", "pairs", "hardest_dp")
ROWS = 8          # focus examples (or pairs) per gallery
BESIDE = 3        # reference examples beside each focus example
LEVEL = 0.95
FILE_PREFIX = "gallery_"


def _newcombe(k1, n1, k2, n2) -> tuple[np.ndarray, np.ndarray]:
    """95% Newcombe interval for p1 - p2 (counts k of n; n > 0)."""
    from statsmodels.stats.proportion import confint_proportions_2indep
    k1, n1, k2, n2 = (np.asarray(a, dtype=float) for a in (k1, n1, k2, n2))
    if k1.size == 0:
        return np.zeros(0), np.zeros(0)
    lo, hi = confint_proportions_2indep(k1, n1, k2, n2, method="newcomb", compare="diff", alpha=1 - LEVEL)
    return np.atleast_1d(lo).astype(float), np.atleast_1d(hi).astype(float)


# -- selections ------------------------------------------------------------------------------

def rule(kind: str, rows: int = ROWS, beside: int = BESIDE) -> str:
    """The selection rule of a gallery, in words (captions and the page quote it)."""
    return {
        "memorized": f"left: the {rows} training examples with the highest memorization estimate (canaries and "
                     f"examples without in- or out-models excluded); right: {beside} typical examples of the same "
                     "class (its largest subgroup first, memorization closest to 0)",
        "pairs": f"the {rows} high-influence pairs with the largest infl that passed false-discovery control, at most "
                 "one per training example; left: training example, right: test example",
        "hardest_dp": f"left: the {rows} test examples with the largest accuracy loss acc(nonprivate) - acc(DP), at "
                      "most one per subgroup (accuracy = share of the K models that classify it correctly); right: "
                      f"the {beside} examples of the same class the DP models get right most often",
    }[kind]


def select_memorized(memorization: pd.DataFrame, variant: str, *, rows: int = ROWS,
                     beside: int = BESIDE) -> pd.DataFrame:
    """Top ``rows`` training examples of ``variant`` by mem, each followed by ``beside`` typical ones.

    Columns: row, role ('memorized' | 'typical'), index, label, subgroup, subgroup_count, mem,
    mem_lo, mem_hi, mem_se, p_in, p_out, n_in, n_out, high_mem (passed false-discovery control).
    """
    rows_v = memorization.loc[memorization["variant"] == variant]
    keep = rows_v["mem"].notna() & (rows_v["n_in"] > 0) & (rows_v["n_out"] > 0)
    if "is_canary" in rows_v:
        keep &= ~rows_v["is_canary"].astype(bool)
    cand = rows_v.loc[keep].copy()
    top = cand.sort_values(["mem", "index"], ascending=[False, True], kind="stable").head(rows)
    rest = cand.loc[~cand["index"].isin(top["index"])].assign(abs_mem=lambda d: d["mem"].abs())
    # typical: from the class's largest subgroups, the examples memorized least
    typical = rest.sort_values(["subgroup_count", "abs_mem", "index"], ascending=[False, True, True], kind="stable")
    parts = []
    for r, (_, ex) in enumerate(top.iterrows()):
        parts.append(ex.to_frame().T.assign(row=r, role="memorized"))
        parts.append(typical.loc[typical["label"] == ex["label"]].head(beside).assign(row=r, role="typical"))
    cols = ["row", "role", "index", "label", "subgroup", "subgroup_count", "mem", "mem_lo", "mem_hi", "mem_se",
            "p_in", "p_out", "n_in", "n_out", "high_mem"]
    if not parts:
        return pd.DataFrame(columns=cols)
    out = pd.concat(parts, ignore_index=True)
    k_in = np.rint(out["p_in"].astype(float) * out["n_in"].astype(float))
    k_out = np.rint(out["p_out"].astype(float) * out["n_out"].astype(float))
    out["mem_lo"], out["mem_hi"] = _newcombe(k_in, out["n_in"], k_out, out["n_out"])
    out = out[cols]
    return out.astype({"row": int, "index": int, "label": int, "subgroup": int, "subgroup_count": int,
                       "mem": float, "mem_se": float, "p_in": float, "p_out": float, "n_in": int, "n_out": int,
                       "high_mem": bool})


def select_pairs(pairs: pd.DataFrame, variant: str, *, masks: np.ndarray, test_correct: np.ndarray,
                 y_train: np.ndarray, y_test: np.ndarray, train_count: np.ndarray,
                 rows: int = ROWS) -> pd.DataFrame:
    """The ``rows`` pairs of ``variant`` with the largest infl, at most one per training example.

    ``pairs`` is influence_pairs (only pairs that passed false-discovery control). Columns: row,
    train_index, test_index, infl, infl_lo, infl_hi, z, mem, train_label, test_label,
    train_subgroup, test_subgroup, same_subgroup, train_subgroup_count.
    """
    cols = ["row", "train_index", "test_index", "infl", "infl_lo", "infl_hi", "z", "mem", "train_label",
            "test_label", "train_subgroup", "test_subgroup", "same_subgroup", "train_subgroup_count"]
    if pairs is None or not len(pairs.columns):
        return pd.DataFrame(columns=cols)
    p = pairs.loc[pairs["variant"] == variant]
    p = p.sort_values(["infl", "z", "train_index", "test_index"], ascending=[False, False, True, True], kind="stable")
    p = p.drop_duplicates("train_index").head(rows).reset_index(drop=True)
    i, j = p["train_index"].to_numpy(int), p["test_index"].to_numpy(int)
    m = np.asarray(masks, bool)[:, i]                         # [K, rows]
    c = np.asarray(test_correct, bool)[:, j]
    n_in = m.sum(0)
    lo, hi = _newcombe((m & c).sum(0), n_in, (~m & c).sum(0), m.shape[0] - n_in)
    out = p.assign(row=np.arange(len(p)), infl_lo=lo, infl_hi=hi, train_label=np.asarray(y_train)[i],
                   test_label=np.asarray(y_test)[j], train_subgroup_count=np.asarray(train_count)[p["train_subgroup"]])
    return out[cols].astype({"same_subgroup": bool})


def select_hardest_dp(reference_correct: np.ndarray, dp_correct: np.ndarray, *, y_test: np.ndarray,
                      g_test: np.ndarray, train_count: np.ndarray, rows: int = ROWS,
                      beside: int = BESIDE) -> pd.DataFrame:
    """Test examples with the largest accuracy loss from the non-private to the DP models (at most one
    per subgroup), each followed by the ``beside`` examples of its class the DP models get right most often.

    Columns: row, role ('hardest' | 'easiest'), test_index, label, subgroup, subgroup_train_count,
    acc_nonprivate, acc_dp, acc_loss, acc_loss_lo, acc_loss_hi.
    """
    ref, dp = np.asarray(reference_correct, bool), np.asarray(dp_correct, bool)
    k_ref, k_dp = ref.sum(0), dp.sum(0)
    frame = pd.DataFrame({"test_index": np.arange(ref.shape[1]), "label": np.asarray(y_test),
                          "subgroup": np.asarray(g_test), "acc_nonprivate": k_ref / ref.shape[0],
                          "acc_dp": k_dp / dp.shape[0]})
    frame["subgroup_train_count"] = np.asarray(train_count)[frame["subgroup"]]
    frame["acc_loss"] = frame["acc_nonprivate"] - frame["acc_dp"]
    # one per subgroup: a rare subgroup's test examples look alike, and one of them makes the point
    hard = frame.sort_values(["acc_loss", "acc_nonprivate", "test_index"], ascending=[False, False, True],
                             kind="stable").drop_duplicates("subgroup").head(rows)
    rest = frame.loc[~frame["test_index"].isin(hard["test_index"])]
    easy = rest.sort_values(["acc_dp", "acc_nonprivate", "test_index"], ascending=[False, False, True], kind="stable")
    parts = []
    for r, (_, ex) in enumerate(hard.iterrows()):
        parts.append(ex.to_frame().T.assign(row=r, role="hardest"))
        parts.append(easy.loc[easy["label"] == ex["label"]].head(beside).assign(row=r, role="easiest"))
    cols = ["row", "role", "test_index", "label", "subgroup", "subgroup_train_count", "acc_nonprivate", "acc_dp",
            "acc_loss", "acc_loss_lo", "acc_loss_hi"]
    out = pd.concat(parts, ignore_index=True)
    idx = out["test_index"].to_numpy(int)
    out["acc_loss_lo"], out["acc_loss_hi"] = _newcombe(k_ref[idx], ref.shape[0], k_dp[idx], dp.shape[0])
    return out[cols].astype({"row": int, "test_index": int, "label": int, "subgroup": int,
                             "subgroup_train_count": int, "acc_nonprivate": float, "acc_dp": float,
                             "acc_loss": float})


def select(kind: str, variant: str, *, store, memorization: pd.DataFrame | None = None,
           pairs: pd.DataFrame | None = None, rows: int = ROWS, beside: int = BESIDE) -> pd.DataFrame:
    """One gallery's selection from a run (a RunStore) and its tables."""
    from dpmem.privacy.errors import UsageError
    cfg = store.config()
    names = [n for n, _ in cfg.variants]
    if kind not in KINDS:
        raise UsageError(f"gallery kind {kind!r}: expected one of {', '.join(KINDS)}")
    if variant not in names:
        raise UsageError(f"gallery variant {variant!r} is not in this run ({', '.join(names)})")
    if kind == "memorized":
        return select_memorized(memorization, variant, rows=rows, beside=beside)
    data = store.data()
    real = ~data["is_canary"].astype(bool)
    train_count = np.bincount(data["g_train"][real], minlength=len(data["subgroup_label"]))
    if kind == "pairs":
        return select_pairs(pairs, variant, masks=store.masks(), test_correct=store.variant_arrays(variant)["test_correct"],
                            y_train=data["y_train"], y_test=data["y_test"], train_count=train_count, rows=rows)
    if variant == names[0]:
        raise UsageError(f"gallery 'hardest_dp' compares a DP variant with {names[0]!r}; choose one of "
                         f"{', '.join(names[1:]) or '(none in this run)'}")
    return select_hardest_dp(store.variant_arrays(names[0])["test_correct"],
                             store.variant_arrays(variant)["test_correct"], y_test=data["y_test"],
                             g_test=data["g_test"], train_count=train_count, rows=rows, beside=beside)


# -- drawing ---------------------------------------------------------------------------------

def input_kind(input_shape: tuple[int, ...]) -> str | None:
    """'image', 'series' or None (flat vectors: nothing faithful to draw)."""
    shape = tuple(input_shape)
    if len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) > 1:
        return "image"
    if len(shape) == 2 and shape[0] <= 3:
        return "series"
    if len(shape) == 2 and min(shape) > 1:
        return "image"
    return None


@dataclass(frozen=True)
class Inputs:
    """Unstandardised inputs of a run's examples, to draw them."""
    kind: str                       # 'image' | 'series'
    x_train: np.ndarray
    x_test: np.ndarray
    lo: float = 0.0                 # a shared colour / y range for every cell
    hi: float = 1.0

    @classmethod
    def from_dataset(cls, ds) -> Inputs | None:
        kind = input_kind(ds.input_shape)
        if kind is None:
            return None
        mean = 0.0 if ds.x_mean is None else ds.x_mean
        std = 1.0 if ds.x_std is None else ds.x_std
        x_train = ds.x_train * std + mean
        x_test = ds.x_test * std + mean
        both = np.concatenate([x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)])
        lo, hi = float(np.min(both)), float(np.max(both))
        return cls(kind=kind, x_train=x_train, x_test=x_test, lo=lo, hi=hi if hi > lo else lo + 1.0)


def _cell(ax, x: np.ndarray, inputs: Inputs, colour: str, text: str) -> None:
    if inputs.kind == "image":
        img = x if x.ndim == 2 else (x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0)))
        if img.ndim == 2:
            ax.imshow(img, cmap="gray_r" if inputs.lo >= 0 else "gray", vmin=inputs.lo, vmax=inputs.hi,
                      interpolation="nearest")
        else:
            ax.imshow(np.clip((img - inputs.lo) / (inputs.hi - inputs.lo), 0, 1), interpolation="nearest")
    else:
        series = x if x.ndim == 2 else x[None]
        for s in series:
            ax.plot(np.arange(len(s)), s, lw=1.0, color="k")
        ax.set_ylim(inputs.lo, inputs.hi)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(colour)
        spine.set_linewidth(2.0 if colour != "0.6" else 0.8)
    if text:
        ax.set_title(text, fontsize=6, loc="left")


def _2f(v: float) -> str:
    text = f"{v:.2f}"
    return "0.00" if text == "-0.00" else text      # a tiny negative estimate is shown as 0.00, not -0.00


def _interval(v: float, lo: float, hi: float) -> str:
    return f"{_2f(v)} [{_2f(lo)}, {_2f(hi)}]"


def _cells(kind: str, frame: pd.DataFrame) -> list[tuple[int, int, str, int, str, str]]:
    """(grid row, grid column, split, example index, frame colour, text) for every drawn example."""
    cells = []
    if kind == "pairs":
        per_line = 2
        for n, (_, p) in enumerate(frame.iterrows()):
            r, c = n // per_line, 2 * (n % per_line)
            cells.append((r, c, "train", int(p["train_index"]), "C3",
                          f"train #{int(p['train_index'])} label {int(p['train_label'])}\n"
                          f"subgroup {int(p['train_subgroup'])} (n={int(p['train_subgroup_count'])})\n"
                          f"mem {p['mem']:.2f}"))
            cells.append((r, c + 1, "test", int(p["test_index"]), "C0",
                          f"test #{int(p['test_index'])} label {int(p['test_label'])}\n"
                          f"infl {_interval(p['infl'], p['infl_lo'], p['infl_hi'])}\n"
                          f"z {p['z']:.1f}, {'same' if p['same_subgroup'] else 'other'} subgroup"))
        return cells
    focus = "memorized" if kind == "memorized" else "hardest"
    for r, block in frame.groupby("row", sort=True):
        for c, (_, ex) in enumerate(block.iterrows()):
            colour = "C3" if ex["role"] == focus else "0.6"
            if kind == "memorized":
                head = f"#{int(ex['index'])} label {int(ex['label'])}" + (" *" if ex["high_mem"] else "")
                cells.append((int(r), c, "train", int(ex["index"]), colour,
                              f"{head}\nsubgroup {int(ex['subgroup'])} (n={int(ex['subgroup_count'])})\n"
                              f"mem {_interval(ex['mem'], ex['mem_lo'], ex['mem_hi'])}"))
            else:
                cells.append((int(r), c, "test", int(ex["test_index"]), colour,
                              f"test #{int(ex['test_index'])} label {int(ex['label'])}\n"
                              f"subgroup {int(ex['subgroup'])} (n={int(ex['subgroup_train_count'])})\n"
                              f"acc {ex['acc_nonprivate']:.2f} -> {ex['acc_dp']:.2f}\n"
                              f"loss {_interval(ex['acc_loss'], ex['acc_loss_lo'], ex['acc_loss_hi'])}"))
    return cells


def draw(kind: str, frame: pd.DataFrame, inputs: Inputs, *, caption: str):
    """A gallery figure of ``frame`` (a selection of ``kind``) with ``caption`` above it.

    Every cell is placed in inches (no tight-layout passes: one render per file)."""
    import textwrap

    import matplotlib.pyplot as plt
    cells = _cells(kind, frame)
    n_rows = 1 + max((r for r, *_ in cells), default=0)
    n_cols = 1 + max((c for _, c, *_ in cells), default=0)
    lines = 1 + max((t.count("\n") for *_, t in cells), default=0)
    pic_w, pic_h = (1.0, 1.0) if inputs.kind == "image" else (1.5, 0.8)
    text_h = 0.11 * lines + 0.06
    cell_w, cell_h = max(pic_w, 1.45) + 0.12, pic_h + text_h + 0.12
    margin = 0.15
    width = 2 * margin + n_cols * cell_w + (0.25 if kind == "pairs" else 0.2)
    wrapped = textwrap.wrap(caption, width=int(width * 16))
    head = 0.15 + 0.12 * len(wrapped)
    height = head + n_rows * cell_h + margin
    fig = plt.figure(figsize=(width, height))
    fig.text(margin / width, 1 - 0.08 / height, "\n".join(wrapped), fontsize=7, ha="left", va="top")
    for r, c, split, index, colour, text in cells:
        gap = 0.2 if (kind == "pairs" and c >= 2) or (kind != "pairs" and c >= 1) else 0.0
        x0 = margin + c * cell_w + gap
        y0 = height - head - (r + 1) * cell_h + 0.06
        ax = fig.add_axes((x0 / width, y0 / height, pic_w / width, pic_h / height))
        _cell(ax, (inputs.x_train if split == "train" else inputs.x_test)[index], inputs, colour, "")
        fig.text(x0 / width, (y0 + pic_h + 0.04) / height, text, fontsize=6, ha="left", va="bottom")
    return fig


def save(fig, out: Path, stem: str) -> list[Path]:
    """PNG and PDF of a gallery, each written atomically; the PDF without a creation date, so the
    same numbers give the same bytes."""
    import io

    import matplotlib.pyplot as plt

    from dpmem.bench.store.files import atomic_write_bytes
    paths = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=150, metadata={"CreationDate": None} if ext == "pdf" else None)
        path = Path(out) / f"{stem}.{ext}"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths


# -- writing ---------------------------------------------------------------------------------

@dataclass
class Gallery:
    kind: str
    variant: str
    caption: str
    frame: pd.DataFrame
    paths: list[Path] = field(default_factory=list)   # PNG and PDF; empty when nothing was drawn
    note: str = ""                                     # why there is no picture


@dataclass
class Galleries:
    items: list[Gallery]
    note: str = ""           # one line: why inputs are not drawn (run-wide), or ""


def caption(kind: str, variant: str, *, run_name: str, models: int, rows: int = ROWS, beside: int = BESIDE) -> str:
    title = {"memorized": "Most memorized", "pairs": "High-influence pairs", "hardest_dp": "Hardest for DP"}[kind]
    legend = {"memorized": " * = passed false-discovery control.", "pairs": "", "hardest_dp": ""}[kind]
    return (f"{title}: run {run_name}, variant {variant}, K = {models} models per variant. "
            f"{rule(kind, rows, beside)}. n = training examples of the subgroup; intervals: 95% Newcombe.{legend}")


def drawable_inputs(store, ds=None) -> tuple[Inputs | None, str]:
    """The run's inputs to draw, or None and one line saying why not."""
    from dpmem.bench.store.run_store import data_fingerprint
    from dpmem.privacy.errors import ConfigError, UsageError
    cfg = store.config()
    if ds is None:
        from dpmem.bench.data import load_dataset
        try:
            ds = load_dataset(cfg)
        except (UsageError, ConfigError, OSError, ImportError) as e:
            return None, f"galleries as tables only: the inputs of dataset {cfg.dataset!r} could not be loaded ({e})"
    stored = store.fingerprint()
    if stored is not None:
        now = data_fingerprint(ds)
        if any(stored.get(k) not in (None, v) for k, v in now.items()):
            return None, ("galleries as tables only: the data rebuilt now differs from the data this run was "
                          "trained on (data fingerprint)")
    inputs = Inputs.from_dataset(ds)
    if inputs is None:
        return None, (f"galleries as tables only: dataset {cfg.dataset!r} has flat {ds.input_shape[0]}-dimensional "
                      "input vectors, which have no faithful picture")
    return inputs, ""


def write_galleries(analysis, store, out: Path, *, ds=None, rows: int = ROWS, beside: int = BESIDE) -> Galleries:
    """Select and draw every gallery of a run into ``out/figures`` (PNG and PDF).

    Files: gallery_memorized_VARIANT, gallery_pairs_VARIANT (variants with pairs that passed
    false-discovery control), gallery_hardest_dp_VARIANT (DP variants). Gallery files of an earlier
    report that this one does not write are removed, so none describes other numbers.
    """
    cfg = store.config()
    names = [n for n, _ in cfg.variants]
    inputs, note = drawable_inputs(store, ds)
    run_name = f"{Path(store.root).resolve().name} ({cfg.hash()[:8]})"
    items = []
    for kind in KINDS:
        for variant in names:
            if kind == "hardest_dp" and variant == names[0]:
                continue
            frame = select(kind, variant, store=store, memorization=analysis.memorization, pairs=analysis.pairs,
                           rows=rows, beside=beside)
            models = analysis.summary["variants"][variant]["models"]
            g = Gallery(kind=kind, variant=variant, frame=frame,
                        caption=caption(kind, variant, run_name=run_name, models=models, rows=rows, beside=beside))
            if not len(frame):
                g.note = ("no pair passed false-discovery control" if kind == "pairs"
                          else "no example to show")
            elif inputs is not None:
                g.paths = save(draw(kind, frame, inputs, caption=g.caption), Path(out) / "figures",
                               f"{FILE_PREFIX}{kind}_{variant}")
            items.append(g)
    written = {p.name for g in items for p in g.paths}
    figures = Path(out) / "figures"
    if figures.is_dir():
        for old in figures.glob(f"{FILE_PREFIX}*"):
            if old.name not in written and old.suffix in (".png", ".pdf"):
                old.unlink()
    return Galleries(items=items, note=note)
