"""Where should an image's reads sit for a from-scratch LLM to copy them? The `tiny` recipe's LLM alone (the 2-layer
tiny-llama, built here) learns to answer a digit string (5 to 12 digits) from its reads: 16 image vectors (random,
as an untrained connector's), then 32 read slots (the ocr extension's `collapsed` tokens: each digit's own embedding,
a learned blank after the last), in the chat template with one of the demo corpus's nine digit questions. The answer
is trained one token per digit, as `OcrExtension.reply_ids` spells it.

- `--layout first`: the image before the question, as a prompt usually puts it: read i sits a question's length
  (which varies) before answer digit i, so the LLM must find each read by its content;
- `--layout last`: the image after the question (`BeniConfig.images_last`): read i sits a fixed distance before
  answer digit i.

    python bench/copy_probe.py --layout last --steps 400 --seed 0
    python bench/copy_probe.py --layout first --steps 400 --seed 0

Prints, every 50 steps, the loss and how many of 50 held-out strings greedy decoding copies exactly; at the end a
few of the misses. One CPU thread, seconds per 100 steps.
"""

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from beni_model.tiny import tiny_llm
from beni_pipeline.prep.synthetic import KIND_QUESTIONS

IMAGE_TOKENS, READ_SLOTS = 16, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=("first", "last"), required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-tokens", type=int, default=IMAGE_TOKENS)
    parser.add_argument("--image-norm", type=float, default=0.0, help="each image vector's norm (0: the token embeddings' scale)")
    parser.add_argument("--misread", type=float, default=0.0, help="chance that a read is another digit than the answer's")
    parser.add_argument("--cosine", action="store_true", help="the trainer's schedule: cosine from --lr to a tenth over --steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = tiny_llm(Path(tempfile.mkdtemp()) / "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM.from_pretrained(folder)
    table = model.get_input_embeddings()
    digits = [tokenizer.encode(c)[0] for c in "0123456789"]
    blank = torch.nn.Parameter(table.weight[digits].mean(0).detach().clone())  # as the ocr extension starts its blank
    questions = [tokenizer.encode(q) for q in KIND_QUESTIONS["digits"]]
    user, turn_end, end = (
        tokenizer.encode("<|im_start|>user\n"),
        tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n"),
        tokenizer.encode("<|im_end|>"),
    )
    line_break = tokenizer.encode("\n")

    def embed(ids: list[int]) -> torch.Tensor:
        return table(torch.tensor(ids, dtype=torch.long))

    def sample(rng: random.Random) -> tuple[list[int], list[int], torch.Tensor]:
        string = [digits[rng.randrange(10)] for _ in range(rng.randint(5, 12))]
        image = torch.randn(args.image_tokens, table.weight.shape[1], generator=torch.Generator().manual_seed(rng.getrandbits(32)))
        image = image * table.weight.std() if not args.image_norm else torch.nn.functional.normalize(image, dim=-1) * args.image_norm
        return string, rng.choice(questions), image

    def prompt(string: list[int], question: list[int], image: torch.Tensor) -> torch.Tensor:
        noise = random.Random(hash((tuple(string), float(image[0, 0]))))
        string = [digits[noise.randrange(10)] if noise.random() < args.misread else d for d in string]
        reads = torch.cat([embed(string), blank[None].expand(READ_SLOTS - len(string), -1)])
        if args.layout == "first":
            return torch.cat([embed(user), image, reads, embed(line_break + question), embed(turn_end)])
        return torch.cat([embed(user + question + line_break), image, reads, embed(turn_end)])

    def greedy(string, question, image) -> list[int]:
        inputs, out = prompt(string, question, image)[None], []
        for _ in range(len(string) + 1):
            out.append(int(model(inputs_embeds=inputs).logits[0, -1].argmax()))
            if out[-1] == end[0]:
                break
            inputs = torch.cat([inputs, embed([out[-1]])[None]], 1)
        return out

    rng, held_out = random.Random(args.seed), [sample(random.Random(10_000 + i)) for i in range(50)]
    optimizer = torch.optim.AdamW(list(model.parameters()) + [blank], lr=args.lr)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows, labels = [], []
        for string, question, image in (sample(rng) for _ in range(args.batch)):
            given = prompt(string, question, image)
            rows.append(torch.cat([given, embed(string + end)]))
            labels.append([-100] * len(given) + string + end)
        width = max(len(r) for r in rows)
        inputs = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, width - len(r))) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        targets = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        for group in optimizer.param_groups:
            cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)) if args.cosine else 1.0
            group["lr"] = args.lr * min(1, step / 20) * cosine
        loss = model(inputs_embeds=inputs, attention_mask=mask, labels=targets).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 and step != args.steps:
            continue
        with torch.no_grad():
            answers = [(greedy(*item), item[0] + end) for item in held_out]
        exact = sum(got == want for got, want in answers)
        print(
            f"layout={args.layout} seed={args.seed} step={step} loss={loss.item():.3f} exact={exact}/50 {time.perf_counter() - start:.0f}s",
            flush=True,
        )
    for got, want in [(g, w) for g, w in answers if g != w][:4]:
        print(f"  wanted {tokenizer.decode(want)!r}, got {tokenizer.decode(got)!r}")


if __name__ == "__main__":
    main()
