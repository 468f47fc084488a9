"""dwm.generate: everything after the checkpoints (the pipeline, its CLI, eval, plots, demo)."""
