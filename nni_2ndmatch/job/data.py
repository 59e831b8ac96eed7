"""The data stage of a job: the config's data section checked against the teacher (``plan_data``,
before anything is written), then made into what the run trains on (``open_data``): the images
themselves, or for a latent pipeline the encoded cache in ``output_dir/cache``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ..config import Config
from ..data import (
    DigitsDataset,
    EncodedDataset,
    ImageFolderDataset,
    MnistDataset,
    TableDataset,
    auto_workers,
    digit_captions,
    table_files,
)
from ..data.encoded import (
    CachePlan,
    Encoding,
    cached_plan,
    encode_shards,
    fingerprint,
    incomplete_shards,
    plan_cache,
    start_cache,
)
from ..data.encoders import vae_downsampling
from ..errors import RunError, UserError, user_errors
from ..models import PipelineParts, conditioning_of
from ..training import Runtime
from ..utils import differs_from_default
from .output import RunFolder

logger = logging.getLogger(__name__)

TABLE_COLUMNS = ("image_column", "caption_column", "label_column")


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """The config's data, checked: ``source`` the images (pixel-space training reads them
    directly), with their ``captions`` (text-to-image) or class ``labels`` (a class-conditional
    latent pipeline); ``example`` one item as the loop will see it; ``cache`` what a latent
    pipeline's encoded cache must hold (None in pixel space)."""

    source: Dataset
    captions: list[str] | None
    labels: list[int] | None
    example: Any
    cache: CachePlan | None

    @property
    def items(self) -> int:
        return len(self.source)


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """What a run trains on (``dataset``) and evaluates against (``source``: the images,
    ``captions`` / ``labels``: each image's conditioning for a latent pipeline)."""

    dataset: Dataset
    source: Dataset
    captions: list[str] | None
    labels: list[int] | None


def data_channels(config: Config, teacher: nn.Module, parts: PipelineParts | None) -> int:
    """The images' channels: the model's (its VAE's, for a latent pipeline) unless the config
    gives them; a given value that disagrees is an error. The built-in digits are greyscale (an
    RGB VAE gets them as grey RGB)."""
    data, latent = config.data, parts is not None and parts.latent
    if data.builtin is not None:
        if data.channels not in (None, 1):
            raise UserError(f"data: channels={data.channels}: the {'MNIST ' * (data.builtin == 'mnist')}digits are "
                            "greyscale; allowed: 1")
        return 1
    model, what = (parts.vae, "the pipeline's VAE") if latent else (teacher, "the teacher")
    want = getattr(getattr(model, "config", None), "in_channels", None)
    if data.channels is None:
        if want not in (1, 3):
            said = f"takes {want} channels" if want is not None else "does not say how many channels it takes"
            raise UserError(f"data.channels: {what} {said}; give data.channels (allowed: 1, 3)")
        return want
    if want is not None and data.channels != want:
        raise UserError(f"data.channels: value {data.channels} is not allowed: {what} takes {want} channel(s); "
                        f"allowed: {want} (or leave it out)")
    return data.channels


def image_source(config: Config, channels: int) -> Dataset:
    """The images the data section names: the digits, a Hugging Face dataset saved to disk or
    parquet files (``image_column``), or an image folder."""
    data = config.data
    if data.builtin is not None:
        return builtin_source(config)
    if table_files(data.path) is not None:
        return TableDataset(data.path, data.resolution, channels, image_column=data.image_column or "image",
                            skip_bad_images=data.skip_bad_images)
    given = [k for k in TABLE_COLUMNS if getattr(data, k) is not None]
    if given:
        raise ValueError(f"{given[0]} goes with a data set saved by Hugging Face datasets (save_to_disk) or parquet "
                         f"files; {data.path!r} is an image folder (captions and labels: its metadata.jsonl)")
    return ImageFolderDataset(data.path, resolution=data.resolution, channels=channels,
                              skip_bad_images=data.skip_bad_images)


def builtin_source(config: Config, model_conditioning: tuple[str, int] | None = None) -> DigitsDataset:
    """The train split of the built-in data (``digits`` or ``mnist``), each item labelled as the model takes it."""
    data = config.data
    dataset = MnistDataset if data.builtin == "mnist" else DigitsDataset
    return dataset(resolution=data.resolution, split="train", conditioning=model_conditioning)


def conditioning(config: Config, source: Dataset, kind: str | None) -> list[Any] | None:
    """Each image's caption (``kind`` "text") or class label ("label"): the digits' own, an image
    folder's metadata.jsonl, or a table's column."""
    if kind is None:
        return None
    if isinstance(source, DigitsDataset):
        return digit_captions(source.labels) if kind == "text" else source.labels.tolist()
    if isinstance(source, TableDataset):
        column = config.data.caption_column if kind == "text" else config.data.label_column
        return source.captions(column or "text") if kind == "text" else source.labels(column or "label")
    return source.captions() if kind == "text" else source.labels()


def plan_data(config: Config, teacher: nn.Module, parts: PipelineParts | None) -> DataPlan:
    """Check the data section against the teacher and read what the run needs before anything is
    written: every image decodes, the conditioning the teacher takes is there, and (latent
    pipelines) the first item encodes."""
    data, latent = config.data, parts is not None and parts.latent
    text = parts is not None and parts.text_encoder is not None
    if data.caption_dropout and not text:
        raise UserError(f"data.caption_dropout: value {data.caption_dropout!r} is not allowed: it needs a "
                        "text-to-image pipeline teacher (one with a text_encoder); allowed here: 0")
    for key in TABLE_COLUMNS[1:]:  # a column whose values the run would not use
        wanted = {"caption_column": text, "label_column": latent and not text}[key]
        if getattr(data, key) is not None and not wanted:
            raise UserError(f"data.{key}: value {getattr(data, key)!r} is not allowed: the teacher takes no "
                            f"{'captions' if key == 'caption_column' else 'class labels'} from the data; "
                            "allowed here: null")
    for key in ("cache_dtype", "encode_batch_size"):  # options of the encoded cache, which only latents have
        if differs_from_default(data, key) and not latent:
            raise UserError(f"data.{key}: value {getattr(data, key)!r} is not allowed: it sets the encoded latent "
                            "cache, and this teacher trains on pixels (no VAE); leave it out")
    channels = data_channels(config, teacher, parts)
    native = getattr(getattr(teacher, "config", None), "sample_size", None)
    if isinstance(native, int) and "resolution" not in data.model_fields_set:
        native *= vae_downsampling(parts.vae) if latent else 1
        if native != data.resolution:
            logger.warning("data.resolution is %d, its default, but the teacher was made for %dx%d images: the run "
                           "trains at %d; set data.resolution to choose", data.resolution, native, native,
                           data.resolution)
    with user_errors("data", OSError):
        if latent:
            return _plan_latent(config, teacher, parts, channels)
        model_conditioning = conditioning_of(teacher)
        if data.builtin is not None:
            source = builtin_source(config, model_conditioning)
        elif model_conditioning is not None:
            what = "a data set" if table_files(data.path) is not None else "an image folder"
            raise ValueError(f"path={data.path!r}: {what} carries no {model_conditioning[0]}, which the teacher "
                             f"({type(teacher).__name__}) needs; allowed: builtin: digits or mnist, or an "
                             "unconditional model")
        else:
            source = image_source(config, channels)
        return DataPlan(source, None, None, source[0], None)


def _plan_latent(config: Config, teacher: nn.Module, parts: PipelineParts, channels: int) -> DataPlan:
    data, text = config.data, parts.text_encoder is not None
    model_conditioning = conditioning_of(teacher)
    if text:
        encoders = [m for m in (parts.text_encoder, parts.text_encoder_2) if m is not None]
        gives = ("encoder_hidden_states", sum(m.config.hidden_size for m in encoders))
        if parts.pooled_key == "pooled_projections":  # SD3: CLIP padded to T5's width (the transformer's without T5)
            t5 = parts.text_encoder_3
            gives = ("encoder_hidden_states", t5.config.d_model if t5 is not None else parts.joint_width)
        check_added_conditioning(teacher, parts)
    else:
        gives = model_conditioning if model_conditioning is not None and model_conditioning[0] == "class_labels" \
            else None
    if model_conditioning != gives:
        raise UserError(f"model.teacher: the denoiser is conditioned on {model_conditioning or 'nothing'} but the "
                        f"pipeline gives {gives or 'no conditioning'}; allowed: a text encoder feeding a "
                        "cross-attention denoiser of its width, class labels for a class-conditional DiT, or no "
                        "conditioning")
    factor = vae_downsampling(parts.vae)
    if data.resolution % factor:
        raise UserError(f"data.resolution: value {data.resolution} is not allowed: the pipeline's VAE downsamples "
                        f"{factor}x, so images become latents of a whole number of pixels only at multiples of "
                        f"{factor}; allowed: e.g. {data.resolution // factor * factor or factor} or "
                        f"{(data.resolution // factor + 1) * factor}")
    if config.finetune.hflip:
        raise UserError("finetune.hflip: value True is not allowed with a latent pipeline: the latents are encoded "
                        "once, and a flipped latent is not the latent of the flipped image; allowed: false")
    source = image_source(config, channels)
    values = conditioning(config, source, "text" if text else "label" if gives else None)
    if gives and not text and max(values) >= gives[1]:
        raise ValueError(f"class label {max(values)} is out of range: the teacher has {gives[1]} classes "
                         f"(labels 0 to {gives[1] - 1})")
    captions, labels = (values, None) if text else (None, values)
    dtype = data.cache_dtype or str(next(parts.vae.parameters()).dtype).removeprefix("torch.")
    key = fingerprint(parts, source, captions, labels, dtype)
    plan, example = plan_cache(parts, source, key, captions, labels, dtype,
                               expand_greyscale=data.builtin is not None)
    return DataPlan(source, captions, labels, example, plan)


def check_added_conditioning(teacher: nn.Module, parts: PipelineParts) -> None:
    """An SDXL pipeline's U-Net takes the pooled text embedding and the micro-conditioning
    (``addition_embed_type: text_time``) of the widths its second text encoder gives, an SD3
    pipeline's transformer both CLIP encoders' pooled projections; other text-to-image U-Nets take
    neither."""
    config = teacher.config
    if parts.pooled_key == "pooled_projections":
        pooled = parts.text_encoder.config.projection_dim + parts.text_encoder_2.config.projection_dim
        clip = parts.text_encoder.config.hidden_size + parts.text_encoder_2.config.hidden_size
        if getattr(config, "pooled_projection_dim", None) != pooled or clip > config.joint_attention_dim:
            raise UserError(f"model.teacher: an SD3 pipeline's transformer needs pooled_projection_dim {pooled} (the "
                            f"two CLIP encoders' projections) and joint_attention_dim >= {clip} (their widths); it has "
                            f"{getattr(config, 'pooled_projection_dim', None)} and "
                            f"{getattr(config, 'joint_attention_dim', None)}")
        return
    takes = getattr(config, "addition_embed_type", None) == "text_time"
    if parts.text_encoder_2 is None:
        if takes:
            raise UserError("model.teacher: the U-Net takes SDXL's pooled text embedding and micro-conditioning "
                            "(addition_embed_type text_time) but the pipeline has no text_encoder_2; allowed: an "
                            "SDXL pipeline (text_encoder_2 and tokenizer_2)")
        return
    pooled = parts.text_encoder_2.config.projection_dim
    wanted = pooled + 6 * (config.addition_time_embed_dim or 0)
    if not takes or config.projection_class_embeddings_input_dim != wanted:
        raise UserError(f"model.teacher: an SDXL pipeline's U-Net needs addition_embed_type text_time with "
                        f"projection_class_embeddings_input_dim {wanted} (text_encoder_2's {pooled} + 6 x "
                        f"addition_time_embed_dim); it has {getattr(config, 'addition_embed_type', None)} and "
                        f"{getattr(config, 'projection_class_embeddings_input_dim', None)}")


def check_resume(config: Config, plan: DataPlan) -> None:
    """``--resume`` trains on the data the run started with: an encoded cache of other data is refused."""
    cache = RunFolder.of(config).cache
    stored = cached_plan(cache)
    if plan.cache is not None and stored is not None and stored.fingerprint != plan.cache.fingerprint:
        raise UserError(f"--resume: the data or the pipeline's encoders changed since the run started (they no "
                        f"longer match {cache}); resume with the run's data, or start "
                        "a new run (another output_dir, or --overwrite without --resume)")


def open_data(config: Config, plan: DataPlan, parts: PipelineParts | None, runtime: Runtime,
              progress: bool = True) -> TrainingData:
    """What the run trains on: the images (parquet copied to a mapped Arrow file first), or the
    encoded cache, its missing shards encoded now by every process, each its share."""
    root = RunFolder.of(config).cache
    source = plan.source
    if plan.cache is None:
        if isinstance(source, TableDataset):  # random access needs mapped Arrow: the main process writes it
            runtime.on_main(lambda: source.mapped(root))
            source = source.mapped(root)
        return TrainingData(source, source, None, None)
    runtime.on_main(lambda: start_cache(root, plan.cache))
    encoding = Encoding(config.data.encode_batch_size, auto_workers(source), config.data.builtin is not None,
                        runtime.device)
    written = encode_shards(root, plan.cache, parts, source, plan.captions, plan.labels, encoding=encoding,
                            rank=runtime.rank, world_size=runtime.world_size, progress=progress and runtime.is_main)
    runtime.barrier()
    missing = incomplete_shards(root, plan.cache)
    if missing:
        raise RunError(f"the encoded cache {root} is incomplete after encoding ({', '.join(missing[:3])} missing); "
                       "run again to encode what is missing")
    dataset = EncodedDataset(root, config.data.caption_dropout)
    logger.info("data: %d latents of shape %s%s (%s)", len(dataset), plan.cache.latent_shape,
                f", {plan.cache.texts - 1} distinct captions" if plan.cache.texts else "",
                f"{written} shard(s) encoded now" if written else f"from {root}")
    return TrainingData(dataset, source, plan.captions, plan.labels)

