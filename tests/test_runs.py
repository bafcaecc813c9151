"""The rerun decision of the training steps (cspine/runs.py): a pure function with a table test,
fingerprints of resolved settings (not of YAML text), retired runs moved aside, never deleted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cspine.runs import (
    STAGE1_IGNORED,
    RunState,
    decide,
    fingerprint,
    fit_stage1,
    fit_stage2,
    retire,
    run_state,
)

REPO = Path(__file__).resolve().parents[1]
STAGE1 = [str(REPO / "configs/stage1/cpu.yaml")]
STAGE2 = [str(REPO / "configs/stage2/cpu.yaml")]


@pytest.mark.parametrize("finished, recorded, has_last, expected", [
    (False, None, False, "fresh"),     # nothing there
    (False, None, True, "retire"),     # a checkpoint of unknown origin
    (True, None, False, "retire"),     # a finished run without a fingerprint (older make)
    (True, "a", True, "skip"),         # finished, same inputs
    (True, "b", True, "retire"),       # finished with other inputs
    (False, "a", True, "resume"),      # interrupted, same inputs
    (False, "a", False, "fresh"),      # started, killed before the first checkpoint
    (False, "b", True, "retire"),      # interrupted with other inputs
])
def test_decide_table(finished, recorded, has_last, expected):
    assert decide(RunState(finished, recorded, has_last), "a") == expected


def _world(tmp_path: Path) -> tuple[Path, Path]:
    data, work = tmp_path / "data", tmp_path / "work"
    data.mkdir()
    work.mkdir()
    (data / "train.csv").write_text("StudyInstanceUID,patient_overall\n1.2.3,0\n")
    (work / "folds.csv").write_text("StudyInstanceUID,fold\n1.2.3,0\n")
    return data, work


class Recorder:
    """A launcher that records the command instead of training."""

    def __init__(self, status: int = 0) -> None:
        self.calls: list[list[str]] = []
        self.status = status

    def __call__(self, cmd: list[str]) -> int:
        self.calls.append(cmd)
        return self.status


def test_stage1_fingerprint_ignores_comments_and_paths_not_values(tmp_path):
    from stage1_segment.cli import parse_settings
    from stage1_segment.prepare import stage1_args

    data, work = _world(tmp_path)
    inputs = {"folds": (work / "folds.csv", "make folds")}

    def fp(configs, root=work, overrides=()):
        return fingerprint(parse_settings(stage1_args(configs, data, root, overrides)).as_dict(),
                           inputs, STAGE1_IGNORED)

    base = fp(STAGE1)
    commented = tmp_path / "commented.yaml"
    commented.write_text("# a comment-only edit\n" + Path(STAGE1[0]).read_text() + "# end\n")
    assert fp([str(commented)]) == base
    assert fp(STAGE1, root=tmp_path / "elsewhere") == base  # paths are not settings
    assert fp(STAGE1, overrides=["--crops.margin_mm", "9"]) == base  # crops: not the fit's
    assert fp(STAGE1, overrides=["--trainer.max_epochs", "31"]) != base
    (work / "folds.csv").write_text("StudyInstanceUID,fold\n1.2.3,1\n")
    assert fp(STAGE1) != base
    (work / "folds.csv").unlink()
    with pytest.raises(FileNotFoundError, match="folds.csv not found.*make folds"):
        fp(STAGE1)


def test_retire_moves_aside_and_never_deletes(tmp_path):
    run = tmp_path / "stage1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    first = retire(run, [run / "checkpoints", run / "run.json", run / "wandb"])
    assert first == tmp_path / "stage1.stale-1" and (first / "run.json").is_file()
    (run / "run.json").write_text('{"second": 1}')
    second = retire(run, [run / "run.json"])
    assert second == tmp_path / "stage1.stale-2" and (first / "run.json").read_text() == "{}"
    assert retire(run, [run / "run.json"]) is None  # nothing left to move


def test_fit_stage1_skips_resumes_and_retires(tmp_path, capsys):
    data, work = _world(tmp_path)
    launch = Recorder()
    assert fit_stage1(data, work, STAGE1, jobs=1, launch=launch) == 0
    cmd = launch.calls[-1]
    assert cmd[1:4] == ["-m", "stage1_segment", "fit"] and "--ckpt_path" not in cmd
    run = work / "stage1"
    assert run_state(run).recorded  # written before the fit starts
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    fit_stage1(data, work, STAGE1, jobs=1, launch=launch)  # interrupted: resume
    assert launch.calls[-1][-2:] == ["--ckpt_path", "last"]
    (run / "run.json").write_text("{}")
    n = len(launch.calls)
    fit_stage1(data, work, STAGE1, jobs=1, launch=launch)  # finished, same inputs: skip
    assert len(launch.calls) == n and "done, inputs unchanged" in capsys.readouterr().out
    fit_stage1(data, work, STAGE1, ["--trainer.max_epochs", "3"], jobs=1, launch=launch)
    assert "moved it to" in capsys.readouterr().out and len(launch.calls) == n + 1
    stale = Path(f"{run}.stale-1")
    assert (stale / "run.json").is_file() and (stale / "checkpoints" / "last.ckpt").is_file()
    assert not (run / "run.json").exists() and "--ckpt_path" not in launch.calls[-1]


def test_fit_stage2_per_fold_and_stops_at_a_failing_fold(tmp_path):
    data, work = _world(tmp_path)
    manifest = work / "stage1" / "crops" / "vertebrae.csv"
    with pytest.raises(FileNotFoundError, match="vertebrae.csv not found.*make crops"):
        fit_stage2(data, work, STAGE2, [0], launch=Recorder())
    manifest.parent.mkdir(parents=True)
    manifest.write_text("study_uid,vertebra\n1.2.3,C1\n")
    done = work / "stage2" / "fold0"
    launch = Recorder()
    fit_stage2(data, work, STAGE2, [0], launch=launch)
    (done / "run.json").write_text(json.dumps({"checkpoint": "checkpoints/last.ckpt"}))
    failing = Recorder(status=3)
    assert fit_stage2(data, work, STAGE2, [0, 1, 2], launch=failing) == 3
    assert len(failing.calls) == 1 and "--data.fold" in failing.calls[0]
    assert failing.calls[0][failing.calls[0].index("--data.fold") + 1] == "1"
    manifest.write_text("study_uid,vertebra\n1.2.3,C2\n")  # new crops: fold 0 is retired
    fit_stage2(data, work, STAGE2, [0], launch=launch)
    assert (work / "stage2" / "fold0.stale-1" / "fold0" / "run.json").is_file()
