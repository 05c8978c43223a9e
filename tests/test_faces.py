"""Face alignment, embedders and the FaceIdentity component with tiny random networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.transform import SimilarityTransform, warp

from conftest import TinyFaceNet, centre_faces, export_tiny_onnx_face_model, random_images, tiny_face_identity
from methods.models.faces import (
    ARCFACE_TEMPLATE,
    FaceEmbedder,
    FaceEnsemble,
    FaceIdentity,
    Faces,
    crop_faces,
    diversified,
    featured,
    load_onnx_embedder,
    read_contract,
)


def test_alignment_matches_a_reference_warp_and_passes_gradients():
    images = random_images(2, size=96)
    faces = centre_faces(images)
    embedder = FaceEmbedder(TinyFaceNet(), size=(112, 112))
    matrices = embedder.matrices(faces)
    images.requires_grad_(True)
    crops = crop_faces(images, faces, matrices, (112, 112))
    assert crops.shape == (2, 3, 112, 112)

    # the same similarity warp done by scikit-image (bilinear, pixel centres at integers, black outside)
    tf = SimilarityTransform.from_estimate(faces.landmarks[0].double().numpy(), ARCFACE_TEMPLATE)
    picture = (images[0].detach().permute(1, 2, 0).numpy() + 1) / 2
    expected = warp(picture, tf.inverse, output_shape=(112, 112), order=1, mode="constant", cval=0)
    ours = (crops[0].detach().permute(1, 2, 0).numpy() + 1) / 2
    assert np.abs(ours - expected)[4:-4, 4:-4].max() < 1e-4

    crops[0].sum().backward()
    grad = images.grad[0].abs().sum(dim=0)
    box = faces.boxes[0].int().tolist()
    assert (grad[box[1]:box[3], box[0]:box[2]] > 0).float().mean() > 0.9  # the face region gets gradient
    assert grad[:5, :5].sum() == 0 and images.grad[1].abs().sum() == 0  # outside the crop, and other images, not


def test_antialiased_crops_reach_every_pixel_of_a_face_larger_than_the_crop():
    images = random_images(2, size=256)  # the landmarks span about 80 px: the 32 px crop shrinks the face 2.5 times
    faces = centre_faces(images)
    matrices = FaceEmbedder(TinyFaceNet(), size=(32, 32)).matrices(faces)
    box = faces.boxes[0].int().tolist()
    coverage = {}
    for antialias in (False, True):
        leaf = images.clone().requires_grad_(True)
        crops = crop_faces(leaf, faces, matrices, (32, 32), antialias)
        crops[0].sum().backward()
        grad = leaf.grad[0].abs().sum(dim=0)[box[1] + 20:box[3] - 20, box[0] + 20:box[2] - 20]
        coverage[antialias] = (grad > 0).float().mean().item()
        assert leaf.grad[1].abs().sum() == 0
    assert coverage[False] < 0.5 and coverage[True] == 1.0
    ramp = torch.linspace(-1, 1, 256).expand(2, 3, 256, 256)  # linear: a blur leaves it as it is, so any shift shows
    plain, shrunk = crop_faces(ramp, faces, matrices, (32, 32)), crop_faces(ramp, faces, matrices, (32, 32), True)
    assert (plain - shrunk)[..., 4:-4, 4:-4].abs().max() < 1e-3  # the same place in the photo
    smooth = torch.nn.functional.interpolate(random_images(2, size=4), size=(256, 256), mode="bilinear")
    plain, shrunk = crop_faces(smooth, faces, matrices, (32, 32)), crop_faces(smooth, faces, matrices, (32, 32), True)
    assert (plain - shrunk)[..., 2:-2, 2:-2].abs().max() < 0.06  # and nearly the same crop of a smooth photo
    small = random_images(1, size=32)  # a face no larger than the crop is cropped exactly as without antialiasing
    small_faces = centre_faces(small)
    small_matrices = FaceEmbedder(TinyFaceNet(), size=(32, 32)).matrices(small_faces)
    assert torch.equal(crop_faces(small, small_faces, small_matrices, (32, 32)),
                       crop_faces(small, small_faces, small_matrices, (32, 32), True))


def test_box_alignment_crops_the_detector_box():
    images = random_images(1, size=64)
    faces = Faces(index=torch.tensor([0]), boxes=torch.tensor([[16.0, 8.0, 48.0, 56.0]]),
                  landmarks=torch.zeros(1, 5, 2), count=1)
    embedder = FaceEmbedder(TinyFaceNet(), size=(48, 32), alignment="box")
    crops = crop_faces(images, faces, embedder.matrices(faces), embedder.size)
    assert torch.allclose(crops[0], images[0, :, 8:56, 16:48], atol=1e-5)  # a 1:1 box is an exact crop


def test_reference_detects_once_and_the_attack_reuses_its_landmarks():
    identity, calls = tiny_face_identity(), []
    detect = identity.detector
    identity.detector = lambda images: calls.append(len(images)) or detect(images)
    x = random_images(2)
    reference = identity.reference(x)
    assert calls == [2]
    similarity = identity(x, reference)
    assert calls == [2]
    assert torch.allclose(similarity, torch.ones(2), atol=1e-5)
    other = identity(random_images(2, seed=5), reference)
    assert (other < 1 - 1e-4).all()  # a random network still tells other pixels apart


def test_all_faces_are_summed_and_faceless_images_score_zero():
    def two_faces_in_image_0(images):
        faces = centre_faces(images[:1])
        shifted = faces.landmarks + 2
        return Faces(index=torch.tensor([0, 0]), boxes=faces.boxes.repeat(2, 1),
                     landmarks=torch.cat([faces.landmarks, shifted]), count=len(images))

    identity = FaceIdentity(tiny_face_identity().embedder, two_faces_in_image_0)
    x = random_images(2)
    reference = identity.reference(x)
    assert reference.found.tolist() == [True, False]
    assert torch.allclose(identity(x, reference), torch.tensor([2.0, 0.0]), atol=1e-5)


def test_embeddings_are_unit_vectors_and_follow_the_input_contract():
    crops = random_images(3, size=32)
    for input_range, bgr in [((0, 255), False), ((-1, 1), True)]:
        embedder = FaceEmbedder(TinyFaceNet(), size=(32, 32), input_range=input_range, bgr=bgr)
        assert torch.allclose(embedder(crops).norm(dim=1), torch.ones(3))
    seen = []
    network = TinyFaceNet()
    network.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    FaceEmbedder(network, size=(32, 32), input_range=(0, 255), bgr=True)(crops)
    assert torch.allclose(seen[0], ((crops + 1) * 127.5).flip(1))


def test_a_feature_level_loss_adds_the_middle_feature_map_s_similarity_within_its_block():
    identity = tiny_face_identity()
    network = identity.embedder.network
    # the leaf modules giving a 4-D map: conv, relu, conv, relu, pool; the middle one is the second conv
    assert identity.embedder.feature_layer() is network.layers[2]
    x, y = random_images(2, size=48, seed=0), random_images(2, size=48, seed=1)
    plain = identity(y, identity.reference(x))
    seen = []
    network.layers[2].register_forward_hook(lambda m, i, out: seen.append(out.flatten(1)))
    with featured(identity, 0.5):
        reference = identity.reference(x)
        featured_value = identity(y, reference)
    clean_maps, adv_maps = seen
    by_hand = plain + 0.5 * torch.nn.functional.cosine_similarity(adv_maps, clean_maps, dim=1)
    assert torch.allclose(featured_value, by_hand, atol=1e-5) and not torch.allclose(featured_value, plain)
    assert identity.feature_weight == 0.0 and torch.equal(identity(y, identity.reference(x)), plain)  # off again
    generators = [torch.Generator().manual_seed(k) for k in (3, 4)]
    with featured(identity, 0.5), diversified(identity, 0.1, generators):  # one perturbed copy per image
        reference = identity.reference(x)
        y.requires_grad_(True)
        noisy = identity(y, reference)
    noisy.sum().backward()
    assert not torch.allclose(noisy, featured_value) and y.grad.abs().sum() > 0


def test_model_cards_are_read_in_keys_or_words():
    words = {"input": "float32 RGB in 0..255, N x 3 x 112 x 112",
             "alignment": "5-point similarity transform onto the ArcFace 112x112 template"}
    assert read_contract(words) == {"size": (112, 112), "input_range": (0.0, 255.0), "bgr": False,
                                    "alignment": "arcface"}
    keys = {"input_size": [128, 128], "input_range": [-1, 1], "channel_order": "BGR", "alignment": "box"}
    assert read_contract(keys) == {"size": (128, 128), "input_range": (-1, 1), "bgr": True, "alignment": "box"}
    assert read_contract({"input": "BGR in -1..1"})["input_range"] == (-1.0, 1.0)


def test_onnx_face_models_load_with_their_card(tmp_path):
    path = export_tiny_onnx_face_model(tmp_path / "tiny")
    embedder = load_onnx_embedder(path)
    assert embedder.name == "tiny" and embedder.size == (112, 112) and embedder.input_range == (0.0, 255.0)
    crops = random_images(2, size=112)
    reference = TinyFaceNet()((crops + 1) * 127.5)
    assert torch.allclose(embedder(crops), torch.nn.functional.normalize(reference), atol=1e-5)
    with pytest.raises(FileNotFoundError):
        load_onnx_embedder(tmp_path / "missing.onnx")


def test_facenet_loader_with_a_random_inception_resnet(monkeypatch, tmp_path):
    import facenet_pytorch

    from methods.models.loading import FACENET_VGGFACE2, load_facenet

    asked, fetched = [], []
    real = facenet_pytorch.InceptionResnetV1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(facenet_pytorch, "InceptionResnetV1",
                        lambda pretrained=None: asked.append(pretrained) or real(pretrained=None))
    monkeypatch.setattr("methods.models.loading.fetch", lambda pinned, path: fetched.append((pinned, path)))
    identity = FaceIdentity(load_facenet(), centre_faces)
    assert asked == ["vggface2"] and identity.embedder.alignment == "box" and identity.embedder.size == (160, 160)
    # the checked weights go where facenet-pytorch reads them, so it never downloads an unchecked copy
    assert fetched == [(FACENET_VGGFACE2, tmp_path / "checkpoints" / "20180402-114759-vggface2.pt")]
    with torch.no_grad():
        embeddings, faces, _ = identity.embed(random_images(1, size=96))
    assert embeddings.shape == (1, 512) and torch.allclose(embeddings.norm(dim=1), torch.ones(1))


def tiny_identity(seed: int, detector) -> FaceIdentity:
    network = TinyFaceNet()
    torch.manual_seed(seed)  # after TinyFaceNet's own seeding
    for p in network.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return FaceIdentity(FaceEmbedder(network.eval(), size=(32, 32), input_range=(-1, 1)), detector)


@pytest.mark.parametrize("combine", ["mean", "max"])
def test_an_ensemble_detects_once_shares_crops_and_combines_similarities(combine, monkeypatch):
    import methods.models.faces as faces_module

    detections, crops = [], []
    detector = lambda images: detections.append(len(images)) or centre_faces(images)  # noqa: E731
    members = [tiny_identity(seed, detector) for seed in (10, 11)]
    ensemble = FaceEnsemble(members, combine=combine)
    x, y = random_images(3, size=48, seed=0), random_images(3, size=48, seed=1)
    reference = ensemble.reference(x)
    assert detections == [3]
    real_crop = faces_module.crop_faces
    monkeypatch.setattr(faces_module, "crop_faces", lambda *a: crops.append(1) or real_crop(*a))
    combined = ensemble(y, reference)
    assert len(crops) == 1  # the two models share one contract, hence one crop
    singles = torch.stack([member(y, member.reference(x)) for member in members])
    assert not torch.allclose(singles[0], singles[1])
    expected = singles.mean(dim=0) if combine == "mean" else singles.max(dim=0).values
    assert torch.allclose(combined, expected, atol=1e-6)
    assert reference.found.all() and ensemble.name == ","
    y.requires_grad_(True)
    ensemble(y, reference).sum().backward()
    assert y.grad.abs().sum() > 0


def test_a_comma_separated_fr_model_loads_each_model_once_as_an_ensemble(tmp_path, monkeypatch):
    from methods.models import loading

    first, second = (export_tiny_onnx_face_model(tmp_path / name) for name in ("one", "two"))
    loaded = []
    real = loading._load_face_embedder
    monkeypatch.setattr(loading, "_load_face_embedder", lambda spec: loaded.append(spec) or real(spec))
    ensemble = loading.load_face_identity(f"{first},{second}", torch.device("cpu"), combine="max")
    assert isinstance(ensemble, FaceEnsemble) and ensemble.combine == "max" and len(ensemble.members) == 2
    assert loaded == [str(first), str(second)]
    assert ensemble.members[0].detector is ensemble.members[1].detector
    assert isinstance(loading.load_face_identity(str(first), torch.device("cpu")), FaceIdentity)
    with pytest.raises(loading.ModelUnavailable, match="different face models"):
        loading.load_face_identity(f"{first},{first}", torch.device("cpu"))


def test_damaged_or_foreign_face_models_and_cards_are_one_line_errors(tmp_path):
    from methods.models.loading import load_face_identity
    from utils import ModelUnavailable

    good = export_tiny_onnx_face_model(tmp_path / "good")
    truncated = tmp_path / "truncated" / "model.onnx"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    image = tmp_path / "image" / "model.onnx"  # a network that gives an image, not an embedding
    image.parent.mkdir()
    torch.onnx.export(torch.nn.Conv2d(3, 3, 3, padding=1).eval(), (torch.rand(1, 3, 112, 112),), str(image),
                      dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    card = export_tiny_onnx_face_model(tmp_path / "card")
    (card.parent / "model.json").write_text("{not json")
    import onnx

    weightless = tmp_path / "weightless" / "model.onnx"  # its weights in a file of their own, which is missing
    weightless.parent.mkdir()
    onnx.save_model(onnx.load(str(good)), str(weightless), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    (weightless.parent / "weights.bin").unlink()
    for path, message in ((truncated, "not a face model this toolkit can run"), (image, "not one embedding per face"),
                          (card, "not a face model's card"), (weightless, "not a face model this toolkit can run")):
        with pytest.raises(ModelUnavailable, match=message) as raised:
            load_face_identity(str(path), torch.device("cpu"))
        assert "\n" not in str(raised.value)
    assert load_face_identity(str(good), torch.device("cpu")).embedder.name == "tiny"
