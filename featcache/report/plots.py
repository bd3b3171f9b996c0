"""Report figures rendered with matplotlib's Agg backend to PNG bytes (and SVG/PDF when asked for).

PNG bytes can be embedded as data URIs (self-contained HTML) and written next to the Markdown; no
figure ever references a file or a URL; vector copies go to report_files/ only. Every string from data
goes through :func:`_t` because matplotlib would otherwise read ``$...$`` in a label as math markup
(and fail on a lone ``$``).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from featcache.metrics import rank_score
from featcache.report.collect import Predictions, RunRecord
from featcache.report.scores import (
    LOWER_IS_BETTER,
    THRESHOLD_FREE,
    auc_binary,
    average_precision,
    calibration_bins,
    confidence_bins,
    confusion,
    pr_points,
    predict,
    roc_points,
    scores,
)
from featcache.runs import threshold_text

BLUE, ORANGE, GREY, GREEN = "#1f5fa8", "#e07b00", "#8a8f98", "#2e8540"
# one colour and one line style per class of a multi-class ROC (styles keep them apart in greyscale)
CLASS_STYLES = ((BLUE, "-"), (ORANGE, "--"), (GREEN, "-."), ("#7b3294", ":"), ("#c51b7d", "-"),
                ("#4d4d4d", "--"))


def _plt():
    """pyplot on the Agg backend, imported lazily so `featcache --help` stays fast."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "svg.fonttype": "path",
            "svg.hashsalt": "featcache",  # fixed element ids: the same figure gives the same SVG bytes
            "pdf.fonttype": 42,  # TrueType, so text stays editable in a journal's tools
        }
    )
    return plt


def _t(text: object) -> str:
    """Literal text for matplotlib: escape the mathtext trigger."""
    return str(text).replace("$", r"\$")


PNG_DPI = 150  # print quality for report_files/; the HTML shows each figure at its 90-dpi size
SCREEN_DPI = 90
VECTOR_FORMATS = ("svg", "pdf")  # what `report --figure-formats` may add beside each PNG
# no dates or tool names in the files: the same runs give byte-identical figures
_VECTOR_METADATA = {"svg": {"Date": None, "Creator": None}, "pdf": {"CreationDate": None, "Creator": None,
                                                                    "Producer": None}}


@dataclass
class Rendered:
    """One figure as a PNG (embedded in the HTML) and, when asked for, as vector files for papers."""

    png: bytes
    vector: dict[str, bytes] = field(default_factory=dict)  # format ("svg", "pdf") -> file content


def _render(fig, formats: Sequence[str] = ()) -> Rendered:
    """The PNG, plus the ``formats`` of VECTOR_FORMATS (a journal wants vector art; a 150-dpi PNG
    blurs when a panel is enlarged)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, bbox_inches="tight", metadata={"Software": None})
    vector: dict[str, bytes] = {}
    for fmt in formats:
        out = io.BytesIO()
        fig.savefig(out, format=fmt, bbox_inches="tight", metadata=_VECTOR_METADATA[fmt])
        vector[fmt] = out.getvalue()
    _plt().close(fig)
    return Rendered(buf.getvalue(), vector)


def _confusion_ax(ax, pred: Predictions, threshold: float | None, title: str) -> None:
    k = pred.proba.shape[1]
    cm = confusion(pred.y_true, predict(pred, threshold), k)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{norm[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.55 else "black",
            )
    labels = [_t(c) for c in pred.classes]
    ax.set_xticks(range(k), labels, rotation=20 if k > 2 else 0)
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(_t(title))


def _roc_ax(ax, rec: RunRecord, threshold: float | None) -> None:
    """ROC of validation and test predictions; 0.5 and the chosen threshold marked on each."""
    ax.plot([0, 1], [0, 1], color=GREY, lw=0.8, ls=":")
    marked: set[str] = set()
    areas, points = [], []
    for split, color in (("val", BLUE), ("test", ORANGE)):
        pred = getattr(rec, split)
        if pred is None or pred.proba.shape[1] != 2 or len(set(pred.y_true.tolist())) < 2:
            continue
        ranked = rank_score(pred.proba, 1)  # P(class 1), saturated ties broken as the AUC breaks them
        fpr, tpr, _ = roc_points(pred.y_true, ranked)
        area = auc_binary(pred.y_true, ranked)
        areas.append(area)
        # validation dashed: the two stay apart where they coincide, and in greyscale
        ax.plot(fpr, tpr, color=color, lw=1.6, ls="--" if split == "val" else "-",
                label=f"{split} (AUC {area:.3f})")
        for thr, marker, name in ((0.5, "o", "0.5"), (threshold, "*", "chosen")):
            if thr is None:
                continue
            yp = pred.proba[:, 1] >= thr
            sens = yp[pred.y_true == 1].mean()
            fp = yp[pred.y_true == 0].mean()
            points.append((fp, sens))
            ax.plot(
                [fp],
                [sens],
                marker=marker,
                ms=9 if marker == "*" else 6,
                color=color,
                mec="black",
                mew=0.6,
                ls="none",
                label=None if name in marked else f"threshold {name}",  # one legend entry per marker
            )
            marked.add(name)
    zoom = bool(areas) and min(areas) >= ZOOM_AUC  # the whole square shows a corner and nothing else
    if zoom:  # one span on both axes: a ROC's shape only reads right with equal scales
        span = max(max([ZOOM_SPAN, *(fp + 0.03 for fp, _ in points)]) + 0.005,
                   1.005 - min([1 - ZOOM_SPAN, *(se - 0.03 for _, se in points)]))
        ax.set_xlim(-0.005, -0.005 + span)
        ax.set_ylim(1.005 - span, 1.005)
    else:
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("sensitivity")
    thr_txt = threshold_text(threshold)
    ax.set_title(f"ROC (● 0.5, ★ chosen {thr_txt})" + (", corner" if zoom else ""))
    _legend(ax, "lower right")


def _one_vs_rest(pred: Predictions) -> Iterator[tuple[str, np.ndarray, np.ndarray, str, str]]:
    """(class name, 0/1 truth, score ranking the class first, colour, line style) of each class present in
    the split: an absent class has no curve (its AUC and AP are undefined). The scores rank as the AUC
    does, saturated ties broken by the other classes' probabilities."""
    for c, name in enumerate(pred.classes):
        truth = (pred.y_true == c).astype(int)
        if truth.min() != truth.max():
            yield (name, truth, rank_score(pred.proba, c), *CLASS_STYLES[c % len(CLASS_STYLES)])


def _roc_ovr_ax(ax, pred: Predictions, split: str) -> None:
    """One-vs-rest ROC of each class of a multi-class run (the split of its confusion matrix): the macro
    AUC in the leaderboard is the mean of these curves' areas, and which class drags it down (viral
    against bacterial pneumonia, on Kermany) is what a reader of a 3-class run wants to see."""
    ax.plot([0, 1], [0, 1], color=GREY, lw=0.8, ls=":")
    areas = []
    for name, truth, ranked, color, style in _one_vs_rest(pred):
        fpr, tpr, _ = roc_points(truth, ranked)
        area = auc_binary(truth, ranked)
        areas.append(area)
        ax.plot(fpr, tpr, color=color, ls=style, lw=1.6, label=_t(f"{name} (AUC {area:.3f})"))
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("false-positive rate (the other classes)")
    ax.set_ylabel("true-positive rate (sensitivity)")
    complete = len(areas) == len(pred.classes)
    macro = f", macro AUC {np.mean(areas):.3f}" if complete else ", a class absent: no macro AUC"
    ax.set_title(f"{split} ROC, one class vs rest{macro}", fontsize=9)
    if areas:
        ax.legend(fontsize=7, loc="lower right", frameon=False)


def _pr_ovr_ax(ax, pred: Predictions, split: str) -> None:
    """One-vs-rest precision-recall of each class of a multi-class run, its average precision in the legend
    and its share of the images dotted (what a classifier without skill reaches): the binary runs' PR panel
    for each class. Why beside the one-vs-rest ROC: a class with few images (viral pneumonia) can show a
    good ROC while most of the images called that class are not."""
    aps = []
    for name, truth, ranked, color, style in _one_vs_rest(pred):
        recall, precision, _ = pr_points(truth, ranked)
        ap = average_precision(truth, ranked)
        aps.append(ap)
        ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", color=color, ls=style,
                lw=1.6, label=_t(f"{name} (AP {ap:.3f})"))
        ax.axhline(float(truth.mean()), color=color, lw=0.7, ls=":")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("recall (of the class)")
    ax.set_ylabel("precision (images called the class)")
    ax.set_title(f"{split} precision-recall, one class vs rest (⋯ share)", fontsize=9)
    if aps:
        ax.legend(fontsize=7, loc="lower left", frameon=False)


RUN_FIGURE_COLUMNS = 3  # panels per row of a top run's figure




ZOOM_AUC = 0.95  # from this AUC / AP on, ROC and precision-recall panels show their top corner
ZOOM_SPAN = 0.3  # how much of each axis the zoomed panel shows


def _legend(ax, loc: str) -> None:
    """The curves' entries, then one neutral entry per threshold marker: the markers are drawn in each
    split's colour, and an entry copied from the validation (blue) one read as if it marked only that."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    curves = [(h, lab) for h, lab in zip(handles, labels, strict=True) if not lab.startswith("threshold")]
    marks = [(Line2D([], [], marker=m, ms=ms, color="white", mec="black", mew=0.6, ls="none"), lab)
             for m, ms, lab in (("o", 6, "threshold 0.5"), ("*", 9, "threshold chosen")) if lab in labels]
    ax.legend([h for h, _ in curves + marks], [lab for _, lab in curves + marks], fontsize=7, loc=loc,
              frameon=False)


def _pr_ax(ax, rec: RunRecord, threshold: float | None) -> None:
    """Precision-recall of validation and test; the dotted line is the test prevalence (a classifier
    without skill); 0.5 and the chosen threshold marked as on the ROC."""
    marked: set[str] = set()
    aps, points, prevalence = [], [], 1.0
    for split, color in (("val", BLUE), ("test", ORANGE)):
        pred = getattr(rec, split)
        if pred is None or pred.proba.shape[1] != 2 or len(set(pred.y_true.tolist())) < 2:
            continue
        y, score = pred.y_true, pred.proba[:, 1]
        ranked = rank_score(pred.proba, 1)  # as on the ROC: saturated ties broken by the other class
        recall, precision, _ = pr_points(y, ranked)
        ap = average_precision(y, ranked)
        aps.append(ap)
        ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", color=color, lw=1.6,
                ls="--" if split == "val" else "-", label=f"{split} (AP {ap:.3f})")
        if split == "test" or rec.test is None:
            prevalence = float(np.mean(y == 1))
            ax.axhline(prevalence, color=GREY, lw=0.8, ls=":")
        for thr, marker, name in ((0.5, "o", "0.5"), (threshold, "*", "chosen")):
            if thr is None:
                continue
            yp = score >= thr
            if not yp.any():
                continue
            points.append((yp[y == 1].mean(), (y[yp] == 1).mean()))
            ax.plot([yp[y == 1].mean()], [(y[yp] == 1).mean()], marker=marker, ms=9 if marker == "*" else 6,
                    color=color, mec="black", mew=0.6, ls="none",
                    label=None if name in marked else f"threshold {name}")
            marked.add(name)
    zoom = bool(aps) and min(aps) >= ZOOM_AUC
    if zoom:
        ax.set_xlim(min([1 - ZOOM_SPAN, *(r - 0.03 for r, _ in points)]), 1.005)
        # down to the prevalence line (the caption explains it; Kermany's test split: 0.625)
        ax.set_ylim(min([1 - ZOOM_SPAN, prevalence - 0.03, *(p - 0.03 for _, p in points)]), 1.005)
    else:
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
    positive = next((getattr(rec, s).classes[1] for s in ("test", "val") if getattr(rec, s) is not None), "")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel(_t(f"precision ({positive} called)" if positive else "precision"))
    ax.set_title("precision-recall (⋯ prevalence)" + (", corner" if zoom else ""))
    _legend(ax, "center left" if zoom else "lower left")  # zoomed, the prevalence line is near the bottom


def _curves_ax(ax, history: dict, kind: str, kept: int | None) -> None:
    """Training and validation ``kind`` (loss or accuracy) per epoch, one quantity per panel (the two on
    twin axes crossed and read as one), loss on a log scale (an early spike flattened the rest), and the
    epoch whose weights were kept (best validation loss with ``checkpoint``) marked."""
    keys = ("loss", "val_loss") if kind == "loss" else ("accuracy", "val_accuracy")
    color = BLUE if kind == "loss" else ORANGE
    ep = None
    for key, style in zip(keys, ("-", "--"), strict=True):
        vals = history.get(key)
        if vals:
            ep = np.arange(1, len(vals) + 1)
            ax.plot(ep, vals, color=color, ls=style, lw=1.4, label=_CURVE_NAMES[key])
    values = np.array([v for k in keys for v in (history.get(k) or [])], dtype=float)
    if kind == "loss" and values.size and np.all(np.isfinite(values)) and values.min() > 0:
        ax.set_yscale("log")
    if kept is not None:
        ax.axvline(kept, color=GREY, lw=0.9, ls=":", label=f"weights kept (epoch {kept})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(kind if kind == "loss" else "accuracy")
    ax.set_title(f"MLP {kind}" + (" (log scale)" if ax.get_yscale() == "log" else "")
                 if ep is not None else "no training history")
    ax.legend(fontsize=7, frameon=False, loc="best")


def kept_epoch(rec: RunRecord, history: dict) -> int | None:
    """The epoch whose weights the model kept when ``checkpoint`` chose one (best validation loss)."""
    hp = rec.run.get("hyperparameters") if isinstance(rec.run.get("hyperparameters"), dict) else {}
    losses = [v if isinstance(v, int | float) and np.isfinite(v) else np.inf
              for v in history.get("val_loss") or []]
    if not hp.get("checkpoint") or not losses or min(losses) == np.inf:
        return None
    return int(np.argmin(losses)) + 1


_CURVE_NAMES = {"loss": "train loss", "val_loss": "val loss", "accuracy": "train acc",
                "val_accuracy": "val acc"}


def wilson_interval(fraction: np.ndarray, n: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson score interval of observed fractions over ``n`` images each (sound at 0, 1 and small n,
    where the normal approximation gives a zero-width or out-of-range bar)."""
    n = np.maximum(np.asarray(n, dtype=float), 1.0)
    p = np.asarray(fraction, dtype=float)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def _calibration_ax(ax, pred: Predictions, split: str) -> None:
    """Reliability diagram: does P(class 1) = 0.8 come true 80% of the time? Dot area = images in bin.
    More than two classes: the top-label diagram, confidence (the predicted class's probability) against
    the fraction of those images whose predicted class is right."""
    binary = pred.proba.shape[1] == 2
    mean_p, observed, counts = calibration_bins(pred) if binary else confidence_bins(pred)
    ax.plot([0, 1], [0, 1], color=GREY, lw=0.8, ls=":")
    ax.plot(mean_p, observed, color=ORANGE if split == "test" else BLUE, lw=1.2)
    lo, hi = wilson_interval(observed, counts)  # a middle bin of 4 images zig-zags within its noise
    # the interval holds the fraction; rounding can put an end a hair past it (a negative bar is an error)
    yerr = [np.maximum(observed - lo, 0.0), np.maximum(hi - observed, 0.0)]
    ax.errorbar(mean_p, observed, yerr=yerr, fmt="none", ecolor=GREY, lw=0.8,
                capsize=1.5, zorder=2)
    ax.scatter(mean_p, observed, s=12 + 120 * counts / max(counts.max(), 1),
               color=ORANGE if split == "test" else BLUE, edgecolor="black", linewidth=0.5, zorder=3)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    if binary:
        ax.set_xlabel(_t(f"predicted P({pred.classes[1]})"))
        ax.set_ylabel(_t(f"observed fraction {pred.classes[1]}"))
    else:
        ax.set_xlabel("confidence: P(predicted class)")
        ax.set_ylabel("fraction predicted right")
    ax.set_title(f"{split} calibration (Brier {scores(pred)['brier']:.3f})" if binary else
                 f"{split} top-label calibration (multi-class Brier {scores(pred)['brier']:.3f})", fontsize=9)


def run_figure(rec: RunRecord, threshold: float | None, formats: Sequence[str] = ()) -> Rendered | None:
    """One row of panels for a top run: confusion matrices (0.5 and chosen), ROC and precision-recall
    (binary), each class's one-vs-rest ROC and precision-recall (multi-class), calibration (top-label
    when multi-class), training curves."""
    pred = rec.test if rec.test is not None else rec.val
    history = rec.metrics.get("history") if isinstance(rec.metrics.get("history"), dict) else None
    panels: list[str] = []
    if pred is not None:
        panels.append("cm05")
        if pred.proba.shape[1] == 2 and threshold is not None:
            panels.append("cmthr")
            panels.append("roc")
            panels.append("pr")
        if pred.proba.shape[1] > 2 and len(set(pred.y_true.tolist())) > 1:
            panels.append("roc_ovr")
            panels.append("pr_ovr")
        if len(pred.y_true):
            panels.append("calib")
    if history and any(history.get(k) for k in ("loss", "val_loss")):
        panels.append("loss")
        if any(history.get(k) for k in ("accuracy", "val_accuracy")):
            panels.append("acc")
    if not panels:
        return None
    plt = _plt()
    # rows of at most 3 panels: one strip of 6 (19.5 in wide) was shrunk to a page's width, 6-px legends
    ncols = min(RUN_FIGURE_COLUMNS + (len(panels) > 2 * RUN_FIGURE_COLUMNS), len(panels))
    nrows = -(-len(panels) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.4 * nrows), squeeze=False)
    axes = grid.ravel()
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    split = "test" if rec.test is not None else "val"
    for ax, panel in zip(axes[:len(panels)], panels, strict=True):
        if panel == "cm05":
            _confusion_ax(
                ax,
                pred,
                0.5,
                f"{split} confusion @ 0.5" if pred.proba.shape[1] == 2 else f"{split} confusion (argmax)",
            )
        elif panel == "cmthr":
            _confusion_ax(ax, pred, threshold, f"{split} confusion @ chosen {threshold_text(threshold)}")
        elif panel == "roc":
            _roc_ax(ax, rec, threshold)
        elif panel == "roc_ovr":
            _roc_ovr_ax(ax, pred, split)
        elif panel == "pr_ovr":
            _pr_ovr_ax(ax, pred, split)
        elif panel == "pr":
            _pr_ax(ax, rec, threshold)
        elif panel == "calib":
            _calibration_ax(ax, pred, split)
        else:
            _curves_ax(ax, history, "loss" if panel == "loss" else "accuracy", kept_epoch(rec, history))
    fig.tight_layout()
    return _render(fig, formats)


def comparison_figure(preds: Sequence[Predictions], labels: Sequence[str],
                      formats: Sequence[str] = ()) -> Rendered | None:
    """The test ROC and precision-recall curves of several binary runs on the same images, in one pair of
    panels (each run's AUC and average precision in the legend). Why: a paper compares backbones and
    heads on one ROC plot; the per-run figures, one run each, leave the reader to overlay them by eye.
    None when fewer than two of ``preds`` are binary with both classes present."""
    shown = [(p, label) for p, label in zip(preds, labels, strict=True)
             if p.proba.shape[1] == 2 and len(set(p.y_true.tolist())) == 2]
    if len(shown) < 2:
        return None
    plt = _plt()
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(9.6, 4.4))
    roc.plot([0, 1], [0, 1], color=GREY, lw=0.8, ls=":")
    areas, aps = [], []
    for i, (pred, label) in enumerate(shown):
        color, style = CLASS_STYLES[i % len(CLASS_STYLES)]
        ranked = rank_score(pred.proba, 1)
        fpr, tpr, _ = roc_points(pred.y_true, ranked)
        areas.append(auc_binary(pred.y_true, ranked))
        top = len(shown) - i + 2  # the best run's curve drawn over the rest where they coincide
        roc.plot(fpr, tpr, color=color, ls=style, lw=1.5, zorder=top,
                 label=_t(f"{label} (AUC {areas[-1]:.3f})"))
        recall, precision, _ = pr_points(pred.y_true, ranked)
        aps.append(average_precision(pred.y_true, ranked))
        pr.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", color=color, ls=style,
                lw=1.5, zorder=top, label=_t(f"{label} (AP {aps[-1]:.3f})"))
    pr.axhline(float(shown[0][0].y_true.mean()), color=GREY, lw=0.8, ls=":")
    zoom = min(areas) >= ZOOM_AUC and min(aps) >= ZOOM_AUC
    low = 1.005 - ZOOM_SPAN if zoom else -0.02
    roc.set_xlim(-0.005 if zoom else -0.02, (-0.005 + ZOOM_SPAN) if zoom else 1.02)
    roc.set_ylim(low, 1.005 if zoom else 1.02)
    roc.set_aspect("equal", adjustable="box")
    roc.set_xlabel("1 − specificity (false-positive rate)")
    roc.set_ylabel("sensitivity")
    roc.set_title("test ROC" + (", corner" if zoom else ""))
    pr.set_xlim(low, 1.005 if zoom else 1.02)
    pr.set_ylim(low, 1.005 if zoom else 1.02)
    pr.set_xlabel(_t(f"recall (sensitivity to {shown[0][0].classes[1]})"))
    pr.set_ylabel(_t(f"precision (images called {shown[0][0].classes[1]})"))
    pr.set_title("test precision-recall (⋯ share)" + (", corner" if zoom else ""))
    # zoomed, the share's dotted line runs along the bottom: the legend goes above it
    for ax, loc in ((roc, "lower right"), (pr, "center left" if zoom else "lower left")):
        ax.legend(fontsize=7, loc=loc, frameon=False)
    fig.tight_layout()
    return _render(fig, formats)


OVERVIEW_RUNS = 15  # rows of the overview dot plot; more would not be readable
HEATMAP_MIN_SPAN = 0.05  # narrowest colour range of a heatmap, in metric units


def overview_rows(rows: Sequence[dict], metric: str, n: int = OVERVIEW_RUNS) -> list[dict]:
    """The runs the overview plot shows (its caption describes the same ones)."""
    return [r for r in rows if r.get(f"val_{metric}") is not None][:n]


_SETTING = re.compile(r", (?=[A-Za-z_][A-Za-z0-9_]*=)")  # "C=1, class_weight={0: 3.0, 1: 1.0}" -> 2


def overview_labels(rows: Sequence[dict], width: int = 64) -> list[str]:
    """Each run's config without the settings that all shown runs of its head share.

    Why: cut at a fixed width, "dropout=0.5, epochs=50, layers=1024-512, lr=0.0…" hid the one setting
    (lr) that told two rows apart; the leaderboard table keeps the full configs. A head whose shared
    settings are the whole config of one of its runs keeps its full configs: stripped, that run read
    "(defaults)" beside "threshold=sensitivity:0.9" though it had C=0.001 as the other.
    """
    parts = [_SETTING.split(str(r["config"])) if r["config"] else [] for r in rows]
    shared: dict[str, set[str]] = {}
    for head in {r["head"] for r in rows}:
        mine = [set(p) for p, r in zip(parts, rows, strict=True) if r["head"] == head]
        common = set.intersection(*mine) if len(mine) > 1 else set()
        shared[head] = common if all(m - common for m in mine) else set()  # a config left empty: keep them
    out = []
    for p, r in zip(parts, rows, strict=True):
        text = ", ".join(x for x in p if x not in shared[r["head"]])
        out.append(text if len(text) <= width else text[:width - 1] + "…")
    return out


def overview_figure(rows: Sequence[dict], metric: str, n: int = OVERVIEW_RUNS,
                    formats: Sequence[str] = (), group_by: str | None = None) -> Rendered | None:
    """Dot plot of the best runs: validation metric vs test metric with its 95% CI where there is one.

    One panel per task: a binary accuracy and a 3-class one on one axis squeezed one of them into a corner
    and read as comparable numbers. With ``group_by`` the ranks count within each group, so a label names
    its group where neither the label nor the panel does (two "#1 logreg" rows of two datasets)."""
    rows = overview_rows(rows, metric, n)
    if not rows:
        return None
    plt = _plt()
    panels: dict[str | None, list[int]] = {}
    for i, r in enumerate(rows):
        panels.setdefault(r.get("task"), []).append(i)
    heights = [0.32 * len(idx) + 0.5 for idx in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights},
                             figsize=(11.0, max(sum(heights) + 0.6 * len(panels), 1.8)))
    many_bb = len({r["backbone"] for r in rows}) > 1
    configs = overview_labels(rows)
    named = (group_by in (None, "head", "task") or (group_by == "backbone" and many_bb)  # label/panel says it
             or len({r.get("group") for r in rows}) == 1)
    for k, (ax, (task, idx)) in enumerate(zip(axes[:, 0], panels.items(), strict=True)):
        members = [rows[i] for i in idx]
        labels = [_t(f"#{r['rank']}{'' if named else ' ' + str(r.get('group'))} "
                     f"{r['backbone'] + ' · ' if many_bb else ''}{r['head']}  {configs[i]}")
                  for i, r in zip(idx, members, strict=True)]
        _overview_panel(ax, members, labels, metric, task, legend=k == 0)
        if len(panels) > 1:
            ax.set_title(_t(f"task: {task}"), loc="right", fontsize=9)
    fig.tight_layout()
    return _render(fig, formats)


def _overview_panel(ax, rows: Sequence[dict], labels: Sequence[str], metric: str, task: str | None,
                    legend: bool) -> None:
    """One task's rows of the overview: blue validation dots, orange test squares with their CIs."""
    y = np.arange(len(rows))[::-1]
    # no interval on validation: the configs were chosen on it, so its spread is not a sampling error;
    # its size is said, since a hold-out of 40 images and CV over 4,000 read alike as dots
    sizes = {r.get("n_val") for r in rows}
    n_val = f", n={next(iter(sizes)):,}" if len(sizes) == 1 and isinstance(next(iter(sizes)), int) else ""
    ax.scatter([r[f"val_{metric}"] for r in rows], y, color=BLUE, zorder=3,
               label=f"validation {metric} (selected on{n_val})")
    tests = [
        (yy, r.get(f"test_{metric}"), r.get(f"test_{metric}_lo"), r.get(f"test_{metric}_hi"))
        for yy, r in zip(y, rows, strict=True)
    ]
    tests = [t for t in tests if t[1] is not None]
    if tests:
        ty = np.array([t[0] for t in tests])
        tv = np.array([t[1] for t in tests])
        lo = np.array([t[2] if t[2] is not None else t[1] for t in tests])
        hi = np.array([t[3] if t[3] is not None else t[1] for t in tests])
        ax.errorbar(
            tv,
            ty - 0.18,
            # a recorded interval may miss a point recomputed from rounded old CSVs: never a negative bar
            xerr=[np.maximum(tv - lo, 0.0), np.maximum(hi - tv, 0.0)],
            fmt="s",
            color=ORANGE,
            ms=4,
            lw=1,
            capsize=2,
            zorder=3,
            label=f"test {metric}" + (" (95% CI)" if any(t[2] is not None for t in tests) else ""),
        )
    ax.set_yticks(y, labels)
    ax.set_ylim(-0.7, len(rows) - 0.4)  # one run: its dot and CI were drawn on the axis line
    if metric in THRESHOLD_FREE:  # scored on the probabilities themselves
        how = [w for w, on in (("one-vs-rest, macro over classes", metric == "auc" and task == "3class"),
                               ("lower is better", metric in LOWER_IS_BETTER)) if on]
        ax.set_xlabel(metric + (f" ({'; '.join(how)})" if how else ""))
    else:
        rule = {"binary": "threshold 0.5", "3class": "the most probable class"}.get(
            str(task), "threshold 0.5 if binary, else the most probable class")
        ax.set_xlabel(f"{metric} ({rule})")
    ax.grid(axis="x", color="#e3e6ea", lw=0.6)
    if legend:
        ax.legend(fontsize=8, frameon=False, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2)


def heatmap_figure(
    table: np.ndarray, xs: Sequence[str], ys: Sequence[str], x_name: str, y_name: str, title: str,
    bar_label: str = "", mark: tuple[int, int] | None = None, formats: Sequence[str] = (),
    min_span: float | None = None, limits: tuple[float, float] | None = None,
) -> Rendered:
    """Metric over two hyperparameters (best run per cell; empty cells stay blank); ``mark`` (row, column)
    outlines the chosen config's cell and ``bar_label`` names the colour scale; ``min_span`` is the
    narrowest colour range (default ``HEATMAP_MIN_SPAN``); ``limits`` is the metric's range ((0, 1) for
    accuracy or AUC), which the widened scale is moved inside: a bar reaching 1.05 showed a value no
    accuracy can take."""
    import textwrap

    plt = _plt()
    width = max(3.8, 1.0 + 0.9 * len(xs))  # a 2-column grid was 2.8 in: the title ran into the bar label
    fig, ax = plt.subplots(figsize=(width, 0.9 + 0.45 * len(ys)))
    masked = np.ma.masked_invalid(table)
    finite = table[np.isfinite(table)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    narrowest = HEATMAP_MIN_SPAN if min_span is None else min_span
    if vmax - vmin < narrowest:  # a one-point spread must not look like the whole colour scale
        mid = (vmin + vmax) / 2
        vmin, vmax = mid - narrowest / 2, mid + narrowest / 2
        if limits is not None:  # slide the window back into the metric's range, then clip what is left
            shift = max(0.0, limits[0] - vmin) - max(0.0, vmax - limits[1])
            vmin, vmax = max(limits[0], vmin + shift), min(limits[1], vmax + shift)
    im = ax.imshow(masked, cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            if np.isfinite(table[i, j]):
                bright = (table[i, j] - vmin) / max(vmax - vmin, 1e-9) > 0.6
                ax.text(
                    j,
                    i,
                    f"{table[i, j]:.3f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if bright else "white",
                )
    ax.set_xticks(range(len(xs)), [_t(x) for x in xs], rotation=30 if len(xs) > 4 else 0)
    ax.set_yticks(range(len(ys)), [_t(v) for v in ys])
    ax.set_xlabel(_t(x_name))
    ax.set_ylabel(_t(y_name))
    ax.set_title(textwrap.fill(_t(title), max(24, int(7 * width))), fontsize=10)
    if mark is not None:
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((mark[1] - 0.5, mark[0] - 0.5), 1, 1, fill=False, ec="#d62728", lw=2.2,
                               zorder=4))
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if bar_label:
        bar.set_label(_t(bar_label))
    bar.ax.yaxis.get_major_formatter().set_useOffset(False)  # "1e-10+9.374e-1" over the title otherwise
    fig.tight_layout()
    return _render(fig, formats)
