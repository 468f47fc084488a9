"""The typed config system and the CLI front door."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dwm.shared import cli
from dwm.shared import config as C

REPO = Path(__file__).resolve().parents[1]
DWM = [sys.executable, "-m", "dwm.shared.cli"]

SEED_DEFAULTS = {
    "training_stage": "all",
    "stage_a_steps": 5000, "stage_b_steps": 10000, "stage_c_steps": 15000,
    "stage_a_lr": 1e-4, "stage_b_lr": 1e-4, "stage_c_lr": 5e-5, "m2p_lr_stage_b": 1e-5,
    "diffusion_loss_weight": 1.0, "pose_loss_weight": 0.5, "face_loss_weight": 0.1,
    "id_loss_weight": 0.1, "temporal_loss_weight": 0.1,
    "mixed_precision": "no", "gradient_checkpointing": False, "use_xformers": False,
    "output_dir": "champ_2stage_output",
}  # fmt: skip
SEED_KEYS = [
    "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_warmup_steps",
    "gradient_clip_norm", "guidance_scale", "sequence_length", "num_workers", "pin_memory",
    "prefetch_factor",
]  # fmt: skip


def test_seed_parameters_exist_with_defaults():
    cfg = C.TrainConfig()
    for key, value in SEED_DEFAULTS.items():
        assert getattr(cfg, key) == value, key
    for key in SEED_KEYS:
        assert hasattr(cfg, key), key


def test_overrides_coerce_types_and_aliases():
    cfg = C.build_train_config(["stage=C", "stage_b_lr=3e-4", "pin_memory=false",
                                "train_batch_size=8", "models.profile=tiny"])
    assert cfg.training_stage == "C"
    assert cfg.stage_b_lr == pytest.approx(3e-4)
    assert cfg.pin_memory is False
    assert cfg.train_batch_size == 8
    assert cfg.models.profile == "tiny"


def test_leaf_names_and_dotted_paths_for_nested_configs():
    cfg = C.build_preprocess_config(["fps=30", "decode.width=256", "extractors=audio,thumbs"])
    assert cfg.decode.fps == 30.0 and cfg.decode.width == 256
    assert cfg.extractors == ["audio", "thumbs"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("stage=D", "training_stage"),
        ("stage_b_lr=abc", "stage_b_lr"),
        ("train_batch_size=2.5", "train_batch_size"),
        ("no_such_key=1", "no_such_key"),
        ("pin_memory=maybe", "pin_memory"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(C.ConfigError, match=needle):
        C.build_train_config([override])


def test_ambiguous_leaf_name_is_refused():
    # "batch_size" exists in several preprocessing sub-configs
    with pytest.raises(C.ConfigError, match="ambiguous"):
        C.build_preprocess_config(["batch_size=2"])


def test_every_shipped_yaml_file_loads():
    files = sorted(C.CONFIG_DIR.glob("*.yaml"))
    assert {f.stem for f in files} >= {"stage_A", "stage_B", "stage_C", "preprocess_full",
                                        "preprocess_tiny", "train_tiny", "train_full"}
    for f in files:
        target = C.PreprocessConfig() if f.stem.startswith("preprocess") else C.TrainConfig()
        C.load_yaml(target, f)


def test_stage_and_profile_files_apply():
    assert C.build_train_config(["stage=B"]).training_stage == "B"
    tiny = C.build_preprocess_config(["profile=tiny"])
    assert tiny.models.profile == "tiny" and tiny.decode.width < 512


@pytest.mark.parametrize("overrides,want", [
    (["profile=tiny"], ("tiny", "tiny", "tiny", 60, 48)),  # the one knob: everything follows
    (["model_size=tiny"], ("tiny", "tiny", "tiny", 60, 48)),  # the older spelling picks it too
    ([], ("full", "full", "full", 5000, 120)),
    (["profile=tiny", "model_size=full"], ("tiny", "full", "tiny", 60, 48)),  # set: kept
    (["profile=tiny", "models.profile=full"], ("tiny", "tiny", "full", 60, 48)),
])
def test_train_profile_is_the_one_size_knob(overrides, want):
    cfg = C.build_train_config(overrides)
    got = (cfg.profile, cfg.model_size, cfg.models.profile, cfg.stage_a_steps, cfg.audio_window)
    assert got == want


def test_generate_and_eval_follow_the_checkpoints_profile(tmp_path):
    ckpt = tmp_path / "final"
    ckpt.mkdir()
    (ckpt / "training_info.json").write_text('{"config": {"models": {"profile": "tiny"}}}')
    for cls in (C.GenerateConfig, C.EvalConfig):
        assert C.build_run_config(cls, [f"ckpt={ckpt}"]).models.profile == "tiny"
        assert C.build_run_config(cls, [f"ckpt={ckpt}", "profile=full"]).models.profile == "full"
        assert C.build_run_config(cls, [f"ckpt={tmp_path}"]).models.profile == "full"  # unknown


def test_bad_yaml_key_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("decode:\n  fsp: 30\n")
    with pytest.raises(C.ConfigError, match="bad.yaml.*fsp"):
        C.load_yaml(C.PreprocessConfig(), bad)


def test_config_hash_is_stable_and_sensitive():
    a, b = C.DecodeConfig(), C.DecodeConfig()
    assert C.config_hash(a) == C.config_hash(b)
    b.fps = 30
    assert C.config_hash(a) != C.config_hash(b)


@pytest.mark.parametrize("argv", [["train", "stage=D"], ["train", "stage_b_lr=abc"]])
def test_cli_bad_override_fails_with_one_line(argv):
    proc = subprocess.run(DWM + argv, capture_output=True, text=True, cwd=REPO.parent)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and argv[1].split("=")[0] in lines[0]


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_subcommand_help_lists_options_with_defaults(name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key, _tp, default in C.describe(cli.COMMANDS[name].config):
        assert key in out and repr(default) in out


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "just test" in ci and "just test" in readme and "just demo" in readme
