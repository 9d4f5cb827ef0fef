"""Taking a tuned model to new images: export a run, predict on files, a scikit-learn-style classifier.

``export_run(run_dir, out)`` writes one safetensors file (head, calibrator, class names, backbone identity,
conformal and abstention thresholds); ``load_model`` reads and validates it; ``predict_files`` applies it;
``CalibPromptClassifier`` fits, predicts and saves in the same format (docs/deploy.md).
"""

from calibprompt.deploy.classifier import CalibPromptClassifier
from calibprompt.deploy.model import DeployedModel, ModelFileError, export_run, load_model
from calibprompt.deploy.predict import image_files, predict_files, render

__all__ = ["CalibPromptClassifier", "DeployedModel", "ModelFileError", "export_run", "image_files", "load_model",
           "predict_files", "render"]
