"""A training step of each vision stem alone, as the GPU recipe runs it: batch 64 at 384 px, bf16, 16 px patches into
512 channels, forward, a loss and its backward, eager and torch.compiled, each memory layout.

    python bench/stem_time.py                                           # on a GPU
    python bench/stem_time.py --modes compiled --layouts contiguous --cudnn-benchmark both

Prints one line per stem and variant: milliseconds a step, the mean of 20 after 3 warm-up steps.
"""

import argparse
import time

import torch

from beni_model.ocr.stem import CUTS, TextStem
from beni_model.vision import ConvStem


def step_ms(stem: torch.nn.Module, pixels: torch.Tensor, steps: int) -> float:
    for _ in range(3):
        stem(pixels).float().square().mean().backward()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        stem(pixels).float().square().mean().backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    parser.add_argument("--layouts", nargs="+", choices=("contiguous", "channels_last"), default=["contiguous", "channels_last"])
    # cuDNN's autotuner times each convolution's algorithms on the first call of a shape and keeps the fastest
    parser.add_argument("--cudnn-benchmark", choices=("off", "on", "both"), default="off")
    args = parser.parse_args()
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    stems = {"conv": lambda: ConvStem(16, 512)} | {f"ocr.{cut}": lambda cut=cut: TextStem(16, 512, cut) for cut in CUTS}
    tunes = {"off": [False], "on": [True], "both": [False, True]}[args.cudnn_benchmark]
    for name, make in stems.items():
        for layout, mode, tune in ((layouts[lay], mode, t) for lay in args.layouts for mode in args.modes for t in tunes):
            torch.backends.cudnn.benchmark = tune
            stem = make().cuda().to(torch.bfloat16).to(memory_format=layout)
            pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device="cuda", dtype=torch.bfloat16)
            ms = step_ms(torch.compile(stem) if mode == "compiled" else stem, pixels.to(memory_format=layout), args.steps)
            print(
                f"{name:12} {mode:8} {str(layout).split('.')[-1]:17} {'cudnn-benchmark' if tune else '':15} {ms:6.2f} ms/step", flush=True
            )


if __name__ == "__main__":
    main()
