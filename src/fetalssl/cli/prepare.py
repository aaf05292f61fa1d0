"""fetalssl-prepare: decode every video under data.root once into the frame cache (what training reads)."""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    datamodule = instantiate(cfg.data, pair_sampler=instantiate(cfg.pairs), views=instantiate(cfg.augment))
    datamodule.prepare_data()


if __name__ == "__main__":
    main()
