"""The whole workflow on tiny models: protect a folder, edit clean and protected photos, evaluate, report."""

from __future__ import annotations

import csv

import main_defend
import main_edit
from conftest import write_photo
from evaluation import report, runner


def test_protect_edit_evaluate_report(tmp_path, tiny_vae_dir, tiny_pix2pix_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    for k, name in enumerate(("ann", "bob")):
        write_photo(photos / f"{name}.jpg", size=(64, 64), seed=k)
    for method in ("encoder", "vae"):
        assert main_defend.main(["--image_dir", str(photos), "--output_dir", str(tmp_path / "protected" / method),
                                 "--defend_method", method, "--vae", str(tiny_vae_dir), "--num_iters", "3"]) == 0
    edit = ["--model_id", str(tiny_pix2pix_dir), "--seed", "0", "--prompt_indices", "0,1", "--num_inference_steps", "2"]
    assert main_edit.main(["--src_dir", str(photos), "--edit_dir", str(tmp_path / "edits" / "clean"), *edit]) == 0
    for method in ("encoder", "vae"):
        assert main_edit.main(["--src_dir", str(tmp_path / "protected" / method / "budget_0.03"),
                               "--edit_dir", str(tmp_path / "edits" / method / "budget_0.03"), *edit]) == 0

    results = tmp_path / "results"
    assert runner.cli(runner.METRIC_KEYS, "test", [
        "--src_dir", str(photos), "--clean_edit_dir", str(tmp_path / "edits" / "clean"), "--defend_edit_dirs",
        str(tmp_path / "edits" / "encoder"), str(tmp_path / "edits" / "vae"), "--seed", "0", "--metrics",
        "psnr,ssim", "--output", str(results)]) == 0
    with (results / "psnr.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"encoder/budget_0.03", "vae/budget_0.03"}
    assert all(r["scored"] == "4" and r["missing"] == "0" for r in rows.values())
    assert all(20 < float(r["mean"]) < 100 for r in rows.values())  # protected edits differ, but not wildly

    assert report.main(["--src_dir", str(photos), "--clean_edit_dir", str(tmp_path / "edits" / "clean"),
                        "--defend_edit_dirs", str(tmp_path / "edits" / "encoder"), str(tmp_path / "edits" / "vae"),
                        "--protected_dirs", str(tmp_path / "protected" / "encoder"),
                        str(tmp_path / "protected" / "vae"), "--seed", "0", "--prompt_indices", "0,1",
                        "--results", str(results), "--output", str(tmp_path / "report")]) == 0
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["grid_ann.png", "grid_bob.png", "index.html"]
