"""A sweep reuses a run folder only for the settings it was trained with, read from what the run resolved."""
import pytest
import yaml

from psdclip.core.errors import InputError
from psdclip.workflows.sweep import Sweep


def test_a_setting_the_recipe_now_names_at_the_value_the_run_had_is_the_same(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.yaml").write_text(yaml.safe_dump({"loss": "psd", "alpha_max": 0.5, "data": "a", "threads": 1}))
    # what the trainer resolved: the then default temperature 1.0
    (run / "config.yaml").write_text(yaml.safe_dump({"loss": "psd", "alpha_max": 0.5, "teacher_temperature": 1.0}))
    Sweep._same_settings(str(run), {"loss": "psd", "alpha_max": 0.5, "data": "b", "threads": 2,
                                    "teacher_temperature": 1.0})  # pinned now at what it had: reused
    for wanted, named in (({"loss": "psd", "alpha_max": 0.5, "teacher_temperature": 2.0}, "teacher_temperature"),
                          ({"loss": "psd", "alpha_max": 0.6}, "alpha_max"),
                          ({"loss": "psd", "alpha_max": 0.5, "ema_teacher": True}, "ema_teacher"),
                          ({"loss": "psd"}, "alpha_max")):
        with pytest.raises(InputError, match=f"trained with other settings \\({named}\\)"):
            Sweep._same_settings(str(run), wanted)


def test_a_study_folder_moved_elsewhere_keeps_its_runs_but_not_another_oracle_file(tmp_path):
    # trained under /old/study: the oracle file it was given lay in that study folder; the folder is now tmp_path/new
    run = tmp_path / "new" / "runs" / "100pct-oracle-s0"
    run.mkdir(parents=True)
    (run / "train.yaml").write_text(yaml.safe_dump({"loss": "psd", "oracle_targets": "/old/study/oracle.parquet",
                                                    "out": "/old/study/runs/100pct-oracle-s0"}))
    here = {"loss": "psd", "out": str(run)}
    Sweep._same_settings(str(run), {**here, "oracle_targets": str(tmp_path / "new" / "oracle.parquet")})  # reused
    for other in (str(tmp_path / "new" / "other.parquet"), "/old/study/oracle.parquet", "/elsewhere/oracle.parquet"):
        with pytest.raises(InputError, match=r"trained with other settings \(oracle_targets\)"):
            Sweep._same_settings(str(run), {**here, "oracle_targets": other})
