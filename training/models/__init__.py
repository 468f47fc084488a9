"""Trainable models: the M2PEncoder and the integrated CHAMP + StableAnimator video model."""
