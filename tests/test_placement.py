"""Where a photo is attacked (whole, face region, scaled, padded to a bucket) and how the perturbation goes back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

import methods
import methods.pipeline.placement as placement_module
from conftest import AUTOENCODERS, write_photo
from methods.models.faces import Faces
from methods.pipeline.placement import face_region, paste, place, quantize_within, work_image
from methods.transforms import EditorView
from utils import load_image


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_a_placement_scales_the_long_side_and_pads_to_its_bucket():
    whole = place((93, 70))
    assert whole.box == (0, 0, 93, 70) and whole.work == (93, 70) and whole.padded == (96, 72) and not whole.scaled
    scaled = place((2000, 1000), max_size=512, bucket=64)
    assert scaled.work == (512, 256) and scaled.padded == (512, 256) and scaled.scaled
    region = place((2000, 1000), box=(100, 200, 400, 500), max_size=256)  # the photo at 256 x 128: 0.128 times
    assert region.canvas == (256, 128) and region.scaled
    assert region.window == (8, 24, 52, 64) and region.work == (44, 40)  # 12.8..51.2 x 25.6..64, corner on 8 px
    assert region.box == (62, 187, 407, 500)  # the photo pixels the window covers: the box, and the grid's slack
    assert place((300, 200), box=(16, 24, 80, 88), max_size=300).window == (16, 24, 80, 88)  # not scaled: the box
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


def test_a_scaled_region_is_the_window_of_the_photo_at_the_editors_size():
    """The work image of a region of a photo longer than max_size is what an editor that scales the whole photo
    to max_size sees there, on its 8-pixel grid; a perturbation pasted onto the photo comes back there after that
    resize."""
    image = photo(700, 560, seed=5).filter(ImageFilter.GaussianBlur(2))
    where = place(image.size, box=(203, 151, 461, 409), max_size=500)
    canvas = image.resize(where.canvas, Image.BILINEAR)
    left, top, right, bottom = where.window
    assert left % 8 == top % 8 == 0 and where.work == (right - left, bottom - top)
    x = work_image(image, where)
    seen = torch.from_numpy(np.asarray(canvas.crop(where.window), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert (x[0, :, :where.work[1], :where.work[0]] - seen).abs().max() <= 1.01 / 127.5  # Pillow's fixed point
    generator = torch.Generator().manual_seed(2)
    delta = F.interpolate(torch.randn(1, 3, 16, 16, generator=generator), size=where.padded[::-1])[0] * 0.03
    out, _ = paste(image, where, delta, eps=0.03)
    after = np.asarray(Image.fromarray(out).resize(where.canvas, Image.BILINEAR), dtype=np.float64)
    back = (after - np.asarray(canvas, dtype=np.float64))[top + 8:bottom - 8, left + 8:right - 8]
    made = np.clip(np.round(delta.permute(1, 2, 0).numpy() * 127.5), -3, 3)[8:where.work[1] - 8, 8:where.work[0] - 8]
    assert np.corrcoef(back.ravel(), made.ravel())[0, 1] > 0.95
    assert np.abs(back - made).mean() < 0.5  # in 8-bit levels, of a perturbation of up to 3


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
    image = photo(300, 210, seed=3)
    where = place(image.size, box=(48, 24, 240, 180), max_size=100)  # the photo at a third: window (16, 8, 80, 60)
    assert where.box == (48, 24, 240, 180)
    delta = torch.randn(3, *where.padded[::-1], generator=torch.Generator().manual_seed(0)) * 0.05
    out, stats = paste(image, where, delta, eps=2.0, norm="l2")
    change = out.astype(np.int64) - np.asarray(image)
    length = float(np.linalg.norm(change)) / 127.5
    assert 1.9 < length <= 2.0 and stats["l2"] == pytest.approx(length)
    assert not change[:24].any() and not change[:, :48].any() and not change[180:].any() and not change[:, 240:].any()
    assert stats["linf_255"] == np.abs(change).max() > 3  # beyond what an L-infinity budget of 0.03 allows


@pytest.mark.parametrize("box", [None, (20, 10, 180, 140)])
def test_a_scaled_perturbation_is_the_bilinear_upsampling_strip_by_strip(monkeypatch, box):
    """The perturbation goes back as `F.interpolate` scales the canvas back to the photo, the window's edge values
    repeated around it, onto the photo pixels the window covers."""
    image = photo(200, 150, seed=2)
    where = place(image.size, box=box, max_size=80)
    generator = torch.Generator().manual_seed(1)
    delta = (torch.rand(3, *where.padded[::-1], generator=generator) * 2 - 1) * 0.03
    (w, h), (left, top, right, bottom) = where.work, where.window
    canvas = F.pad(delta[None, :, :h, :w], (left, where.canvas[0] - right, top, where.canvas[1] - bottom),
                   mode="replicate")
    upsampled = F.interpolate(canvas, size=(150, 200), mode="bilinear", align_corners=False)[0]
    reference = np.asarray(image).astype(int)
    steps = (upsampled.clamp(-0.03, 0.03) * 127.5).round().clamp(-3, 3).to(torch.int64).permute(1, 2, 0).numpy()
    x0, y0, x1, y1 = where.box
    reference[y0:y1, x0:x1] = np.clip(reference[y0:y1, x0:x1] + steps[y0:y1, x0:x1], 0, 255)
    monkeypatch.setattr(placement_module, "STRIP_ROWS", 7)  # many strips
    out, _ = paste(image, where, delta, eps=0.03)
    assert np.mean(out == reference) > 0.999  # float rounding may flip a level where a value sits at .5
    assert np.abs(out.astype(int) - reference).max() <= 1
    outside = np.ones((150, 200), dtype=bool)
    outside[y0:y1, x0:x1] = False
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


def test_with_the_editors_view_a_scaled_face_region_is_attacked_at_the_photos_resolution():
    region = place((2000, 1000), box=(100, 200, 400, 500), max_size=256, view=True)
    assert region.window == (8, 24, 52, 64) and region.seen == (44, 40)  # what the editor sees: the window
    assert region.box == (62, 187, 407, 500) and region.work == (345, 313) and not region.scaled  # pasted 1:1
    assert region.batch == ((352, 320), (48, 40))
    assert place((300, 200), box=(16, 24, 80, 88), max_size=300, view=True).seen is None  # not scaled: no view
    assert place((2000, 1000), box=(100, 200, 400, 500), max_size=256).batch == ((48, 40), None)


def test_the_editors_view_is_each_images_part_shrunk_as_the_editor_shrinks_it():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 72, 80, generator=generator) * 2 - 1
    view = EditorView([(80, 70), (75, 72)], [(40, 35), (38, 36)])
    seen = view(x)
    assert seen.shape == (2, 3, 40, 40)  # padded to a common multiple of 8
    alone = F.interpolate(x[1:, :, :72, :75], size=(36, 38), mode="bilinear", antialias=True, align_corners=False)
    assert torch.equal(seen[1:, :, :36, :38], alone)
    assert torch.equal(seen[1:, :, 36:, :38], alone[:, :, -1:].expand(1, 3, 4, 38))  # edge rows repeated
    assert torch.equal(EditorView([(75, 72)], [(38, 36)])(x[1:])[:, :, :36, :38], alone)  # batch == single


def test_an_attack_made_through_the_editors_view_is_made_for_what_the_editor_sees():
    """The same attack, once through the editor's view of the photo and once on the editor's own copy with its
    perturbation scaled up onto the photo afterwards (what attacking at the editor's size gives): the first moves the
    latent the editor computes from the photo further from the clean one."""
    x = F.interpolate(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)), size=(96, 96),
                      mode="bilinear").double() * 2 - 1
    view = EditorView([(96, 96)], [(72, 72)])
    attack = methods.create("encoder", autoencoder=AUTOENCODERS["tiny"]().double(), targeted=False, num_iters=20,
                            eps=0.03, step_size=0.01)
    attack.view = view
    through = attack(x, [torch.Generator().manual_seed(0)])
    attack.view = None
    canvas = view(x)
    made = attack(canvas, [torch.Generator().manual_seed(0)])
    scaled_up = (x + F.interpolate(made - canvas, size=(96, 96), mode="bilinear", align_corners=False)).clamp(-1, 1)
    clean = attack.autoencoder.encode(canvas)
    moved = lambda image: float((attack.autoencoder.encode(view(image)) - clean).detach().norm())  # noqa: E731
    assert (through - x).abs().max() <= 0.03 + 1e-6  # the budget holds on the photo itself (float32 inside)
    assert moved(through) > 1.2 * moved(scaled_up)  # 0.168 against 0.103


def test_defend_attacks_a_face_region_of_a_photo_longer_than_max_size_through_the_editors_view(
        tmp_path, tiny_vae_dir, monkeypatch):
    import defend

    source = write_photo(tmp_path / "in.png", size=(240, 200))
    monkeypatch.setattr("methods.models.faces.FaceDetector.__call__",
                        lambda self, images: boxes_detector([[100, 80, 130, 110]])(images))
    seen = []
    call = EditorView.__call__
    monkeypatch.setattr(EditorView, "__call__", lambda self, x: seen.append(tuple(x.shape)) or call(self, x))
    assert defend.main(["--input_path", str(source), "--defend_method", "encoder", "--vae", str(tiny_vae_dir),
                        "--num_iters", "2", "--region", "face", "--max_size", "120"]) == 0
    where = place((240, 200), face_region(load_image(source), boxes_detector([[100, 80, 130, 110]])), 120, view=True)
    assert where.seen is not None and set(seen) == {(1, 3, *where.padded[::-1])}  # the photo's pixels, viewed
    protected = np.asarray(Image.open(tmp_path / "in_protected.png")).astype(int)
    changed = np.abs(protected - np.asarray(load_image(source)).astype(int)).max(axis=2) > 0
    x0, y0, x1, y1 = where.box
    assert changed[y0:y1, x0:x1].mean() > 0.5 and not changed.sum() - changed[y0:y1, x0:x1].sum()
