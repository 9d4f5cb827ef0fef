"""The micro Med-VLM the project pretrains itself (docs/demo.md): captions, which images it may see,
the pretraining loop and its model folder."""

from calibprompt.data.medmnist_files import find_medmnist
from calibprompt.pretrain.captions import TASKS, TaskText, class_captions, task_text
from calibprompt.pretrain.loop import PretrainSettings, multi_positive_clip_loss, pretrain_micro, zero_shot_accuracy
from calibprompt.pretrain.model import (
    DEFAULT_SOURCES,
    META_FILE,
    MODEL_PREFIX,
    ensure_model,
    micro_model_cfg,
    model_dir,
    read_meta,
    save_model,
)
from calibprompt.pretrain.sources import downstream_pool, medmnist_data_cfg, pretrain_samples, reserve_size, train_part
from calibprompt.pretrain.threads import ThreadTuner

__all__ = [
    "DEFAULT_SOURCES", "META_FILE", "MODEL_PREFIX", "PretrainSettings", "TASKS", "TaskText", "ThreadTuner", "class_captions",
    "downstream_pool", "ensure_model", "find_medmnist", "medmnist_data_cfg", "micro_model_cfg", "model_dir",
    "multi_positive_clip_loss", "pretrain_micro", "pretrain_samples", "read_meta", "reserve_size", "save_model",
    "task_text", "train_part", "zero_shot_accuracy",
]
