"""Face-recognition thresholds at a false-accept rate."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT, write_photo
from evaluation.calibration import (
    calibrate,
    labelled_photos,
    model_digest,
    read_thresholds,
    threshold_at_far,
    write_thresholds,
)
from methods.models.loading import load_face_identity
from utils import UserError


def test_threshold_accepts_at_most_the_allowed_fraction_of_impostors():
    impostor = [0.1 * k for k in range(10)]  # 0.0 ... 0.9
    assert threshold_at_far(impostor, 0.0) == pytest.approx(0.9)  # nothing above the highest
    assert threshold_at_far(impostor, 0.1) == pytest.approx(0.8)  # one of ten above
    assert threshold_at_far(impostor, 0.25) == pytest.approx(0.7)  # floor(2.5) = 2 above
    for far in (0.0, 0.1, 0.25, 0.5):
        accepted = sum(s > threshold_at_far(impostor, far) for s in impostor)
        assert accepted <= far * len(impostor)
    with pytest.raises(ValueError):
        threshold_at_far([], 0.01)


def test_identities_come_from_labels_or_folders_and_the_holdout_is_refused(tmp_path):
    for person in ("ann", "bob"):
        (tmp_path / "by_folder" / person).mkdir(parents=True)
        write_photo(tmp_path / "by_folder" / person / "1.png")
    assert [i for _, i in labelled_photos(tmp_path / "by_folder")] == ["ann", "bob"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("x.png", "y.png", "z.png"):
        write_photo(flat / name)
    (flat / "labels.csv").write_text("path,identity\nx.png,p\ny.png,q\nz.png,q\n")
    assert [(p.name, i) for p, i in labelled_photos(flat)] == [("x.png", "p"), ("y.png", "q"), ("z.png", "q")]
    (flat / "labels.csv").write_text("path,identity\nx.png,p\ny.png,p\n")
    with pytest.raises(UserError, match="at least two people"):
        labelled_photos(flat)
    holdout = tmp_path / "faces-holdout"
    holdout.mkdir()
    write_photo(holdout / "a.png")
    with pytest.raises(UserError, match="reserved for acceptance"):
        labelled_photos(holdout)


def test_real_models_separate_people_at_one_percent_far(assets):
    photos = labelled_photos(assets / "faces")
    for name in ("sface", "mobilefacenet"):
        result = calibrate(load_face_identity(name, torch.device("cpu")), photos, far=0.01)
        print(f"\n{name}: threshold {result.threshold:.3f}, {result.false_rejects:.0%} of "
              f"{result.genuine_pairs} same-person pairs rejected")
        assert (result.genuine_pairs, result.impostor_pairs) == (14, 77)
        assert 0 < result.threshold < 0.5 and result.false_rejects <= 0.15
        shipped = read_thresholds(ROOT / "assets" / "thresholds.json")[name]  # what evaluation.check uses
        assert shipped["threshold"] == pytest.approx(result.threshold, abs=1e-4)
        assert shipped["model_sha256"] == model_digest(name) and shipped["far"] == 0.01


def test_a_threshold_table_keeps_other_models_when_one_is_recalibrated(tmp_path):
    table = tmp_path / "thresholds.json"
    assert read_thresholds(table) == {}
    write_thresholds(table, {"a": {"threshold": 0.3}, "b": {"threshold": 0.4}})
    write_thresholds(table, {"b": {"threshold": 0.5}})
    assert read_thresholds(table) == {"a": {"threshold": 0.3}, "b": {"threshold": 0.5}}
    table.write_text("{}")
    with pytest.raises(UserError, match="not a threshold table"):
        read_thresholds(table)
