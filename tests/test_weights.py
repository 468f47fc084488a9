"""Pretrained weights: the tiny profile's models and stand-in ONNX files under the real loaders,
full-weight resolution (local folder, `dwm models` mirror, HF cache) and its errors, the VAE
helpers, and the wheel."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dwm.shared import pretrained as P
from dwm.shared import tiny
from dwm.shared import vae as V
from dwm.shared import weights as W
from dwm.shared.errors import UserFacingError
from dwm.shared.config import ModelsConfig

REPO = Path(__file__).resolve().parents[1]
SVD = ModelsConfig().svd


def _frames(video: Path, idx: list[int], width: int = 0, height: int = 0) -> np.ndarray:
    import decord

    vr = decord.VideoReader(str(video), width=width or -1, height=height or -1)
    return vr.get_batch(idx).asnumpy()  # RGB uint8 [N,H,W,3]


def _read_rgb(path: Path) -> np.ndarray:
    # PIL, not cv2.imread: once decord is imported, cv2 fails to decode PNGs (libpng/zlib clash)
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def dance_frames(dance_video) -> np.ndarray:
    """Frames 0 and 96 at native size (RGB): sequential decode, the video has few keyframes."""
    return _frames(dance_video, [0, 96])


@pytest.fixture
def offline_empty_cache(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache, whatever this machine has cached."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


# ----------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------
def test_tiny_tree_layout_and_classes(tiny_models_cfg, tiny_models_root, offline_empty_cache):
    W.ensure_available(tiny_models_cfg, list(W.COMPONENTS))  # all local, nothing downloaded
    root = tiny_models_root
    for sub in ("vae", "image_encoder", "unet"):
        assert (root / sub / "config.json").is_file()
        assert list((root / sub).glob("*.safetensors")), sub
        assert not list((root / sub).glob("*.bin")), "weights must be safetensors only"
    assert json.loads((root / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    cfg = W.unet_config(tiny_models_cfg)
    assert cfg["_class_name"] == "UNetSpatioTemporalConditionModel"
    assert cfg["cross_attention_dim"] == 32 and cfg["in_channels"] == 8
    clip_cfg = json.loads((root / "image_encoder" / "config.json").read_text())
    assert clip_cfg["projection_dim"] == cfg["cross_attention_dim"]
    # the same call on a built tree is a no-op (stamp matches)
    stamp = (root / "STAMP").read_text()
    assert tiny.build_tiny(tiny_models_cfg.models_dir) == root
    assert (root / "STAMP").read_text() == stamp


def test_tiny_definitions_are_deterministic():
    a, b = tiny.models.build_vae().state_dict(), tiny.models.build_vae().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stale_stamp_rebuilds_atomically(tiny_models_root, tmp_path):
    models_dir = tmp_path / "m"
    shutil.copytree(tiny_models_root, models_dir / "tiny")
    (models_dir / "tiny" / "STAMP").write_text("old-version\n")
    (models_dir / "tiny" / "leftover.txt").write_text("from the old build")
    root = tiny.build_tiny(models_dir)
    assert (root / "STAMP").read_text() == (tiny_models_root / "STAMP").read_text()
    assert not (root / "leftover.txt").exists()
    # nothing half-built or old is left beside it
    assert sorted(p.name for p in models_dir.iterdir() if p.name != ".tiny.lock") == ["tiny"]
    # the rebuilt weights are identical to the session's build (fixed seeds)
    a = (root / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == (tiny_models_root / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def _roundtrip(model, tmp_path, forward, load):
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    again = load(tmp_path / "saved")
    with torch.no_grad():
        a, b = forward(model), forward(again)
    assert torch.equal(a, b)
    return a


def test_tiny_vae_roundtrip_and_helpers(tiny_models_cfg, tmp_path):
    from diffusers import AutoencoderKL

    vae, sf = V.load_vae(tiny_models_cfg)
    assert isinstance(vae, AutoencoderKL) and sf == pytest.approx(0.18215)
    img = np.random.RandomState(0).randint(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    z = _roundtrip(vae, tmp_path, lambda m: V.encode_latents(m, img),
                   lambda p: AutoencoderKL.from_pretrained(p))
    assert z.shape == (2, 4, 8, 12)  # 8x downsampling, 4 latent channels
    # uint8 NHWC and float NCHW in [0,1] are the same input
    f = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(V.encode_latents(vae, f), z, atol=1e-5)
    assert torch.allclose(V.encode_latents(vae, img, batch_size=1), z, atol=1e-5)
    x = V.decode_latents(vae, z)
    assert x.shape == (2, 3, 64, 96) and 0 <= x.min() and x.max() <= 1


def test_vae_helpers_drive_svd_temporal_decoder():
    """SVD's AutoencoderKLTemporalDecoder decodes frames of a clip together (num_frames)."""
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(
        down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32, 32),
        layers_per_block=1, latent_channels=4).eval()
    assert V.vae_kind(vae) == "temporal"
    img = np.random.RandomState(1).randint(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    z = V.encode_latents(vae, img)
    assert z.shape == (4, 4, 16, 16)
    assert V.decode_latents(vae, z, num_frames=2).shape == (4, 3, 32, 32)
    assert V.decode_latents(vae, z, batch_size=2).shape == (4, 3, 32, 32)


def test_tiny_clip_roundtrip_and_preprocess(tiny_models_cfg, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    model, pre = P.load_clip(tiny_models_cfg)
    assert isinstance(model, CLIPVisionModelWithProjection)
    imgs = [np.full((120, 80, 3), 128, np.uint8), np.zeros((50, 70, 3), np.uint8)]
    px = pre(imgs)
    size = model.config.image_size
    assert px.shape == (2, 3, size, size)
    expect = (128 / 255 - np.array(P.CLIP_MEAN)) / np.array(P.CLIP_STD)
    assert np.allclose(px[0, :, size // 2, size // 2].numpy(), expect, atol=1e-3)
    emb = _roundtrip(model, tmp_path, lambda m: m(pixel_values=px).image_embeds,
                     lambda p: CLIPVisionModelWithProjection.from_pretrained(p))
    assert emb.shape == (2, model.config.projection_dim)
    assert not torch.allclose(emb[0], emb[1])
    with pytest.raises(ValueError):
        pre([np.zeros((8, 8), np.uint8)])


def test_tiny_unet_roundtrip_and_forward(tiny_models_cfg, tmp_path):
    from diffusers import UNetSpatioTemporalConditionModel

    unet = P.load_unet(tiny_models_cfg)
    g = torch.Generator().manual_seed(0)
    b, t = 1, 2
    sample = torch.randn(b, t, 8, 8, 8, generator=g)
    ehs = torch.randn(b, 5, 32, generator=g)  # 1 CLIP token + 4 face tokens
    ids = torch.tensor([[6.0, 127.0, 0.02]])

    def fwd(m):
        return m(sample, torch.tensor([10.0]), encoder_hidden_states=ehs, added_time_ids=ids).sample

    out = _roundtrip(unet, tmp_path, fwd, UNetSpatioTemporalConditionModel.from_pretrained)
    assert out.shape == (b, t, 4, 8, 8) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# full profile: local folders, TAESD, the mirror and the HF cache, missing weights
# ----------------------------------------------------------------------------------------------
def test_taesd_from_local_folder_reconstructs_video(taesd_dir, dance_video, offline_empty_cache):
    from diffusers import AutoencoderTiny

    cfg = ModelsConfig(profile="full", vae=str(taesd_dir), models_dir="/nonexistent")
    W.ensure_available(cfg, ["vae"])
    vae, sf = V.load_vae(cfg)
    assert isinstance(vae, AutoencoderTiny) and sf == 1.0 and V.vae_kind(vae) == "tiny"
    frames = _frames(dance_video, [0, 12], width=256, height=448)  # portrait, as the video
    z = V.encode_latents(vae, frames, batch_size=1)
    assert z.shape == (2, 4, 56, 32)
    rec = V.decode_latents(vae, z).permute(0, 2, 3, 1).numpy()
    mse = np.mean((rec - frames / 255.0) ** 2)
    psnr = 10 * np.log10(1.0 / mse)
    print(f"TAESD PSNR on 2 dance frames at 256x448: {psnr:.2f} dB")
    assert psnr >= 25.0, psnr


def test_svd_pipeline_folder_resolves_subfolders(tiny_models_root, offline_empty_cache):
    """profile=full with models.svd = a local pipeline folder: vae/, image_encoder/, unet/."""
    cfg = ModelsConfig(profile="full", svd=str(tiny_models_root), models_dir="/nonexistent")
    W.ensure_available(cfg, ["vae", "clip", "unet"])
    assert W.component_dir(cfg, "clip") == tiny_models_root / "image_encoder"
    assert W.unet_config(cfg)["block_out_channels"] == [32, 64]
    # an explicit component folder wins over the SVD default
    cfg2 = dataclasses.replace(cfg, svd=SVD, unet=str(tiny_models_root / "unet"))
    assert W.component_dir(cfg2, "unet") == tiny_models_root / "unet"


def test_missing_full_weights_name_id_and_just_models(tmp_path, offline_empty_cache):
    cfg = ModelsConfig(profile="full", models_dir=str(tmp_path / "models"))
    for comp, sub in (("vae", "vae"), ("clip", "image_encoder"), ("unet", "unet")):
        with pytest.raises(W.MissingWeightError) as ei:
            W.ensure_available(cfg, [comp])
        msg = str(ei.value)
        assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, UserFacingError)
        assert SVD in msg and sub in msg and "just models" in msg and str(tmp_path) in msg
        assert "\n" not in msg
    with pytest.raises(W.MissingWeightError) as ei:
        W.ensure_available(cfg, ["dwpose"])
    assert "yolox_l.onnx" in str(ei.value) and "just models" in str(ei.value)
    assert W.DWPOSE_REPO in str(ei.value)
    # an empty insightface pack (insightface itself would raise a bare AssertionError)
    pack = tmp_path / "models" / "insightface" / "models" / "antelopev2"
    pack.mkdir(parents=True)
    with pytest.raises(W.MissingWeightError) as ei:
        W.insightface_root(cfg)
    msg = str(ei.value)
    assert str(pack) in msg and "antelopev2.zip" in msg and "just models" in msg and "empty" in msg
    # a local override folder that does not exist is named too
    with pytest.raises(W.MissingWeightError, match="nope"):
        W.ensure_available(dataclasses.replace(cfg, vae="./nope"), ["vae"])
    with pytest.raises(ValueError, match="unknown component"):
        W.ensure_available(cfg, ["vea"])


def test_mirror_and_hf_cache_are_found_offline(tmp_path, tiny_models_root, offline_empty_cache):
    cfg = ModelsConfig(profile="full", models_dir=str(tmp_path / "models"))
    # 1) the mirror `dwm models` writes: <models_dir>/hf/<repo>/<subfolder>
    mirror = tmp_path / "models" / "hf" / SVD / "vae"
    shutil.copytree(tiny_models_root / "vae", mirror)
    assert W.component_dir(cfg, "vae") == mirror
    vae, _ = V.load_vae(cfg)
    assert type(vae).__name__ == "AutoencoderKL"
    # 2) the Hugging Face cache layout (models--org--name/snapshots/<commit>/<subfolder>)
    commit = "0" * 40
    repo_dir = offline_empty_cache / ("models--" + SVD.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(tiny_models_root / "image_encoder", snapshot / "image_encoder")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    found = W.component_dir(cfg, "clip")
    assert found == repo_dir / "snapshots" / commit / "image_encoder"
    model, pre = P.load_clip(cfg)
    assert model(pixel_values=pre([np.zeros((32, 32, 3), np.uint8)])).image_embeds.shape == (1, 32)
    # the UNet is in neither place
    with pytest.raises(W.MissingWeightError, match="unet"):
        P.load_unet(cfg)


def test_download_plan_and_tiny_download_main(tmp_path, tiny_models_cfg, capsys, taesd_dir):
    cfg = ModelsConfig(profile="full", models_dir=str(tmp_path / "m"))
    plan = W.download_plan(cfg)
    comps = [c for c, _, _ in plan]
    assert comps == ["vae", "clip", "unet", "dwpose", "dwpose", "insightface"]
    srcs = " ".join(s for _, s, _ in plan)
    assert f"hf://{SVD}/image_encoder" in srcs and "yolox_l.onnx" in srcs
    assert "dw-ll_ucoco_384.onnx" in srcs and "antelopev2.zip" in srcs
    assert plan[3][2] == tmp_path / "m" / "dwpose" / "yolox_l.onnx"
    # a local override needs no download
    local_vae = dataclasses.replace(cfg, vae=str(taesd_dir))
    assert "vae" not in [c for c, _, _ in W.download_plan(local_vae)]
    assert W.download_main(tiny_models_cfg) == 0
    assert "tiny" in capsys.readouterr().out
    # and through the CLI, as `dwm models profile=tiny`
    from dwm.shared.cli import main

    assert main(["models", "profile=tiny", f"models_dir={tiny_models_cfg.models_dir}"]) == 0
    assert str(Path(tiny_models_cfg.models_dir) / "tiny") in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# stand-in ONNX files under the real loaders
# ----------------------------------------------------------------------------------------------
def test_standin_onnx_signatures(tiny_models_cfg):
    import onnxruntime as ort

    det, pose = W.dwpose_paths(tiny_models_cfg)

    def sig(path):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return ([(i.name, i.shape) for i in s.get_inputs()],
                [(o.name, o.shape) for o in s.get_outputs()])

    assert sig(det) == ([("images", [1, 3, 640, 640])], [("output", [1, 8400, 85])])
    assert sig(pose) == ([("input", [1, 3, 384, 288])],
                         [("simcc_x", [1, 133, 576]), ("simcc_y", [1, 133, 768])])


def test_dwpose_standins_run_in_rtmlib(tiny_models_cfg, dance_frames, dance_face):
    from rtmlib import Wholebody

    det, pose = W.dwpose_paths(tiny_models_cfg)
    wb = Wholebody(det=str(det), det_input_size=(640, 640), pose=str(pose),
                   pose_input_size=(288, 384), backend="onnxruntime", device="cpu")
    results = []
    for rgb in list(dance_frames) + [_read_rgb(dance_face)]:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        boxes = np.asarray(wb.det_model(bgr))
        assert boxes.shape == (1, 4)
        h, w = bgr.shape[:2]
        x0, y0, x1, y1 = boxes[0]
        assert (x1 - x0) * (y1 - y0) > 0.6 * h * w  # a person box covering most of the image
        kp, sc = wb(bgr)
        assert kp.shape == (1, 133, 2) and sc.shape == (1, 133)
        body = kp[0, :17]
        inside = ((body[:, 0] >= x0) & (body[:, 0] <= x1) & (body[:, 1] >= y0 - 0.1 * h)
                  & (body[:, 1] <= y1))
        assert inside.mean() > 0.8
        assert (sc[0, :17] > 0.3).all()
        assert body[0, 1] < body[11, 1] < body[15, 1]  # nose above hips above ankles
        results.append(kp[0])
    assert not np.allclose(results[0], results[1], atol=1.0), "keypoints must depend on the image"
    # a flat image holds no person
    assert len(wb.det_model(np.full((480, 640, 3), 90, np.uint8))) == 0


@pytest.mark.parametrize("pack", ["antelopev2", "buffalo_l"])
def test_insightface_standins_run_in_faceanalysis(tiny_models_cfg, dance_face, dance_frames, pack):
    from insightface.app import FaceAnalysis

    cfg = dataclasses.replace(tiny_models_cfg, insightface_pack=pack)
    root, name = W.insightface_root(cfg)
    assert name == pack
    app = FaceAnalysis(name=name, root=root, allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    assert set(app.models) == {"detection", "recognition"}
    app.prepare(ctx_id=-1)
    face_img = np.ascontiguousarray(_read_rgb(dance_face)[:, :, ::-1])  # insightface wants BGR
    frame = np.ascontiguousarray(dance_frames[0][:, :, ::-1])
    embs = []
    for img in (face_img, frame):
        faces = app.get(img)
        assert len(faces) == 1
        f = faces[0]
        h, w = img.shape[:2]
        cx, cy = (f.bbox[0] + f.bbox[2]) / 2, (f.bbox[1] + f.bbox[3]) / 2
        assert abs(cx - w / 2) < 0.25 * w and cy < 0.6 * h  # near the centre-top
        assert f.kps.shape == (5, 2) and f.det_score > 0.5
        assert f.embedding.shape == (512,) and np.isfinite(f.embedding).all()
        embs.append(f.embedding / np.linalg.norm(f.embedding))
    assert float(embs[0] @ embs[1]) < 0.99  # different faces, different embeddings
    assert app.get(np.full((200, 200, 3), 60, np.uint8)) == []


# ----------------------------------------------------------------------------------------------
# packaging
# ----------------------------------------------------------------------------------------------
def test_wheel_contains_packages_and_configs(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".venv", "build", "dist", "*.egg-info", "__pycache__", "tests",
                                    ".git", "models", "data", "*_out", ".pytest_cache")
    shutil.copytree(REPO, src, ignore=ignore)  # build outside the shared tree: no build/ there
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, capture_output=True, timeout=120)
    (whl,) = out.glob("dance_with_music-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    shipped = {Path(n).name for n in names if n.startswith("dwm/shared/configs/")}
    assert shipped == {p.name for p in (REPO / "shared" / "configs").glob("*.yaml")}
    assert "dwm/shared/weights.py" in names and "dwm/shared/tiny/onnx.py" in names
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(whl).extractall(unpacked)
    code = (
        "import dwm.shared, dwm.shared.config as c, dwm.preprocess, dwm.datasets, dwm.training;"
        "import dwm.shared.weights, dwm.shared.tiny;"
        f"assert dwm.shared.__file__.startswith({str(unpacked)!r}), dwm.shared.__file__;"
        "assert c.config_file('stage_A').is_file();"
        "print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(PYTHONPATH=str(unpacked), PYTHONSAFEPATH="1")
    # The editable install's finder would serve dwm from the repo: PYTHONPATH comes before
    # site-packages, and the assert above proves which copy was imported.
    res = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
