"""evaluation/: metrics against reference implementations, the walker, the tables and the report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import random_images, tiny_clip, tiny_lpips, write_photo
from evaluation import report, runner
from evaluation.metrics.clip_score import ClipEmbedder, ClipI, ClipS
from evaluation.metrics.facial import FaceSimilarity
from evaluation.metrics.perceptual import LPIPS
from evaluation.metrics.psnr import PSNR, psnr
from evaluation.metrics.ssim import ssim
from evaluation.walker import edit_sets, images_by_name, pair_by_name
from utils import UserError, load_image


def as_unit_numpy(x: torch.Tensor) -> np.ndarray:
    return ((x.double() + 1) / 2).permute(1, 2, 0).numpy()


def test_psnr_matches_scikit_image_and_is_infinite_on_identical_images():
    a, b = random_images(3, size=40, seed=1), random_images(3, size=40, seed=2)
    ours = psnr(a, b)
    for k in range(3):
        assert ours[k].item() == pytest.approx(peak_signal_noise_ratio(
            as_unit_numpy(a[k]), as_unit_numpy(b[k]), data_range=1), abs=1e-4)
    assert torch.isinf(psnr(a, a)).all()
    with pytest.raises(ValueError):
        psnr(a, b[:, :, :20])


def test_ssim_matches_scikit_image_and_is_one_on_identical_images():
    a = random_images(2, size=48, seed=3)
    b = (a + 0.2 * random_images(2, size=48, seed=4)).clamp(-1, 1)
    ours = ssim(a, b)
    for k in range(2):
        reference = structural_similarity(as_unit_numpy(a[k]), as_unit_numpy(b[k]), data_range=1, channel_axis=-1,
                                          gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours[k].item() == pytest.approx(reference, abs=1e-5)
    assert torch.allclose(ssim(a, a), torch.ones(2))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(a[..., :8, :8], b[..., :8, :8])


def test_lpips_with_a_random_backbone_is_zero_on_identical_images():
    metric, a = LPIPS(tiny_lpips()), random_images(2, size=32)
    assert torch.allclose(metric.score(a, a), torch.zeros(2), atol=1e-6)
    assert (metric.score(a, random_images(2, size=32, seed=9)) > 0).all()


def test_clip_scores_with_a_tiny_clip_model():
    model, processor = tiny_clip()
    embedder = ClipEmbedder(model, processor)
    sources, edits = random_images(2, size=40, seed=1), random_images(2, size=40, seed=2)
    clip_i, clip_s = ClipI(embedder), ClipS(embedder)
    for metric in (clip_i, clip_s):
        metric.add_sources(["a", "b"], sources)
    assert torch.allclose(clip_i.score(sources, ["a", "b"]), torch.ones(2), atol=1e-5)
    assert (clip_i.score(edits, ["a", "b"]) < 1 - 1e-4).all()
    clip_s.set_prompt("Let it be snowy")
    snowy = clip_s.score(edits, ["a", "b"])
    clip_s.set_prompt("Add elf-like ears")
    ears = clip_s.score(edits, ["a", "b"])
    assert snowy.abs().max() <= 1 and not torch.allclose(snowy, ears)
    delta = embedder.images(edits[:1]) - embedder.images(sources[:1])
    expected = torch.nn.functional.cosine_similarity(delta, embedder.text("Add elf-like ears")[None])
    assert ears[0].item() == pytest.approx(expected.item(), abs=1e-5)


def make_edits(root: Path, prompts: int, names: list[str], seed: int = 0, image_seed: int = 0, size=(72, 64)):
    for i in range(prompts):
        folder = root / f"seed{seed}" / f"prompt{i}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, name in enumerate(names):
            write_photo(folder / f"{name}.png", size=size, seed=image_seed + 31 * i + k)
    return root


def test_the_walker_pairs_by_name_and_reports_what_is_missing(tmp_path):
    sources = tmp_path / "src"
    sources.mkdir()
    for name in ("a10", "a2", "b"):
        write_photo(sources / f"{name}.jpg")
    (sources / "notes.txt").write_text("stray")
    edits = make_edits(tmp_path / "edits", 1, ["a2", "b", "zz"])
    (edits / "seed0" / "prompt0" / ".DS_Store").write_text("stray")
    pairing = pair_by_name(images_by_name(edits / "seed0" / "prompt0"), images_by_name(sources))
    assert [(n, e.name, r.name) for n, e, r in pairing.pairs] == [("a2", "a2.png", "a2.jpg"), ("b", "b.png", "b.jpg")]
    assert pairing.missing == ["a10"] and pairing.unmatched == ["zz"]

    budgets = tmp_path / "method"
    make_edits(budgets / "budget_0.02", 1, ["a"])
    make_edits(budgets / "budget_0.03", 1, ["a"])
    assert [s.label for s in edit_sets(budgets, 0)] == ["method/budget_0.02", "method/budget_0.03"]
    assert [s.label for s in edit_sets(edits, 0)] == ["edits"]
    with pytest.raises(UserError, match="seed5"):
        edit_sets(edits, 5)


def test_tables_have_the_expected_columns_and_identical_folders_score_perfectly(tmp_path, capsys):
    names = ["p1", "p2", "p3"]
    clean = make_edits(tmp_path / "clean", 2, names)
    same = make_edits(tmp_path / "same", 2, names)  # identical to clean
    other = make_edits(tmp_path / "other" / "budget_0.03", 2, names[:2], image_seed=100)
    output = tmp_path / "results"
    assert runner.cli(runner.METRIC_KEYS, "test", [
        "--clean_edit_dir", str(clean), "--defend_edit_dirs", str(same), str(other.parent), "--seed", "0",
        "--metrics", "psnr,ssim", "--output", str(output), "--src_dir", str(tmp_path)]) == 0
    with (output / "psnr.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "mean", "std", "scored", "unscored", "missing", "prompt0", "prompt1"]
    by_method = {r["method"]: r for r in rows}
    assert math.isinf(float(by_method["same"]["mean"])) and by_method["same"]["scored"] == "6"
    assert by_method["other/budget_0.03"]["missing"] == "2"  # p3 of each prompt
    with (output / "ssim.csv").open() as f:
        assert float(next(csv.DictReader(f))["mean"]) == pytest.approx(1.0)
    with (output / "psnr_per_image.csv").open() as f:
        assert next(csv.reader(f)) == ["method", "prompt", "image", "psnr"]
    table = (output / "results.md").read_text()
    assert "| method | PSNR ↓ | SSIM ↓ |" in table and "### PSNR ↓ per prompt" in table
    assert json.loads((output / "results_missing.json").read_text())["other/budget_0.03"] == ["prompt0/p3",
                                                                                             "prompt1/p3"]
    printed = capsys.readouterr().out
    assert "other/budget_0.03: 2 edits missing" in printed


def test_source_metrics_score_the_clean_row_and_embed_each_source_once(tmp_path):
    model, processor = tiny_clip()
    calls = []
    embedder = ClipEmbedder(model, processor)
    metric = ClipI(embedder)
    original = metric.embed_sources
    metric.embed_sources = lambda images: calls.append(len(images)) or original(images)
    sources = tmp_path / "src"
    sources.mkdir()
    for name in ("a", "b"):
        write_photo(sources / f"{name}.png", size=(72, 64))
    clean = make_edits(tmp_path / "clean", 3, ["a", "b"])
    method = make_edits(tmp_path / "method", 3, ["a", "b"], image_seed=7)
    sets = edit_sets(method, 0)
    results = runner.evaluate([metric], sets, ["x", "y", "z"], src_dir=sources,
                              clean=edit_sets(clean, 0, label="clean")[0], progress=False)
    assert results.labels(metric) == ["clean", "method"]
    assert calls == [1, 1]  # two sources, once each, for 2 folders x 3 prompts
    assert results.summary(metric, "method")["scored"] == 6


def test_clean_metrics_need_the_clean_edits_and_source_metrics_do_not(tmp_path):
    with pytest.raises(UserError, match="--clean_edit_dir"):
        runner.evaluate([PSNR()], [], ["x"], clean=None)
    sources = tmp_path / "src"
    sources.mkdir()
    write_photo(sources / "a.png", size=(72, 64))
    metric = ClipI(ClipEmbedder(*tiny_clip()))
    results = runner.evaluate([metric], edit_sets(make_edits(tmp_path / "method", 2, ["a"]), 0), ["x", "y"],
                              src_dir=sources, clean=None, progress=False)
    assert results.labels(metric) == ["method"] and results.summary(metric, "method")["scored"] == 2


def test_report_writes_grids_of_the_expected_size_and_a_page(tmp_path):
    sources = tmp_path / "src"
    sources.mkdir()
    for name in ("a", "b"):
        write_photo(sources / f"{name}.jpg", size=(80, 64))
    protected = tmp_path / "protected" / "budget_0.03"
    protected.mkdir(parents=True)
    write_photo(protected / "a.png", size=(80, 64))
    clean = make_edits(tmp_path / "clean", 3, ["a", "b"])
    make_edits(tmp_path / "edits" / "budget_0.03", 3, ["a"])
    results = tmp_path / "results"
    results.mkdir()
    (results / "psnr.csv").write_text("method,mean\nedits/budget_0.03,21.5\n")
    out = tmp_path / "report"
    assert report.main(["--src_dir", str(sources), "--clean_edit_dir", str(clean), "--defend_edit_dirs",
                        str(tmp_path / "edits"), "--protected_dirs", str(tmp_path / "protected"), "--seed", "0",
                        "--prompt_indices", "0,2", "--tile", "64", "--results", str(results),
                        "--output", str(out)]) == 0
    sheet = Image.open(out / "grid_a.png")
    assert sheet.size == (64 * 6, report.LABEL + 1 * (64 + report.LABEL))  # 6 columns, one method row
    pixels = np.asarray(sheet)
    top = report.LABEL * 2
    assert (pixels[top + 32, 64 * 5 + 32] != report.MISSING).any()  # a's protected edit is there
    missing = np.asarray(Image.open(out / "grid_b.png"))
    assert (missing[top + 32, 64 * 5 + 32] == report.MISSING).all()  # b was not edited: a grey tile
    page = (out / "index.html").read_text()
    assert "grid_a.png" in page and "PSNR ↓" in page and "21.5" in page


def test_report_grid_helper_layout():
    image = report.grid(["x", "y", "z"], [("row", [None, None, None])] * 2, size=50)
    assert image.size == (150, report.LABEL + 2 * (50 + report.LABEL))


def test_an_unreadable_edit_is_reported_and_the_rest_scored(tmp_path):
    clean = make_edits(tmp_path / "clean", 1, ["a", "b"])
    method = make_edits(tmp_path / "method", 1, ["a", "b"], image_seed=3)
    (method / "seed0" / "prompt0" / "b.png").write_bytes(b"\x89PNG broken")
    results = runner.evaluate([PSNR()], edit_sets(method, 0), ["x"], clean=edit_sets(clean, 0)[0], progress=False)
    assert list(results.scores["psnr"]["method"][0]) == ["a"]
    assert len(results.missing["method"]) == 1 and "prompt0/b" in results.missing["method"][0]


def test_fr_scores_the_same_person_above_another_and_counts_faceless_edits(assets, tmp_path):
    from methods.models.loading import load_face_identity

    sources = tmp_path / "src"
    same, other = (tmp_path / kind / "seed0" / "prompt0" for kind in ("same", "other"))
    for folder in (sources, same, other):
        folder.mkdir(parents=True)
    faces = assets / "faces"
    load_image(faces / "obama" / "obama.jpg").save(sources / "x.png")
    load_image(faces / "obama" / "obama2.jpg").save(same / "x.png")
    load_image(faces / "biden" / "biden.jpg").save(other / "x.png")
    load_image(faces / "kit_harington" / "john1.jpg").save(sources / "y.png")
    write_photo(same / "y.png", size=(128, 128))  # noise: no face
    write_photo(other / "y.png", size=(128, 128))
    metric = FaceSimilarity(load_face_identity(str(assets / "models" / "sface" / "model.onnx"), torch.device("cpu")))
    results = runner.evaluate([metric], edit_sets(tmp_path / "same", 0) + edit_sets(tmp_path / "other", 0), ["p"],
                              src_dir=sources, progress=False)
    same_score = results.scores["fr"]["same"][0]["x"]
    other_score = results.scores["fr"]["other"][0]["x"]
    print(f"\nSFace FR metric: same person {same_score:.3f}, different person {other_score:.3f}")
    assert same_score > other_score + 0.3
    summary = results.summary(metric, "same")
    assert summary["scored"] == 1 and summary["unscored"] == 1 and summary["mean"] == pytest.approx(same_score)


def test_evaluate_runs_as_a_module_with_models_from_folders(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, export_tiny_onnx_face_model

    clip = tmp_path / "clip"
    tiny_clip(clip)
    face = export_tiny_onnx_face_model(tmp_path / "face")
    sources = tmp_path / "src"
    sources.mkdir()
    for name in ("a", "b"):
        write_photo(sources / f"{name}.jpg", size=(72, 64))
    clean = make_edits(tmp_path / "clean", 2, ["a", "b"])
    method = make_edits(tmp_path / "facelock" / "budget_0.03", 2, ["a", "b"], image_seed=50)
    result = subprocess.run(
        [sys.executable, "-m", "evaluation.evaluate", "--src_dir", str(sources), "--clean_edit_dir", str(clean),
         "--defend_edit_dirs", str(method.parent), "--seed", "0", "--metrics", "psnr,ssim,clip_s,clip_i,fr",
         "--clip_model", str(clip), "--fr_model", str(face), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| method | PSNR ↓ | SSIM ↓ | CLIP-S ↓ | CLIP-I ↓ | FR ↓ |" in result.stdout
    for key in ("psnr", "ssim", "clip_s", "clip_i", "fr"):
        with (tmp_path / "out" / f"{key}.csv").open() as f:
            rows = {r["method"]: r for r in csv.DictReader(f)}
        expected = {"facelock/budget_0.03"} | ({"clean"} if key in ("clip_s", "clip_i", "fr") else set())
        assert set(rows) == expected
    with (tmp_path / "out" / "fr.csv").open() as f:
        assert {r["unscored"] for r in csv.DictReader(f)} == {"4"}  # noise has no face: counted, not scored

    helped = subprocess.run([sys.executable, "-m", "evaluation.eval_facial", "--help"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert helped.returncode == 0 and "--fr_model" in helped.stdout and "--src_dir" in helped.stdout
