"""evaluation.table1 end to end on tiny models: every stage's outputs, resuming, and the process split."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, export_tiny_onnx_face_model, tiny_clip, write_photo
from evaluation import table1
from methods.pipeline import protect
from utils import UserError

METHODS = ("encoder", "editshield", "diffusion")


@pytest.fixture
def setup(tmp_path, tiny_pix2pix_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    for k, name in enumerate(("ann", "bob", "cid")):
        write_photo(photos / f"{name}.jpg", size=(64, 64), seed=k)
    clip = tmp_path / "clip"
    tiny_clip(clip)
    models = ["--model_id", str(tiny_pix2pix_dir), "--clip_model", str(clip),
              "--fr_model", str(export_tiny_onnx_face_model(tmp_path / "face")),
              "--heldout_fr_model", str(export_tiny_onnx_face_model(tmp_path / "judge"))]
    fast = ["--num_iters", "2", "--num_inference_steps", "2", "--defend_args=--diffusion_steps 2 --grad_reps 1",
            "--metrics", "psnr,ssim,clip_s,clip_i,fr", "--device", "cpu"]  # LPIPS-VGG cannot be had offline
    return photos, tmp_path / "out", [*models, *fast]


def outputs(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.suffix in (".png", ".csv", ".md", ".html")}


def test_every_stage_writes_its_outputs_and_a_rerun_does_no_work(setup, monkeypatch, capsys):
    photos, out, common = setup
    argv = ["--image_dir", str(photos), "--output_dir", str(out), "--methods", ",".join(METHODS), "--limit", "2",
            "--prompt_indices", "0,3", *common]
    loads = {"attack": 0, "editor": 0}
    build_attack, load_editor = protect.build_attack, table1.load_editor
    monkeypatch.setattr(protect, "build_attack", lambda *a, **k: loads.update(attack=loads["attack"] + 1)
                        or build_attack(*a, **k))
    monkeypatch.setattr(table1, "load_editor", lambda *a, **k: loads.update(editor=loads["editor"] + 1)
                        or load_editor(*a, **k))
    assert table1.main(argv) == 0
    assert loads == {"attack": 3, "editor": 1}  # one attack per method; one editor for the four folders

    assert sorted(p.name for p in (out / "photos").iterdir()) == ["ann.jpg", "bob.jpg"]  # --limit 2
    expected = {f"prompt{i}/{name}.png" for i in (0, 3) for name in ("ann", "bob")}
    for method in METHODS:
        assert sorted(p.name for p in (out / "protected" / method / "budget_0.03").glob("*.png")) == ["ann.png",
                                                                                                   "bob.png"]
    for folder in ["clean", *(f"{m}/budget_0.03" for m in METHODS)]:
        seed = out / "edits" / folder / "seed0"
        assert {str(p.relative_to(seed)) for p in seed.rglob("*.png")} == expected
    table = (out / "results" / "table1.md").read_text()
    assert table.startswith("Table 1 on 2 photos: every method at budget 0.03 (3.8/255), 2 iterations")
    assert "| method | PSNR ↓ | SSIM ↓ | CLIP-S ↓ | CLIP-I ↓ | FR ↓ | FR held-out ↓ |" in table
    assert all(f"| {label} |" in table for label in ("clean", *METHODS))
    with (out / "results" / "psnr.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(METHODS) and all(r["scored"] == "4" for r in rows.values())
    assert {"prompt0", "prompt3"} <= set(rows["encoder"]) and "prompt1" not in rows["encoder"]
    assert (out / "results" / "fr_heldout.csv").is_file()
    page = (out / "report" / "index.html").read_text()
    assert "FR held-out ↓" in page and "grid_ann.png" in page and (out / "report" / "grid_bob.png").is_file()
    capsys.readouterr()

    before = outputs(out)

    def refuse(*args, **kwargs):
        raise AssertionError("a rerun loaded a model or redid a stage")

    for module, name in ((protect, "build_attack"), (table1, "load_editor"), (table1, "build_metrics"),
                         (table1.report, "main")):
        monkeypatch.setattr(module, name, refuse)
    assert table1.main(argv) == 0
    assert outputs(out) == before
    printed = capsys.readouterr().out
    assert "scores up to date" in printed and "report up to date" in printed


def test_bad_options_are_refused_before_any_work(setup):
    photos, out, common = setup
    face = common[common.index("--fr_model") + 1]
    base = ["--image_dir", str(photos), "--output_dir", str(out), *common]
    for extra, message in ((["--methods", "facelock", "--attack_fr_model", face, "--heldout_fr_model", face],
                            "is the model facelock attacks"),
                           (["--methods", "encoder,nope"], "--methods takes"),
                           (["--methods", "encoder", "--prompt_indices", "0,25"], r"must lie in 0\.\.24"),
                           (["--methods", "encoder", "--metrics", "psnr,fid"], "--metrics takes")):
        with pytest.raises(UserError, match=message):
            table1.main([*base, *extra])
    assert not out.exists()


def test_processes_split_the_work_as_main_defend_and_main_edit_do(setup):
    photos, out, common = setup
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "evaluation.table1", "--image_dir", str(photos), "--output_dir", str(out), "--methods", "encoder",
         "--prompt_indices", "0", *common],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 to do in 2 processes" in result.stdout  # the protections, then each folder's edits
    assert result.stdout.count("== scoring") == 1  # the main process alone scores
    for folder in ("protected/encoder/budget_0.03", "edits/clean/seed0", "edits/encoder/budget_0.03/seed0"):
        assert not list((out / folder).glob("manifest.part*")) and (out / folder / "manifest.json").is_file()
    assert len(list((out / "edits").rglob("*.png"))) == 6
    assert (out / "results" / "table1.md").is_file() and (out / "report" / "index.html").is_file()
