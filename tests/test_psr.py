"""Protection Success Rate: known answers from hand-made embeddings, and the script and the one-pass evaluator."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import centre_faces, tiny_face_identity
from evaluation import eval_psr, runner
from evaluation.metrics.psr import Gallery, psr_outcomes

NAN = float("nan")


def same(values):
    return [NAN if math.isnan(v) else round(v, 6) for v in values]


def test_rank_and_verification_psr_of_hand_made_similarities():
    identities = ["A", "A", "B", "C", "D"]
    similarity = torch.tensor([
        [0.95, 0.5, 0.7, 0.3, 0.6],  # A, its own photo (0) left out: B and D closer than A's other photo
        [0.9, 0.8, 0.99, 0.1, 0.2],  # B, its own photo (2) left out: no other photo of B, not scored
        [0.2, 0.35, 0.1, 0.3, 0.4],  # A, not in the gallery: D closer; both A photos under the threshold
        [0.5, 0.1, 0.5, 0.0, 0.0],  # A: a tie with B counts against the protection
    ])
    probe_people = ["A", "B", "A", "A"]
    same_person = torch.tensor([[g == p for g in identities] for p in probe_people])
    eligible = torch.ones(4, 5, dtype=torch.bool)
    eligible[0, 0] = eligible[1, 2] = False
    out = psr_outcomes(similarity, same_person, eligible, threshold=0.4)
    assert same(out["top1"].tolist()) == same([1.0, NAN, 1.0, 0.0])
    assert same(out["top5"].tolist()) == same([0.0, NAN, 0.0, 0.0])
    assert same(out["verification"].tolist()) == same([0.0, NAN, 1.0, 0.5])
    assert same(psr_outcomes(similarity, same_person, eligible, threshold=0.5)["verification"].tolist()) == \
        same([1.0, NAN, 1.0, 1.0])  # at the threshold is rejected


def test_the_gallery_names_probes_leaves_their_own_photo_out_and_skips_faceless_ones():
    # unit embeddings in 2-D: people at angles; a probe of A turned toward B is protected at rank 1
    angle = lambda degrees: [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]  # noqa: E731
    gallery = Gallery(keys=["a__1", "a__2", "b__1", "c__1"], identities=["A", "A", "B", "C"],
                      embeddings={"m": torch.tensor([angle(0), angle(10), angle(90), angle(180)])},
                      thresholds={"m": 0.5})
    probes = torch.tensor([angle(5), angle(80), angle(0), [NAN, NAN]])
    out = gallery.outcomes("m", probes, ["a__1", "1", "a__2", "b__1"])  # "1" is ambiguous: two photos named 1
    assert same(out["top1"].tolist()) == same([0.0, NAN, 0.0, NAN])
    out = gallery.outcomes("m", torch.tensor([angle(80)]), ["a__1"])
    assert same(out["top1"].tolist()) == [1.0] and same(out["verification"].tolist()) == [1.0]  # cos 70° < 0.5
    assert gallery.identity_of("2") == ("A", 1) and gallery.identity_of("x") == (None, None)


def write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def people_folder(root: Path) -> Path:
    """Three people, two near-identical photos each (what a face model matches), with a labels.csv."""
    rng = np.random.default_rng(0)
    rows = ["path,identity"]
    for person in ("p", "q", "r"):
        base = rng.integers(0, 256, size=(64, 64, 3))
        for k in (1, 2):
            noisy = np.clip(base + rng.integers(-3, 4, size=base.shape), 0, 255).astype(np.uint8)
            write(root / f"{person}{k}.png", noisy)
            rows.append(f"{person}{k}.png,{person}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def tiny_models(monkeypatch):
    from methods.models import loading

    identity = tiny_face_identity()
    identity.embedder.name = "tiny"
    monkeypatch.setattr(eval_psr, "face_models", lambda spec, device: ({"tiny": identity}, centre_faces))
    monkeypatch.setattr(loading, "load_face_identity", lambda spec, device: identity)  # the one-pass evaluator's


def test_eval_psr_scores_protected_probes_against_the_unprotected_control(tmp_path, tiny_models, capsys):
    gallery = people_folder(tmp_path / "gallery")
    probes = tmp_path / "protected"
    probes.mkdir()
    shutil.copy(gallery / "q1.png", probes / "p1.png")  # a perfect protection: p1 now looks like q
    shutil.copy(gallery / "q1.png", probes / "q1.png")  # no protection
    shutil.copy(gallery / "r1.png", probes / "r1.png")
    (probes / "stray.png").write_bytes((gallery / "r2.png").read_bytes())  # no such gallery photo
    assert eval_psr.main(["--gallery", str(gallery), "--probes", str(probes), "--fr_model", "tiny", "--output",
                          str(tmp_path / "out")]) == 0
    with (tmp_path / "out" / "psr.csv").open() as f:
        rows = {r["probes"]: r for r in csv.DictReader(f)}
    assert float(rows["none"]["top1"]) == 0 and float(rows["none"]["verification"]) == 0
    assert float(rows["protected"]["top1"]) == pytest.approx(1 / 3)  # p1 of p1, q1, r1
    assert float(rows["protected"]["top5"]) == 0  # p2 is among the 5 others
    assert float(rows["protected"]["verification"]) == pytest.approx(1 / 3)
    assert rows["protected"]["scored"] == "3" and rows["protected"]["unscored"] == "1"
    printed = capsys.readouterr().out
    assert "| protected | 33% | 0% | 33% | 3 |" in printed and "1 probes match no gallery photo" in printed


def test_the_one_pass_evaluator_s_psr_with_a_gallery_adds_the_identification_psr(tmp_path, tiny_models):
    gallery = people_folder(tmp_path / "gallery")
    for label, source in (("clean", {"p1": "p1", "q1": "q1"}), ("cloaked", {"p1": "q1", "q1": "q1"})):
        for name, image in source.items():
            photo = np.asarray(Image.open(gallery / f"{image}.png"))
            write(tmp_path / label / "seed0" / "prompt0" / f"{name}.png", photo)
    argv = ["--src_dir", str(gallery), "--clean_edit_dir", str(tmp_path / "clean"), "--defend_edit_dirs",
            str(tmp_path / "cloaked"), "--seed", "0", "--output", str(tmp_path / "out"), "--fr_model", "tiny"]
    def means(key: str) -> dict[str, float]:
        with (tmp_path / "out" / f"{key}.csv").open() as f:
            return {r["method"]: float(r["mean"]) for r in csv.DictReader(f)}

    # without a gallery: the verification PSR against the source photo only, at the given threshold
    assert runner.cli(runner.METRIC_KEYS, "test", [*argv, "--metrics", "psr", "--fr_threshold", "0.9998"]) == 0
    assert means("psr") == {"clean": 0.0, "cloaked": 0.5}  # p1's edit shows q
    assert not (tmp_path / "out" / "psr_top1_tiny.csv").exists()
    # with one: the same metric, calibrated on the gallery, and the identification PSR against it
    assert runner.cli(runner.METRIC_KEYS, "test", [*argv, "--metrics", "psr", "--psr_gallery", str(gallery)]) == 0
    assert means("psr") == {"clean": 0.0, "cloaked": 0.5}
    assert means("psr_top1_tiny") == {"clean": 0.0, "cloaked": 0.5}
    assert means("psr_verification_tiny") == {"clean": 0.0, "cloaked": 0.5}
    table = (tmp_path / "out" / "results.md").read_text()
    assert "PSR ↑" in table and "PSR top-1 (tiny) ↑" in table
