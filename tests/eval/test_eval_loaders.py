"""Loaders on the real MTEB folders (row counts from each SOURCE.md), the shipped quick data, and bad input."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from sfr_export.eval.loaders import DEFAULT_FORMATS, Limits, load_task, read_qrels
from sfr_export.eval.quickdata import build_quick_data
from sfr_export.eval.suite import PACKAGE_DATA_DIR, load_suite, parse_suite
from sfr_export.eval.tasks import (ClassificationTask, ClusteringTask, EvalDataError, PairClassificationTask,
                                   RetrievalTask, StsTask)
from sfr_export.errors import SfrExportError, UserInputError

# task -> expected size (pairs / test rows / queries / documents), from each folder's SOURCE.md
EXPECTED = {"STSBenchmark": 1379, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186, "BIOSSES": 100,
            "Banking77Classification": 3080, "TRECCOVID": 50, "LegalSummarization": 290, "ClusTREC-Covid": 2284,
            "TwitterURLCorpus": 9334}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_mteb_folder_loads_with_documented_counts(data_dir: Path, name: str) -> None:
    task = load_task(data_dir / name, name, DEFAULT_FORMATS[name])
    assert task.size == EXPECTED[name]
    if isinstance(task, StsTask):
        assert min(task.scores) >= task.min_score and max(task.scores) <= task.max_score
    if isinstance(task, ClassificationTask):
        assert len(task.train_texts) == 10003 and len(set(task.train_labels)) == 77
    if isinstance(task, RetrievalTask):
        assert len(task.corpus_ids) == {"TRECCOVID": 2284, "LegalSummarization": 445}[name]
        assert all(any(g > 0 for g in task.qrels[q].values()) for q in task.query_ids)
    if isinstance(task, ClusteringTask):
        assert len(set(task.labels)) == 50
    if isinstance(task, PairClassificationTask):
        assert sum(task.labels) == 1821  # positives per SOURCE.md (n >= 4 of 6 annotators)


def test_biosses_gold_is_the_annotator_mean(data_dir: Path) -> None:
    task = load_task(data_dir / "BIOSSES", "BIOSSES", "biosses-tsv")
    assert task.max_score == 4.0 and task.scores[0] == 4.0  # row 1: all five annotators gave 4


def test_limits_take_the_first_rows_per_label(data_dir: Path) -> None:
    task = load_task(data_dir / "Banking77Classification", "Banking77Classification", "labelled-csv",
                     Limits(max_train_per_label=3, max_test_per_label=1))
    assert isinstance(task, ClassificationTask)
    assert len(task.train_texts) == 3 * 77 and len(task.test_texts) == 77


def test_shipped_quick_data_is_exactly_the_first_rows_of_the_sources(data_dir: Path, tmp_path: Path) -> None:
    build_quick_data(data_dir, tmp_path)
    for entry in load_suite("quick").tasks:
        cmp = filecmp.dircmp(tmp_path / entry.folder, PACKAGE_DATA_DIR / entry.folder)
        assert not cmp.diff_files and not cmp.left_only, f"{entry.name}: shipped data differs from the rebuilt subset"
    # and the quick suite reads the same tasks from the full folders as from the shipped ones
    quick = load_suite("quick")
    for (e, shipped), (_, full) in zip(quick.load(), quick.load(data_dir)):
        assert shipped == full, e.name


def test_shipped_data_has_no_noncommercial_task() -> None:
    shipped = {p.name for p in PACKAGE_DATA_DIR.iterdir() if p.is_dir()}
    assert "TwitterURLCorpus" not in shipped  # CC BY-NC-SA: tests only, never in the package
    assert (PACKAGE_DATA_DIR / "SOURCE.md").is_file()


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_missing_data_folder(tmp_path: Path) -> None:
    with pytest.raises(EvalDataError, match="missing data folder"):
        load_task(tmp_path / "nope", "STSBenchmark", "stsb-csv")


def test_missing_file_in_folder(tmp_path: Path) -> None:
    with pytest.raises(EvalDataError, match="missing data file .*stsb-en-test.csv"):
        load_task(tmp_path, "STSBenchmark", "stsb-csv")


def test_malformed_sts_row_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "stsb-en-test.csv").write_text("a,b,1.0\nc,d,not-a-number\n", encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"stsb-en-test.csv:2: 'not-a-number' is not a number"):
        load_task(tmp_path, "STSBenchmark", "stsb-csv")


def test_bad_qrels_line(tmp_path: Path) -> None:
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2 d2 1\n", encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"test.tsv:3: bad qrels line"):
        read_qrels(tmp_path / "qrels" / "test.tsv")
    (tmp_path / "qrels" / "test.tsv").write_text("q1\td1\thigh\n", encoding="utf-8")
    with pytest.raises(EvalDataError, match="'high' is not an integer"):
        read_qrels(tmp_path / "qrels" / "test.tsv")


def test_malformed_jsonl(tmp_path: Path) -> None:
    (tmp_path / "clustrec_covid.jsonl").write_text('{"topic_id": "1", "title": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"clustrec_covid.jsonl:2: malformed JSON"):
        load_task(tmp_path, "ClusTREC-Covid", "clustrec-jsonl")


def test_single_valued_gold_is_refused(tmp_path: Path) -> None:
    (tmp_path / "stsb-en-test.csv").write_text("a,b,1.0\nc,d,1.0\n", encoding="utf-8")
    with pytest.raises(EvalDataError, match="single value"):
        load_task(tmp_path, "STSBenchmark", "stsb-csv")


def test_unknown_task_type_and_format() -> None:
    with pytest.raises(EvalDataError, match="unknown task type 'reranking'"):
        parse_suite({"tasks": [{"name": "X", "type": "reranking", "format": "beir", "instruction": "i"}]}, "t")
    with pytest.raises(EvalDataError, match="known format"):
        parse_suite({"tasks": [{"name": "X", "type": "sts", "format": "xlsx", "instruction": "i"}]}, "t")
    with pytest.raises(EvalDataError, match="unknown data format"):
        load_task(Path("."), "X", "xlsx")


def test_empty_suite_and_unknown_suite(tmp_path: Path) -> None:
    with pytest.raises(EvalDataError, match="lists no tasks"):
        parse_suite({"name": "empty", "tasks": []}, "empty")
    p = tmp_path / "s.toml"
    p.write_text('name = "x"\n', encoding="utf-8")
    with pytest.raises(EvalDataError, match="lists no tasks"):
        load_suite(p)
    with pytest.raises(EvalDataError, match="unknown suite 'nightly'"):
        load_suite("nightly")


def test_bad_limits_and_keys() -> None:
    with pytest.raises(EvalDataError, match="max_pairs must be a positive integer"):
        Limits(max_pairs=0)
    with pytest.raises(EvalDataError, match="unknown keys"):
        parse_suite({"tasks": [{"name": "STSBenchmark", "max_rows": 3}]}, "t")


def test_data_errors_are_user_input_errors() -> None:
    assert issubclass(EvalDataError, UserInputError) and issubclass(EvalDataError, SfrExportError)
