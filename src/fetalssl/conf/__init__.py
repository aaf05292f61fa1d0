"""Hydra configs, shipped inside the package so a plain `pip install .` composes them."""
