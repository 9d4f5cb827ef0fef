"""How the micro model's captions describe each dataset: a zero-shot template, caption templates per
modality and paraphrases of each class description (used for pretraining and the demo's prompts)."""

from __future__ import annotations

from dataclasses import dataclass, field

@dataclass(frozen=True)
class TaskText:
    """How a dataset is described in text: its zero-shot template, caption templates (each with one
    "{}") and, per class name, paraphrases of the class description."""

    modality: str
    zero_shot: str
    templates: tuple[str, ...]
    descriptions: dict[str, tuple[str, ...]] = field(default_factory=dict)


_CHEST = (
    "a chest x-ray showing {}.", "a chest radiograph with {}.", "chest x-ray: {}.",
    "a frontal chest x-ray of a child with {}.", "paediatric chest radiograph, {}.",
    "an x-ray image of the chest showing {}.", "a chest x-ray with findings of {}.",
    "radiograph of the lungs: {}.",
)
_BREAST = (
    "a breast ultrasound image showing {}.", "breast ultrasound: {}.", "an ultrasound scan of the breast with {}.",
    "a sonogram of the breast showing {}.", "breast sonography, {}.", "an ultrasound image of breast tissue with {}.",
    "a breast ultrasound with findings of {}.", "ultrasound of the breast: {}.",
)

TASKS: dict[str, TaskText] = {
    "pneumoniamnist": TaskText(
        "chest X-ray", "A chest X-ray image of a {} patient.", _CHEST, {
            "normal": ("normal", "normal lungs", "no pneumonia", "clear lungs", "no acute findings",
                       "healthy lungs", "no consolidation", "no signs of infection"),
            "pneumonia": ("pneumonia", "signs of pneumonia", "lung consolidation", "lung opacity",
                          "a pulmonary infection", "infiltrates in the lungs", "bacterial or viral pneumonia",
                          "pneumonic opacities"),
        }),
    "breastmnist": TaskText(
        "breast ultrasound", "A breast ultrasound image showing {} tissue.", _BREAST, {
            "malignant": ("malignant", "a malignant tumour", "breast cancer", "a malignant lesion",
                          "a suspicious irregular mass", "carcinoma", "malignant tissue"),
            "normal, benign": ("normal, benign", "a benign lesion", "normal breast tissue", "no malignancy",
                               "a benign mass", "a benign cyst or fibroadenoma", "normal, benign tissue"),
        }),
}

TASKS["retinamnist"] = TaskText(
    "retinal fundus", "A retinal fundus photograph with diabetic retinopathy grade {}.", (
        "a retinal fundus photograph with diabetic retinopathy grade {}.", "fundus image, retinopathy grade {}.",
        "a colour fundus photo of diabetic retinopathy grade {}.", "retina: diabetic retinopathy severity {}.",
        "an eye fundus image graded {} for diabetic retinopathy.", "grade {} diabetic retinopathy in a fundus image.",
    ), {str(k): (str(k),) for k in range(5)})

# Modality of the other 2D single-label MedMNIST subsets (captions then use the class name only).
MODALITIES = {
    "pathmnist": "colon pathology", "dermamnist": "dermatoscopic", "octmnist": "retinal OCT",
    "retinamnist": "retinal fundus", "bloodmnist": "blood cell microscopy", "tissuemnist": "kidney cortex microscopy",
    "organamnist": "abdominal CT", "organcmnist": "abdominal CT", "organsmnist": "abdominal CT",
}
_GENERIC = (
    "a {m} image of {}.", "{m} image: {}.", "a {m} image showing {}.", "an example of {} in a {m} image.",
    "a {m} scan of {}.", "{m}, {}.", "a medical image of {}.", "an image showing {}.",
)


def task_text(name: str) -> TaskText:
    """Text description of dataset ``name`` (a MedMNIST flag, else a generic medical one)."""
    from calibprompt.data.medmnist import parse_flag

    try:
        flag = parse_flag(name)[0]
    except ValueError:
        flag = name.lower()
    if flag in TASKS:
        return TASKS[flag]
    modality = MODALITIES.get(flag, "medical")
    zero_shot = f"A {modality} image of {{}}."
    templates = tuple(t.replace("{m}", modality) for t in _GENERIC)
    return TaskText(modality, zero_shot, templates)


def class_captions(text: TaskText, classname: str, template: str | None = None) -> list[str]:
    """Caption paraphrases of one class: every template x every description, plus the dataset's
    zero-shot prompt and the bare class name, deduplicated, lower-case."""
    descriptions = text.descriptions.get(classname, ()) or (classname, f"findings of {classname}",
                                                           f"a case of {classname}")
    if classname not in descriptions:
        descriptions = (classname, *descriptions)
    out = [t.format(d) for t in text.templates for d in descriptions]
    out += [(template or text.zero_shot).format(classname), f"{classname}."]
    return list(dict.fromkeys(c.lower() for c in out))
