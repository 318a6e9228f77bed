"""Data sources (CIFAR pickles, image folders and archives) and the prepared on-disk format."""

from quest.core.data.prepared import (
    PreparedDataset,
    Split,
    data_hash,
    load_prepared,
    save_prepared,
)
from quest.core.data.sources import SOURCES, prepare_dataset, smoke_subset

__all__ = [
    "SOURCES",
    "PreparedDataset",
    "Split",
    "data_hash",
    "load_prepared",
    "prepare_dataset",
    "save_prepared",
    "smoke_subset",
]
