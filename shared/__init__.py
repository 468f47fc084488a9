"""dwm.shared: the contract between preprocessing and training (features, config, models)."""
