"""Mistakes of a user's own through the real CLI: one line naming the key or file and the fix, the documented exit
code, and no stage folder written where the mistake could be seen before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sft_engine.errors import EXIT_CODES


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from flows.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _stage_folders(work_dir: Path) -> list[Path]:
    return [p for p in work_dir.glob("*/*") if (p / "_SUCCESS").is_file()] if work_dir.exists() else []


def test_help_documents_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for code, text in EXIT_CODES.items():
        assert f"{code:>3}  {text.split(';')[0][:40]}" in out


def test_preflight_lists_every_problem_in_one_line_each_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=2\nnode2 two-slots\n")
    work = tmp_path / "w"
    code, out, err = _run(
        capsys, "train", "-c", "conf/demo.yaml", f"work_dir={work}", "curate.sources=[{name: a, path: /nowhere/*.jsonl}]",
        f"model={tmp_path / 'no_model'}", f"train.hostfile={hostfile}",
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert lines == [
        ("sft-pipeline: source 'a': '/nowhere/*.jsonl' matches no file (curate.sources.0.path); check the path or glob "
         "(relative paths start from the directory you run in)"),
        (f"sft-pipeline: model '{tmp_path / 'no_model'}' is neither a packaged model (smollm2-135m) nor a folder (model); "
         "pass model=/path/to/hf_model_folder (a Hugging Face folder with config.json and *.safetensors)"),
        "sft-pipeline: hostfile line 'node2 two-slots' does not parse (train.hostfile); write each node as 'hostname slots=N'",
    ]
    assert out == "" and not work.exists()


def test_a_suite_of_ones_own_that_cannot_be_scored_stops_the_run_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "quiz.jsonl"
    bad.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "gold": 1}) + "\n"
                   + json.dumps({"question": "3+3?", "choices": ["6", "7"], "gold": 5}) + "\n")
    work = tmp_path / "w"
    suites = (f"evaluate.suites=[{{name: quiz, kind: multiple_choice, path: {bad}}}, "
              f"{{name: checked, kind: generation, path: {bad}, prompt_field: question, answer_field: gold, metric: 'python:nope.mod:check'}}]")
    code, out, err = _run(capsys, "evaluate", "-c", "conf/demo.yaml", f"work_dir={work}", suites)
    assert code == 2
    assert err.strip().splitlines() == [
        (f"sft-pipeline: evaluate.suites 'quiz' ({bad}, item 1): 'gold' = 5 is not an index into its 2 choices (0-1) "
        "(evaluate.suites.0); fix the file, or the suite's settings"),
        (f"sft-pipeline: evaluate.suites 'checked' ({bad}): the checker 'nope.mod:check' cannot be imported (No module named 'nope'); "
        "install its package or add it to PYTHONPATH (evaluate.suites.1); fix the file, or the suite's settings"),
    ]
    assert out == "" and not work.exists()


def _without_chat_template(model: Path, dest: Path) -> Path:
    """A copy of ``model`` whose tokenizer has no chat template."""
    shutil.copytree(model, dest)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    return dest


def test_a_model_without_chat_template_and_a_work_dir_inside_a_file_are_refused(tiny_model: Path, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str]) -> None:
    bare = _without_chat_template(tiny_model, tmp_path / "bare")
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = _run(capsys, "prepare", "-c", "conf/demo.yaml", f"work_dir={afile / 'w'}", f"model={bare}",
                        "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 5}]")
    assert code == 2
    assert f"sft-pipeline: the tokenizer in '{bare}' has no chat template (model); add chat_template.jinja" in err
    assert f"sft-pipeline: work_dir '{afile / 'w'}' is inside '{afile}', which is a file (work_dir); pass work_dir=<a folder>" in err


def test_an_unreadable_file_in_a_glob_ends_the_run_with_exit_5_and_the_file_named(prefect_server, tmp_path: Path,
                                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}\n')
    (data / "b.parquet").write_bytes(b"PAR1 this is not a parquet file")
    work = tmp_path / "w"
    code, out, err = _run(capsys, "curate", "-c", "conf/demo.yaml", f"work_dir={work}",
                          f"curate.sources=[{{name: d, path: '{data}/*'}}]", "runner.files_per_shard=1")
    assert code == 5
    (line,) = err.strip().splitlines()
    assert line.startswith(f"sft-pipeline: cannot read source '{data / 'b.parquet'}'") and "; the full log is " in line
    log = Path(line.rsplit("; the full log is ", 1)[1])
    assert log.is_file() and "Traceback" in log.read_text()
    assert out.startswith("log: ") and "Traceback" not in out + err
    assert not list(work.glob("curate/*/_SUCCESS"))


def test_a_template_that_rejects_every_row_ends_the_run_with_exit_5(prefect_server, tiny_model: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rejecting = _without_chat_template(tiny_model, tmp_path / "rejecting")
    # Refuses any conversation with more than one message: the self-check's shapes are rejected, not failed.
    (rejecting / "chat_template.jinja").write_text(
        "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    code, _, err = _run(capsys, "prepare", "-c", "conf/demo.yaml", f"work_dir={tmp_path / 'w'}", f"model={rejecting}",
                        "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 20}]")
    assert code == 5
    assert "preparation left no training sample: the " in err and '{"mask_template_rejected": ' in err
    assert "sft-pipeline check-template --model" in err


def test_library_progress_bars_are_off_once_the_cli_package_is_imported() -> None:
    import os
    import subprocess
    import sys

    # transformers' GGUF conversion and lm-eval draw plain tqdm bars; tqdm reads TQDM_DISABLE when first imported,
    # so the CLI package must set it before anything imports tqdm.
    code = "import flows.cli\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='library bar'): pass\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert "library bar" not in done.stderr + done.stdout


def test_disk_full_is_one_line_with_the_stage_folder_and_the_preflight_estimate(tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from flows import console
    from flows.cli import _disk_full
    from sft_engine.config import load_config
    from sft_engine.errors import DiskFullError
    from sft_engine.preflight import MIN_FREE

    cfg = load_config("conf/demo.yaml", [f"work_dir={tmp_path}"])
    # What atomic_dir raises when a write fails with ENOSPC (tests/test_io.py fills a real 256 KiB tmpfs).
    raised = DiskFullError(f"out of disk space writing curate/abc in '{tmp_path / 'curate'}' (0.2 MiB written before the disk "
                           "filled, 0.0 MiB free now); nothing was published")
    code = console.report(_disk_full(raised, cfg, "curate", None), None, False)
    err = capsys.readouterr().err.strip()
    assert code == DiskFullError.exit_code == 6 and "out of disk space" in EXIT_CODES[6]
    assert len(err.splitlines()) == 1 and err.startswith("sft-pipeline: out of disk space writing curate/abc in ")
    # Built-in sources have no files to size: the estimate is the preflight's floor.
    assert f"this run needs about {MIN_FREE / 2**30:.2f} GiB free in work_dir (the preflight's estimate)" in err
    assert err.endswith("free space there or pass work_dir=<a larger disk>")
    # A bare ENOSPC from anywhere else (a log file, the MLflow store) gets the same line, naming the file.
    import errno

    bare = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "mlflow.db"))
    assert console.report(_disk_full(bare, cfg, "curate", None), None, False) == 6
    assert f"out of disk space writing '{tmp_path / 'mlflow.db'}'; this run needs about" in capsys.readouterr().err
