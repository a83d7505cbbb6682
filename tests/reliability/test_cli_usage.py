"""Every command with its usage errors, in a subprocess: a non-zero exit, no traceback anywhere, and one error
line naming the bad argument (the option, the value, the file)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from reliability_helpers import CliResult, run_cli
from sfr_export.artifact import writer_lock
from sfr_export.models.demo import materialize_demo

# (id, argv with {A} = a tiny artifact and {T} = a scratch dir, exit code, text the error line must contain)
CASES: list[tuple[str, list[str], int, str]] = [
    ("unknown-option", ["--bogus"], 2, "--bogus"),
    ("unknown-command", ["nosuchcmd"], 2, "nosuchcmd"),
    ("export-no-output", ["export"], 2, "'--output'"),
    ("export-bad-precision", ["export", "-o", "{T}/o", "--precision", "int4"], 2, "'int4'"),
    ("export-opset-not-int", ["export", "-o", "{T}/o", "--opset", "abc"], 2, "'--opset'"),
    ("export-unknown-demo", ["export", "-m", "demo:nope", "-o", "{T}/o"], 2, "demo:nope"),
    ("export-missing-model-dir", ["export", "-m", "{T}/no-model", "-o", "{T}/o"], 2, "{T}/no-model"),
    ("export-model-config-not-json", ["export", "-m", "{T}/bad-model", "-o", "{T}/o"], 2, "config.json"),
    ("export-output-is-a-file", ["export", "-m", "demo:tiny-mistral", "-o", "{T}/afile"], 6, "{T}/afile"),
    ("export-output-under-a-file", ["export", "-m", "demo:tiny-mistral", "-o", "{T}/afile/sub"], 6, "{T}/afile/sub"),
    ("export-output-not-empty", ["export", "-m", "demo:tiny-mistral", "-o", "{T}/notart"], 2, "{T}/notart"),
    ("build-no-output", ["build"], 2, "'--output'"),
    ("build-bad-precision", ["build", "-o", "{T}/o", "-p", "bogus"], 2, "'bogus'"),
    ("build-output-is-a-file", ["build", "-m", "demo:tiny-mistral", "-o", "{T}/afile"], 6, "{T}/afile"),
    ("inspect-no-dir", ["inspect"], 2, "'directory'"),
    ("inspect-missing-dir", ["inspect", "{T}/nope"], 3, "{T}/nope"),
    ("inspect-not-an-artifact", ["inspect", "{T}/notart"], 3, "manifest.json"),
    ("inspect-manifest-is-list", ["inspect", "{T}/list-manifest"], 3, "manifest.json"),
    ("inspect-manifest-not-utf8", ["inspect", "{T}/binary-manifest"], 3, "manifest.json"),
    ("embed-no-dir", ["embed"], 2, "'directory'"),
    ("embed-no-texts", ["embed", "{A}"], 2, "'texts'"),
    ("embed-empty-text", ["embed", "{A}", ""], 2, "input 0"),
    ("embed-bad-variant", ["embed", "{A}", "hi", "--variant", "int4"], 2, "'int4'"),
    ("embed-bad-backend", ["embed", "{A}", "hi", "--backend", "nope"], 2, "'nope'"),
    ("embed-absent-variant", ["embed", "{A}", "hi", "--variant", "int8"], 3, "int8"),
    ("embed-dims-not-int", ["embed", "{A}", "hi", "--dims", "abc"], 2, "'--dims'"),
    ("verify-no-dir", ["verify"], 2, "'directory'"),
    ("verify-unknown-candidate", ["verify", "{A}", "--candidates", "int4"], 2, "'int4'"),
    ("verify-absent-candidate", ["verify", "{A}", "--candidates", "int8"], 2, "'int8'"),
    ("verify-empty-candidates", ["verify", "{A}", "--candidates", ","], 2, "--candidates"),
    ("verify-batch-size-0", ["verify", "{A}", "--batch-size", "0"], 2, "batch_size"),
    ("verify-negative-budget", ["verify", "{A}", "--time-budget", "-1"], 2, "time budget"),
    ("verify-unknown-suite", ["verify", "{A}", "--suite", "nosuch"], 2, "'nosuch'"),
    ("verify-missing-config", ["verify", "{A}", "--config", "{T}/none.toml"], 2, "{T}/none.toml"),
    ("verify-config-bad-toml", ["verify", "{A}", "--config", "{T}/bad.toml"], 2, "{T}/bad.toml"),
    ("verify-config-not-utf8", ["verify", "{A}", "--config", "{T}/binary.toml"], 2, "{T}/binary.toml"),
    ("verify-config-unknown-key", ["verify", "{A}", "--config", "{T}/unknown-key.toml"], 2, "bogus"),
    ("verify-config-wrong-type", ["verify", "{A}", "--config", "{T}/wrong-type.toml"], 2, "suite"),
    ("verify-absent-reference", ["verify", "{A}", "--reference", "int8"], 4, "'int8'"),
    ("verify-report-dir-is-a-file", ["verify", "{A}", "--report-dir", "{T}/afile"], 6, "{T}/afile"),
    ("verify-junit-under-a-file", ["verify", "{A}", "--junit", "{T}/afile/j.xml"], 6, "{T}/afile"),
    ("calibrate-no-dir", ["calibrate"], 2, "'directory'"),
    ("calibrate-bad-method", ["calibrate", "{A}", "--method", "bogus"], 2, "'bogus'"),
    ("calibrate-bad-rotation", ["calibrate", "{A}", "--rotation", "yes"], 2, "unknown rotation mode 'yes'"),
    ("calibrate-bad-weight-rounding", ["calibrate", "{A}", "--weight-rounding", "bad"], 2, "unknown weight rounding 'bad'"),
    ("calibrate-bad-reference-dtype", ["calibrate", "{A}", "--reference-dtype", "fp16"], 2, "unknown reference dtype"),
    ("calibrate-alpha-out-of-range", ["calibrate", "{A}", "--smoothquant", "7"], 2, "7.0"),
    ("calibrate-unknown-recipe", ["calibrate", "{A}", "--recipe", "nosuch"], 2, "'nosuch'"),
    ("engine-no-dir", ["engine"], 2, "'directory'"),
    ("engine-opt-level-not-int", ["engine", "{A}", "--opt-level", "abc"], 2, "'--opt-level'"),
    ("engine-bad-profile", ["engine", "{A}", "--batch", "1,2"], 2, "--batch"),
    ("check-qdq-no-model", ["check-qdq"], 2, "'model'"),
    ("check-qdq-missing-file", ["check-qdq", "{T}/none.onnx"], 3, "{T}/none.onnx"),
    ("serve-no-dir", ["serve"], 2, "'directory'"),
    ("serve-not-an-artifact", ["serve", "{T}/notart"], 3, "{T}/notart"),
    ("serve-bad-port", ["serve", "{A}", "--port", "99999"], 2, "99999"),
    ("serve-bad-truncation", ["serve", "{A}", "--truncation", "bogus"], 2, "'bogus'"),
    ("serve-inputs-over-queue", ["serve", "{A}", "--max-queue", "16", "--max-inputs", "100"], 2, "--max-inputs 100"),
    ("serve-zero-inputs", ["serve", "{A}", "--max-inputs", "0"], 2, "--max-inputs"),
    ("bench-no-dir", ["bench"], 2, "'directory'"),
    ("bench-bad-sizes", ["bench", "{A}", "--batch-sizes", "a,b"], 2, "--batch-sizes"),
    ("finetune-data-no-output", ["finetune-data"], 2, "'--output'"),
    ("mine-no-input", ["mine"], 2, "'--input'"),
    ("mine-missing-input", ["mine", "-i", "{T}/none.jsonl", "-o", "{T}/m.jsonl"], 2, "{T}/none.jsonl"),
    ("finetune-no-config", ["finetune"], 2, "'--config'"),
    ("finetune-missing-config", ["finetune", "-c", "{T}/none.toml"], 2, "{T}/none.toml"),
]


def _scratch(root: Path) -> None:
    (root / "afile").write_text("not a dir\n")
    (root / "notart").mkdir()
    (root / "notart" / "f").write_text("x\n")
    (root / "bad-model").mkdir()  # the demo model's files, with a config.json that is not JSON
    for f in materialize_demo("demo:tiny-mistral").iterdir():
        if f.name != "config.json":
            (root / "bad-model" / f.name).symlink_to(f)
    (root / "bad-model" / "config.json").write_text("{not json")
    (root / "list-manifest").mkdir()
    (root / "list-manifest" / "manifest.json").write_text("[]")
    (root / "binary-manifest").mkdir()
    (root / "binary-manifest" / "manifest.json").write_bytes(b"\xff\xfe{\x00")
    (root / "bad.toml").write_text("[verify\nx =")
    (root / "binary.toml").write_bytes(b"\xff\xfe[verify]")
    (root / "unknown-key.toml").write_text("[verify]\nbogus = 1\n")
    (root / "wrong-type.toml").write_text("[verify]\nsuite = 5\n")


@pytest.fixture(scope="module")
def results(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[CliResult, str]]:
    """All cases run once, four at a time (each is a short-lived process)."""
    scratch = tmp_path_factory.mktemp("cli-usage")
    _scratch(scratch)

    def fill(s: str) -> str:
        return s.replace("{A}", str(tiny_artifact)).replace("{T}", str(scratch))

    def one(case: tuple[str, list[str], int, str]) -> tuple[str, tuple[CliResult, str]]:
        cid, argv, _, needle = case
        return cid, (run_cli(*[fill(a) for a in argv], timeout=240), fill(needle))

    # the artifact's writer lock is held throughout: every usage error is found before a command would take it,
    # so it is named as such even while another process writes the dir (and the cases cannot race each other)
    with writer_lock(tiny_artifact), ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize("cid, code", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_usage_error_is_one_line_naming_the_argument(results, cid: str, code: int) -> None:
    res, needle = results[cid]
    line = res.one_error()
    assert needle in line, f"{needle!r} not named in: {line}"
    assert res.rc == code, f"exit {res.rc}, expected {code}: {line}"


def test_undecodable_argv_text_is_one_line(tiny_artifact: Path) -> None:
    """Bytes that are not UTF-8 reach Python as lone surrogates; the text is refused by index, before loading."""
    res = run_cli("embed", str(tiny_artifact), "fine", b"caf\xe9 \xff")
    line = res.one_error()
    assert res.rc == 2 and "input 1" in line and "Embedder on" not in res.output


def test_bare_command_prints_help_and_exits_0() -> None:
    res = run_cli()
    assert res.rc == 0 and "Usage" in res.output and "Traceback" not in res.output


def test_version() -> None:
    res = run_cli("--version")
    assert res.rc == 0 and res.stdout.startswith("sfr-export ")


def test_help_shows_bracketed_table_names() -> None:
    res = run_cli("verify", "--help")
    assert res.rc == 0 and "[verify]" in res.stdout and "[thresholds.<precision>]" in res.stdout


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    res = run_cli("inspect", str(tmp_path / "nope"), SFR_EXPORT_DEBUG="1")
    assert res.rc != 0 and "Traceback" in res.output and "ArtifactError" in res.output
