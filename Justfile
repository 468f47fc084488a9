# dance-with-music: every recipe is a thin wrapper over the `dwm` CLI in .venv.
# Set-up runs first and is skipped when .venv already matches the lock.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
py := venv + "/bin/python"
dwm := venv + "/bin/dwm"
export HF_HUB_OFFLINE := env_var_or_default("HF_HUB_OFFLINE", "1")
export TOKENIZERS_PARALLELISM := "false"
# onnxruntime (pose and face models) sends usage telemetry unless told not to
export ORT_DISABLE_TELEMETRY := "1"

default:
    @just --list

# Create .venv and install the pinned stack (cpu default; `just setup gpu` for CUDA torch)
setup variant="cpu":
    bash scripts/setup.sh {{variant}}

# Run the whole test suite (installs first, with the app extra: the page is tested too)
test *ARGS: setup
    bash scripts/setup.sh app
    {{venv}}/bin/pytest {{ARGS}}

# Run the main job end to end on a small generated default: preprocess -> A -> B -> C -> generate -> eval
demo *ARGS: setup
    {{dwm}} demo {{ARGS}}

# Preprocess a folder of dance videos into the feature cache and WebDataset shards
preprocess DIR *ARGS: setup
    {{dwm}} preprocess {{DIR}} {{ARGS}}

# Train: no stage runs A -> B -> C; `just train stage=B` runs one stage
train *ARGS: setup
    {{dwm}} train {{ARGS}}

# Song + photo -> dance video: just generate music=SONG ref=PHOTO [out=dance.mp4]
generate *ARGS: setup
    {{dwm}} generate {{ARGS}}

# Metrics of a checkpoint on held-out shards: just eval ckpt=... data=data/manifest.json
eval *ARGS: setup
    {{dwm}} eval {{ARGS}}

# Measured speed of the data path and train step, as ratios (bench.json + Markdown table)
bench *ARGS: setup
    {{dwm}} bench {{ARGS}}

# Local web page: drop a photo and a song, watch the dance: just app [ckpt=...] [port=7860] [host=127.0.0.1]
app *ARGS: setup
    bash scripts/setup.sh app
    {{dwm}} app {{ARGS}}

# Download the `full` weights into models/ (needs internet)
models *ARGS: setup
    {{dwm}} models {{ARGS}}

# Regenerate constraints.txt from a fresh resolve (maintainers)
lock:
    bash scripts/setup.sh lock
