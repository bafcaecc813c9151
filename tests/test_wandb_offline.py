"""Real offline W&B runs (no mocks) of both stages' LightningCLI fits: the run folders hold the
resolved config, the validation metrics (history and summary) and the logged media.

The runs come from the shared short training run (``e2e_fixtures.trained_run``: stage-1 fit and
stage-2 fold 0 with ``WANDB_MODE=offline`` and every W&B folder in a temporary directory).
The ``.wandb`` file is read with a small reader of its record log (LevelDB log format, W&B's
own protobuf records), so the test sees exactly what ``wandb sync`` would upload.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from e2e_fixtures import trained_run

HEADER_BYTES = 7  # ":W&B" + magic (2) + version (1)
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """Every protobuf ``Record`` of a ``run-<id>.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run log"
    pos, chunks, buf = HEADER_BYTES, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            chunks.append(chunk)
        elif kind == FIRST:
            buf = chunk
        elif kind == MIDDLE:
            buf += chunk
        elif kind == LAST:
            chunks.append(buf + chunk)
            buf = b""
    records = []
    for chunk in chunks:
        rec = pb.Record()
        rec.ParseFromString(chunk)
        records.append(rec)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def run_contents(run_dir: Path) -> dict:
    """History values, summary keys, config keys and run metadata of an offline run folder."""
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1, f"{run_dir}: expected one .wandb file, found {files}"
    out = {"history": {}, "summary": set(), "config": set(), "run": None}
    for rec in read_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            for item in rec.history.item:
                out["history"].setdefault(_key(item), []).append(json.loads(item.value_json))
        elif kind == "summary":
            out["summary"].update(_key(i) for i in rec.summary.update)
        elif kind == "config":
            out["config"].update(_key(i) for i in rec.config.update)
        elif kind == "run":
            out["run"] = rec.run
    summary_file = run_dir / "files" / "wandb-summary.json"  # written by some wandb versions
    if summary_file.is_file():
        out["summary"].update(json.loads(summary_file.read_text()))
    return out


@pytest.fixture(scope="module")
def work(tiny_data, tmp_path_factory) -> Path:
    return trained_run(tiny_data, tmp_path_factory)


def _one_run(folder: Path) -> Path:
    runs = sorted(folder.glob("offline-run-*"))
    assert runs, f"no offline W&B run in {folder}"
    return runs[0]


def test_stage1_offline_run_has_metrics_config_and_overlays(work):
    run_dir = _one_run(work / "stage1" / "wandb")
    got = run_contents(run_dir)
    assert got["run"].project == "cspine" and got["run"].run_group  # grouped per experiment
    dice = got["history"].get("val/dice_mean")
    assert dice and all(0.0 <= v <= 1.0 for v in dice)
    assert {f"val/dice_C{i}" for i in range(1, 8)} <= set(got["history"])
    assert "val/dice_mean" in got["summary"]
    assert {"model", "data", "trainer"} <= got["config"]  # the same shape as stage 2
    images = list((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert images and all(p.stat().st_size > 100 for p in images)


def test_stage2_offline_run_has_metrics_config_and_crops(work):
    run_dir = _one_run(work / "stage2" / "fold0" / "wandb")
    got = run_contents(run_dir)
    assert got["run"].project == "cspine"
    assert got["run"].display_name == "stage2-fold0" and got["run"].run_group
    for key in ("val/loss", "val/comp_loss", "val/auc_overall", "val/auc_C1"):
        assert key in got["history"], sorted(got["history"])
    assert all(v > 0 for v in got["history"]["val/comp_loss"])
    assert "val/comp_loss" in got["summary"]
    assert {"model", "data", "trainer"} <= got["config"]
    images = list((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert images, "no logged crops"


@pytest.mark.parametrize("mode", [None, "disabled", "online"])
def test_both_stages_let_wandb_mode_decide(mode, tmp_path, monkeypatch):
    """The YAMLs' WandbLogger is offline; a WANDB_MODE in the environment overrides it for stage 1
    and stage 2 alike (stage 2 used to ignore it: `disabled` still wrote runs)."""
    from stage1_segment.cli import main as stage1_cli
    from stage2_classify.cli import cli_main as stage2_cli

    repo = Path(__file__).resolve().parents[1]
    if mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", mode)
    one = stage1_cli(["-c", str(repo / "configs/stage1/cpu.yaml"), f"--data.data_root={tmp_path}",
                      f"--data.work_dir={tmp_path / 'w'}"], run=False)
    two = stage2_cli(["-c", str(repo / "configs/stage2/cpu.yaml"),
                      f"--data.manifest={tmp_path / 'm.csv'}", f"--data.data_root={tmp_path}",
                      f"--trainer.default_root_dir={tmp_path / 's2'}",
                      f"--trainer.logger.init_args.save_dir={tmp_path / 's2'}"], run=False)
    for cli in (one, two):
        assert cli.trainer.logger._offline is (mode is None), type(cli).__name__
