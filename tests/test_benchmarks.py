"""The protection benchmark's bookkeeping on a tiny setup, and its real-face path with FACELOCK_ASSETS."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import export_tiny_onnx_face_model, write_photo
from evaluation.benchmarks import crops
from evaluation.benchmarks import protection as benchmark_protection
from evaluation.benchmarks import speed as benchmark_speed
from methods.models.faces import FaceDetector
from utils import UserError, load_image

METHODS = "none,noise,encoder,facelock-eot,editshield"
CLEANUPS = "none,jpeg75,resize0.5"


def test_protection_benchmark_bookkeeping(tmp_path, tiny_vae_dir, capsys):
    faces = tmp_path / "faces"
    for person, seed in (("ann", 1), ("bob", 2)):
        (faces / person).mkdir(parents=True)
        write_photo(faces / person / "portrait.jpg", size=(120, 90), seed=seed)
    face = export_tiny_onnx_face_model(tmp_path / "face")
    argv = ["--faces", str(faces), "--output", str(tmp_path / "out"), "--methods", f"{METHODS},diffusion",
            "--cleanups", CLEANUPS,
            "--size", "64", "--num_iters", "2", "--vae", str(tiny_vae_dir), "--fr_model", str(face), "--judge",
            str(face), "--device", "cpu"]
    assert benchmark_protection.main(argv) == 0
    out = tmp_path / "out"
    with (out / "protection.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * 3 * 2  # diffusion is skipped: without --editor it has no UNet to run
    assert {(r["method"], r["cleanup"]) for r in rows} == {(m, c) for m in METHODS.split(",")
                                                            for c in CLEANUPS.split(",")}
    assert {r["photo"] for r in rows} == {"ann__portrait", "bob__portrait"}
    for r in rows:
        assert math.isnan(float(r["fr_heldout"]))  # noise photos have no face: not scored
        if r["method"] == "editshield":  # its fidelity term outweighs a random tiny autoencoder's latents
            assert 0 < float(r["linf_255"]) <= 3
        else:
            assert float(r["linf_255"]) == (0 if r["method"] == "none" else 3)  # the whole budget, never more
    facelock = [r for r in rows if r["method"] == "facelock-eot"]
    assert all(float(r["seconds"]) > 0 for r in facelock)
    table = (out / "protection.md").read_text()
    assert "| method | FR" in table and "after each cleanup" in table and "| facelock-eot | n/a |" in table
    assert "| editshield | n/a |" in table and "diffusion: skipped" in table and "| diffusion |" not in table
    assert Image.open(out / "grid.png").size == (160 * 6, 18 + 2 * (160 + 18))
    assert Image.open(out / "photos" / "ann__portrait.png").size == (64, 64)
    assert (out / "protected" / "facelock-eot" / "budget_0.03" / "manifest.json").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in (out / "protected").rglob("*.png")}
    assert benchmark_protection.main(argv) == 0  # resumes: nothing protected again
    assert {p: p.stat().st_mtime_ns for p in (out / "protected").rglob("*.png")} == stamps
    capsys.readouterr()


def test_protection_benchmark_refuses_the_held_out_faces(tmp_path):
    holdout = tmp_path / "faces-holdout"
    holdout.mkdir()
    write_photo(holdout / "a.jpg")
    with pytest.raises(UserError, match="reserved for acceptance"):
        benchmark_protection.main(["--faces", str(holdout), "--output", str(tmp_path / "out")])


def test_face_crops_centre_the_face(assets):
    image = load_image(assets / "faces" / "obama" / "obama.jpg")
    detector = FaceDetector()
    crop = crops.face_crop(image, 128, detector)
    box = detector(torch.from_numpy(np.asarray(crop)).permute(2, 0, 1)[None].float() / 127.5 - 1).boxes[0]
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    assert crop.size == (128, 128)
    assert abs(centre[0] - 64) < 12 and abs(centre[1] - 64) < 12
    assert 0.3 * 128 < box[3] - box[1] < 0.6 * 128


def test_speed_benchmark_schedule_weights_facelocks_phases():
    import methods
    from conftest import AUTOENCODERS, tiny_face_identity, tiny_lpips

    models = dict(autoencoder=AUTOENCODERS["tiny"](), face=tiny_face_identity())
    assert benchmark_speed.schedule(methods.create("facelock", **models, perceptual=tiny_lpips())) == {
        0: 26, 26: 9, 35: 65}  # encoder only; with LPIPS; with LPIPS and FR
    assert benchmark_speed.schedule(methods.create("facelock", **models)) == {0: 35, 35: 65}
    assert benchmark_speed.schedule(methods.create("encoder", autoencoder=AUTOENCODERS["tiny"]())) == {0: 100}


def test_speed_benchmark_times_every_sharing_lever(monkeypatch):
    import argparse

    from conftest import AUTOENCODERS, random_images, tiny_face_identity

    built = []
    real_create = benchmark_speed.methods.create
    monkeypatch.setattr(benchmark_speed.methods, "create", lambda *a, **k: built.append(k) or real_create(*a, **k))
    monkeypatch.setattr(benchmark_speed, "LEVER_ITERATIONS", 2)
    rows = benchmark_speed.sharing_levers(argparse.Namespace(repeats=1), torch.device("cpu"), tiny_face_identity(),
                                          AUTOENCODERS["tiny"](), random_images(1, size=64))
    assert [r[0] for r in rows] == list(benchmark_speed.SHARING_LEVERS) and rows[0][2] == "1.00x"
    assert all(float(r[1]) > 0 for r in rows)
    for options, (label, extra) in zip(built, benchmark_speed.SHARING_LEVERS.items(), strict=True):
        assert all(options[name] == value for name, value in extra.items() if name != "eot"), label  # its own lever
    assert built[1]["eot"] is not None and built[0].get("eot") is None
    assert all(k["input_diversity"] == 0.5 and k["perceptual"] is None for k in built)


def test_reference_loop_recomputes_the_clean_references_at_every_iteration():
    from conftest import AUTOENCODERS, random_images, tiny_face_identity, tiny_lpips

    x = random_images(1)
    face, perceptual, seen, references = tiny_face_identity(), tiny_lpips(), [], []
    for model in (face, perceptual):
        model.reference = lambda images, clean=model.reference, model=model: references.append(model) or clean(images)
    out = benchmark_speed.reference_facelock(x, AUTOENCODERS["tiny"](), face, perceptual, 0.03, 0.01, 4,
                                             torch.Generator().manual_seed(0), on_iteration=seen.append)
    assert seen == [0, 1, 2, 3] and (out - x).abs().max() <= 0.03 + 1e-6 and not out.requires_grad
    assert references == [face, perceptual] * 4  # as the official loop: every term, every iteration


def assert_a_rerun_redoes_nothing(main, argv: list[str], out: Path, table: str, column: str, marked: str,
                                  rows: list[dict]) -> None:
    """Rerun a benchmark that has finished: it protects nothing again (the photos keep their times) and judges
    nothing again (a row of `judged.json` whose key holds `marked`, given a value no judging gives, is in the table
    unchanged)."""
    stamps = {p: p.stat().st_mtime_ns for p in (out / "protected").rglob("*.png")}
    judged = json.loads((out / "judged.json").read_text())
    judged[next(key for key in judged if marked in key)][0][column] = -0.5
    (out / "judged.json").write_text(json.dumps(judged))
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "protected").rglob("*.png")} == stamps
    with (out / table).open() as f:
        again = list(csv.DictReader(f))
    assert [r[column] for r in again].count("-0.5") == 1 and len(again) == len(rows)


def test_transfer_benchmark_leaves_a_model_out_and_resumes(assets, tmp_path, capsys):
    from evaluation.benchmarks import transfer as benchmark_transfer

    assert benchmark_transfer.alone(["sface", "mobileface"], "single-di") == ["sface"]  # single-...: the first alone
    assert benchmark_transfer.alone(["sface", "mobileface"], "mi-di") == ["sface", "mobileface"]
    faces = tmp_path / "faces"
    for person, files in (("obama", ("obama.jpg", "obama2.jpg")), ("biden", ("biden2.jpg",))):
        (faces / person).mkdir(parents=True)
        for name in files:  # smaller copies: detection on full-size photos is what takes time here
            image = load_image(assets / "faces" / person / name)
            image.thumbnail((400, 400))
            image.save(faces / person / f"{Path(name).stem}.png")
    out = tmp_path / "out"
    argv = ["--faces", str(faces), "--output", str(out), "--models", "sface,mobilefacenet", "--held_out", "sface",
            "--configs", "mi,l2", "--kinds", "crops", "--photos", "2", "--num_iters", "2", "--device", "cpu",
            "--l2_budget", "4", "--vae", str(assets / "models" / "taesd")]
    assert benchmark_transfer.main(argv) == 0
    with (out / "transfer.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 4  # (unprotected + the two configs) x the two photos of --photos x cleanups
    assert {r["cleanup"] for r in rows} == {"none", "jpeg75", "jpeg50", "1080+jpeg85"}
    assert all(0 <= float(r["flat_mean"]) <= float(r["flat_max"]) <= 3 for r in rows if r["config"] == "mi"
               and r["flat_max"] != "nan")
    assert {(r["held_out"], r["config"]) for r in rows} == {("sface", "none"), ("sface", "mi"), ("sface", "l2")}
    assert max(int(r["linf_255"]) for r in rows if r["config"] == "mi") == 3  # 0.03 is 3.8 levels
    l2 = (out / "protected" / "crops" / "mobilefacenet" / "l2" / "budget_4.0" / "manifest.json").read_text()
    assert '"norm": "l2"' in l2 and '"step_size": 0.5' in l2 and '"attack_budget": 4.0' in l2
    unprotected = [r for r in rows if r["config"] == "none" and r["cleanup"] == "none"]
    assert all(float(r["fr_held_out"]) > 0.5 and r["protected"] == "False" for r in unprotected)
    manifest = (out / "protected" / "crops" / "mobilefacenet" / "mi" / "budget_0.03" / "manifest.json").read_text()
    assert '"fr_model": "mobilefacenet"' in manifest and '"momentum": 1.0' in manifest
    table = (out / "transfer.md").read_text()
    assert "| sface | mi |" in table and "| sface | l2 |" in table and "flat: mean / largest" in table
    assert Image.open(out / "zoom_crops.png").size == (3 * 144, 18 + 144 + 18)  # clean, mi, l2 for one held-out model
    assert_a_rerun_redoes_nothing(benchmark_transfer.main, argv, out, "transfer.csv", "fr_held_out", "|mi|", rows)
    capsys.readouterr()


def test_a_transfer_config_may_set_its_own_iterations(tmp_path, monkeypatch):
    from argparse import Namespace

    from evaluation.benchmarks import transfer as benchmark_transfer

    seen = {}
    monkeypatch.setattr(benchmark_transfer, "protect_folder", lambda options, *a, **k: seen.update(options=options))
    args = Namespace(l2_budget=8.0, attack_budget=0.03, vae="madebyollin/taesd", num_iters=7, seed=0, device="cpu",
                     batch_size=1)
    for config, iterations in (("single-di-share", 7), ("single-di-share-long", 300)):
        benchmark_transfer.protect(args, tmp_path, tmp_path / config, ["sface", "mobileface"], config, "crops")
        assert (seen["options"].num_iters, seen["options"].eot, seen["options"].fr_model) == (iterations, "share",
                                                                                              "sface")


def test_portraits_benchmark_checks_whole_photos_at_their_own_size(assets, tmp_path, capsys):
    from evaluation.benchmarks import portraits

    with pytest.raises(UserError, match="name=flags"):
        portraits.parse_configs("plain;aa=--antialias")
    faces = tmp_path / "faces"
    for person, name in (("obama", "obama.jpg"), ("biden", "biden2.jpg")):
        (faces / person).mkdir(parents=True)
        image = load_image(assets / "faces" / person / name)
        image.thumbnail((320, 320))
        image.save(faces / person / f"{Path(name).stem}.png")
    out = tmp_path / "out"
    argv = ["--faces", str(faces), "--output", str(out), "--judge", "mobilefacenet", "--device", "cpu",
            "--configs", "plain=--num_iters 2 --input_diversity 0 --no-antialias; aa=--num_iters 2"]
    assert portraits.main(argv) == 0
    with (out / "portraits.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3  # configs x photos x ways of sharing, one judge
    assert {r["sharing"] for r in rows} == {"as posted", "JPEG 75", "1080 px + JPEG 85"}
    assert all((r["protected"] == "True") == (r["verdict"] == "not recognised") for r in rows)
    assert all(float(r["psnr"]) > 30 and r["size"] in ("256x320", "320x320") for r in rows)
    assert all(-1 <= float(r["attacked"]) <= 1 for r in rows)  # sface's similarity, as the judges see the photo
    manifest = (out / "protected" / "aa" / "budget_0.0314" / "manifest.json").read_text()
    assert '"antialias": true' in manifest and '"fr_model": "sface"' in manifest  # the preset's
    assert '"eot": "none,share"' in manifest
    assert '"antialias": false' in (out / "protected" / "plain" / "budget_0.0314" / "manifest.json").read_text()
    table = (out / "portraits.md").read_text()
    assert table.count("**all**") == 2 and "of 2" in table
    assert "`--num_iters 2 --input_diversity 0 --no-antialias`" in table
    assert "`--preset small` (budget 0.0314 (4.0/255)" in table
    assert "| attacked: sface (as posted, JPEG 75, 1080 px + JPEG 85) |" in table
    assert len(json.loads((out / "judged.json").read_text())) == 2 * 2  # configs x photos
    assert_a_rerun_redoes_nothing(portraits.main, argv, out, "portraits.csv", "similarity", "aa|", rows)
    capsys.readouterr()


def test_time_to_protection_finds_the_first_iterate_at_the_official_protection():
    from evaluation.benchmarks.time_to_protection import Curve, summary

    official = Curve([5, 10], [1.0, 2.0], [0.5, 0.2], [0.6, 0.3])
    faster = Curve([5, 10], [0.9, 1.8], [0.2, 0.1], [0.3, 0.2])
    slower = Curve([5, 10], [1.0, 2.0], [0.4, 0.3], [0.5, 0.35])
    assert official.reached(0.2, 0.3) == (10, 2.0) and faster.reached(0.2, 0.3) == (5, 0.9)
    assert slower.reached(0.2, 0.3) is None
    rows = summary({"official": [official], "faster": [faster], "slower": [slower]})
    assert rows == [["official", "1/1", "10", "2.0", "1.00x"], ["faster", "1/1", "5", "0.9", "2.22x"],
                    ["slower", "0/1", "n/a", "n/a", "n/a"]]


def test_time_to_protection_curves_of_a_tiny_facelock():
    import methods
    from conftest import AUTOENCODERS, random_images, tiny_face_identity
    from evaluation.benchmarks.time_to_protection import VARIANTS, run, table_of_curves

    taesd, face = AUTOENCODERS["tiny"](), tiny_face_identity()
    build = lambda **options: methods.create("facelock", autoencoder=taesd, face=face, num_iters=10,  # noqa: E731
                                             **options)
    curves = run([random_images(1, size=32, seed=k) for k in range(2)], build, taesd, face, face, seeds=[0, 1])
    assert set(curves) == set(VARIANTS) and all(len(per_photo) == 2 for per_photo in curves.values())
    curve = curves["momentum"][0]
    assert curve.iterations == [5, 10] and curve.seconds[0] < curve.seconds[1]
    assert curves["official"][0].attacked[-1] < 0.99  # the attack lowered its own similarity
    assert len(table_of_curves(curves, (5, 10))[0]) == 3
