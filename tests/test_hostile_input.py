"""Hostile but realistic input, end to end through the command line in a temporary folder:
every case must end in a clear error (exit 2, argparse's exit 2, or 130 for Ctrl-C) that
names the problem, with no file clobbered or half written. The case numbers follow the table
of the hostile-input report; ``test_also_*`` are the smaller findings listed after it."""

from __future__ import annotations

import gzip
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adderquant import _io
from adderquant._io import LOCK_FILE, OutputError, folder_lock, write_bytes_atomic
from adderquant.cli import main
from adderquant.engine import export_model, fakequant_model, load_package
from adderquant.engine.package import GRAPH_FILE, MANIFEST_FILE, PackageError
from adderquant.models import create_model
from adderquant.quant.io import save_quantized
from adderquant.studies.reproduce import accuracy_table, select_rows
from test_engine import input_thresholds, quantize_resnet
from test_export import rewrite

ADDERQUANT = Path(sys.executable).with_name("adderquant")
MISSING_DATA = ["--data", "/nonexistent/adderquant-data"]


def usage_error(argv: list[str], capsys) -> str:
    """The message of an argument that argparse refuses (exit 2)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def error(argv: list[str], capsys) -> str:
    """The one-line error of a command that exits 2."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.fixture(scope="module")
def quantized() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    return quantize_resnet(model, input_thresholds(model, torch.randn(4, 3, 32, 32)), 4)


@pytest.fixture()
def aq_file(quantized, tmp_path) -> Path:
    path = tmp_path / "q.aq"
    save_quantized(path, quantized, "resnet20", 10, {"method": "test"})
    return path


@pytest.fixture()
def package(quantized, tmp_path) -> Path:
    export_model(quantized, "resnet20", tmp_path / "pkg", "cifar10")
    return tmp_path / "pkg"


@pytest.fixture()
def fashion_root(tmp_path) -> Path:
    """A random stand-in for Fashion-MNIST: 64 training and 16 test images."""
    root = tmp_path / "data" / "fashion-mnist"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 16)):
        for stem, shape in ((f"{prefix}-images-idx3-ubyte", (n, 28, 28)),
                            (f"{prefix}-labels-idx1-ubyte", (n,))):
            data = rng.integers(0, 10 if len(shape) == 1 else 256, shape).astype(np.uint8)
            header = bytes([0, 0, 8, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
            (root / f"{stem}.gz").write_bytes(gzip.compress(header + data.tobytes()))
    return root.parent


def bad_targets(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, a folder, links to both, and (as root) a character device like /dev/null."""
    targets = {"fifo": tmp_path / "fifo", "folder": tmp_path / "folder"}
    os.mkfifo(targets["fifo"])
    targets["folder"].mkdir()
    targets["link to fifo"] = tmp_path / "fifo-link"
    targets["link to fifo"].symlink_to(targets["fifo"])
    targets["link to folder"] = tmp_path / "folder-link"
    targets["link to folder"].symlink_to(targets["folder"])
    try:
        os.mknod(tmp_path / "nulldev", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        targets["device"] = tmp_path / "nulldev"
    except PermissionError:
        pass
    return targets


def test_case01_devices_fifos_and_folders_are_never_replaced(tmp_path, aq_file, capsys):
    for what, target in bad_targets(tmp_path).items():
        before = os.lstat(target)
        for argv in (["ptq", "--limit", "200", "--method", "fp", "--out", str(target)],
                     ["ptq", "--limit", "200", "--method", "fp", "--report", str(target)],
                     ["reproduce", "--limit", "200", "--json", str(target)]):
            err = error([*argv, *MISSING_DATA], capsys)
            assert f"refusing to write {target}" in err and "not a regular file" in err, (what,
                                                                                           err)
        # train writes a run folder: one of its files is a link to the target
        run_dir = tmp_path / f"run-{what.replace(' ', '-')}"
        run_dir.mkdir()
        (run_dir / "model.pth").symlink_to(target)
        err = error(["train", "--epochs", "1", "--limit", "64", "--out", str(run_dir),
                     *MISSING_DATA], capsys)
        assert f"refusing to write {run_dir / 'model.pth'}" in err, (what, err)
        assert "not a regular file" in err, (what, err)
        with pytest.raises(OutputError, match="not a regular file"):
            write_bytes_atomic(target, b"x")
        after = os.lstat(target)
        assert (after.st_mode, after.st_ino, after.st_rdev) == (
            before.st_mode, before.st_ino, before.st_rdev), what
    # export's target is a folder: a FIFO or a file there is refused, nothing written into it
    fifo = tmp_path / "fifo"
    assert "not a folder" in error(["export", str(aq_file), "--out", str(fifo)], capsys)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    # a link to a regular file is written through: the link stays, its target changes
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old")
    link.symlink_to(real)
    write_bytes_atomic(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_case02_reproduce_bits_outside_the_range_or_the_rows_are_refused(tmp_path, capsys):
    out = ["--out", str(tmp_path / "r"), "--limit", "200", *MISSING_DATA]
    for bits in (["9", "33"], ["4", "9"], ["1"], ["four"]):
        err = usage_error(["reproduce", "--bits", *bits, "--methods", "qssf", *out], capsys)
        assert "argument --bits" in err and "from 2 to 8" in err
    err = error(["reproduce", "--bits", "8", "--methods", "adderquant-mixed", *out], capsys)
    assert "row adderquant-mixed runs at [6, 5, 4, 3] bits, none of --bits 8" in err
    assert "twice" in error(["reproduce", "--bits", "4", "4", *out], capsys)
    assert not (tmp_path / "r").exists()
    # the library refuses too, instead of running the row unquantized as full precision
    with pytest.raises(ValueError, match="none of the requested"):
        accuracy_table(None, select_rows(["adderquant-mixed"]), [8], None)


def test_case04_train_refuses_bad_rates_and_limits_and_stops_when_the_loss_diverges(
    tmp_path, fashion_root, capsys
) -> None:
    out = tmp_path / "t.pth"
    base = ["train", "--model", "lenet5", "--epochs", "1", "--data", str(fashion_root),
            "--batch-size", "16", "--out", str(out)]
    for lr in ("nan", "inf", "-inf", "0", "-0.1", "fast"):
        err = usage_error([*base, f"--lr={lr}"], capsys)
        assert "argument --lr" in err and "finite number above 0" in err
    for limit in ("-5", "0"):
        assert "argument --limit" in usage_error([*base, f"--limit={limit}"], capsys)
    assert "argument --weight-decay" in usage_error([*base, "--weight-decay", "nan"], capsys)
    err = error([*base, "--limit", "64", "--lr", "1e30", "--json"], capsys)
    assert "training diverged: the loss became nan" in err and "lower --lr" in err
    assert list(tmp_path.iterdir()) == [fashion_root]


def test_case05_an_edited_model_json_is_refused(package, capsys):
    graph_path = package / GRAPH_FILE
    original = graph_path.read_text()
    edits = [("\"fixed_frac_bits\": 40", "\"fixed_frac_bits\": 30"),
             ("\"relu\": true", "\"relu\": false")]
    for old, new in edits:
        assert old in original
        graph_path.write_text(original.replace(old, new, 1))
        err = error(["infer", str(package), "--limit", "8", *MISSING_DATA], capsys)
        assert f"{graph_path} does not match the SHA-256 recorded in {MANIFEST_FILE}" in err
    graph_path.write_text(original)
    load_package(package)
    (package / MANIFEST_FILE).write_text("{}")
    assert "is not an adderquant-integer-adder package file" in error(
        ["infer", str(package), *MISSING_DATA], capsys)


def test_case06_a_layer_cut_to_fewer_input_channels_is_refused(
    aq_file, package, tmp_path, capsys
) -> None:
    payload = torch.load(aq_file, weights_only=True)
    key = "layer1.0.conv1.weight_codes"
    payload["state_dict"][key] = payload["state_dict"][key][:, :8].clone()
    torch.save(payload, aq_file)
    err = error(["export", str(aq_file), "--out", str(tmp_path / "cut")], capsys)
    assert "layer layer1.0.conv1 holds weight codes of shape (16, 8, 3, 3)" in err
    assert "needs (16, 16, 3, 3)" in err and not (tmp_path / "cut").exists()
    # the same cut in a package, made consistent with its graph and manifest, fails on load
    base = load_package(package)
    graph = json.loads(json.dumps(base.graph))
    graph["layers"]["layer1.0.conv1"]["in_channels"] = 8
    tensors = dict(base.tensors)
    tensors[key] = tensors[key][:, :8].contiguous()
    rewrite(package, graph, tensors)
    with pytest.raises(PackageError, match="layer1.0.conv1 takes 8 input channels but gets 16"):
        load_package(package)


def test_case07_output_paths_and_layer_names_are_checked_before_the_work(tmp_path, capsys):
    # the data folder does not exist: an error about it would mean the work had started
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv in (["ptq", "--method", "fp", "--out", str(blocker / "q.aq")],
                 ["reproduce", "--out", str(blocker / "r")],
                 ["analyze", "bits", "--out", str(blocker / "a")]):
        err = error([*argv, "--limit", "200", *MISSING_DATA], capsys)
        assert f"{blocker} is not a folder" in err, err
    err = error(["analyze", "histograms", "--layers", "nosuch", "--out", str(tmp_path / "a"),
                 *MISSING_DATA], capsys)
    assert "--layers: resnet20 has no adder layer nosuch" in err and "layer1.0.conv1" in err
    assert "name the same file" in error(
        ["ptq", "--out", str(tmp_path / "x"), "--report", str(tmp_path / "x"), *MISSING_DATA],
        capsys)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        err = error(["ptq", "--method", "fp", "--out", str(locked / "q.aq"), *MISSING_DATA],
                    capsys)
        assert f"the folder {locked} is not writable" in err


def test_case08_energy_table_inline_json_or_a_file(tmp_path, capsys):
    base = ["energy", "--model", "lenet5", "--bits", "4", "--json"]
    inline = '{"int_add": {"8": 0.03}}'
    assert main([*base, "--table", inline]) == 0
    assert json.loads(capsys.readouterr().out)["table_pj"]["int_add"] == {"8": 0.03}
    path = tmp_path / "table.json"
    path.write_text('{"int_add": {"8": 0.05}}')
    assert main([*base, "--table", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["table_pj"]["int_add"] == {"8": 0.05}
    err = usage_error([*base, "--table", '{"int_add": {"8": 0.03}'], capsys)
    assert "energy table (inline JSON): not valid JSON" in err
    err = usage_error([*base, "--table", str(tmp_path / "none.json")], capsys)
    assert f"energy table {tmp_path / 'none.json'}: cannot read it" in err
    assert "non-negative" in usage_error([*base, "--table", '{"int_add": {"8": NaN}}'], capsys)


def test_case09_ctrl_c_during_start_up_prints_one_line_and_exits_130(tmp_path):
    out = tmp_path / "q.aq"
    proc = subprocess.Popen([str(ADDERQUANT), "ptq", "--method", "fp", "--limit", "200",
                             "--out", str(out), "--no-progress"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # the command is still importing its modules
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # a second Ctrl-C changes nothing
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr == "adderquant: interrupted\n", stderr
    assert stdout == "" and list(tmp_path.iterdir()) == []


def test_case09_the_entry_point_imports_nothing_a_ctrl_c_could_cut(tmp_path):
    """The console script imports ``adderquant.cli`` before ``main`` can catch anything: that
    import must not load torch (whose import Ctrl-C would cut with a traceback)."""
    code = "import sys, adderquant.cli; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_case09_ctrl_c_during_the_work_or_a_write_leaves_nothing_behind(
    tmp_path, fashion_root, monkeypatch, capsys
) -> None:
    out = tmp_path / "run"
    argv = ["train", "--model", "lenet5", "--epochs", "1", "--limit", "16", "--data",
            str(fashion_root), "--out", str(out), "--json"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("adderquant.train.fit", interrupted)
    assert main(argv) == 130
    assert capsys.readouterr().err == "adderquant: interrupted\n"
    monkeypatch.undo()
    out.mkdir()
    (out / "last.pt").write_bytes(b"previous")
    monkeypatch.setattr(_io.os, "replace", interrupted)  # Ctrl-C just before the rename
    assert main(argv) == 130
    assert capsys.readouterr().err == "adderquant: interrupted\n"
    assert (out / "last.pt").read_bytes() == b"previous"
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]


def test_case13_a_second_writer_into_a_package_folder_fails_clearly(aq_file, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    with folder_lock(pkg):  # an export in progress
        err = error(["export", str(aq_file), "--out", str(pkg)], capsys)
        assert f"{pkg} is being written by process {os.getpid()}" in err
        assert sorted(p.name for p in pkg.iterdir()) == [LOCK_FILE]
    assert main(["export", str(aq_file), "--out", str(pkg)]) == 0
    assert LOCK_FILE not in {p.name for p in pkg.iterdir()}
    load_package(pkg)
    # a lock left by a process that no longer runs is taken over
    gone = subprocess.Popen(["true"])
    gone.wait()
    (pkg / LOCK_FILE).write_text(f"{gone.pid}\n")
    assert main(["export", str(aq_file), "--out", str(pkg)]) == 0
    assert not (pkg / LOCK_FILE).exists()
    load_package(pkg)


def test_also_options_that_would_be_ignored_are_refused(capsys):
    err = error(["ptq", "--no-grouping", "--groups", "8", *MISSING_DATA], capsys)
    assert "--groups has no effect with --no-grouping" in err
    err = error(["ptq", "--method", "fp", "--bits", "2", *MISSING_DATA], capsys)
    assert "--method fp quantizes nothing, so --bits would have no effect" in err
    assert "bit width must be an integer from 2 to 8" in error(
        ["ptq", "--bits", "9", *MISSING_DATA], capsys)
    for flag, value in (("--threads", "0"), ("--batch-size", "0"), ("--limit", "-1")):
        assert f"argument {flag}" in usage_error(["eval", flag, value, *MISSING_DATA], capsys)


class _Payload:
    """Unpickling this runs ``os.system``: the test checks that it never does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_also_unsafe_pickles_are_refused_without_advice_to_run_them(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Payload(marker)}, evil)
    for argv in (["eval", "--checkpoint", str(evil), *MISSING_DATA],
                 ["export", str(evil), "--out", str(tmp_path / "pkg")]):
        err = error(argv, capsys)
        assert "refusing to load" in err and str(evil) in err and "could run code" in err
        assert "weights_only" not in err and "trusted source" not in err
    assert not marker.exists()


def test_also_architecture_mismatches_give_a_short_message(aq_file, package, capsys):
    payload = torch.load(aq_file, weights_only=True)
    payload["model"] = "resnet32"
    torch.save(payload, aq_file)
    err = error(["export", str(aq_file), "--out", str(aq_file.parent / "p32")], capsys)
    assert f"{aq_file} does not fit resnet32:" in err and "missing keys (" in err
    assert "Error(s) in loading state_dict" not in err and len(err.splitlines()) <= 5
    graph = json.loads((package / GRAPH_FILE).read_text())
    graph["architecture"] = "resnet32"
    rewrite(package, graph)
    with pytest.raises(PackageError, match="do not fit resnet32") as exc:
        fakequant_model(load_package(package))
    assert len(str(exc.value).splitlines()) <= 5


def test_also_write_errors_name_the_target_and_leave_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_io.os, "fsync", disk_full)
    with pytest.raises(OutputError) as exc:
        write_bytes_atomic(target, b"{}")
    assert str(exc.value) == f"cannot write {target}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_also_energy_results_that_are_not_text_name_the_file(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_bytes(bytes(range(256)) * 4)
    err = error(["energy", "--model", "lenet5", "--bits", "4", "--results", str(results)],
                capsys)
    assert f"--results {results}: not a text file" in err
