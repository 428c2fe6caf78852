"""Paired comparison of two evaluations on the same studies: per class and metric, B minus A, Wilcoxon and bootstrap."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import ManifestError
from pipeline.fileio import write_json_atomic, write_text_atomic
from pipeline.metrics.statistics import CI_METHOD, PAIRED_TEST, paired_comparison
from pipeline.metrics.table import HIGHER_IS_BETTER, fmt, read_per_study
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.reporting.pages import comparison_page
from pipeline.stages.common import execute_stage
from pipeline.stages.evaluate import rounded

log = logging.getLogger(__name__)

COMPARISON_JSON = "comparison.json"
COMPARISON_CSV = "comparison.csv"
COMPARISON_HTML = "comparison.html"
COMPARED_METRICS = ("dice", "iou", "nsd", "hd95", "assd")
_CSV_COLUMNS = ("class", "class_name", "metric", "n", "n_dropped", "mean_a", "mean_b", "mean_diff", "ci_low",
                "ci_high", "median_diff", "n_nonzero", "wilcoxon_statistic", "p_value", "better")


def _per_study(folder: Path) -> tuple[Path, dict[tuple[str, int], dict[str, Any]]]:
    path = folder / "per_study.csv" if folder.is_dir() else folder
    if not path.is_file():
        raise ManifestError(f"{path}: no per_study.csv; pass an evaluate output folder ('medpipe evaluate')")
    return path, {(r["study"], r["class"]): r for r in read_per_study(path)}


def _better(stats: dict[str, Any], metric: str, *, alpha: float) -> str | None:
    """'a' or 'b' when the Wilcoxon p-value is below ``alpha`` and the bootstrap interval of the difference
    excludes 0 (both must agree), else None."""
    lo, hi, p = stats.get("ci_low"), stats.get("ci_high"), stats.get("p_value")
    if lo is None or hi is None or p is None or p >= alpha or lo <= 0 <= hi:
        return None
    b_higher = lo > 0
    return "b" if b_higher == HIGHER_IS_BETTER[metric] else "a"


def compare_tables(a: dict[tuple[str, int], dict[str, Any]], b: dict[tuple[str, int], dict[str, Any]], *,
                   config: PipelineConfig) -> dict[str, Any]:
    """The comparison of two per-study tables keyed by (study, class): only studies in both are paired."""
    settings = config.evaluate
    studies_a, studies_b = {s for s, _ in a}, {s for s, _ in b}
    shared = sorted(studies_a & studies_b)
    classes = sorted({c for _, c in a} & {c for _, c in b})
    results: dict[str, Any] = {}
    for c in classes:
        keys = [(s, c) for s in shared if (s, c) in a and (s, c) in b]
        name = next((a[k].get("class_name") for k in keys), f"class_{c}")
        per_metric = {}
        for metric in COMPARED_METRICS:
            stats = paired_comparison([a[k][metric] for k in keys], [b[k][metric] for k in keys],
                                      samples=settings.bootstrap, confidence=settings.confidence,
                                      seed=settings.bootstrap_seed, key=("paired", c, metric))
            stats["better"] = _better(stats, metric, alpha=1.0 - settings.confidence)
            per_metric[metric] = stats
        results[str(c)] = {"name": name, "n_studies": len(keys), "metrics": per_metric}
    return {"studies": shared, "only_in_a": sorted(studies_a - studies_b), "only_in_b": sorted(studies_b - studies_a),
            "classes_only_in_one": sorted({c for _, c in a} ^ {c for _, c in b}), "classes": results}


def comparison_csv(result: dict[str, Any]) -> str:
    """CSV text: one row per class and metric."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for c, entry in sorted(result["classes"].items(), key=lambda kv: int(kv[0])):
        for metric, s in entry["metrics"].items():
            cells = [s.get(col) for col in _CSV_COLUMNS[3:]]
            writer.writerow([c, entry["name"], metric, *("" if v is None else v if isinstance(v, int | str)
                                                          else fmt(float(v)) for v in cells)])
    return buffer.getvalue()


def compare(
    a: Path,
    b: Path,
    out: Path,
    *,
    names: tuple[str, str] = ("A", "B"),
    config: PipelineConfig | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Compare evaluation ``b`` with ``a`` (two evaluate folders on the same studies); write comparison.{json,csv}.

    Differences are B minus A per study and class; the paired test is the Wilcoxon signed-rank
    test and the interval a bootstrap of the mean difference (``evaluate`` settings).
    """
    config = config or PipelineConfig()
    out = Path(out)
    path_a, table_a = _per_study(Path(a))
    path_b, table_b = _per_study(Path(b))

    def work(record: StageRecord) -> list[Path]:
        result = compare_tables(table_a, table_b, config=config)
        if not result["studies"]:
            raise ManifestError(f"{path_a} and {path_b} share no study; a paired comparison needs the same studies")
        for side, ids in (("a", result["only_in_a"]), ("b", result["only_in_b"])):
            if ids:
                log.warning("compare: %d studies only in %s are left out: %s", len(ids), side, ", ".join(ids))
        for sid in result["studies"]:
            record.add(StudyStatus(id=sid, status="ok"))
        payload = {"schema_version": 1, "task": "segmentation", "a": names[0], "b": names[1],
                   "difference": "b - a", "test": PAIRED_TEST, "ci": CI_METHOD,
                   "confidence": config.evaluate.confidence, "bootstrap": config.evaluate.bootstrap,
                   "bootstrap_seed": config.evaluate.bootstrap_seed, **rounded(result)}
        for c, entry in result["classes"].items():  # p-values keep 6 significant digits, not 6 decimals
            for metric, stats in entry["metrics"].items():
                if stats["p_value"] is not None:
                    payload["classes"][c]["metrics"][metric]["p_value"] = float(f"{stats['p_value']:.6g}")
        write_json_atomic(out / COMPARISON_JSON, payload)
        write_text_atomic(out / COMPARISON_CSV, comparison_csv(payload))
        write_text_atomic(out / COMPARISON_HTML, comparison_page(
            title=f"Paired comparison: {names[1]} vs {names[0]}", result=payload))
        return [out / COMPARISON_JSON, out / COMPARISON_CSV, out / COMPARISON_HTML]

    return execute_stage("compare", out, config=config, inputs={"a:per_study": path_a, "b:per_study": path_b},
                         work=work, force=force, extra_hash={"names": list(names)})
