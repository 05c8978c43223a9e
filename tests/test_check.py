"""evaluation.check: is a photo still protected? Mechanics with stand-in models, verdicts on real ones."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import defend
from conftest import ROOT, export_tiny_onnx_face_model, tiny_face_identity
from evaluation import check
from evaluation.benchmarks.crops import face_crop
from evaluation.calibration import Calibration, model_digest, write_thresholds
from evaluation.metrics.facial import FaceSimilarity
from methods.models.faces import FaceDetector, Faces
from utils import InputError, UserError, load_image, save_png


class IdentityVAE(torch.nn.Module):
    """An 'editor' that gives the image back unchanged, so the judge sees exactly what was shared."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = torch.nn.Parameter(torch.zeros(1, 1, 1, 1))

    def encode(self, x):
        return SimpleNamespace(latents=x)

    def decode(self, z):
        return SimpleNamespace(sample=z)


def judge(threshold: float | None = 0.5, detector=None) -> check.Judge:
    identity = tiny_face_identity()
    if detector is not None:
        identity.detector = detector
    calibration = None if threshold is None else Calibration("tiny", 0.01, threshold, 1, 1, 0.0)
    return check.Judge("tiny", FaceSimilarity(identity), calibration, "a test")


def photo(size=(120, 96), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def test_the_control_is_judged_in_every_way_of_sharing_with_every_field():
    report = check.Checker(IdentityVAE(), [judge()], "identity")(photo())
    assert report["control"] is True and report["linf_255"] is None and report["psnr"] is None
    assert [r["sharing"] for r in report["results"]] == ["as posted", "JPEG 75", "1080 px + JPEG 85"]
    posted = report["results"][0]
    assert posted["similarity"] == pytest.approx(1.0, abs=1e-4)  # the identical photo
    assert all(r["recognised"] is True and r["verdict"] == "recognised" for r in report["results"])
    assert report["summary"] == dict.fromkeys(check.SHARING, "recognised")
    assert report["judges"] == [{"model": "tiny", "threshold": 0.5, "far": 0.01, "threshold_source": "a test"}]
    assert check.conclusion(report).startswith("control (no protection): the face is recognised")
    json.dumps(report, allow_nan=False)  # machine-readable as it is


def test_a_protected_copy_reports_its_visibility_and_must_match_the_original():
    original = photo()
    shifted = np.clip(np.asarray(original).astype(int) + 3, 0, 255).astype(np.uint8)
    report = check.Checker(IdentityVAE(), [judge(threshold=1.01)], "identity")(original, Image.fromarray(shifted))
    assert report["control"] is False and report["linf_255"] == 3 and 35 < report["psnr"] < 40
    assert report["summary"] == dict.fromkeys(check.SHARING, "not recognised")  # nothing passes a threshold > 1
    assert check.conclusion(report).startswith("protected:")
    with pytest.raises(InputError, match="not a copy"):
        check.Checker(IdentityVAE(), [judge()], "identity")(original, photo(size=(96, 96)))


def test_watched_models_are_scored_on_the_same_edits_without_a_verdict():
    original = photo()
    shifted = Image.fromarray(np.clip(np.asarray(original).astype(int) + 3, 0, 255).astype(np.uint8))
    watched = [("attacked", FaceSimilarity(tiny_face_identity()))]
    report = check.Checker(IdentityVAE(), [judge(threshold=1.01)], "identity", watched=watched)(original, shifted)
    alone = check.Checker(IdentityVAE(), [judge(threshold=1.01)], "identity")(original, shifted)
    assert report["summary"] == alone["summary"] and report["results"] == alone["results"]
    assert [(w["sharing"], w["judge"]) for w in report["watched"]] == [(s, "attacked") for s in check.SHARING]
    # the same face model as the judge, on the same edits: the same similarities
    assert [w["similarity"] for w in report["watched"]] == [r["similarity"] for r in report["results"]]
    assert alone["watched"] == []


def test_a_copy_that_no_protection_could_give_is_refused_and_another_face_is_named():
    original = photo(seed=1)
    checker = check.Checker(IdentityVAE(), [judge(threshold=1.01)], "identity")  # recognises no face
    black = Image.new("RGB", original.size)
    with pytest.raises(InputError, match="not a protected copy of this photo.*PSNR .* any protection .* 18.1 dB") as no:
        checker(original, black)
    assert "\n" not in str(no.value)
    with pytest.raises(InputError, match="shows another person's face"):  # another picture of the same size
        checker(original, photo(seed=2))
    strongest = np.clip(np.asarray(original).astype(int) + np.where(np.arange(original.width) % 2, 31, -31)[None, :,
                        None], 0, 255).astype(np.uint8)  # the largest budget, 0.25 (31/255), on every pixel
    assert checker(original, Image.fromarray(strongest))["linf_255"] == 31  # still a copy: judged, not refused


def test_faces_missing_and_thresholds_missing_are_said_plainly():
    nobody = lambda images: Faces(torch.zeros(0, dtype=torch.long), torch.zeros(0, 4),  # noqa: E731
                                  torch.zeros(0, 5, 2), len(images))
    with pytest.raises(InputError, match="no face found in the original"):
        check.Checker(IdentityVAE(), [judge(detector=nobody)], "identity")(photo())
    assert check.verdict(float("nan"), None) == (False, "no face found")
    assert check.verdict(0.9, None) == (None, "no threshold")
    report = check.Checker(IdentityVAE(), [judge(threshold=None)], "identity")(photo())
    assert report["summary"] == dict.fromkeys(check.SHARING, "unknown")
    assert check.conclusion({**report, "control": False}).startswith("unknown")
    partly = {"control": False, "summary": {"as posted": "not recognised", "JPEG 75": "recognised"}}
    assert check.conclusion(partly) == "partly protected: the face is not recognised after the edit only when " \
                                       "shared as posted"


def test_sharing_shrinks_only_large_photos_and_saves_8_bit_jpegs():
    x = torch.rand(1, 3, 1200, 1600) * 2 - 1
    shared = check.SHARING["1080 px + JPEG 85"](x)
    assert shared.shape[-2:] == (810, 1080)
    assert torch.allclose((shared + 1) * 127.5, ((shared + 1) * 127.5).round(), atol=1e-3)
    small = torch.rand(1, 3, 64, 80) * 2 - 1
    assert check.SHARING["1080 px + JPEG 85"](small).shape == small.shape
    assert check.fit_long_side(x, 0) is x


def test_the_command_line_gives_json_and_refuses_a_judge_the_protection_attacked(tmp_path, tiny_vae_dir, capsys,
                                                                                 monkeypatch):
    monkeypatch.delenv("FACELOCK_ASSETS", raising=False)
    original = tmp_path / "me.png"
    Image.open(ROOT / "assets" / "astronaut.png").convert("RGB").resize((160, 160)).save(original)
    model = str(export_tiny_onnx_face_model(tmp_path / "judge"))
    table = tmp_path / "thresholds.json"
    write_thresholds(table, {model: {"model": model, "far": 0.01, "threshold": 0.25, "genuine_pairs": 1,
                                     "impostor_pairs": 1, "false_rejects": 0.0, "model_sha256": model_digest(model),
                                     "photos": "a test", "command": "none"}})
    common = ["--original", str(original), "--vae", str(tiny_vae_dir), "--judge", model, "--device", "cpu"]
    assert check.main([*common, "--thresholds", str(table), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"original", "protected", "control", "editor", "linf_255", "psnr", "judges", "results", "summary",
            "conclusion"} <= set(report)
    assert report["judges"][0]["threshold"] == 0.25 and len(report["results"]) == 3
    assert check.main([*common, "--thresholds", str(tmp_path / "none.json")]) == 0
    text = capsys.readouterr().out
    assert "no threshold for" in text and "python -m evaluation.calibration --fr_model" in text
    with pytest.raises(UserError, match="did not attack"):
        check.main([*common, "--protection_fr_model", f"sface,{model}"])


def test_real_models_recognise_the_photo_and_not_its_facelock_protected_copy(assets, tmp_path, capsys):
    photo_path = tmp_path / "obama.png"
    save_png(np.asarray(face_crop(load_image(assets / "faces" / "obama" / "obama.jpg"), 224, FaceDetector())),
             photo_path)
    assert defend.main(["--input_path", str(photo_path), "--defend_method", "facelock", "--preset", "small",
                        "--num_iters", "100", "--attack_budget", "0.125"]) == 0  # 15/255: see the README
    capsys.readouterr()
    protected = tmp_path / "obama_protected.png"
    for extra, expected in (([], "recognised"), (["--protected", str(protected)], "not recognised")):
        assert check.main(["--original", str(photo_path), *extra, "--judge", "mobilefacenet", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        with capsys.disabled():
            print(f"\n{'control' if not extra else 'protected'}: " +
                  ", ".join(f"{r['sharing']} {r['similarity']:.3f}" for r in report["results"]) +
                  (f"; L-inf {report['linf_255']}/255, PSNR {report['psnr']:.1f} dB" if extra else "") +
                  f": {report['conclusion']}")
        assert report["judges"][0]["model"] == "mobilefacenet"
        assert "thresholds.json" in report["judges"][0]["threshold_source"]  # the shipped table, not recalibrated
        assert report["summary"]["as posted"] == expected
    assert report["linf_255"] <= 15 and report["psnr"] > 25
