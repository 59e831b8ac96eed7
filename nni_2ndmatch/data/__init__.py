"""Training data: the sources (built-in digits and MNIST, image folders, Hugging Face datasets saved to disk,
parquet files), a latent pipeline's encoded cache, and the order and loading of batches."""

from .batches import (
    ItemKey,
    Reads,
    StepBatches,
    auto_workers,
    batch_indices,
    batch_loader,
    collate,
    epoch_permutation,
)
from .builtin import BUILTIN_DATA, DigitsDataset, MnistDataset, digit_captions
from .encoded import EncodedDataset
from .sources import (
    IMAGE_SUFFIXES,
    METADATA_FILE,
    ImageFolderDataset,
    TableDataset,
    image_problem,
    image_tensor,
    read_metadata,
    table_files,
)

__all__ = [
    "BUILTIN_DATA", "IMAGE_SUFFIXES", "METADATA_FILE", "DigitsDataset", "EncodedDataset", "MnistDataset",
    "ImageFolderDataset", "ItemKey", "Reads", "StepBatches", "TableDataset", "auto_workers", "batch_indices",
    "batch_loader", "collate", "digit_captions", "epoch_permutation", "image_problem", "image_tensor",
    "read_metadata", "table_files",
]
