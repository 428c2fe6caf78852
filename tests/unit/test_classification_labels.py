"""Classification inputs: labels CSV reading/validation/application, stratified folds and splits, fast rates."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline.classification.cv import stratified_folds, stratified_split
from pipeline.classification.labels_csv import apply_class_labels, read_labels_csv
from pipeline.classification.metrics import _rates, auc, fast_auc, probability_metrics
from pipeline.errors import ManifestError, StageError
from pipeline.manifest import Manifest, Study


def _manifest(*sources: str) -> Manifest:
    studies = [Study(id=f"case_{i:02d}", source=s, format="nifti", status="ok", image=f"images/case_{i:02d}.nii.gz")
               for i, s in enumerate(sources)]
    return Manifest(studies=studies)


SOURCES = ("a/scan_1.nii.gz", "a/scan_2.nii.gz", "b/scan_3.nii", "scan_4.nii.gz", "b/other.nii.gz", "c/other.nii.gz")


def _csv(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_names_numbered_in_sorted_order_and_keys_by_path_stem_name_or_id(tmp_path: Path) -> None:
    path = _csv(tmp_path, "\ufeffStudy , Label\na/scan_1.nii.gz,tumour\nscan_2,normal\n\nscan_3.nii,cyst\n"
                          "case_03,normal\n")
    manifest = apply_class_labels(_manifest(*SOURCES), path)
    assert manifest.classes == {"0": "cyst", "1": "normal", "2": "tumour"}
    labels = {s.source: s.class_label for s in manifest.studies}
    assert labels == {"a/scan_1.nii.gz": 2, "a/scan_2.nii.gz": 1, "b/scan_3.nii": 0, "scan_4.nii.gz": 1,
                      "b/other.nii.gz": None, "c/other.nii.gz": None}  # no row: unlabelled, inference only


def test_integer_labels_kept_and_integral_floats_accepted(tmp_path: Path) -> None:
    table = read_labels_csv(_csv(tmp_path, "study,label\nx,1\ny,0\nz,1.0\n"))
    assert [r.label for r in table.rows] == [1, 0, 1] and [r.line for r in table.rows] == [2, 3, 4]
    assert table.classes == {"0": "class_0", "1": "class_1"}
    known = {"0": "normal", "1": "tumour"}
    assert read_labels_csv(_csv(tmp_path, "study,label\nx,tumour\n"), known_classes=known).rows[0].label == 1


def test_absolute_paths_inside_root_match_and_stale_labels_are_cleared(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    path = _csv(tmp_path, f"study,label\n{root / 'a' / 'scan_2.nii.gz'},1\n.\\a\\scan_1.nii.gz,0\n")
    manifest = apply_class_labels(_manifest(*SOURCES), path, root=root)
    assert [s.class_label for s in manifest.studies[:3]] == [0, 1, None]
    cleared = apply_class_labels(manifest, None)
    assert cleared.classes is None and all(s.class_label is None for s in cleared.studies)


@pytest.mark.parametrize(("text", "code", "where"), [
    ("id,class\nscan_1,0\n", "labels_csv_column", "line 1"),
    ("study,label\nscan_1,0\nscan_2\n", "labels_csv_column", "line 3"),
    ("study,label\nscan_1,0\nscan_2,\n", "labels_csv_empty", "line 3"),
    ("study,label\n", "labels_csv_empty", "no rows"),
    ("study,label\nscan_1,0\nscan_2,1\nscan_1,1\n", "labels_csv_duplicate", "line 4"),
    ("study,label\nscan_1,0\na/scan_1.nii.gz,1\n", "labels_csv_duplicate", "line 3"),
    ("study,label\nscan_1,0\nscan_9,1\n", "labels_csv_unknown_study", "line 3"),
    ("study,label\nother,0\n", "labels_csv_ambiguous_study", "line 2"),
    ("study,label\nscan_1,0\nscan_2,1.5\n", "labels_csv_bad_label", "line 3"),
    ("study,label\nscan_1,-1\n", "labels_csv_bad_label", "line 2"),
    ("study,label\nscan_1,0\nscan_2,tumour\n", "labels_csv_bad_label", "line 3"),
])
def test_errors_name_file_line_and_fix(tmp_path: Path, text: str, code: str, where: str) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(ManifestError) as err:
        apply_class_labels(_manifest(*SOURCES), path)
    assert err.value.code == code
    assert str(path) in str(err.value) and where in str(err.value)


def test_unknown_class_missing_file_and_shard_tolerance(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="unknown class name 'cyst'") as err:
        read_labels_csv(_csv(tmp_path, "study,label\nx,cyst\n"), known_classes={"0": "normal", "1": "tumour"})
    assert err.value.code == "labels_csv_unknown_class"
    with pytest.raises(ManifestError, match="class 2 is not one of the known classes"):
        read_labels_csv(_csv(tmp_path, "study,label\nx,2\n"), known_classes={"0": "a", "1": "b"})
    with pytest.raises(ManifestError, match="no such file; set data.labels_csv") as err:
        apply_class_labels(_manifest(*SOURCES), tmp_path / "absent.csv")
    assert err.value.code == "labels_csv_missing"
    # a shard holds some scans only: rows naming the others are not errors, and the classes come from every row
    path = _csv(tmp_path, "study,label\nscan_1,normal\nscan_9,tumour\n")
    manifest = apply_class_labels(_manifest(*SOURCES), path, partial=True)
    assert manifest.classes == {"0": "normal", "1": "tumour"} and manifest.studies[0].class_label == 0


def _ids_labels(counts: dict[int, int]) -> tuple[list[str], list[int]]:
    labels = [c for c, n in counts.items() for _ in range(n)]
    ids = [f"s{i:03d}" for i in np.random.default_rng(5).permutation(len(labels))]
    return ids, labels


def test_stratified_folds_are_disjoint_covering_and_balanced() -> None:
    ids, labels = _ids_labels({0: 23, 1: 11, 2: 6})
    by_id = dict(zip(ids, labels, strict=True))
    folds = stratified_folds(ids, labels, num_folds=5, seed=3)
    validation = [set(f["validation"]) for f in folds]
    assert sum(len(v) for v in validation) == len(ids) and set().union(*validation) == set(ids)
    for fold in folds:
        assert not set(fold["train"]) & set(fold["validation"])
        assert set(fold["train"]) | set(fold["validation"]) == set(ids)
        counts = Counter(by_id[i] for i in fold["validation"])
        for c, n in ((0, 23), (1, 11), (2, 6)):  # each class's share, to within one study
            assert abs(counts[c] - n / 5) < 1
    assert folds == stratified_folds(list(reversed(ids)), list(reversed(labels)), num_folds=5, seed=3)
    assert folds != stratified_folds(ids, labels, num_folds=5, seed=4)


def test_stratified_folds_refuse_small_classes_and_one_class() -> None:
    with pytest.raises(StageError, match=r"class\(es\) 1 \(2\) have fewer. Lower classify.num_folds"):
        stratified_folds(*_ids_labels({0: 10, 1: 2}), num_folds=3, seed=0)
    with pytest.raises(StageError, match="at least two classes"):
        stratified_folds(*_ids_labels({1: 10}), num_folds=2, seed=0)


def test_stratified_split_keeps_class_shares() -> None:
    ids, labels = _ids_labels({0: 40, 1: 10})
    split = stratified_split(ids, labels, val_fraction=0.2, seed=1)
    by_id = dict(zip(ids, labels, strict=True))
    assert len(split["validation"]) == 10 and Counter(by_id[i] for i in split["validation"]) == {0: 8, 1: 2}
    assert sorted(split["train"] + split["validation"]) == sorted(ids)
    tiny = stratified_split(["a", "b", "c"], [0, 0, 1], val_fraction=0.34, seed=0)  # too small: plain hold-out
    assert len(tiny["validation"]) == 1 and len(tiny["train"]) == 2


def test_bootstrap_rates_and_auc_equal_sklearn() -> None:
    rng = np.random.default_rng(2)
    for k in (2, 3):
        labels, pred = rng.integers(0, k, 40), rng.integers(0, k, 40)
        rates = _rates(labels, pred, k)
        assert rates["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))
        f1 = skm.f1_score(labels, pred, average="binary" if k == 2 else "macro", zero_division=0)
        assert rates["f1"] == pytest.approx(f1)
        if k == 2:
            assert rates["sensitivity"] == pytest.approx(skm.recall_score(labels, pred))
            assert rates["specificity"] == pytest.approx(skm.recall_score(labels, pred, pos_label=0))
    for k in (2, 3, 4):  # the rank AUC of the bootstrap equals scikit-learn's, ties and absent classes included
        for _ in range(30):
            n = int(rng.integers(2, 25))
            y, pool = rng.integers(0, k, n), rng.dirichlet(np.ones(k), 4)
            p = pool[rng.integers(0, 4, n)]
            expected = auc(y, p)
            assert fast_auc(y, p) == (None if expected is None else pytest.approx(expected, abs=1e-12))
    p1 = rng.uniform(0, 1, 30)
    labels = (p1 + rng.normal(0, 0.3, 30) > 0.5).astype(int)
    m = probability_metrics(labels, np.stack([1 - p1, p1], 1), bootstrap=300, seed=1)
    for name in ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity"):
        low, high = m[f"{name}_ci"]
        assert low <= m[name] <= high and high - low < 0.6, name
