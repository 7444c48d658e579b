"""A training step of each vision stem alone, as the GPU recipe runs it: batch 64 at 384 px, bf16, 16 px patches into
512 channels, forward, a loss and its backward, eager and torch.compiled, each memory layout.

    python bench/stem_time.py            # on a GPU

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
    args = parser.parse_args()
    stems = {"conv": lambda: ConvStem(16, 512)} | {f"ocr.{cut}": lambda cut=cut: TextStem(16, 512, cut) for cut in CUTS}
    for name, make in stems.items():
        for layout in (torch.contiguous_format, torch.channels_last):
            for compiled in (False, True):
                stem = make().cuda().to(torch.bfloat16).to(memory_format=layout)
                pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device="cuda", dtype=torch.bfloat16)
                ms = step_ms(torch.compile(stem) if compiled else stem, pixels.to(memory_format=layout), args.steps)
                print(f"{name:12} {'compiled' if compiled else 'eager':8} {str(layout).split('.')[-1]:17} {ms:6.2f} ms/step", flush=True)


if __name__ == "__main__":
    main()
