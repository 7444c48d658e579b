"""A vision stem that learned from real text (`vision_stem: ocr.pplcnet`): the first 21 convolutions of PP-OCRv4's
text recognizer (PaddleOCR's PPLCNetV3 backbone up to its last stride-4 layer, 240 channels), frozen, then a learned
patchify to the encoder's patch grid. A conv stem trained on our corpus learns the glyphs the corpus draws; these
layers learned strokes from real text, and a reader on them reads faces and handwriting it never saw far better
(bench/BENCHMARKS.md, bench/stem_probe.py).

The weights come from the recognizer's ONNX model in the `rapidocr_onnxruntime` wheel on PyPI (Apache-2.0), read with
`onnx` once, when a new model is built (`OcrExtension.start`). They are buffers, so they never train, and a saved
model keeps them: it loads without either package. The recognizer reads RGB scaled to -1..1, as SigLIP's processor
hands pixels over; an encoder whose processor normalizes otherwise feeds it slightly shifted inputs.
"""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WHEEL = "rapidocr_onnxruntime==1.4.4"
MODEL = "models/ch_PP-OCRv4_rec_infer.onnx"
STRIDE = 4
LAST = "p2o.Add.159"  # the graph's value after the 21st convolution's activation: the last at stride 4

# (in, out, kernel, stride, groups) of each convolution, as the recognizer runs them (its blocks reparameterised into
# single convolutions): a 3x3 with BatchNorm, then ten depthwise + pointwise pairs, each convolution followed by a
# learnable affine, hardswish and a learnable affine. Text lines are wide: two of its strides halve one axis only.
PAIRS = [
    (16, 32, 3, (1, 1)),
    (32, 64, 3, (1, 1)),
    (64, 64, 3, (1, 1)),
    (64, 128, 3, (2, 1)),
    (128, 128, 3, (1, 1)),
    (128, 240, 3, (1, 2)),
    *[(240, 240, 5, (1, 1))] * 4,
]
LAYERS = [(3, 16, 3, (2, 2), 1)] + [
    layer for c_in, c_out, k, s in PAIRS for layer in ((c_in, c_in, k, s, c_in), (c_in, c_out, 1, (1, 1), 1))
]


class TextStem(nn.Module):
    def __init__(self, patch_size: int, hidden_size: int):
        super().__init__()
        if patch_size % STRIDE:
            raise ValueError(
                f"vision_stem 'ocr.pplcnet' ends at stride {STRIDE}: the patch size must be a multiple of {STRIDE}, not {patch_size}."
            )
        for i, (c_in, c_out, k, _, groups) in enumerate(LAYERS):
            self.register_buffer(f"weight{i}", torch.zeros(c_out, c_in // groups, k, k))
            self.register_buffer(f"bias{i}", torch.zeros(c_out))
        self.register_buffer("affines", torch.zeros(len(LAYERS) - 1, 4))  # scale, shift; scale, shift around each hardswish
        self.patchify = nn.Conv2d(LAYERS[-1][1], hidden_size, patch_size // STRIDE, patch_size // STRIDE)

    @property
    def weight(self) -> torch.Tensor:  # encoders read the patch embedding's dtype from its weight
        return self.patchify.weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        for i, (_, _, k, stride, groups) in enumerate(LAYERS):
            x = F.conv2d(x, getattr(self, f"weight{i}"), getattr(self, f"bias{i}"), stride, k // 2, 1, groups)
            if i:
                a, b, c, d = self.affines[i - 1]
                x = c * F.hardswish(a * x + b) + d
        return self.patchify(x)

    def flops(self, image_size: int) -> float:
        """Training FLOPs for one image: the frozen layers forward only, the patchify forward and its weight's gradient
        (nothing before it trains, so no gradient flows back through the frozen layers)."""
        total, height, width = 0.0, image_size, image_size
        for c_in, c_out, k, (sh, sw), groups in LAYERS:
            height, width = -(-height // sh), -(-width // sw)
            total += 2 * k * k * c_in // groups * c_out * height * width
        patch = self.patchify
        return total + 2 * 2 * patch.weight[0].numel() * patch.out_channels * (height // patch.stride[0]) * (width // patch.stride[1])

    def load_pretrained(self) -> None:
        """The frozen layers' weights from the recognizer (`pretrained_weights`)."""
        for name, value in pretrained_weights().items():
            getattr(self, name).copy_(value)


def model_path() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # finds the package without importing it (onnxruntime, cv2)
    path = Path(spec.submodule_search_locations[0]) / MODEL if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"vision_stem 'ocr.pplcnet' starts from PP-OCRv4's text recognizer in the {WHEEL} wheel: pip install --no-deps {WHEEL}"
        )
    return path


@torch.no_grad()
def pretrained_weights(path: Path | None = None) -> dict[str, torch.Tensor]:
    """TextStem's buffers from the recognizer's ONNX graph: each convolution's weight and bias (the first one's
    BatchNorm folded in, its input channels turned from the BGR it was trained on to RGB) and the scalars of each
    activation (x -> c * hardswish(a * x + b) + d), in graph order up to LAST."""
    import onnx
    from onnx import numpy_helper

    path = path or model_path()
    graph = onnx.load(str(path)).graph
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    consts |= {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    tensor = lambda name: torch.from_numpy(consts[name].copy()).float()  # noqa: E731
    convs, scalars, strides = [], [], []
    for node in graph.node:
        if node.op_type == "Conv":
            weight = tensor(node.input[1])
            convs.append([weight, tensor(node.input[2]) if len(node.input) > 2 else torch.zeros(len(weight))])
            strides.append(tuple(next(a.ints for a in node.attribute if a.name == "strides")))
        elif node.op_type == "BatchNormalization":
            scale, shift, mean, var = (tensor(n) for n in node.input[1:])
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            factor = scale / (var + eps).sqrt()
            weight, bias = convs[-1]
            convs[-1] = [weight * factor.view(-1, 1, 1, 1), (bias - mean) * factor + shift]
        elif node.op_type in ("Mul", "Add"):
            scalars += [float(consts[n].reshape(-1)[0]) for n in node.input if n in consts and consts[n].size == 1]
        if node.output[0] == LAST:
            break
    # Around each hardswish: a, b, then hardswish's own +3, then c, d.
    expected = [(c_out, c_in // groups, k, k) for c_in, c_out, k, _, groups in LAYERS]
    if (
        [tuple(w.shape) for w, _ in convs] != expected
        or len(scalars) != 5 * (len(LAYERS) - 1)
        or scalars[2::5] != [3.0] * (len(LAYERS) - 1)
    ):
        raise ValueError(f"{path} is not the PP-OCRv4 recognizer vision_stem 'ocr.pplcnet' reads ({WHEEL}): its first layers differ.")
    if strides != [stride for *_, stride, _ in LAYERS]:
        raise ValueError(f"{path}'s strides differ from PP-OCRv4's recognizer ({WHEEL}).")
    convs[0][0] = convs[0][0].flip(1)
    weights = {f"weight{i}": w for i, (w, _) in enumerate(convs)} | {f"bias{i}": b for i, (_, b) in enumerate(convs)}
    table = torch.tensor(scalars).view(-1, 5)
    return weights | {"affines": table[:, [0, 1, 3, 4]]}
