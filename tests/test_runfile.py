"""run.json: stages in pipeline order with state, output and timing; written whole, atomically."""
import json

from ckptflow import runfile


def test_stages_are_recorded_in_pipeline_order_with_timing(tmp_path):
    run = str(tmp_path / "demo")
    rec = runfile.load(run, "demo")
    assert rec == {"run_id": "demo", "stages": []}
    runfile.started(rec, "train")
    runfile.finished(rec, "train", "Completed", output=f"{run}/train/step-000060")
    runfile.started(rec, "download")
    runfile.finished(rec, "download", "Cached", output=f"{run}/source")
    runfile.started(rec, "export")
    runfile.save(run, rec)
    back = json.loads((tmp_path / "demo" / "run.json").read_text())
    assert [s["name"] for s in back["stages"]] == ["download", "train", "export"]
    train = back["stages"][1]
    assert train["state"] == "Completed" and train["output"].endswith("step-000060")
    assert train["seconds"] >= 0 and train["finished"] >= train["started"]
    assert back["stages"][2]["state"] == "Running" and back["stages"][2]["finished"] is None
    assert runfile.load(run, "other") == back
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["run.json"]   # no temp file left


def test_a_restarted_stage_starts_over(tmp_path):
    rec = runfile.load(str(tmp_path), "r")
    runfile.finished(rec, "export", "Failed")
    runfile.started(rec, "export")
    (entry,) = rec["stages"]
    assert entry["state"] == "Running" and entry["seconds"] is None and entry["finished"] is None
