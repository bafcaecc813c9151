"""Stage 1 through its real entry points on the synthetic ``tiny`` preset.

Shipped configs parse and run (``fast_dev_run``); prepare resumes; prepare → fit → predict →
crops writes a manifest that :func:`common.manifest.read_manifest` accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stage1_segment.cli import main as cli_main
from stage1_segment.prepare import GridSettings, cache_path, load_cached, prepare_studies

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "stage1").glob("*.yaml"))
SMOKE = REPO / "configs" / "smoke" / "stage1.yaml"
SMALL = ["--data.grid_shape=[32,32,32]", "--data.prepare_jobs=1", "--data.num_workers=0"]


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    import torch

    torch.set_num_threads(1)


def _paths(data: Path, work: Path) -> list[str]:
    return [f"--data.data_root={data}", f"--data.work_dir={work}"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(config, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "-c", str(config), "-c", str(SMOKE), *_paths(tmp_path, tmp_path),
                  "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "monai.networks.nets" in printed and "hu_window" in printed
    with pytest.raises(SystemExit) as exc:  # the profile alone parses too
        cli_main(["fit", "-c", str(config), *_paths(tmp_path, tmp_path), "--print_config"])
    assert exc.value.code == 0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_fast_dev_run_of_shipped_config(config, tiny_data, tmp_path):
    """Each profile's own network and loss run one train and one val step on CPU (32³ grid)."""
    cli = cli_main(["fit", "-c", str(config), *_paths(tiny_data, tmp_path),
                    "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu",
                    "--trainer.precision=32-true", *SMALL])
    assert np.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert "val/dice_mean" in cli.trainer.callback_metrics
    assert cli.model.hparams.grid_shape == [32, 32, 32]      # linked from data
    assert tuple(cli.model.hparams.hu_window) == cli.datamodule.hu_window


def test_prepare_resumes_and_records_failures(tiny_data, tmp_path):
    settings = GridSettings(shape=(24, 24, 24))
    qc = prepare_studies(tiny_data, tmp_path, settings, splits=("test",), masked_only=False, jobs=1,
                         progress=False)
    assert (qc["status"] == "prepared").all() and len(qc) >= 2
    uids = qc["study_uid"].tolist()
    study = load_cached(cache_path(tmp_path, settings, uids[0]))
    assert study.image.shape == (24, 24, 24) and study.image.dtype == np.int16
    assert study.label is None and study.src_affine.shape == (4, 4)
    # interrupt: one cache file lost, a leftover temp file of an unfinished write beside it
    lost = cache_path(tmp_path, settings, uids[1])
    lost.unlink()
    leftover = lost.parent / f".{lost.name}.abc123.tmp.npz"
    leftover.write_bytes(b"half-written")
    qc2 = prepare_studies(tiny_data, tmp_path, settings, splits=("test",), masked_only=False, jobs=1,
                          progress=False)
    status = dict(zip(qc2["study_uid"], qc2["this_run"]))
    assert status[uids[1]] == "prepared" and status[uids[0]] == "cached"
    assert sum(s == "cached" for s in status.values()) == len(uids) - 1
    assert (qc2["status"] == "prepared").all()  # the cold run's record is kept
    assert load_cached(lost).uid == uids[1]
    # a broken study is a failed QC row, and the batch goes on
    from stage1_segment.prepare import prepare_study

    bad = tmp_path / "bad_study"
    bad.mkdir()
    (bad / "1.dcm").write_bytes(b"not a dicom file")
    row = prepare_study("bad", str(bad), None, "test", str(tmp_path / "bad.npz"), settings)
    assert row["status"] == "failed" and row["reason"] and not (tmp_path / "bad.npz").exists()


def test_prepare_fit_crops_end_to_end(tiny_data, tmp_path):
    from common.manifest import read_manifest
    from common.nifti_io import load_nifti
    from cspine.cli import main as cspine_main
    from stage1_segment.inference import load_model, segment_volume

    base = ["-c", str(REPO / "configs/stage1/base.yaml"), "-c", str(SMOKE),
            *_paths(tiny_data, tmp_path)]
    cli_main(["fit", *base, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"])
    run = json.loads((tmp_path / "stage1" / "run.json").read_text())
    assert run["schema"] == 1 and run["stage"] == "stage1"  # common/run_record.py
    assert run["checkpoint"] == run["best_checkpoint"]
    assert not Path(run["checkpoint"]).is_absolute()  # a moved WORK keeps working
    best = tmp_path / "stage1" / run["checkpoint"]
    assert best.is_file() and "val/dice_C1" in run["metrics"]
    # fit prepared (and decoded) only the segmented train studies; they are kept decoded
    prepared = pd.read_csv(tmp_path / "stage1" / "qc_prepare.csv")
    assert set(prepared["split"]) == {"train"} and prepared["has_mask"].all()
    assert len(list((tmp_path / "cache" / "volumes").glob("*.npz"))) == len(prepared)

    configs = ["-c", str(REPO / "configs/stage1/base.yaml"), "-c", str(SMOKE)]
    assert cspine_main(["crops", str(tiny_data), "--work", str(tmp_path), *configs,
                        "--jobs", "1"]) == 0
    qc = pd.read_csv(tmp_path / "stage1" / "crops" / "qc_crops.csv")
    n_train = len(pd.read_csv(tiny_data / "train.csv"))
    assert len(qc) == n_train and (qc["status"] == "ok").all()
    masked = qc["study_uid"].isin(prepared["study_uid"])
    assert set(qc.loc[masked, "volume"]) == {"cache"}
    assert set(qc.loc[~masked, "volume"]) <= {"decoded"}
    assert qc.loc[masked, "dice_mean"].notna().all()  # scored against the cached ground truth
    manifest = read_manifest(tmp_path / "stage1" / "crops" / "vertebrae.csv")
    assert len(manifest) == 7 * n_train
    assert set(manifest.groupby("study_uid").size()) == {7}
    present = manifest[manifest["present"]]
    absent = manifest[~manifest["present"]]
    assert (absent["crop_path"] == "").all() and absent["qc_status"].str.startswith("absent").all()
    with np.load(present.iloc[0]["crop_path"]) as z:
        assert z["image"].dtype == np.int16 and z["mask"].dtype == np.uint8
        assert z["image"].shape == (16, 16, 12) and z["affine"].shape == (4, 4)
    assert (manifest["fold"] >= 0).all()
    # a second run finds every study current and decodes nothing
    assert cspine_main(["crops", str(tiny_data), "--work", str(tmp_path), *configs,
                        "--jobs", "1"]) == 0
    again = pd.read_csv(tmp_path / "stage1" / "crops" / "qc_crops.csv")
    assert set(again["volume"]) == {"done"}
    assert read_manifest(tmp_path / "stage1" / "crops" / "vertebrae.csv").equals(manifest)

    # the engine's mask in the CT geometry, and the single-study API of `cspine export-mask`
    from common.dicom_io import load_series

    uid = manifest.iloc[-1]["study_uid"]
    model = load_model(best)
    volume = load_series(tiny_data / "train_images" / uid)
    full = segment_volume(model, volume)
    assert full.shape == volume.shape and full.dtype == np.uint8
    written, written_affine = load_nifti(tmp_path / "stage1" / "masks" / f"{uid}.nii.gz")
    assert np.array_equal(written, full) and np.allclose(written_affine, volume.affine, atol=1e-4)

    study_dir = tiny_data / "train_images" / uid
    out = tmp_path / "exported.nii.gz"
    assert cspine_main(["export-mask", str(study_dir), str(out), "--ckpt", "best",
                        "--work", str(tmp_path)]) == 0
    exported, exp_affine = load_nifti(out)
    assert exported.shape == volume.shape and np.allclose(exp_affine, volume.affine, atol=1e-4)
    assert np.array_equal(exported, full)
    assert cspine_main(["export-mask", str(study_dir), str(out), "--mask",
                        str(tmp_path / "stage1" / "masks" / f"{uid}.nii.gz")]) == 0
    assert np.array_equal(load_nifti(out)[0], full)
    assert cspine_main(["export-mask", str(tmp_path), str(out), "--mask", str(out)]) == 2


def test_no_predict_subcommand(capsys):
    """Stage-1 prediction runs only through the engine (make crops / submit / cspine predict)."""
    with pytest.raises(SystemExit):
        cli_main(["predict", "--help"])


def test_a_warm_prepare_keeps_the_cold_run_record(tiny_data, tmp_path):
    """A second prepare finds every study cached: qc_prepare.csv keeps each study's status and
    seconds from the run that prepared it, and says what this run did (issue 12)."""
    settings = GridSettings(shape=(24, 24, 32))
    cold = prepare_studies(tiny_data, tmp_path, settings, jobs=1, progress=False)
    assert (cold["status"] == "prepared").all() and (cold["seconds"] > 0).all()
    prepare_studies(tiny_data, tmp_path, settings, jobs=1, progress=False)
    warm = pd.read_csv(tmp_path / "stage1" / "qc_prepare.csv")
    assert (warm["this_run"] == "cached").all() and (warm["status"] == "prepared").all()
    assert warm.set_index("study_uid")["seconds"].equals(cold.set_index("study_uid")["seconds"])


def test_prepare_and_crops_read_settings_through_the_stage_parser(tiny_data, tmp_path):
    """`-c a -c b` plus `--section.key` overrides mean the same in prepare and crops as in fit
    (issue 12): the override reaches the cache key / crop settings, an unknown key or the
    retired second lenient key is refused."""
    from cspine.train_crops import crop_settings
    from stage1_segment.prepare import main as prepare_main

    configs = [REPO / "configs/stage1/cpu.yaml", SMOKE]
    cfg = crop_settings(configs, tiny_data, tmp_path, ["--crops.margin_mm", "6",
                                                       "--data.lenient", "true"])
    assert cfg.margin_mm == 6.0 and cfg.lenient and cfg.shape == (16, 16, 12)
    for bad in (["--crops.margn", "6"], ["--crops.lenient", "true"]):
        with pytest.raises(ValueError, match="Stage1CLI settings"):
            crop_settings(configs, tiny_data, tmp_path, bad)
    args = [a for c in configs for a in ("-c", str(c))]
    assert prepare_main([*args, "--data-root", str(tiny_data), "--work-dir", str(tmp_path),
                         "--jobs", "1", "--data.grid_shape", "[20, 20, 24]"]) == 0
    settings = json.loads(next((tmp_path / "stage1" / "cache").glob("*/settings.json")).read_text())
    assert settings["shape"] == [20, 20, 24]
