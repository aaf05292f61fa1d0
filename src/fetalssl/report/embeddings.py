"""What each frozen init makes of the test images: a 2-D t-SNE map per init, coloured by class and by patient,
with how well the classes separate in the full feature space (leave-one-out k-NN accuracy, silhouette score)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score

from fetalssl.report.collect import RunRecord

log = logging.getLogger(__name__)

EMBEDDINGS_FILE = "test_embeddings.npz"  # written by frozen-backbone fine-tune runs (fetalssl.finetune.run)
KNN_K = 5  # neighbours of the leave-one-out vote; the separability summary, not a tuning knob


@dataclass
class InitEmbedding:
    label: str
    source: Path
    features: np.ndarray  # (N, D)
    classes: np.ndarray  # (N,) class names
    patients: np.ndarray  # (N,) patient ids

    @property
    def normalised(self) -> np.ndarray:
        return self.features / np.maximum(np.linalg.norm(self.features, axis=1, keepdims=True), 1e-12)

    def knn_accuracy(self) -> float:
        """Leave-one-out majority vote of the k most cosine-similar other test images (k shrinks to the number of
        other images on a tiny test set; NaN with a single image)."""
        if len(self.classes) < 2:
            return float("nan")
        z = self.normalised
        similarity = z @ z.T
        np.fill_diagonal(similarity, -np.inf)
        neighbours = np.argsort(-similarity, axis=1)[:, :min(KNN_K, len(z) - 1)]
        votes = self.classes[neighbours]
        # the most frequent class; a tie goes to the class of the nearest neighbour among the tied ones
        predicted = np.array([max(row, key=lambda c, r=list(row): (r.count(c), -r.index(c))) for row in votes])
        return float(np.mean(predicted == self.classes))

    def silhouette(self) -> float:
        """Mean silhouette of the classes under cosine distance: 1 separated, 0 overlapping, < 0 mixed. NaN where it is
        undefined: fewer than 2 classes, or a class per image (e.g. a tiny test set of one image per plane)."""
        if not 2 <= len(set(self.classes)) < len(self.classes):
            return float("nan")
        return float(silhouette_score(self.normalised, self.classes, metric="cosine"))


def collect_embeddings(records: Sequence[RunRecord], label_of: Callable[[RunRecord], str]) -> list[InitEmbedding]:
    """One run's test embeddings per init label (the lowest seed, then fraction: every fraction of one init and
    seed has the same frozen backbone)."""
    chosen: dict[str, RunRecord] = {}
    for record in sorted(records, key=lambda r: (r.grid.get("seed", 0), r.grid.get("fraction", 0))):
        if (record.out_dir / EMBEDDINGS_FILE).is_file():
            chosen.setdefault(label_of(record), record)
    embeddings = []
    for label, record in sorted(chosen.items()):
        with np.load(record.out_dir / EMBEDDINGS_FILE) as data:
            embeddings.append(InitEmbedding(label, record.out_dir, data["features"], data["labels"],
                                            data["patients"]))
    return embeddings


def tsne_map(features: np.ndarray, seed: int) -> np.ndarray:
    perplexity = min(30.0, (len(features) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", metric="cosine",
                random_state=seed).fit_transform(features)


def plot_embeddings(embeddings: Sequence[InitEmbedding], path: Path, seed: int) -> list[dict[str, object]]:
    """embeddings.png (a column per init: by class on top, by patient below) and the summary rows."""
    fig = Figure(figsize=(3.6 * len(embeddings) + 1.5, 7), layout="constrained")
    axes = fig.subplots(2, len(embeddings), squeeze=False)
    classes = sorted({c for e in embeddings for c in e.classes})
    rows = []
    for column, embedding in enumerate(embeddings):
        xy = tsne_map(embedding.features, seed)
        knn, silhouette = embedding.knn_accuracy(), embedding.silhouette()
        rows.append({"init": embedding.label, "images": len(embedding.classes), "knn_accuracy": knn,
                     "silhouette": silhouette, "source": str(embedding.source)})
        for cls_index, cls in enumerate(classes):
            inside = embedding.classes == cls
            axes[0, column].scatter(*xy[inside].T, s=10, color=f"C{cls_index % 10}", label=cls)
        patients = sorted(set(embedding.patients))
        for patient_index, patient in enumerate(patients):
            inside = embedding.patients == patient
            axes[1, column].scatter(*xy[inside].T, s=10, color=f"C{patient_index % 10}",
                                    marker="os^Dv"[(patient_index // 10) % 5])
        axes[0, column].set_title(f"{embedding.label}\n{KNN_K}-NN acc {knn:.2f}, silhouette {silhouette:.2f}",
                                  fontsize="small")
        axes[1, column].set_title(f"by patient ({len(patients)})", fontsize="small")
        for ax in axes[:, column]:
            ax.set_xticks([])
            ax.set_yticks([])
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize="small", title="class")
    fig.suptitle("t-SNE of the test images' frozen features per init")
    fig.savefig(path, dpi=120)
    return rows


def write_embedding_summary(rows: Sequence[dict[str, object]], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["init", "images", "knn_accuracy", "silhouette", "source"])
        writer.writeheader()
        writer.writerows(rows)
