"""edit.py and main_edit.py with tiny InstructPix2Pix and img2img pipelines (CPU, offline)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edit
import main_edit
from conftest import ROOT, write_photo
from methods.pipeline.editing import parse_edit
from utils import PAPER_PROMPTS, UserError

FAST = ["--num_inference_steps", "3"]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def test_defaults_equal_the_official_ones():
    args = parse_edit(edit.build_parser(), ["--input_path", "a.png", "--prompt", "x", "--seed", "0"])
    assert (args.model, args.model_id, args.guidance_scale, args.image_guidance_scale, args.strength,
            args.num_inference_steps, args.output_path) == (
        "instruct-pix2pix", "timbrooks/instruct-pix2pix", 7.5, 1.5, 0.5, 50, None)
    sd = parse_edit(edit.build_parser(), ["--input_path", "a.png", "--prompt", "x", "--model", "stable-diffusion"])
    assert sd.model_id == "stable-diffusion-v1-5/stable-diffusion-v1-5" and sd.seed >= 0  # -1 picked a seed


def test_the_papers_prompts_are_there_typos_included():
    assert len(PAPER_PROMPTS) == 25 and len(set(PAPER_PROMPTS)) == 25
    assert "Let the person have a tatto" in PAPER_PROMPTS and "Let the person grow a mustach" in PAPER_PROMPTS


def test_edit_writes_an_image_of_the_inputs_size(tmp_path, tiny_pix2pix_dir, capsys):
    source = write_photo(tmp_path / "face.jpg", size=(93, 70))
    assert edit.main(["--input_path", str(source), "--prompt", "Let it be snowy", "--model_id",
                      str(tiny_pix2pix_dir), "--seed", "0", *FAST]) == 0
    output = tmp_path / "edit_face.png"
    assert Image.open(output).size == (93, 70)
    assert "edit seed" in capsys.readouterr().out


def make_sources(folder: Path) -> Path:
    folder.mkdir()
    write_photo(folder / "a.png", size=(64, 64), seed=1)
    write_photo(folder / "b.jpg", size=(64, 64), seed=2)
    write_photo(folder / "c.png", size=(80, 64), seed=3)
    (folder / "broken.png").write_text("not an image")
    return folder


def test_main_edit_writes_the_layout_reproducibly_and_resumes(tmp_path, tiny_pix2pix_dir, capsys):
    sources, edits = make_sources(tmp_path / "src"), tmp_path / "edits"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Let it be snowy\n\nAdd elf-like ears\nTurn the person into a zombie\n")
    argv = ["--src_dir", str(sources), "--edit_dir", str(edits), "--model_id", str(tiny_pix2pix_dir), "--seed", "7",
            "--prompts", str(prompts), "--batch_size", "2", *FAST]
    assert main_edit.main(argv) == 1  # broken.png
    folder = edits / "seed7"
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    assert written == [f"prompt{i}/{name}.png" for i in range(3) for name in "abc"]
    assert Image.open(folder / "prompt0" / "c.png").size == (80, 64)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["parameters"]["prompt_list"] == ["Let it be snowy", "Add elf-like ears",
                                                      "Turn the person into a zombie"]
    assert manifest["parameters"]["seed"] == 7 and manifest["parameters"]["model_id"] == str(tiny_pix2pix_dir)
    assert list(manifest["failed"]) == [str(sources / "broken.png")]
    assert "edited 9" in capsys.readouterr().out

    # any single edit is reproduced alone by edit.py (exactly where it was edited alone: c is the only photo of
    # its size; b shared a batch with a, and batched float32 arithmetic rounds differently), and another prompt
    # index changes it
    for name, source in (("c", "c.png"), ("b", "b.jpg")):
        single = tmp_path / f"single_{name}.png"
        assert edit.main(["--input_path", str(sources / source), "--output_path", str(single), "--prompts",
                          str(prompts), "--prompt_index", "1", "--model_id", str(tiny_pix2pix_dir), "--seed", "7",
                          *FAST]) == 0
        difference = np.abs(pixels(single) - pixels(folder / "prompt1" / f"{name}.png"))
        assert difference.max() == 0 if name == "c" else difference.mean() < 0.5
    assert np.abs(pixels(folder / "prompt1" / "b.png") - pixels(folder / "prompt2" / "b.png")).mean() > 5

    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")}
    assert main_edit.main(argv) == 1
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")} == stamps
    assert "9 edits already done, 3 to do" in capsys.readouterr().out  # broken.png's, which fail again

    with pytest.raises(UserError, match="made with --guidance_scale 7.5"):
        main_edit.main([*argv, "--guidance_scale", "5"])


def test_main_edit_can_run_a_subset_of_the_papers_prompts(tmp_path, tiny_pix2pix_dir):
    sources, edits = tmp_path / "src", tmp_path / "edits"
    sources.mkdir()
    write_photo(sources / "a.png", size=(64, 64))
    assert main_edit.main(["--src_dir", str(sources), "--edit_dir", str(edits), "--model_id", str(tiny_pix2pix_dir),
                           "--seed", "0", "--prompt_indices", "13,24", *FAST]) == 0
    assert sorted(p.name for p in (edits / "seed0").iterdir() if p.is_dir()) == ["prompt13", "prompt24"]
    manifest = json.loads((edits / "seed0" / "manifest.json").read_text())
    assert manifest["parameters"]["prompt_list"] == list(PAPER_PROMPTS)


def test_img2img_works_the_same_way(tmp_path, tiny_img2img_dir):
    sources, edits = make_sources(tmp_path / "src"), tmp_path / "edits"
    (sources / "broken.png").unlink()
    argv = ["--model", "stable-diffusion", "--model_id", str(tiny_img2img_dir), "--seed", "1", "--strength", "0.6",
            *FAST]
    assert main_edit.main(["--src_dir", str(sources), "--edit_dir", str(edits), "--prompt_indices", "0", *argv]) == 0
    out = tmp_path / "one.png"
    assert edit.main(["--input_path", str(sources / "c.png"), "--output_path", str(out), "--prompt_index", "0",
                      *argv]) == 0
    assert np.array_equal(pixels(out), pixels(edits / "seed1" / "prompt0" / "c.png"))
    assert pixels(out).shape == (64, 80, 3)


@pytest.mark.parametrize("argv, message", [
    (["--prompt_index", "25"], "outside the 25 prompts"),
    (["--prompt", "x", "--output_path", "out.jpg"], "written as PNG"),
    (["--prompt", "x", "--model_id", "/nonexistent/editor"], "cannot load the instruct-pix2pix editor"),
])
def test_edit_bad_input_fails_clearly_and_writes_nothing(tmp_path, monkeypatch, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    source = write_photo(tmp_path / "in.png")
    with pytest.raises(UserError, match=message):
        edit.main(["--input_path", str(source), "--seed", "0", *argv])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_parallel_processes_split_the_edits(tmp_path, tiny_pix2pix_dir):
    sources, edits = make_sources(tmp_path / "src"), tmp_path / "edits"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "main_edit.py"), "--src_dir", str(sources), "--edit_dir", str(edits), "--model_id",
         str(tiny_pix2pix_dir), "--seed", "3", "--prompt_indices", "0,1", "--device", "cpu", *FAST],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1, result.stderr  # broken.png
    assert "8 to do in 2 processes" in result.stdout and "edited 6" in result.stdout
    assert len(list((edits / "seed3").rglob("*.png"))) == 6
    manifest = json.loads((edits / "seed3" / "manifest.json").read_text())
    assert list(manifest["failed"]) == [str(sources / "broken.png")]
