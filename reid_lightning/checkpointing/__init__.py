"""Checkpoints: safe loading (weights_only), atomic writes, and the state that exact resume needs."""
