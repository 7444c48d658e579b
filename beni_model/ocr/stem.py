"""Vision stems that learned from real text (`vision_stem: ocr.pplcnet`, `ocr.pplcnet8` or `ocr.pplcnet16`): the
first layers of PP-OCRv4's text recognizer (PaddleOCR's PPLCNetV3 backbone: 21 convolutions to its last stride-4
layer, 240 channels; two depthwise + pointwise pairs with squeeze-excite further, to stride 8 down and 4 across, 480
channels; or the whole backbone, two pairs more, to stride 16 down), frozen, then a learned patchify to the encoder's
patch grid. A conv stem trained on our corpus learns the glyphs the corpus draws; these layers learned strokes from
real text, and a reader on them reads faces and handwriting it never saw far better, the more so the deeper the cut
(bench/BENCHMARKS.md, bench/stem_probe.py).

The weights come from the recognizer's ONNX model in the `rapidocr_onnxruntime` wheel on PyPI (Apache-2.0), read with
`onnx` once, when a new model is built (`OcrExtension.start`). They are buffers, so they never train, and a saved
model keeps them: it loads without either package. The recognizer reads RGB scaled to -1..1, as SigLIP's processor
hands pixels over; an encoder whose processor normalizes otherwise feeds it slightly shifted inputs. Its
squeeze-excite gates were learned on single text lines 48 px high; on a whole image they see the mean over the page.
"""

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WHEEL = "rapidocr_onnxruntime==1.4.4"
MODEL = "models/ch_PP-OCRv4_rec_infer.onnx"

# (in, out, kernel, stride, squeeze-excite) of each depthwise + pointwise pair after the first 3x3 convolution (which
# has a BatchNorm), as the recognizer runs them (its blocks reparameterised into single convolutions); each
# convolution is followed by a learnable affine, hardswish and a learnable affine, and a pair's squeeze-excite gates
# the depthwise output's channels by their mean over the image. Text lines are wide: some strides halve one axis only.
PAIRS = [
    (16, 32, 3, (1, 1), False),
    (32, 64, 3, (1, 1), False),
    (64, 64, 3, (1, 1), False),
    (64, 128, 3, (2, 1), False),
    (128, 128, 3, (1, 1), False),
    (128, 240, 3, (1, 2), False),
    *[(240, 240, 5, (1, 1), False)] * 4,
    (240, 480, 5, (2, 1), True),
    (480, 480, 5, (1, 1), True),
    (480, 480, 5, (2, 1), False),
    (480, 480, 5, (1, 1), False),
]


@dataclass(frozen=True)
class Cut:
    """Where a stem leaves the recognizer: after its first `pairs` pairs, at graph value `last` (checked on reading)."""

    pairs: int
    last: str

    @property
    def layers(self) -> list[tuple[int, int, int, tuple[int, int], int, bool]]:
        """(in, out, kernel, stride, groups, squeeze-excite) of each convolution up to the cut."""
        return [(3, 16, 3, (2, 2), 1, False)] + [
            layer
            for c_in, c_out, k, s, se in PAIRS[: self.pairs]
            for layer in ((c_in, c_in, k, s, c_in, se), (c_in, c_out, 1, (1, 1), 1, False))
        ]

    @property
    def stride(self) -> tuple[int, int]:
        return math.prod(s[0] for *_, s, _, _ in self.layers), math.prod(s[1] for *_, s, _, _ in self.layers)


# `pplcnet`: PPLCNetV3 to its last stride-4 layer (21 convolutions, 240 channels). `pplcnet8`: two pairs further, to
# stride 8 down and 4 across (480 channels), where each position sees most of a letter. `pplcnet16`: the whole
# backbone, to stride 16 down and 4 across, what the recognizer's own sequence model reads (3 rows of a 48 px line).
CUTS = {"pplcnet": Cut(10, "p2o.Add.159"), "pplcnet8": Cut(12, "p2o.Add.199"), "pplcnet16": Cut(14, "p2o.Add.231")}


class TextStem(nn.Module):
    def __init__(self, patch_size: int, hidden_size: int, cut: str = "pplcnet"):
        super().__init__()
        self.cut = CUTS[cut]
        self.layers = self.cut.layers
        stride = self.cut.stride
        if patch_size % stride[0] or patch_size % stride[1]:
            at = f"{stride[0]}" if stride[0] == stride[1] else f"{stride[0]} down and {stride[1]} across"
            raise ValueError(
                f"vision_stem 'ocr.{cut}' ends at stride {at}: the patch size must be a multiple of {max(stride)}, not {patch_size}."
            )
        for i, (c_in, c_out, k, _, groups, se) in enumerate(self.layers):
            self.register_buffer(f"weight{i}", torch.zeros(c_out, c_in // groups, k, k))
            self.register_buffer(f"bias{i}", torch.zeros(c_out))
            if se:
                self.register_buffer(f"se_down{i}", torch.zeros(c_out // 4, c_out, 1, 1))
                self.register_buffer(f"se_down_bias{i}", torch.zeros(c_out // 4))
                self.register_buffer(f"se_up{i}", torch.zeros(c_out, c_out // 4, 1, 1))
                self.register_buffer(f"se_up_bias{i}", torch.zeros(c_out))
        self.register_buffer("affines", torch.zeros(len(self.layers) - 1, 4))  # scale, shift; scale, shift around each hardswish
        kernel = (patch_size // stride[0], patch_size // stride[1])
        self.patchify = nn.Conv2d(self.layers[-1][1], hidden_size, kernel, kernel)

    @property
    def weight(self) -> torch.Tensor:  # encoders read the patch embedding's dtype from its weight
        return self.patchify.weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        for i, (_, _, k, stride, groups, se) in enumerate(self.layers):
            x = F.conv2d(x, getattr(self, f"weight{i}"), getattr(self, f"bias{i}"), stride, k // 2, 1, groups)
            if i:
                a, b, c, d = self.affines[i - 1]
                x = c * F.hardswish(a * x + b) + d
            if se:
                gate = F.relu(F.conv2d(x.mean((2, 3), keepdim=True), getattr(self, f"se_down{i}"), getattr(self, f"se_down_bias{i}")))
                x = x * F.hardsigmoid(F.conv2d(gate, getattr(self, f"se_up{i}"), getattr(self, f"se_up_bias{i}")))
        return self.patchify(x)

    def flops(self, image_size: int) -> float:
        """Training FLOPs for one image: the frozen layers forward only, the patchify forward and its weight's gradient
        (nothing before it trains, so no gradient flows back through the frozen layers)."""
        total, height, width = 0.0, image_size, image_size
        for c_in, c_out, k, (sh, sw), groups, se in self.layers:
            height, width = -(-height // sh), -(-width // sw)
            total += 2 * k * k * c_in // groups * c_out * height * width + (2 * 2 * c_out * (c_out // 4) if se else 0)
        patch = self.patchify
        return total + 2 * 2 * patch.weight[0].numel() * patch.out_channels * (height // patch.stride[0]) * (width // patch.stride[1])

    def load_pretrained(self) -> None:
        """The frozen layers' weights from the recognizer (`pretrained_weights`)."""
        for name, value in pretrained_weights(self.cut).items():
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
def pretrained_weights(cut: Cut, path: Path | None = None) -> dict[str, torch.Tensor]:
    """TextStem's buffers from the recognizer's ONNX graph: each convolution's weight and bias (the first one's
    BatchNorm folded in, its input channels turned from the BGR it was trained on to RGB), each squeeze-excite's two
    convolutions and the scalars of each activation (x -> c * hardswish(a * x + b) + d), in graph order up to the cut."""
    import onnx
    from onnx import numpy_helper

    path = path or model_path()
    graph = onnx.load(str(path)).graph
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    consts |= {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    tensor = lambda name: torch.from_numpy(consts[name].copy()).float()  # noqa: E731
    convs, excites, scalars, strides, gated = [], [], [], [], set()
    for node in graph.node:
        if node.op_type in ("GlobalAveragePool", "Relu"):
            gated.add(node.output[0])
        if node.op_type == "Conv" and node.input[0] in gated:  # a squeeze-excite's reduce or expand
            excites.append((tensor(node.input[1]), tensor(node.input[2])))
        elif node.op_type == "Conv":
            weight = tensor(node.input[1])
            convs.append([weight, tensor(node.input[2]) if len(node.input) > 2 else torch.zeros(len(weight))])
            strides.append(tuple(next(a.ints for a in node.attribute if a.name == "strides")))
        elif node.op_type == "BatchNormalization":
            scale, shift, mean, var = (tensor(n) for n in node.input[1:])
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            factor = scale / (var + eps).sqrt()
            weight, bias = convs[-1]
            convs[-1] = [weight * factor.view(-1, 1, 1, 1), (bias - mean) * factor + shift]
        elif node.op_type == "HardSigmoid" and [round(a.f, 6) for a in node.attribute] != [round(1 / 6, 6), 0.5]:
            raise ValueError(f"{path}'s squeeze-excite gate is not hardsigmoid (x / 6 + 0.5, clipped to 0..1).")
        elif node.op_type in ("Mul", "Add"):
            scalars += [float(consts[n].reshape(-1)[0]) for n in node.input if n in consts and consts[n].size == 1]
        if node.output[0] == cut.last:
            break
    layers = cut.layers
    # Around each hardswish: a, b, then hardswish's own +3, then c, d.
    expected = [(c_out, c_in // groups, k, k) for c_in, c_out, k, _, groups, _ in layers]
    expected_excites = [
        shape for *_, c_out, _, _, _, se in layers if se for shape in ((c_out // 4, c_out, 1, 1), (c_out, c_out // 4, 1, 1))
    ]
    if (
        [tuple(w.shape) for w, _ in convs] != expected
        or [tuple(w.shape) for w, _ in excites] != expected_excites
        or len(scalars) != 5 * (len(layers) - 1)
        or scalars[2::5] != [3.0] * (len(layers) - 1)
    ):
        raise ValueError(f"{path} is not the PP-OCRv4 recognizer the ocr extension's text stems read ({WHEEL}): its first layers differ.")
    if strides != [stride for *_, stride, _, _ in layers]:
        raise ValueError(f"{path}'s strides differ from PP-OCRv4's recognizer ({WHEEL}).")
    convs[0][0] = convs[0][0].flip(1)
    weights = {f"weight{i}": w for i, (w, _) in enumerate(convs)} | {f"bias{i}": b for i, (_, b) in enumerate(convs)}
    excited = iter(excites)
    for i, layer in enumerate(layers):
        if layer[-1]:
            (down, down_bias), (up, up_bias) = next(excited), next(excited)
            weights |= {f"se_down{i}": down, f"se_down_bias{i}": down_bias, f"se_up{i}": up, f"se_up_bias{i}": up_bias}
    table = torch.tensor(scalars).view(-1, 5)
    return weights | {"affines": table[:, [0, 1, 3, 4]]}
