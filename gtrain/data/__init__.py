"""Data: what a dataset name means (`datasets`: the table, splits, transforms), how an image
file becomes pixels (`images`: decoding only what the crop needs, EXIF orientation) and how
images reach the model in batches (`loaders`: on the device or through DataLoaders); tar
shards read by sample index (`shards`) and written (`shard_writer`)."""

from gtrain.data.datasets import (
    DATASETS,
    IMAGE_FOLDER,
    IMAGE_FOLDER_SPEC,
    BatchAugmentation,
    DataBundle,
    DatasetInfo,
    DatasetSpec,
    Digits,
    Pipeline,
    balanced_class_weights,
    batch_mix,
    build_data,
    build_eval_data,
    check_flip_keeps_the_class,
    choose_pipeline,
    eval_transform,
    class_counts,
    item_name,
    list_datasets,
    train_labels,
    train_transform,
)

__all__ = [
    "DATASETS", "IMAGE_FOLDER", "IMAGE_FOLDER_SPEC", "BatchAugmentation", "DataBundle", "DatasetInfo", "DatasetSpec",
    "Digits", "Pipeline", "balanced_class_weights", "batch_mix", "build_data", "build_eval_data",
    "check_flip_keeps_the_class", "choose_pipeline", "class_counts", "eval_transform", "item_name", "list_datasets", "train_labels",
    "train_transform",
]  # fmt: skip
