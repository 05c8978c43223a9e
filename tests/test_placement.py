"""Where a photo is attacked (whole, face region, scaled, padded to a bucket) and how the perturbation goes back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import methods
import methods.pipeline.placement as placement_module
from conftest import AUTOENCODERS, write_photo
from methods.models.faces import Faces
from methods.pipeline.placement import face_region, paste, place, quantize_within, work_image
from utils import load_image


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_a_placement_scales_the_long_side_and_pads_to_its_bucket():
    whole = place((93, 70))
    assert whole.box == (0, 0, 93, 70) and whole.work == (93, 70) and whole.padded == (96, 72) and not whole.scaled
    scaled = place((2000, 1000), max_size=512, bucket=64)
    assert scaled.work == (512, 256) and scaled.padded == (512, 256) and scaled.scaled
    region = place((2000, 1000), box=(100, 200, 400, 500), max_size=256)
    assert region.work == (256, 256) and region.scaled
    assert place((300, 200), bucket=64).padded == (320, 256)
    with pytest.raises(ValueError, match="multiple of 8"):
        place((64, 64), bucket=12)


def test_the_work_image_is_the_region_padded_with_its_edges():
    image = photo(50, 40)
    where = place(image.size, box=(10, 5, 31, 26))  # 21 x 21, padded to 24 x 24
    x = work_image(image, where)
    assert x.shape == (1, 3, 24, 24)
    region = torch.from_numpy(np.asarray(image)[5:26, 10:31].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(x[0, :, :21, :21], region)
    assert torch.equal(x[0, :, :21, 21:], region[:, :, -1:].expand(3, 21, 3))  # edge pixels repeated


def test_pasting_matches_rounding_the_perturbed_photo_within_the_budget():
    """Without scaling, `paste` gives what the reference rounding of `clean + delta` gives."""
    image = photo(45, 37, seed=1)
    where = place(image.size)
    generator = torch.Generator().manual_seed(0)
    delta = (torch.rand(3, *where.padded[::-1], generator=generator) * 2 - 1) * 0.05
    out, stats = paste(image, where, delta, eps=0.03)
    x = torch.from_numpy(np.asarray(image).astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    expected = quantize_within((x + delta[:, :37, :45].clamp(-0.03, 0.03)).clamp(-1, 1), np.asarray(image), 0.03)
    assert np.array_equal(out, expected)
    assert stats["linf_255"] == 3 and 35 < stats["psnr"] < 60


def test_an_l2_perturbation_scaled_back_keeps_its_l2_budget_after_rounding():
    """Upsampling lengthens an L2 perturbation; `paste` shortens it to the budget before rounding within it, and
    leaves the photo outside the region untouched."""
    image = photo(300, 200, seed=3)
    where = place(image.size, box=(40, 20, 240, 180), max_size=100)  # the region at half size
    delta = torch.randn(3, *where.padded[::-1], generator=torch.Generator().manual_seed(0)) * 0.05
    out, stats = paste(image, where, delta, eps=2.0, norm="l2")
    change = out.astype(np.int64) - np.asarray(image)
    length = float(np.linalg.norm(change)) / 127.5
    assert 1.9 < length <= 2.0 and stats["l2"] == pytest.approx(length)
    assert not change[:20].any() and not change[:, :40].any() and not change[180:].any()
    assert stats["linf_255"] == np.abs(change).max() > 3  # beyond what an L-infinity budget of 0.03 allows


def test_a_scaled_perturbation_is_the_bilinear_upsampling_strip_by_strip(monkeypatch):
    image = photo(200, 150, seed=2)
    where = place(image.size, box=(20, 10, 180, 140), max_size=64)
    generator = torch.Generator().manual_seed(1)
    delta = (torch.rand(3, *where.padded[::-1], generator=generator) * 2 - 1) * 0.03
    w, h = where.work
    upsampled = F.interpolate(delta[None, :, :h, :w], size=(130, 160), mode="bilinear", align_corners=False)[0]
    reference = np.asarray(image).astype(int)
    steps = (upsampled.clamp(-0.03, 0.03) * 127.5).round().clamp(-3, 3).to(torch.int64).permute(1, 2, 0).numpy()
    reference[10:140, 20:180] = np.clip(reference[10:140, 20:180] + steps, 0, 255)
    monkeypatch.setattr(placement_module, "STRIP_ROWS", 7)  # many strips
    out, _ = paste(image, where, delta, eps=0.03)
    assert np.mean(out == reference) > 0.999  # float rounding may flip a level where a value sits at .5
    assert np.abs(out.astype(int) - reference).max() <= 1
    outside = np.ones((150, 200), dtype=bool)
    outside[10:140, 20:180] = False
    assert np.array_equal(out[outside], np.asarray(image)[outside])  # the rest of the photo is untouched


def boxes_detector(boxes, seen=None):
    def detect(images):
        if seen is not None:
            seen.append(tuple(images.shape[-2:]))
        found = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return Faces(index=torch.zeros(len(found), dtype=torch.long), boxes=found,
                     landmarks=torch.zeros(len(found), 5, 2), count=len(images))
    return detect


def test_a_face_region_is_a_square_around_every_face_inside_the_photo():
    image = photo(400, 300)
    left, top, right, bottom = face_region(image, boxes_detector([[150, 120, 170, 150], [200, 130, 220, 160]]))
    assert right - left == bottom - top == 152  # (220 - 150) * 1.25 + 2 * 32, up to a multiple of 8
    assert left <= 150 and top <= 120 and right >= 220 and bottom >= 160  # both faces
    assert left % 8 == top % 8 == 0  # on the photo's 8-pixel grid, as the autoencoder sees the whole photo
    corner = face_region(image, boxes_detector([[0, 0, 30, 30]]))
    assert corner[:2] == (0, 0)  # moved inside the photo
    assert face_region(photo(120, 100), boxes_detector([[30, 30, 90, 90]])) == (0, 0, 120, 100)  # cut to it
    assert face_region(image, boxes_detector([])) is None


def test_faces_of_a_huge_photo_are_found_in_a_smaller_copy(monkeypatch):
    monkeypatch.setattr(placement_module, "DETECTION_SIZE", 100)
    seen = []
    box = face_region(photo(400, 200), boxes_detector([[10, 10, 20, 20]], seen))
    assert seen == [(50, 100)]
    assert box == (0, 0, 120, 120)  # the detected box scaled back (40 px), times 1.25, plus 2 x 32


def test_photos_of_one_bucket_give_the_same_result_batched_or_alone():
    attack = methods.create("encoder", autoencoder=AUTOENCODERS["tiny"](), num_iters=3)
    attack.autoencoder.double()
    images = [photo(60, 50, seed=3), photo(64, 56, seed=4)]
    where = [place(image.size, bucket=64) for image in images]
    assert where[0].padded == where[1].padded == (64, 64)
    x = torch.cat([work_image(image, w) for image, w in zip(images, where)])
    generators = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batched = attack(x, generators(0, 1))
    assert torch.equal(batched[1:], attack(x[1:], generators(1)))
    out, _ = paste(images[0], where[0], batched[0] - x[0], attack.eps)
    assert out.shape == (50, 60, 3)


def test_defend_attacks_only_the_face_region_and_leaves_the_rest(tmp_path, tiny_vae_dir, monkeypatch):
    import defend

    source = write_photo(tmp_path / "in.png", size=(240, 200))
    monkeypatch.setattr("methods.models.faces.FaceDetector.__call__",
                        lambda self, images: boxes_detector([[100, 80, 130, 110]])(images))
    assert defend.main(["--input_path", str(source), "--defend_method", "encoder", "--vae", str(tiny_vae_dir),
                        "--num_iters", "2", "--region", "face"]) == 0
    protected = np.asarray(Image.open(tmp_path / "in_protected.png")).astype(int)
    changed = np.abs(protected - np.asarray(load_image(source)).astype(int)).max(axis=2) > 0
    rows, cols = np.nonzero(changed)
    # the 104-pixel square around the face: 30 px times 1.25 plus 2 x 32, up to a multiple of 8, centred on it and
    # moved onto the 8-pixel grid
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (40, 143, 56, 159)
    assert changed[40:144, 56:160].mean() > 0.5
