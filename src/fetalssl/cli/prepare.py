"""fetalssl-prepare: decode every video under data.root (or data.manifest) once into the frame cache."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fetalssl.data.pretrain import prepare


@hydra.main(config_path="../conf", config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(prepare(cfg.data))


if __name__ == "__main__":
    main()
