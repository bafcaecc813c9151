"""Both stages' networks as ONNX files, and the adapters that run them in the test-time engine.

``cspine export-bundle WORK OUT --format onnx`` writes ``stage1.onnx`` (windowed image
(B, 1, X, Y, Z) float32 → logits (B, C, X, Y, Z)) and one ``stage2_<fold>.onnx`` per fold model
(crop channels (B, C, X, Y, Z) float32 and vertebra index (B,) int64 → fracture logit (B,)),
each with a dynamic batch axis, plus in ``bundle.json`` everything around the networks: the
stage-1 grid, HU window, flip TTA and class count, and per stage-2 model its preprocessing
(:class:`stage2_classify.transforms.Preprocess`), flip TTA and training prior. The pre- and
post-processing stays in Python (the same functions as for checkpoints), so an exported bundle
gives the checkpoints' probabilities (tests/test_export.py: to 1e-4).

:class:`OnnxStage1` and :class:`OnnxStage2` offer what :class:`cspine.engine.StudyEngine` uses of
:class:`stage1_segment.module.Stage1Module` / :class:`stage2_classify.module.CropClassifier`
(``hparams``, ``predict_probs`` / ``predict_proba``, ``preprocess``, ``prior_dict``, a device),
on ONNX Runtime's CPU (or CUDA) provider. They have no gradients: ``cspine predict`` then shows
each flagged vertebra's centre slice instead of its class-activation maximum (no `--cam`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

OPSET = 17


def export_stage1(model, path: str | os.PathLike) -> dict[str, Any]:
    """Write the stage-1 network as ONNX; returns the settings ``bundle.json`` keeps for it."""
    hp = model.hparams
    shape = hp.get("patch_size") or hp.get("grid_shape")
    if shape is None:
        raise ValueError("stage-1 export needs grid_shape (or patch_size) in the checkpoint")
    dummy = torch.zeros(1, 1, *[int(s) for s in shape])
    _export(model.net.eval(), (dummy,), path, ["image"], ["logits"],
            {"image": {0: "batch"}, "logits": {0: "batch"}})
    return {"grid_shape": hp.get("grid_shape"), "grid_spacing_mm": hp.get("grid_spacing_mm"),
            "thoracic": hp.get("thoracic", "background"), "hu_window": list(hp.hu_window),
            "tta_flip_lr": bool(hp.get("tta_flip_lr", False)),
            "patch_size": hp.get("patch_size"), "sw_overlap": hp.get("sw_overlap", 0.25),
            "num_classes": int(hp.get("num_classes", 8))}


class _Stage2Net(torch.nn.Module):
    """``CropClassifier.forward`` (network, vertebra embedding, head) as one graph."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, vertebra: torch.Tensor) -> torch.Tensor:
        return self.model(x, vertebra)


def export_stage2(model, path: str | os.PathLike, crop_shape) -> dict[str, Any]:
    """Write one stage-2 fold model as ONNX; returns its settings for ``bundle.json``."""
    channels = model.preprocess.num_channels
    dummy = (torch.zeros(2, channels, *[int(s) for s in crop_shape]),
             torch.zeros(2, dtype=torch.long))
    _export(_Stage2Net(model.eval()), dummy, path, ["x", "vertebra"], ["logit"],
            {"x": {0: "batch"}, "vertebra": {0: "batch"}, "logit": {0: "batch"}})
    return {"preprocess": model.preprocess.to_dict(), "tta_flip": bool(model.hparams.tta_flip),
            "prior": [float(p) for p in model.prior.tolist()]}


def _export(net, args, path, inputs, outputs, axes) -> None:
    from common.atomic import atomic_path

    with atomic_path(path, suffix=".onnx") as tmp, torch.no_grad():
        torch.onnx.export(net, args, str(tmp), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def _session(path: str | os.PathLike, device: str):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    threads = torch.get_num_threads()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers)


class _Hparams(dict):
    """A dict with attribute access, like a LightningModule's ``hparams``."""

    __getattr__ = dict.__getitem__


class OnnxStage1:
    """A stage-1 ONNX network with the interface the engine uses of ``Stage1Module``."""

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any], device: str = "cpu"):
        self.session = _session(path, device)
        self.hparams = _Hparams(settings)
        self.path = Path(path)

    def parameters(self) -> Iterator[torch.Tensor]:
        """One CPU tensor: the engine's inputs are made on the CPU (ONNX Runtime copies)."""
        yield torch.zeros(0)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        run = lambda t: torch.from_numpy(self.session.run(  # noqa: E731
            None, {"image": t.detach().cpu().numpy().astype(np.float32)})[0])
        if self.hparams.get("patch_size") is None:
            return run(image)
        return sliding_window_inference(image, self.hparams.patch_size, 1, run,
                                        overlap=self.hparams.sw_overlap, mode="gaussian")

    def predict_probs(self, image: torch.Tensor, tta_flip_lr: bool | None = None) -> torch.Tensor:
        """As :meth:`Stage1Module.predict_probs`."""
        from stage1_segment.module import tta_softmax

        tta = self.hparams.tta_flip_lr if tta_flip_lr is None else tta_flip_lr
        return tta_softmax(self, image, tta)


class OnnxStage2:
    """A stage-2 ONNX fold model with the interface the engine uses of ``CropClassifier``."""

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any], device: str = "cpu"):
        from stage2_classify.transforms import Preprocess

        self.session = _session(path, device)
        self.preprocess = Preprocess.from_dict(settings["preprocess"])
        self.hparams = _Hparams(tta_flip=bool(settings["tta_flip"]))
        self.prior = torch.tensor(settings["prior"], dtype=torch.float32)
        self.path = Path(path)

    def parameters(self) -> Iterator[torch.Tensor]:
        yield torch.zeros(0)

    def __call__(self, x: torch.Tensor, vertebra: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"x": np.ascontiguousarray(x.detach().cpu().numpy(), np.float32),
                                      "vertebra": vertebra.detach().cpu().numpy().astype(np.int64)})
        return torch.from_numpy(out[0])

    def predict_proba(self, x: torch.Tensor, vertebra: torch.Tensor,
                      tta_flip: bool | None = None) -> torch.Tensor:
        """As :meth:`CropClassifier.predict_proba`."""
        from stage2_classify.module import tta_sigmoid

        tta = self.hparams.tta_flip if tta_flip is None else tta_flip
        return tta_sigmoid(self, x, vertebra, tta)

    def prior_dict(self) -> dict[str, float]:
        from common.labels import TARGETS

        return {t: float(v) for t, v in zip(TARGETS, self.prior.tolist())}
