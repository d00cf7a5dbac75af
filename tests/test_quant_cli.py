"""The ptq, reproduce and analyze commands on the real data (small settings), and the slow
accuracy targets on the 1,000-image test subset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adderquant
from adderquant.cli import main
from adderquant.models import create_model, load_pretrained
from adderquant.quant.config import PaperConfig, QSSFConfig
from adderquant.quant.io import load_quantized
from adderquant.studies.experiment import Experiment

TINY = ["--calib-batches", "1", "--calib-batch-size", "16", "--bias-correction-batches", "1",
        "--limit", "40", "--batch-size", "40", "--no-progress"]


def model_args(root: Path, checkpoint: Path) -> list[str]:
    return ["--data", str(root), "--checkpoint", str(checkpoint)]


def test_ptq_command_saves_a_model_that_loads_and_scores_the_same(
    shared_data_root, released_checkpoint, tmp_path, capsys
) -> None:
    out = tmp_path / "q.pt"
    code = main(["ptq", "--method", "paper", "--bits", "6", "--groups", "2", "--report-images",
                 "2", "--json", "--out", str(out), "--report", str(tmp_path / "r.json"), *TINY,
                 *model_args(shared_data_root, released_checkpoint)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "paper" and result["bits"] == 6 and result["images"] == 40
    assert len(result["layers"]) == 20 and result["seconds"]["total"] > 0
    assert all(len(e["group_sizes"]) == 2 for e in result["layers"])
    model, payload = load_quantized(out)
    assert payload["config"]["groups"] == 2
    code = main(["ptq", "--method", "fp", "--json", "--limit", "40", "--batch-size", "40",
                 "--no-progress", *model_args(shared_data_root, released_checkpoint)])
    assert code == 0 and json.loads(capsys.readouterr().out)["layers"] == []


def test_ptq_command_and_the_python_call_give_the_same_model(
    shared_data_root, released_checkpoint, tmp_path, capsys
) -> None:
    out = tmp_path / "q.pt"
    assert main(["ptq", "--bits", "3", "--out", str(out), "-v", *TINY,
                 *model_args(shared_data_root, released_checkpoint)]) == 0
    assert "quantized 20 adder layers with adderquant" in capsys.readouterr().err  # -v: debug
    from_cli, payload = load_quantized(out)
    model = load_pretrained(create_model("resnet20"), released_checkpoint)
    # the three lines of docs/api.md, with the settings of TINY
    config = adderquant.AdderQuantConfig(bits=3, calib_batches=1, calib_batch_size=16,
                                         bias_correction_batches=1)
    qmodel = adderquant.quantize(
        model, config, adderquant.CalibrationSet.from_config(config, root=shared_data_root))
    assert payload["config"] == config.as_dict()
    expected = qmodel.state_dict()
    state = from_cli.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
        else:
            assert value == state[key], key


def test_ptq_command_reports_bad_settings(shared_data_root, released_checkpoint, capsys) -> None:
    args = model_args(shared_data_root, released_checkpoint)
    assert main(["ptq", "--method", "paper", "--bits", "9", *TINY, *args]) == 2
    assert "from 2 to 8" in capsys.readouterr().err
    assert main(["ptq", "--method", "paper", "--groups", "17", *TINY, *args]) == 2
    assert "exceeds the 16 output channels" in capsys.readouterr().err
    assert main(["ptq", "--calib-pool", "60000", *TINY, *args]) == 2
    assert "exceeds the 50000 training images" in capsys.readouterr().err
    # settings of another method are refused before any data is read, naming the flag
    assert main(["ptq", "--method", "qssf", "--groups", "2", *TINY, *args]) == 2
    assert "--groups do(es) not apply to method 'qssf'" in capsys.readouterr().err
    assert main(["analyze", "ablation", "--method", "adderquant", *TINY, *args]) == 2
    assert ("varies ['act_clip', 'weight_clamp'], which method 'adderquant' does not have"
            in capsys.readouterr().err)


def test_reproduce_and_analyze_write_their_tables(
    shared_data_root, released_checkpoint, tmp_path, capsys
) -> None:
    args = model_args(shared_data_root, released_checkpoint)
    code = main(["reproduce", "--out", str(tmp_path), "--bits", "8", "--methods", "fp", "qssf",
                 "--agreement-images", "40", "--json", str(tmp_path / "rows.json"), *TINY,
                 *args])
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["bits"]) for r in rows] == [("fp", None), ("qssf", 8)]
    assert rows[0]["agreement"] == rows[0]["test_agreement"] == 100.0 and rows[0]["kl"] == 0.0
    assert rows[1]["kl"] > 0.0 and rows == json.loads((tmp_path / "rows.json").read_text())
    for plot in ("accuracy_vs_bits", "agreement_vs_bits", "kl_vs_bits"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 0
    assert "| qssf |" in (tmp_path / "table.md").read_text()
    # two calibration seeds: every cell is the mean ± sd of the two single-seed runs
    single = {}
    for seed in (0, 1):
        assert main(["reproduce", "--out", str(tmp_path / f"s{seed}"), "--bits", "4",
                     "--methods", "adderquant", "--agreement-images", "40", "--seed",
                     str(seed), *TINY, *args]) == 0
        single[seed] = json.loads((tmp_path / f"s{seed}" / "results.json").read_text())[0]
    assert main(["reproduce", "--out", str(tmp_path / "both"), "--bits", "4", "--methods",
                 "adderquant", "--agreement-images", "40", "--seed", "0", "1", *TINY,
                 *args]) == 0
    both = json.loads((tmp_path / "both" / "results.json").read_text())[0]
    for key in ("top1", "test_agreement", "agreement", "kl"):
        values = [single[0][key], single[1][key]]
        assert both[f"{key}_seeds"] == pytest.approx(values)
        assert both[key] == pytest.approx(sum(values) / 2)
        assert both[f"{key}_sd"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert " ± " in (tmp_path / "both" / "table.md").read_text()
    assert main(["reproduce", "--out", str(tmp_path), "--seed", "1", "1", *TINY, *args]) == 2
    assert "--seed values must differ" in capsys.readouterr().err
    capsys.readouterr()
    code = main(["analyze", "histograms", "--method", "paper", "--out", str(tmp_path),
                 "--layers", "layer1.0.conv1", *TINY, *args])
    assert code == 0
    assert "| layer1.0.conv1 |" in (tmp_path / "histograms.md").read_text()
    assert (tmp_path / "histograms.png").stat().st_size > 0


@pytest.mark.slow
def test_paper_method_meets_the_targets_and_beats_the_shared_scale(
    released_resnet20, shared_data_root
) -> None:
    exp = Experiment.load(released_resnet20, "cifar10", shared_data_root)
    targets = {8: 90.8, 6: 90.6, 5: 90.2, 4: 89.6}
    for bits, target in targets.items():
        paper = exp.run(PaperConfig(bits=bits))[1]["top1"]
        # the shared-scale baseline as in the reproduce table: no repair after quantization
        qssf = exp.run(QSSFConfig(qssf_source="max", bias_correction="none",
                                  bits=bits))[1]["top1"]
        assert paper >= target, (bits, paper)
        assert paper > qssf + 5, (bits, paper, qssf)


def test_reproduce_rows_default_all_and_named() -> None:
    from adderquant.studies.reproduce import select_rows

    default = [r.name for r in select_rows(None)]
    assert default[:4] == ["fp", "qssf", "paper-faithful", "paper"]
    assert "adderquant" in default and "adderquant-mixed" in default
    assert "adderquant-grid" not in default  # ablation rows run on request
    every = [r.name for r in select_rows(["all"])]
    assert set(every) > set(default) and "adderquant-grid" in every
    assert [r.name for r in select_rows(["adderquant", "fp"])] == ["fp", "adderquant"]
    with pytest.raises(ValueError, match="unknown rows"):
        select_rows(["nope"])


def test_ptq_help_shows_the_defaults_it_runs_with(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["ptq", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "quantization method (default: adderquant)" in text
    assert ("calibration batches (default: 2 (adderquant); paper, qssf, qssf-repaired: 202)"
            in text)
    assert "--act-clip {released,quantile,max,mse} activation threshold" in text
    assert "(paper only; default: mse)" in text
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    assert "quantization method (default: paper)" in " ".join(capsys.readouterr().out.split())


def test_reproduce_qat_row_is_qat_of_the_post_training_result(
    shared_data_root, released_checkpoint, tmp_path, capsys
) -> None:
    """The ``adderquant-qat`` row equals ``adderquant qat`` run by itself with the same budget
    (the post-training step, then QAT holding out the last 10,000 training images)."""
    torch.set_num_threads(1)
    args = [*model_args(shared_data_root, released_checkpoint), "--limit", "40",
            "--no-progress"]
    assert main(["reproduce", "--out", str(tmp_path), "--bits", "4", "--methods",
                 "adderquant-qat", "--agreement-images", "40", "--qat-steps", "2",
                 "--qat-batch-size", "16", *args]) == 0
    row = json.loads((tmp_path / "results.json").read_text())[0]
    assert (row["method"], row["bits"]) == ("adderquant-qat", 4)
    capsys.readouterr()
    assert main(["qat", "--method", "adderquant", "--bits", "4", "--steps", "2",
                 "--batch-size", "16", "--eval-images", "0", "--json", *args]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert row["top1"] == pytest.approx(alone["top1"])
    assert 0.0 < row["kl"] and 0.0 <= row["agreement"] <= 100.0
    assert main(["reproduce", "--out", str(tmp_path), "--methods", "adderquant-qat", "--bits",
                 "8", *args]) == 2
    assert "runs at [4, 3, 2] bits" in capsys.readouterr().err
