"""fetalssl-extract-frames: patient split, pretraining manifest and strided labelled frames from a video manifest.

    fetalssl-extract-frames                                   # POCUS: ${paths.pocus}/manifest.csv
    fetalssl-extract-frames manifest=my/videos.csv out_dir=my/prepared stride=5
    fetalssl-extract-frames folds=5      # + a fold column and pretrain_manifest_fold<k>.csv per round
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from fetalssl.data.frames import extract_frames


@hydra.main(config_path="../conf", config_name="extract_frames", version_base="1.3")
def main(cfg: DictConfig) -> None:
    summary = extract_frames(cfg.manifest, cfg.out_dir, stride=cfg.stride,
                             max_frames_per_video=cfg.max_frames_per_video, short_side=cfg.short_side,
                             val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.split_seed,
                             subsets=OmegaConf.to_container(cfg.subsets), folds=cfg.folds)
    print(summary)


if __name__ == "__main__":
    main()
