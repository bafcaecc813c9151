"""Stage 2 through its real entry points: every shipped YAML parses and runs ``fast_dev_run``,
the model learns on fixture crops, and fit → OOF → evaluate → submit works on the ``tiny`` preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from stage2_fixtures import make_crops_for_dataset, make_stage2_world

from common.labels import TARGETS
from stage2_classify.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "stage2").glob("*.yaml"))
SMOKE = REPO / "configs" / "smoke" / "stage2.yaml"


def _data_args(world: dict, fold: int = 0, root: Path | None = None) -> list[str]:
    return ["--data.manifest", str(world["manifest"]), "--data.data_root", str(world["data"]),
            "--data.folds_csv", str(world["work"] / "folds.csv"), "--data.fold", str(fold),
            "--trainer.default_root_dir", str(root or world["work"] / "stage2" / f"fold{fold}")]


@pytest.fixture(scope="module")
def world32(tmp_path_factory) -> dict:
    # 32³ crops: large enough for DenseNet121's five 2× reductions.
    return make_stage2_world(tmp_path_factory.mktemp("s2w32"), n_train=10, n_test=2,
                             shape=(32, 32, 32))


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"base.yaml", "cpu.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_print_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "-c", str(config), "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    net = config.read_text().split("class_path: ", 2)[-1].split()[0]  # the model's backbone
    assert f"class_path: {net}" in out and "folds_csv:" in out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_fast_dev_run(config, world32, tmp_path):
    torch.set_num_threads(2)
    cli = cli_main(["fit", "-c", str(config), "-c", str(SMOKE), "--trainer.fast_dev_run", "1",
                    *_data_args(world32, root=tmp_path)])
    assert cli.trainer.state.finished


def _fit(world: dict, fold: int, epochs: int, extra: tuple[str, ...] = ()) -> None:
    cli_main(["fit", "-c", str(REPO / "configs/stage2/cpu.yaml"), "-c", str(SMOKE),
              "--trainer.max_epochs", str(epochs), "--trainer.limit_train_batches", "1.0",
              "--trainer.limit_val_batches", "1.0", "--data.n_folds", "2",
              "--data.batch_size", "16", "--model.log_crops", "0",
              "--oof_dir", str(world["work"] / "stage2" / "oof"), *_data_args(world, fold), *extra])


def test_model_learns_on_fixture_crops(tmp_path):
    """Training loss over the whole fixture train set drops after a few epochs."""
    from stage2_classify.data import CropDataModule
    from stage2_classify.inference import load_model
    from stage2_classify.module import metric_weighted_bce

    torch.set_num_threads(2)
    world = make_stage2_world(tmp_path, n_train=24, n_test=1, shape=(16, 16, 12), seed=3)
    _fit(world, 0, epochs=8, extra=("--model.lr", "0.01"))
    last = world["work"] / "stage2" / "fold0" / "checkpoints" / "last.ckpt"
    trained = load_model(last)
    dm = CropDataModule(str(world["manifest"]), str(world["data"]),
                        str(world["work"] / "folds.csv"), fold=0, n_folds=2, augment=False,
                        **trained.preprocess.to_dict())  # the inputs the model was trained on
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(  # no trainer: assembled, not augmented
        next(iter(torch.utils.data.DataLoader(dm.train_ds, batch_size=len(dm.train_ds)))), 0)
    one = torch.ones(1)

    def loss_of(model) -> float:
        with torch.no_grad():
            return float(metric_weighted_bce(model(batch["x"], batch["vertebra"])[:, None],
                                             batch["y"][:, None], one, 2 * one))

    fresh = load_model(last)
    torch.manual_seed(0)
    for m in fresh.modules():  # same architecture, untrained weights
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    before, after = loss_of(fresh), loss_of(trained)
    assert after < 0.8 * before, (before, after)


def test_fit_oof_evaluate_on_tiny_preset(tiny_data, tmp_path):
    """The stage-2 chain on the ``tiny`` preset's tables with fixture crops (no stage 1; the
    submission runs the whole engine: tests/test_engine.py)."""
    from stage2_classify.evaluate import evaluate

    torch.set_num_threads(2)
    work = tmp_path / "work"
    manifest = make_crops_for_dataset(tiny_data, work)
    world = {"data": tiny_data, "work": work, "manifest": manifest}
    for k in (0, 1):
        _fit(world, k, epochs=2)
        assert (work / "stage2" / "oof" / f"fold{k}.csv").exists()
        run = json.loads((work / "stage2" / f"fold{k}" / "run.json").read_text())
        assert run["checkpoint"] == "checkpoints/last.ckpt"  # relative to the fold folder
        state = torch.load(work / "stage2" / f"fold{k}" / run["checkpoint"], map_location="cpu",
                           weights_only=False)
        # saved after the last epoch (the counter then reads max_epochs), not at the best epoch
        assert state["epoch"] == 2
    metrics = evaluate(work, tiny_data, rule="stacker", clip=(1e-3, 1 - 1e-3))
    assert set(metrics["rules"]) == {"noisy_or", "max", "stacker"}
    assert {"comp_loss", "comp_loss_global"} <= set(metrics["baseline_prevalence"])
    oof = pd.read_csv(work / "oof.csv")
    assert list(oof.columns) == ["StudyInstanceUID", *TARGETS, "fold"]
    for name in ("roc.png", "calibration.png"):
        assert (work / "report" / name).stat().st_size > 1000


def test_box_file_numbers_map_to_crop_slices():
    from stage2_classify.data import crop_z_of_file_numbers

    # box = source slices 10..19 (10 slices of 2 mm), file numbers 41..50 running down (reversed
    # numbering: file 50 is slice 10), margin 4 mm = 2 slices; crop of 14 slices at 2 mm.
    row = pd.Series({"vox_lo_z": 10, "vox_hi_z": 19, "file_number_lo": 50, "file_number_hi": 41,
                     "margin_mm": 4.0, "spacing_z": 2.0})
    z = crop_z_of_file_numbers(row, [50, 41, 45], crop_z=14)
    np.testing.assert_allclose(z, [2.0, 11.0, 7.0])  # slice 10 → crop 2 (after 2 margin slices)


def test_fast_dev_run_with_aux_boxes(tmp_path):
    world = make_stage2_world(tmp_path, n_train=10, n_test=1, shape=(16, 16, 12), seed=5)
    cli = cli_main(["fit", "-c", str(REPO / "configs/stage2/cpu.yaml"), "-c", str(SMOKE),
                    "--trainer.fast_dev_run", "1", "--data.aux_boxes", "true",
                    "--model.aux_weight", "0.5", *_data_args(world)])
    assert cli.model.aux_head is not None
    aux = cli.datamodule.train_ds.aux
    assert aux[:, -1].sum() > 0 and aux[:, :-1].sum() > 0  # some crops know their fracture bins


def test_mask_pooling_ignores_features_outside_the_target_vertebra():
    import torch

    from stage2_classify.nets import SmallCNN3d, masked_pool

    feats = torch.zeros(2, 3, 4, 4, 4)
    feats[:, :, 0, 0, 0] = 5.0  # a strong response in a corner, outside the mask
    feats[:, :, 2:, 2:, 2:] = 1.0
    mask = torch.zeros(2, 1, 8, 8, 8)
    mask[0, 0, 4:, 4:, 4:] = 1.0  # sample 0: the target fills the far octant; sample 1: empty
    pooled = masked_pool(feats, mask)
    assert pooled.shape == (2, 6)
    assert torch.allclose(pooled[0], torch.ones(6))  # mean 1 and max 1 inside the mask
    assert float(pooled[1, 3]) == 5.0  # empty mask: pooled over the whole crop
    net = SmallCNN3d(3, 8, widths=(4, 8), stem_stride=2, pool_mask_channel=1)
    assert net(torch.rand(2, 3, 16, 16, 8)).shape == (2, 8)
    with pytest.raises(ValueError, match="pool_mask_channel"):
        SmallCNN3d(3, 8, pool_mask_channel=3)


def test_oof_last_checkpoint_is_the_final_state_not_lightnings_last_best(tmp_path):
    """Lightning's ``save_last`` rewrites last.ckpt only in epochs that saved a top-k checkpoint, so
    it can hold the best validation epoch; after fit the final state is saved over it."""
    from types import SimpleNamespace

    from stage2_classify.oof import chosen_checkpoint, save_final_checkpoint

    (tmp_path / "last.ckpt").write_text("best epoch")

    class Trainer:
        checkpoint_callbacks = [SimpleNamespace(dirpath=str(tmp_path), best_model_path="",
                                                last_model_path=str(tmp_path / "last.ckpt"))]

        def save_checkpoint(self, path: str) -> None:
            Path(path).write_text("final state")

    assert save_final_checkpoint(Trainer()) == tmp_path / "last.ckpt"
    path, score = chosen_checkpoint(Trainer(), "last")
    assert path == tmp_path / "last.ckpt" and score is None
    assert path.read_text() == "final state"
