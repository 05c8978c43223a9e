"""defend.py and main_defend.py end to end with a tiny autoencoder saved to disk (CPU, offline)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

import defend
import main_defend
import methods
from conftest import ROOT, export_tiny_onnx_face_model, write_photo
from methods.pipeline import options as protection_options
from methods.pipeline import protect
from utils import ModelUnavailable, UserError, load_image

FAST = ["--num_iters", "3"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_defaults_equal_the_official_ones():
    args = protection_options.parse(defend.build_parser(), ["--input_path", "a.png", "--defend_method", "encoder"])
    official = dict(attack_budget=0.03, step_size=0.01, num_iters=100, c=0.03, lr=0.03,
                    target_model="instruct-pix2pix", model_id="timbrooks/instruct-pix2pix", output_path=None)
    assert {k: getattr(args, k) for k in official} == official
    batch = protection_options.parse(main_defend.build_parser(),
                              ["--image_dir", "a", "--output_dir", "b", "--defend_method", "cw"])
    assert {k: getattr(batch, k) for k in ("attack_budget", "step_size", "num_iters", "c", "lr")} == \
        {k: official[k] for k in ("attack_budget", "step_size", "num_iters", "c", "lr")}


def test_targeted_flags_and_presets():
    parse = lambda *extra: protection_options.parse(  # noqa: E731
        defend.build_parser(), ["--input_path", "a.png", "--defend_method", "encoder", *extra])
    assert parse().targeted is None  # each method's own default: encoder targeted, cw untargeted
    assert parse("--untargeted").targeted is False and parse("--targeted").targeted is True
    paper = parse("--preset", "paper")
    assert (paper.attack_budget, paper.step_size, paper.num_iters) == (0.02, 0.003, 100)
    assert parse("--preset", "paper", "--attack_budget", "0.05").attack_budget == 0.05
    assert parse("--target_model", "stable-diffusion").model_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert parse("--target_model", "stable-diffusion", "--model_id", "my/sd").model_id == "my/sd"
    small = parse("--preset", "small")
    assert (small.vae, small.fr_model, small.lpips, small.region) == ("madebyollin/taesd", "sface", "none", "face")
    assert parse("--preset", "small", "--region", "full").region == "full"
    assert small.input_diversity == 0.0  # the preset's input diversity is FaceLock's only


def test_small_preset_gives_facelock_its_measured_levers():
    parse = lambda *extra: protection_options.parse(  # noqa: E731
        defend.build_parser(), ["--input_path", "a.png", "--defend_method", "facelock", *extra])
    small = parse("--preset", "small")
    assert (small.input_diversity, small.eot, small.num_iters) == (0.5, "none,share", 200) and small.antialias
    assert not parse("--preset", "small", "--no-antialias").antialias
    assert not parse().antialias and not parse("--preset", "paper").antialias
    assert parse("--preset", "small", "--input_diversity", "0").input_diversity == 0.0  # an explicit flag wins
    explicit = parse("--preset", "small", "--num_iters", "3", "--eot", "jpeg")
    assert (explicit.num_iters, explicit.eot) == (3, "jpeg")
    assert parse("--preset", "small", "--eot", "none").eot is None  # the preset's EOT turned off
    assert parse().input_diversity == parse("--preset", "paper").input_diversity == 0.0
    assert (parse().eot, parse().num_iters) == (parse("--preset", "paper").eot, 100) == (None, 100)
    for method in ("cw", "noise", "facecloak"):  # no error for a method without the lever, no change to FaceCloak
        options = protection_options.parse(defend.build_parser(), ["--input_path", "a.png", "--defend_method", method,
                                                                   "--preset", "small"])
        assert options.input_diversity == 0.0 and not options.antialias and options.eot is None
        assert options.num_iters == protection_options.layered_defaults(method)["num_iters"]  # not the preset's 200


@pytest.mark.parametrize("script", ["defend.py", "main_defend.py"])
def test_help_lists_every_method(script):
    result = run(script, "--help")
    assert result.returncode == 0
    for name in methods.METHODS:
        assert f"  {name} " in result.stdout
    assert "--attack_budget" in result.stdout and "--preset" in result.stdout


def test_protects_an_odd_sized_photo_within_budget(tmp_path, tiny_vae_dir, capsys):
    source = write_photo(tmp_path / "photo.jpg", size=(93, 70))
    before = digest(source)
    assert defend.main(["--input_path", str(source), "--defend_method", "encoder", "--vae", str(tiny_vae_dir),
                        *FAST]) == 0
    output = tmp_path / "photo_protected.png"
    protected, clean = np.asarray(Image.open(output)), np.asarray(load_image(source))
    assert protected.shape == clean.shape == (70, 93, 3)
    assert 0 < np.abs(protected.astype(int) - clean.astype(int)).max() <= 0.03 * 127.5
    assert digest(source) == before
    printed = capsys.readouterr().out
    assert "3.8/255" in printed and "PSNR" in printed


def test_existing_output_is_kept_unless_overwrite(tmp_path, tiny_vae_dir, capsys):
    source = write_photo(tmp_path / "photo.png")
    output = tmp_path / "out.png"
    output.write_bytes(b"earlier result")
    common = ["--input_path", str(source), "--output_path", str(output), "--defend_method", "vae",
              "--vae", str(tiny_vae_dir), *FAST]
    assert defend.main(common) == 0
    assert output.read_bytes() == b"earlier result" and "--overwrite" in capsys.readouterr().out
    assert defend.main([*common, "--overwrite"]) == 0
    assert Image.open(output).size == Image.open(source).size


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("not_image", "not an image"),
    ("truncated", "truncated"),
    ("tiny", "too small"),
    ("jpeg_output", "written as PNG"),
    ("output_is_input", "is the input"),
    ("missing_vae", "no config.json"),
])
def test_bad_input_fails_with_a_clear_error_and_writes_nothing(tmp_path, tiny_vae_dir, case, message):
    source, output, vae = tmp_path / "in.png", tmp_path / "out.png", str(tiny_vae_dir)
    if case == "not_image":
        source.write_text("hello")
    elif case == "truncated":
        write_photo(tmp_path / "full.png")
        source.write_bytes((tmp_path / "full.png").read_bytes()[:2000])
    elif case == "tiny":
        write_photo(source, size=(40, 30))
    elif case != "missing":
        write_photo(source)
    if case == "jpeg_output":
        output = tmp_path / "out.jpg"
    elif case == "output_is_input":
        output = source
    elif case == "missing_vae":
        vae = str(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match=message):
        defend.main(["--input_path", str(source), "--output_path", str(output), "--defend_method", "encoder",
                     "--vae", vae, *FAST])
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("argv", [["--defend_method", "nope"], ["--defend_method", "vae", "--attack_budget", "0"],
                                  ["--defend_method", "vae", "--attack_budget", "0.5"]])
def test_bad_options_exit_2(tmp_path, argv):
    source = write_photo(tmp_path / "in.png")
    with pytest.raises(SystemExit) as exited:
        defend.main(["--input_path", str(source), *argv])
    assert exited.value.code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_a_model_that_cannot_be_had_offline_is_named_in_one_line(tmp_path):
    source = write_photo(tmp_path / "in.png")
    result = run("defend.py", "--input_path", str(source), "--defend_method", "encoder", "--vae", "nobody/no-vae",
                 env={"HF_HUB_OFFLINE": "1", "FACELOCK_ASSETS": ""})
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: cannot load the autoencoder of nobody/no-vae") and "FACELOCK_ASSETS" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_lpips_without_vgg_weights_names_the_file_and_offers_none(tmp_path, tiny_vae_dir, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("network unreachable")

    monkeypatch.setattr("methods.models.downloads._download", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    source = write_photo(tmp_path / "in.png")
    face = export_tiny_onnx_face_model(tmp_path / "face")
    with pytest.raises(ModelUnavailable, match=r"vgg16-397923af\.pth.*torch.*--lpips none"):
        defend.main(["--input_path", str(source), "--defend_method", "facelock", "--vae", str(tiny_vae_dir),
                     "--fr_model", str(face), "--lpips", "vgg", *FAST])
    assert not (tmp_path / "in_protected.png").exists()


def test_facelock_refuses_a_photo_without_a_face_unless_allowed(tmp_path, tiny_vae_dir):
    source = write_photo(tmp_path / "noise.png")
    face = export_tiny_onnx_face_model(tmp_path / "face")
    argv = ["--input_path", str(source), "--defend_method", "facelock", "--vae", str(tiny_vae_dir),
            "--fr_model", str(face), "--lpips", "none", *FAST]
    with pytest.raises(UserError, match="no face found.*--allow_no_face"):
        defend.main(argv)
    assert not (tmp_path / "noise_protected.png").exists()
    assert defend.main([*argv, "--allow_no_face"]) == 0
    assert (tmp_path / "noise_protected.png").exists()


def make_folder(folder: Path) -> Path:
    folder.mkdir()
    write_photo(folder / "a.png", size=(80, 64), seed=1)
    write_photo(folder / "b.jpg", size=(72, 96), seed=2)
    write_photo(folder / "c.png", size=(80, 64), seed=3)
    (folder / "broken.png").write_text("not an image")
    write_photo(folder / "small.png", size=(20, 20))
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_main_defend_protects_a_folder_reports_bad_files_and_resumes(tmp_path, tiny_vae_dir, capsys):
    images, out = make_folder(tmp_path / "photos"), tmp_path / "out"
    argv = ["--image_dir", str(images), "--output_dir", str(out), "--defend_method", "encoder",
            "--vae", str(tiny_vae_dir), "--batch_size", "2", *FAST]
    assert main_defend.main(argv) == 1  # two bad files
    folder = out / "budget_0.03"
    assert sorted(p.name for p in folder.glob("*.png")) == ["a.png", "b.png", "c.png"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["outputs"]) == {"a.png", "b.png", "c.png"}
    for name, entry in manifest["outputs"].items():
        assert entry["linf_255"] <= 3 and entry["psnr"] > 30 and entry["seconds"] > 0
        protected = np.asarray(Image.open(folder / name))
        assert protected.shape == np.asarray(load_image(entry["source"])).shape
    assert manifest["parameters"]["attack_budget"] == 0.03 and "torch" in manifest["versions"]
    assert set(manifest["failed"]) == {str(images / "broken.png"), str(images / "small.png")}
    printed = capsys.readouterr().out
    assert "protected 3" in printed and "failed 2" in printed and "broken.png" in printed

    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    assert main_defend.main(argv) == 1
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")} == stamps
    assert "3 already protected" in capsys.readouterr().out
    assert set(json.loads((folder / "manifest.json").read_text())["outputs"]) == {"a.png", "b.png", "c.png"}

    assert main_defend.main([*argv, "--overwrite"]) == 1
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in folder.glob("*.png"))


def test_main_defend_same_image_same_result_alone_or_in_a_batch(tmp_path, tiny_vae_dir):
    images = make_folder(tmp_path / "photos")
    common = ["--image_dir", str(images), "--defend_method", "encoder", "--vae", str(tiny_vae_dir), *FAST]
    main_defend.main([*common, "--output_dir", str(tmp_path / "one")])
    main_defend.main([*common, "--output_dir", str(tmp_path / "two"), "--batch_size", "2"])
    for name in ("a.png", "b.png", "c.png"):
        one = np.asarray(Image.open(tmp_path / "one" / "budget_0.03" / name)).astype(int)
        two = np.asarray(Image.open(tmp_path / "two" / "budget_0.03" / name)).astype(int)
        assert np.mean(one == two) > 0.99  # float32 convolutions round differently in a batch


def test_main_defend_refuses_to_write_into_its_input_folder(tmp_path, tiny_vae_dir):
    images = make_folder(tmp_path / "budget_0.03")
    with pytest.raises(UserError, match="is the input folder"):
        main_defend.main(["--image_dir", str(images), "--output_dir", str(tmp_path), "--defend_method", "vae",
                          "--vae", str(tiny_vae_dir)])


def test_inputs_that_share_a_stem_each_get_an_output_of_their_own(tmp_path, tiny_vae_dir):
    images = tmp_path / "photos"
    images.mkdir()
    write_photo(images / "x.jpg")
    write_photo(images / "x.png", seed=5)
    write_photo(images / "y.png", seed=6)
    out = tmp_path / "out"
    assert main_defend.main(["--image_dir", str(images), "--output_dir", str(out), "--defend_method", "vae",
                             "--vae", str(tiny_vae_dir), *FAST]) == 0
    manifest = json.loads((out / "budget_0.03" / "manifest.json").read_text())
    assert {name: entry["source"] for name, entry in manifest["outputs"].items()} == {
        "x_jpg.png": str(images / "x.jpg"), "x_png.png": str(images / "x.png"), "y.png": str(images / "y.png")}
    assert not manifest["failed"]


def test_a_photo_replaced_under_the_same_name_is_protected_again(tmp_path, tiny_vae_dir, capsys):
    images = tmp_path / "photos"
    images.mkdir()
    write_photo(images / "me.png", seed=1)
    write_photo(images / "other.png", seed=2)
    out = tmp_path / "out"
    argv = ["--image_dir", str(images), "--output_dir", str(out), "--defend_method", "vae", "--vae",
            str(tiny_vae_dir), *FAST]
    assert main_defend.main(argv) == 0
    kept = (out / "budget_0.03" / "other.png").stat().st_mtime_ns
    write_photo(images / "me.png", seed=9)  # another picture under the same name
    capsys.readouterr()
    assert main_defend.main(argv) == 0
    assert "1 already protected, 1 to do" in capsys.readouterr().out
    protected = np.asarray(Image.open(out / "budget_0.03" / "me.png")).astype(int)
    assert np.abs(protected - np.asarray(load_image(images / "me.png")).astype(int)).max() <= 3  # the new picture
    assert (out / "budget_0.03" / "other.png").stat().st_mtime_ns == kept


def test_parallel_processes_split_the_folder(tmp_path, tiny_vae_dir):
    images = make_folder(tmp_path / "photos")
    common = ["--image_dir", str(images), "--defend_method", "encoder", "--vae", str(tiny_vae_dir), "--device",
              "cpu", *FAST]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "main_defend.py"), *common, "--output_dir", str(tmp_path / "two")],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1, result.stderr  # the two bad files
    assert "5 to do in 2 processes" in result.stdout and "protected 3" in result.stdout
    folder = tmp_path / "two" / "budget_0.03"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["outputs"]) == {"a.png", "b.png", "c.png"} and len(manifest["failed"]) == 2
    assert not list(folder.glob("manifest.part*"))
    main_defend.main([*common, "--output_dir", str(tmp_path / "one")])
    for name in manifest["outputs"]:
        one = np.asarray(Image.open(tmp_path / "one" / "budget_0.03" / name)).astype(int)
        two = np.asarray(Image.open(folder / name)).astype(int)
        assert np.mean(one == two) > 0.99


def test_main_defend_refuses_to_mix_results_of_other_parameters(tmp_path, tiny_vae_dir):
    images, out = make_folder(tmp_path / "photos"), tmp_path / "out"
    common = ["--image_dir", str(images), "--output_dir", str(out), "--vae", str(tiny_vae_dir), *FAST]
    main_defend.main([*common, "--defend_method", "encoder"])
    with pytest.raises(UserError, match="made with --defend_method encoder"):
        main_defend.main([*common, "--defend_method", "vae"])
    assert main_defend.main([*common, "--defend_method", "vae", "--overwrite"]) == 1  # the two bad files
    manifest = json.loads((out / "budget_0.03" / "manifest.json").read_text())
    assert manifest["parameters"]["defend_method"] == "vae" and len(manifest["outputs"]) == 3


def test_vae_tiling_runs_the_autoencoder_tile_by_tile(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from conftest import tiny_autoencoder_kl

    tiny_autoencoder_kl().save_pretrained(tmp_path / "kl")  # 32-pixel tiles
    tiled = []
    original = AutoencoderKL._tiled_encode
    monkeypatch.setattr(AutoencoderKL, "_tiled_encode", lambda self, x: tiled.append(x.shape) or original(self, x))
    source = write_photo(tmp_path / "in.png", size=(96, 96))
    assert defend.main(["--input_path", str(source), "--defend_method", "vae", "--vae", str(tmp_path / "kl"),
                        "--vae_tiling", *FAST]) == 0
    assert len(tiled) >= 3  # once for the first iteration ... once per iteration
    protected = np.asarray(Image.open(tmp_path / "in_protected.png")).astype(int)
    assert 0 < np.abs(protected - np.asarray(Image.open(source)).astype(int)).max() <= 3


def test_compile_is_opt_in_and_covers_every_network(tmp_path, tiny_vae_dir, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    face = export_tiny_onnx_face_model(tmp_path / "face")
    common = ["--input_path", str(write_photo(tmp_path / "in.png")), "--defend_method", "facelock", "--vae",
              str(tiny_vae_dir), "--fr_model", str(face), "--lpips", "none", "--allow_no_face", *FAST]
    assert defend.main(common) == 0 and compiled == []
    assert defend.main([*common, "--overwrite", "--compile"]) == 0
    assert compiled == ["EncoderTiny", "DecoderTiny", "GraphModule"]


def test_an_ensemble_of_face_models_and_the_transfer_levers_from_the_command_line(tmp_path, tiny_vae_dir, capsys):
    first, second = (export_tiny_onnx_face_model(tmp_path / name) for name in ("one", "two"))
    source = write_photo(tmp_path / "in.png")
    common = ["--input_path", str(source), "--vae", str(tiny_vae_dir), "--lpips", "none", "--allow_no_face", *FAST]
    assert defend.main([*common, "--defend_method", "facelock", "--fr_model", f"{first},{second}", "--fr_combine",
                        "max", "--momentum", "1", "--input_diversity", "0.5", "--ti_kernel", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"face model {first},{second} (max)" in printed and "momentum 1.0, DI 0.5, TI kernel 3" in printed
    protected = np.asarray(Image.open(tmp_path / "in_protected.png")).astype(int)
    assert 0 < np.abs(protected - np.asarray(Image.open(source)).astype(int)).max() <= 3
    with pytest.raises(UserError, match="--momentum work.* with the PGD methods"):
        defend.main([*common, "--defend_method", "noise", "--momentum", "1", "--overwrite"])
    with pytest.raises(SystemExit):
        defend.main([*common, "--defend_method", "facelock", "--ti_kernel", "4"])


def test_backend_switches_follow_the_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    parse = lambda *extra: protection_options.parse(  # noqa: E731
        defend.build_parser(), ["--input_path", "a.png", "--defend_method", "encoder", *extra])
    try:
        protect.configure_backends(parse("--cudnn_benchmark").options)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        protect.configure_backends(parse("--cudnn_benchmark", "--deterministic").options)
        assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = torch.backends.cudnn.benchmark = False


@pytest.mark.parametrize("flags, message", [
    (["--step_size", "nan"], "--step_size must be a finite number"),
    (["--c", "nan"], "--c must be a finite number"),
    (["--momentum", "nan"], "--momentum must be a finite number"),
    (["--target_fr", "nan"], "--target_fr must be a finite number"),
    (["--attack_budget", "1e-9"], "less than one 8-bit level"),
    (["--norm", "l2", "--attack_budget", "inf"], "--attack_budget must be a finite number"),
    (["--norm", "l2", "--attack_budget", "nan"], "--attack_budget must be a finite number"),
    (["--norm", "l2", "--attack_budget", "1e9"], "longer than any photo attacked at --max_size 1024 can take"),
    (["--device", "banana"], "--device banana: not a device"),
    (["--targeted", "--untargeted"], "not allowed with argument"),
    (["--max_size", "1"], "--max_size must be 0 (full size) or at least 64 px"),
    (["--c", "-1"], "--c and --fidelity_weight must be >= 0"),
])
def test_nonsense_is_refused_in_one_line_before_any_work(tmp_path, capsys, flags, message):
    source = write_photo(tmp_path / "photo.png")
    with pytest.raises(SystemExit) as exited:
        defend.main(["--input_path", str(source), "--defend_method", "facelock", "--vae", "/nowhere", *flags])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and error.count("\n") == 1 and error.startswith("error: ") and message in error
    assert not (tmp_path / "photo_protected.png").exists()


def test_an_l2_budget_longer_than_the_photo_can_take_is_refused_before_the_attack(tmp_path, tiny_vae_dir):
    source = write_photo(tmp_path / "photo.png", size=(96, 80))  # at most 0.25 * sqrt(3 * 96 * 80) = 38 long
    with pytest.raises(UserError, match="L2 budget 100.0 is longer than this photo's work image"):
        defend.main(["--input_path", str(source), "--defend_method", "vae", "--vae", str(tiny_vae_dir), "--norm",
                     "l2", "--attack_budget", "100", "--max_size", "0", *FAST])
    assert not (tmp_path / "photo_protected.png").exists()


def test_web_with_a_photo_and_an_output_that_cannot_be_written_are_refused(tmp_path, tiny_vae_dir):
    with pytest.raises(UserError, match="--web starts the page.*drop --input_path"):
        defend.main(["--web", "--input_path", "a.png"])
    source = write_photo(tmp_path / "photo.png")
    blocked = tmp_path / "file"
    blocked.write_text("in the way")
    with pytest.raises(UserError, match="cannot write to"):
        defend.main(["--input_path", str(source), "--output_path", str(blocked / "out.png"), "--defend_method", "vae",
                     "--vae", str(tiny_vae_dir), *FAST])
    with pytest.raises(UserError, match="cannot write to"):
        main_defend.main(["--image_dir", str(tmp_path), "--output_dir", str(blocked), "--defend_method", "vae",
                          "--vae", str(tiny_vae_dir), *FAST])


def test_the_levers_for_sharing_and_unseen_models_keep_the_budget_and_the_input(tmp_path, tiny_vae_dir):
    face = export_tiny_onnx_face_model(tmp_path / "face")
    images = tmp_path / "photos"
    images.mkdir()
    for k in range(2):
        write_photo(images / f"p{k}.png", size=(72, 64), seed=k)
    before = {p.name: digest(p) for p in images.iterdir()}
    levers = ["--chroma", "0.5", "--smooth_perturbation", "3", "--dct_keep", "6", "--flat_budget", "0.5", "--eot",
              "share", "--surrogate_noise", "0.05", "--landmark_jitter", "2", "--antialias", "--feature_weight", "1"]
    common = ["--image_dir", str(images), "--defend_method", "facelock", "--vae", str(tiny_vae_dir), "--fr_model",
              str(face), "--lpips", "none", "--allow_no_face", *FAST]
    for out in ("one", "two"):
        assert main_defend.main([*common, *levers, "--output_dir", str(tmp_path / out)]) == 0
    for name in before:
        protected = np.asarray(Image.open(tmp_path / "one" / "budget_0.03" / name)).astype(int)
        assert 0 < np.abs(protected - np.asarray(load_image(images / name)).astype(int)).max() <= 3
        assert digest(tmp_path / "one" / "budget_0.03" / name) == digest(tmp_path / "two" / "budget_0.03" / name)
    assert {p.name: digest(p) for p in images.iterdir()} == before
    with pytest.raises(UserError, match="--surrogate_noise work.* with the methods .*facelock.*, not vae"):
        main_defend.main([*common[:3], "vae", *common[4:], "--surrogate_noise", "0.05", "--output_dir",
                          str(tmp_path / "three")])
    with pytest.raises(UserError, match="--antialias and --feature_weight work.* with the methods \\(facelock\\), not "
                                        "encoder"):
        main_defend.main([*common[:3], "encoder", *common[4:], "--antialias", "--feature_weight", "1", "--output_dir",
                          str(tmp_path / "four")])
