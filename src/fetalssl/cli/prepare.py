"""fetalssl-prepare: decode every video under data.root (or data.manifest) once into the frame cache, find each
video's scan layout, and write a report of what the model will see (data/prepare_report.py)."""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from fetalssl.data.index import index_videos
from fetalssl.data.prepare_report import write_prepare_report
from fetalssl.data.pretrain import prepare
from fetalssl.progress import configure_console


@hydra.main(config_path="../conf", config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    configure_console(cfg.verbose)
    summary = prepare(cfg.data)
    print(summary)
    records = index_videos(cfg.data.root, cfg.data.manifest, cfg.data.patient_pattern)
    report = write_prepare_report(summary, {r.path: r.patient_id for r in records}, instantiate(cfg.data.scan),
                                  cfg.report.dir,
                                  cfg.report.frames_per_video, cfg.report.videos_per_sheet)
    print(f"report: {cfg.report.dir} ({report['kept']} kept, {report['skipped']} skipped; normalisation over "
          f"the live image: mean {report['normalization']['mean']}, std {report['normalization']['std']})")


if __name__ == "__main__":
    main()
