"""``adderquant eval`` on the released model and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adderquant.cli import main
from adderquant.data import TensorLoader
from adderquant.evaluate import evaluate

LIMIT = 200


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the ``adderquant`` entry point (``adderquant.cli:main``) in a new process."""
    entry = "import sys; from adderquant.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", entry, *args],
                          capture_output=True, text=True, timeout=300)


def test_eval_json_on_the_first_images(
    shared_data_root: Path, released_checkpoint: Path, released_resnet20, cifar10_test, capsys
) -> None:
    code = main(["eval", "--json", "--limit", str(LIMIT), "--batch-size", "64",
                 "--data", str(shared_data_root), "--checkpoint", str(released_checkpoint)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert {"model", "dataset", "top1", "top5", "correct", "total", "seconds"} <= report.keys()
    assert report["model"] == "resnet20" and report["dataset"] == "cifar10"
    assert report["total"] == LIMIT and report["seconds"] > 0
    images, labels = cifar10_test[0][:LIMIT], cifar10_test[1][:LIMIT]
    direct = evaluate(released_resnet20, TensorLoader(images, labels, "cifar10", batch_size=50),
                      progress=False)
    assert report["correct"] == direct.correct
    assert report["top1"] == pytest.approx(100.0 * direct.correct / LIMIT)
    assert report["top5"] == pytest.approx(direct.top5)
    assert report["correct"] >= 0.8 * LIMIT  # the model is 91.6 % accurate on the subset


@pytest.mark.slow
def test_eval_reproduces_the_released_accuracy(shared_data_root: Path, capsys) -> None:
    assert main(["eval", "--json", "--data", str(shared_data_root)]) == 0
    report = json.loads(capsys.readouterr().out)
    # The release notes: 916/1000 on the shared 1,000-image test subset.
    assert (report["correct"], report["total"]) == (916, 1000)


def test_missing_data_dir_exits_2_with_one_message(
    released_checkpoint: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-dir"
    result = run_cli("eval", "--data", str(missing), "--checkpoint", str(released_checkpoint))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("adderquant eval: error: cifar10: data folder ")
    assert str(missing) in lines[0] and "--data DIR" in lines[0]
    assert result.stdout == ""


def test_wrong_checkpoint_exits_2_with_the_key_list(
    shared_data_root: Path, released_checkpoint: Path, capsys
) -> None:
    code = main(["eval", "--model", "resnet32", "--checkpoint", str(released_checkpoint),
                 "--data", str(shared_data_root), "--limit", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("adderquant eval: error: checkpoint ") and "missing keys" in err


def test_corrupted_dataset_exits_2(
    cifar10_dir: Path, released_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes((cifar10_dir / "test_batch").read_bytes()[:5000])
    code = main(["eval", "--data", str(tmp_path), "--checkpoint", str(released_checkpoint)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("adderquant eval: error: ") and "corrupted or truncated pickle" in err


def test_limit_must_be_positive(shared_data_root: Path, released_checkpoint: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--limit", "0", "--data", str(shared_data_root),
              "--checkpoint", str(released_checkpoint)])
    assert exc.value.code == 2
    assert "argument --limit: must be an integer at least 1" in capsys.readouterr().err
