"""FaceCloak: learning an identity mask, its budgets, and warping it onto new photos (tiny random face models)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.transform import SimilarityTransform

import defend
import main_defend
import methods
from conftest import (
    TinyFaceNet,
    centre_faces,
    export_tiny_onnx_face_model,
    random_images,
    tiny_face_identity,
    write_photo,
)
from methods.facecloak import FaceCloak, IdentityMask, sticker_regions, template, warp_onto
from methods.models.faces import (
    FaceDetector,
    FaceEmbedder,
    FaceEnsemble,
    FaceIdentity,
    Faces,
    NoFaceError,
    arcface_matrix,
    crop_faces,
)
from methods.pipeline import options as protection_options
from methods.pipeline import protect
from methods.pipeline.placement import budget_levels, place
from utils import UserError, load_image, tensor_to_uint8

FAST = dict(num_iters=3, variations=2)


def tiny(name: str = "tiny") -> FaceIdentity:
    face = tiny_face_identity()
    face.embedder.name = name
    return face


def landmarks_detector(points: np.ndarray):
    """A detector that finds one face with the given five landmarks in every image."""

    def detect(images: torch.Tensor) -> Faces:
        n = len(images)
        landmarks = torch.tensor(points, dtype=torch.float32).expand(n, 5, 2).clone()
        low, high = landmarks.min(dim=1).values, landmarks.max(dim=1).values
        return Faces(torch.arange(n), torch.cat([low, high], dim=1), landmarks, n)

    return detect


def faceless_if_flat(images: torch.Tensor) -> Faces:
    """centre_faces, except that flat (uniform) images have no face."""
    faces = centre_faces(images)
    keep = images.flatten(1).std(dim=1) > 1e-3
    return Faces(faces.index[keep], faces.boxes[keep], faces.landmarks[keep], len(images))


@torch.no_grad()
def triplet(face, x: torch.Tensor, anchors: tuple[torch.Tensor, torch.Tensor]) -> float:
    e = face.embed(x)[0][0]
    return float(e @ anchors[0] - e @ anchors[1])


def test_learning_lowers_the_triplet_loss_and_protects_the_photo_it_learned_from():
    face = tiny()
    photo, gallery = random_images(1, 96, seed=1), [random_images(1, 80, seed=s) for s in (2, 3, 4, 5)]
    cloak = FaceCloak(face, num_iters=4, variations=2)
    mask = cloak.learn([photo], gallery, torch.Generator().manual_seed(0))
    assert mask.info["loss"][-1] < mask.info["loss"][0]
    # the anchors by hand: the gallery faces most and least similar to the person's clean face
    with torch.no_grad():
        own = face.embed(photo)[0][0]
        others = torch.cat([face.embed(g)[0] for g in gallery])
        anchors = (others[(others @ own).argmax()], others[(others @ own).argmin()])
        assert mask.info["anchors"]["tiny"]["near"] == int((others @ own).argmax())
        learned = triplet(face, cloak(photo), anchors)
        noise = IdentityMask(torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(1)) * 0.1256 - 0.0628,
                             mask.budget)
        random = triplet(face, FaceCloak(detector=centre_faces, mask=noise)(photo), anchors)
    assert learned < triplet(face, photo, anchors) - 2e-3 and learned < random - 2e-3  # tiny model, small values


def test_an_l2_mask_keeps_its_length_under_its_cap_and_near_self_pushes_the_face_from_itself():
    face = tiny()
    photo, gallery = random_images(1, 96, seed=1), [random_images(1, 80, seed=s) for s in (2, 3, 4, 5)]
    length, cap = 3.0, 0.251
    cloak = FaceCloak(face, eps=cap, near="self", mask_l2=length, num_iters=4, variations=2)
    mask = cloak.learn([photo], gallery, torch.Generator().manual_seed(0))
    assert length * 0.9 < float(mask.delta.norm()) <= length + 1e-4  # the length is used, never exceeded
    assert mask.delta.abs().max() <= cap + 1e-6 and torch.equal(mask.budget, torch.full((1, 112, 112), cap))
    # L2 steps spread the change unevenly: few values sit at the cap (sign steps put nearly all at the budget)
    assert (mask.delta.abs() > cap - 1e-3).float().mean() < 0.05
    assert mask.info["near"] == "self" and mask.info["mask_l2"] == length
    assert mask.info["anchors"]["tiny"]["near"] == "self" and mask.info["loss"][-1] < mask.info["loss"][0]
    with torch.no_grad():
        own = F.normalize(face.embed(photo)[0][0], dim=0)
        others = torch.cat([face.embed(g)[0] for g in gallery])
        far = others[(others @ own).argmin()]
        learned = triplet(face, cloak(photo), (own, far))
        shuffle = torch.randperm(mask.delta.numel(), generator=torch.Generator().manual_seed(1))
        noise = IdentityMask(mask.delta.flatten()[shuffle].view_as(mask.delta), mask.budget)  # same values, shuffled
        random = triplet(face, FaceCloak(detector=centre_faces, mask=noise)(photo), (own, far))
    assert learned < triplet(face, photo, (own, far)) - 1e-3 and learned < random - 1e-3  # tiny model, small values
    for bad in (dict(near="person"), dict(mask_l2=-1.0)):
        with pytest.raises(ValueError, match="near in"):
            FaceCloak(face, **bad)


def test_an_ensemble_learns_against_every_model_and_the_mask_survives_saving(tmp_path):
    second = FaceIdentity(FaceEmbedder(TinyFaceNet().eval(), size=(48, 48), input_range=(0, 255), name="other"),
                          centre_faces)
    torch.manual_seed(7)
    for p in second.parameters():
        p.data.normal_(0, 0.3)
    ensemble = FaceEnsemble([tiny(), second])
    cloak = FaceCloak(ensemble, **FAST)
    mask = cloak.learn([random_images(1, 96, seed=1)], [random_images(1, 80, seed=s) for s in (2, 3, 4)])
    assert set(mask.info["anchors"]) == {"tiny", "other"} and mask.info["models"] == "tiny,other"
    mask.save(tmp_path / "mask.safetensors")
    loaded = IdentityMask.load(tmp_path / "mask.safetensors")
    assert torch.equal(loaded.delta, mask.delta) and torch.equal(loaded.budget, mask.budget)
    assert loaded.info == mask.info
    with pytest.raises(ValueError, match="exceeds its budget"):
        IdentityMask(mask.budget.repeat(3, 1, 1) * 1.5, mask.budget)


def test_a_mask_learned_through_the_sharing_channel_and_perturbed_models_is_seeded_and_in_budget():
    from methods.transforms import Sharing

    photos, gallery = [random_images(1, 96, seed=1)], [random_images(1, 80, seed=s) for s in (2, 3, 4)]
    levers = dict(eot=Sharing(resize_probability=1.0), surrogate_noise=0.1)
    mask = FaceCloak(tiny(), **FAST, **levers).learn(photos, gallery, torch.Generator().manual_seed(5))
    again = FaceCloak(tiny(), **FAST, **levers).learn(photos, gallery, torch.Generator().manual_seed(5))
    plain = FaceCloak(tiny(), **FAST).learn(photos, gallery, torch.Generator().manual_seed(5))
    assert torch.equal(mask.delta, again.delta) and not torch.equal(mask.delta, plain.delta)
    assert (mask.delta.abs() <= mask.budget + 1e-6).all()
    off = FaceCloak(tiny(), **FAST, eot=None, surrogate_noise=0.0).learn(photos, gallery,
                                                                          torch.Generator().manual_seed(5))
    assert torch.equal(off.delta, plain.delta)  # off by default: the paper's learning, unchanged


def test_the_mask_stays_in_its_per_pixel_budgets_after_warping_and_rounding():
    base, sticker, highpass = 0.0628, 0.251, 0.15  # 8, 32 and 19 levels
    cloak = FaceCloak(tiny(), eps=base, focus=("stickers", "highpass"), sticker_budget=sticker,
                      highpass_budget=highpass, **FAST)
    mask = cloak.learn([random_images(1, 96, seed=1)], [random_images(1, 80, seed=s) for s in (2, 3, 4)])
    assert cloak.eps == pytest.approx(sticker)
    levels = {round(v * 127.5 + 1e-6) for v in mask.budget.unique().tolist()}
    assert levels == {8, 19, 32}
    assert (mask.budget[sticker_regions(112)] == pytest.approx(sticker))  # the stickers win where both apply
    # a new photo with a rotated, enlarged face at a known place, protected as the scripts do (8-bit rounding)
    rotation = SimilarityTransform(scale=1.9, rotation=math.radians(25), translation=(70, 40))
    cloak.detector = landmarks_detector(rotation(template(112)))
    photo = random_images(1, 300, seed=9)
    image = Image.fromarray(tensor_to_uint8(photo))
    (protected, stats), = protect.protect_images(cloak, [image], [0], torch.device("cpu"), [place(image.size)])
    change = np.abs(protected.astype(int) - np.asarray(image).astype(int))
    _, budget = cloak.cloak(photo)
    allowed = budget_levels(budget[0].permute(1, 2, 0).numpy())
    assert (change <= allowed).all() and stats["linf_255"] <= 32
    # where no pixel of a larger budget is near, the base budget holds; the larger budgets are used
    larger = warp_onto((mask.budget > base + 1e-6).float(), cloak.detector(photo), (300, 300))[0, 0].numpy()
    assert change[larger == 0].max() <= 8 and change[larger == 1].max() > 19
    # away from the face, nothing changes
    face_area = warp_onto(torch.ones(1, 112, 112), cloak.detector(photo), (300, 300))[0, 0].numpy()
    assert change[face_area == 0].max() == 0 and (face_area > 0).mean() < 0.6


def test_applying_is_deterministic_and_independent_of_batching():
    mask = IdentityMask(torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(0)) * 0.12 - 0.06,
                        torch.full((1, 112, 112), 0.0628))
    cloak = methods.create("facecloak", detector=centre_faces, mask=mask)
    batch = random_images(3, 96, seed=4)
    together = cloak(batch)
    alone = torch.cat([cloak(batch[i:i + 1]) for i in range(3)])
    assert torch.equal(together, alone) and torch.equal(cloak(batch), together)
    assert 0 < (together - batch).abs().max() <= 0.0628 + 1e-6


def test_the_inverse_warp_puts_the_mask_on_the_face():
    size = 112
    v, u = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    smooth = 0.05 * torch.stack([torch.sin(u / 9), torch.cos(v / 7), torch.sin((u + v) / 11)])  # known pattern
    mask = IdentityMask(smooth, torch.full((1, size, size), 0.06))
    # a face whose landmarks are the template moved by a known similarity (scale 2.2, roll 15 degrees)
    move = SimilarityTransform(scale=2.2, rotation=math.radians(15), translation=(90, 30))
    points = move(template(size))
    cloak = FaceCloak(detector=landmarks_detector(points), mask=mask)
    photo = torch.zeros(1, 3, 360, 400)
    protected, budget = cloak.cloak(photo)
    delta = protected - photo
    # each image pixel p carries the mask's value at move^-1(p), e.g. the left eye's
    for point in template(size)[[0, 2, 4]]:
        x, y = np.round(move(point[None])[0]).astype(int)
        source = move.inverse(np.array([[x, y]], dtype=float))[0]
        expected = torch.from_numpy(np.array([
            0.05 * math.sin(source[0] / 9), 0.05 * math.cos(source[1] / 7),
            0.05 * math.sin((source[0] + source[1]) / 11)])).float()
        assert torch.allclose(delta[0, :, y, x], expected, atol=2e-3)
    # and the aligned crop of the protected photo, as a face model takes it, is the mask again
    faces = cloak.detector(photo)
    matrices = torch.from_numpy(arcface_matrix(points, (size, size)))[None]
    crop = crop_faces(protected, faces, matrices, (size, size)) - crop_faces(photo, faces, matrices, (size, size))
    assert (crop[0] - smooth).abs()[:, 2:-2, 2:-2].max() < 2e-3
    assert budget.max() == pytest.approx(0.06) and budget[0, 0, :20, :20].max() == 0  # nothing off the face


def test_a_photo_without_a_face_is_named_and_a_mask_is_required():
    mask = IdentityMask(torch.zeros(3, 112, 112), torch.full((1, 112, 112), 0.0628))
    cloak = FaceCloak(detector=faceless_if_flat, mask=mask)
    batch = torch.cat([random_images(1, 64), torch.zeros(1, 3, 64, 64)])
    with pytest.raises(NoFaceError) as error:
        cloak(batch)
    assert error.value.missing == [1]
    with pytest.raises(ValueError, match="no identity mask"):
        FaceCloak(detector=centre_faces)(random_images(1, 64))
    with pytest.raises(ValueError, match="unknown focus"):
        FaceCloak(focus=("eyes",))
    with pytest.raises(NoFaceError):
        FaceCloak(FaceIdentity(tiny_face_identity().embedder, faceless_if_flat)).learn(
            [torch.zeros(1, 3, 64, 64)], [random_images(1, 64)])


# --------------------------------------------------------------------------------------------- scripts

@pytest.fixture
def detector(monkeypatch):
    """MTCNN finds nothing in random pixels: a face in the middle of every photo that is not flat."""
    monkeypatch.setattr(FaceDetector, "__call__", lambda self, images: faceless_if_flat(images))


def photos(folder: Path, *names: str, size=(120, 100)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names, start=10):
        write_photo(folder / name, size=size, seed=seed)
    return folder


def test_learn_from_one_photo_then_protect_a_folder_with_the_saved_mask(tmp_path, detector, capsys):
    face = export_tiny_onnx_face_model(tmp_path / "face")
    gallery = photos(tmp_path / "gallery", "x.png", "y.png", "z.png")
    me = write_photo(tmp_path / "me.jpg", size=(120, 100), seed=1)
    assert defend.main(["--input_path", str(me), "--defend_method", "facecloak", "--fr_model", str(face),
                        "--gallery", str(gallery), "--num_iters", "2", "--variations", "1"]) == 0
    saved = tmp_path / "me_protected_mask.safetensors"
    mask = IdentityMask.load(saved)
    assert mask.info["learned_from"] == [str(me)] and mask.info["gallery"] == str(gallery)
    assert (tmp_path / "me_protected.png").exists()
    printed = capsys.readouterr().out
    assert "budget 0.0628 (8.0/255)" in printed and f"--mask {saved}" in printed
    (tmp_path / "other_mask.safetensors").write_bytes(b"learned before")
    with pytest.raises(UserError, match="exists; apply it with --mask"):
        defend.main(["--input_path", str(me), "--output_path", str(tmp_path / "other.png"), "--defend_method",
                     "facecloak", "--fr_model", str(face), "--gallery", str(gallery)])

    new = photos(tmp_path / "new", "a.png", "b.jpg", size=(150, 130))
    Image.new("RGB", (80, 80), (128, 128, 128)).save(new / "flat.png")
    out = tmp_path / "out"
    argv = ["--image_dir", str(new), "--output_dir", str(out), "--defend_method", "facecloak", "--mask", str(saved),
            "--fr_model", str(tmp_path / "absent.onnx"), "--batch_size", "2"]  # a saved mask loads no face model
    assert main_defend.main(argv) == 1
    folder = out / "budget_0.0628"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["outputs"]) == {"a.png", "b.png"} and not (folder / "flat.png").exists()
    assert "facecloak masks faces only" in manifest["failed"][str(new / "flat.png")]
    assert manifest["mask"]["sha256"] == hashlib.sha256(saved.read_bytes()).hexdigest()
    assert manifest["mask"]["learned_from"] == [str(me)]
    for name, entry in manifest["outputs"].items():
        change = np.abs(np.asarray(Image.open(folder / name)).astype(int) -
                        np.asarray(load_image(entry["source"])).astype(int))
        assert 0 < change.max() <= 8 and change[:3, :3].max() == 0  # on the face only
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    assert main_defend.main(argv) == 1
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")} == stamps
    assert "2 already protected" in capsys.readouterr().out


def test_main_defend_learns_the_folder_s_mask_beside_the_outputs_and_reuses_it(tmp_path, detector, capsys):
    face = export_tiny_onnx_face_model(tmp_path / "face")
    gallery = photos(tmp_path / "gallery", "x.png", "y.png", "z.png")
    mine = photos(tmp_path / "mine", "one.png", "two.png")
    common = ["--image_dir", str(mine), "--defend_method", "facecloak", "--fr_model", str(face), "--num_iters", "1",
              "--variations", "1"]
    with pytest.raises(UserError, match="pass --gallery"):
        main_defend.main([*common, "--output_dir", str(tmp_path / "nowhere")])
    argv = [*common, "--output_dir", str(tmp_path / "out"), "--gallery", str(gallery)]
    assert main_defend.main(argv) == 0
    folder = tmp_path / "out" / "budget_0.0628"
    saved = folder / protect.MASK_FILE
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["mask"]["learned_from"]) == [str(mine / "one.png"), str(mine / "two.png")]
    assert manifest["mask"]["path"] == str(saved) and manifest["mask"]["photos"] == 2
    stamp = saved.stat().st_mtime_ns
    write_photo(mine / "three.png", size=(120, 100), seed=30)
    assert main_defend.main(argv) == 0
    assert saved.stat().st_mtime_ns == stamp and (folder / "three.png").exists()
    assert "applying the mask learned for this folder before" in capsys.readouterr().out


def test_facecloak_defaults_are_the_paper_s_and_its_options_are_checked(tmp_path):
    parse = lambda *extra: protection_options.parse(  # noqa: E731
        defend.build_parser(), ["--input_path", "a.png", "--defend_method", "facecloak", *extra])
    args = parse()
    assert (args.attack_budget, args.step_size, args.num_iters, args.sticker_budget) == (0.0628, 0.0157, 10, 0.251)
    assert parse("--attack_budget", "0.03", "--preset", "small").attack_budget == 0.03
    for bad in (["--focus", "eyes"], ["--focus", ""], ["--mask_size", "100"], ["--sticker_budget", "2"],
                ["--region", "face"]):  # the mask goes onto the faces themselves
        with pytest.raises(SystemExit):
            parse(*bad)
    assert parse("--region", "full").region == "full"
    with pytest.raises(SystemExit):  # 16 cannot be reached with every pixel at 8/255 (at most 0.0628 * 112 * 3 ** .5)
        parse("--mask_l2", "16")
    assert parse("--mask_l2", "16", "--focus", "stickers").mask_l2 == 16  # the stickers' pixels may take more
    args = parse("--mask_l2", "16", "--attack_budget", "0.25", "--near", "self")
    assert (args.mask_l2, args.attack_budget, args.near) == (16.0, 0.25, "self")
    for facecloak_only in (["--near", "self"], ["--mask_l2", "4"]):
        with pytest.raises(SystemExit):
            protection_options.parse(defend.build_parser(), ["--input_path", "a.png", "--defend_method", "facelock",
                                                      *facecloak_only])
    with pytest.raises(SystemExit):
        protection_options.parse(defend.build_parser(), ["--input_path", "a.png", "--defend_method", "facelock",
                                                         "--mask", "m.safetensors"])
    (tmp_path / "m.safetensors").write_text("not a mask")
    with pytest.raises(UserError, match="not an identity mask"):
        protect.load_mask(tmp_path / "m.safetensors")


def test_the_facecloak_benchmark_bookkeeping(tmp_path, tiny_vae_dir, detector, capsys):
    import csv

    from evaluation.benchmarks import facecloak as benchmark_facecloak

    faces = tmp_path / "faces"
    for person, seeds in (("ann", (1, 2)), ("bob", (3, 4)), ("cid", (5,))):
        for k, seed in enumerate(seeds):
            (faces / person).mkdir(parents=True, exist_ok=True)
            write_photo(faces / person / f"p{k}.jpg", size=(120, 90), seed=seed)
    models = {}
    for name in ("judge", "attacked"):
        models[name] = export_tiny_onnx_face_model(tmp_path / name)
        card = json.loads((tmp_path / name / "model.json").read_text())
        (tmp_path / name / "model.json").write_text(json.dumps({**card, "name": name}))
    out = tmp_path / "out"
    argv = ["--faces", str(faces), "--output", str(out), "--methods",
            "none,noise,facecloak,facecloak-l2-self,facecloak+facelock",
            "--size", "64", "--fr_model", str(models["attacked"]), "--judge", str(models["judge"]), "--vae",
            str(tiny_vae_dir), "--cloak_options", "--num_iters 1 --variations 0", "--facelock_iters", "2",
            "--facelock_options", "--input_diversity 0", "--device", "cpu"]
    assert benchmark_facecloak.main(argv) == 0
    with (out / "facecloak.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["none", "noise", "facecloak", "facecloak-l2-self", "facecloak+facelock"]
    linf = {m: float(rows[m]["linf_255"]) for m in rows}  # the mask and FaceLock at 4/255 each in the last
    assert (linf["none"], linf["noise"], linf["facecloak"], linf["facecloak+facelock"]) == (0, 8, 8, 8)
    assert 0 < linf["facecloak-l2-self"] <= 31  # each pixel capped at 0.25 (31 whole levels)
    l2_mask = IdentityMask.load(out / "masks" / "facecloak-l2-self" / "ann" / "budget_0.25" / protect.MASK_FILE)
    assert (l2_mask.info["near"], l2_mask.info["mask_l2"]) == ("self", 16.0)
    assert float(l2_mask.delta.norm()) <= 16 + 1e-4
    facelock = json.loads((out / "protected" / "facecloak+facelock" / "ann+facelock" / "budget_0.0314" /
                           "manifest.json").read_text())["parameters"]
    assert (facelock["input_diversity"], facelock["vae"]) == (0.0, str(tiny_vae_dir))  # over the preset's 0.5
    assert float(rows["facecloak"]["seconds_to_learn"]) > 0 and float(rows["facecloak"]["seconds_per_photo"]) > 0
    assert float(rows["none"]["fr"]) == pytest.approx(1.0, abs=1e-4)  # a clean photo is itself
    assert all(0 <= float(r[f"{m}_{k}"]) <= 1 for r in rows.values() for m in ("judge", "attacked")
               for k in ("top1", "top5", "verification"))
    for person in ("ann", "bob"):  # cid has one photo: in the gallery, never a probe
        assert (out / "masks" / "facecloak" / person / "budget_0.0628" / protect.MASK_FILE).is_file()
    assert "| facecloak |" in (out / "facecloak.md").read_text() and (out / "grid.png").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "protected").rglob("*.png")}
    assert benchmark_facecloak.main(argv) == 0  # resumes: nothing learned or protected again
    assert {p: p.stat().st_mtime_ns for p in (out / "protected").rglob("*.png")} == stamps
    capsys.readouterr()


# ------------------------------------------------------------------------------------------ real models

def test_a_mask_learned_from_one_real_photo_hides_it_and_moves_the_person_s_other_photos(assets):
    """SFace attacked, faces/ as the people. The issue asked for more: that the mask hide the person's other photos
    from a held-out model; measured, it does not (README, FaceCloak), so this checks what holds."""
    from PIL import Image as PILImage

    from evaluation.metrics.psr import Probes, load_gallery
    from methods.models.loading import load_face_identity
    from methods.noise import UniformNoise
    from utils import pil_to_tensor

    def photo(path: Path) -> torch.Tensor:  # long side 512, to keep detection quick
        image = load_image(path)
        scale = 512 / max(image.size)
        return pil_to_tensor(image.resize((round(image.width * scale), round(image.height * scale)),
                                          PILImage.LANCZOS))

    faces = assets / "faces"
    obama = sorted((faces / "obama").glob("*.jpg"))
    others = [p for p in sorted(faces.rglob("*.*")) if p.suffix in (".jpg", ".png") and p.parent.name != "obama"]
    sface = load_face_identity("sface", torch.device("cpu"))
    cloak = FaceCloak(sface, num_iters=5, variations=4)
    cloak.learn([photo(obama[0])], [photo(p) for p in others], torch.Generator().manual_seed(0))
    gallery, _ = load_gallery(faces, {"sface": sface}, sface.detector)
    probes = Probes(gallery, {"sface": sface}, sface.detector)

    learned_from = photo(obama[0])
    ranks = [probes.outcomes(x, [f"obama__{obama[0].stem}"])["sface"]["top1"].item()
             for x in (learned_from, cloak(learned_from))]
    assert ranks == [0, 1]  # identified among faces/ before, not after

    noise = UniformNoise(eps=cloak.eps)
    stronger = FaceCloak(sface, eps=0.25, mask_l2=16.0, near="self", num_iters=5, variations=4)  # README's choice
    stronger.learn([photo(obama[0])], [photo(p) for p in others], torch.Generator().manual_seed(0))
    moved, control, further = [], [], []
    with torch.no_grad():
        for path in obama[1:]:
            x = photo(path)
            clean = sface.embed(x)[0][0]
            moved.append(float(sface.embed(cloak(x))[0][0] @ clean))
            control.append(float(sface.embed(noise(x, torch.Generator().manual_seed(0)))[0][0] @ clean))
            further.append(float(sface.embed(stronger(x))[0][0] @ clean))
    print(f"\nSFace similarity of Obama's other photos to themselves: {np.round(moved, 3)} with the mask, "
          f"{np.round(control, 3)} with noise at the same budget, {np.round(further, 3)} with an L2 mask (16, "
          f"near self)")
    assert np.mean(moved) < np.mean(control) - 0.05
    assert np.mean(further) < np.mean(moved) - 0.05
