"""CTC for the reading heads: a loss with a hand-written backward that never waits on the device, and its passes
replayed as CUDA graphs on the GPU."""

import warnings

import torch
from torch import nn

NEVER = -1e30  # the log-probability of an impossible path: finite, so no gradient becomes NaN


def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, passes: tuple | None = None) -> torch.Tensor:
    """CTC's loss per character (class 0 is the blank), averaged over the lines that have a transcript and fit in
    the steps; log_probs [batch, steps, classes], targets [batch, width] padded, lengths [batch] (-1: no transcript,
    so no loss; 0: an empty one, all blanks, its loss taken per step). The values of
    `nn.functional.ctc_loss(..., zero_infinity=True)` on those lines (and its gradients at the logits of a
    log_softmax), computed on the device without waiting on it (PyTorch's CUDA kernel copies offsets from host
    memory with a blocking copy in forward and in backward) and with a hand-written backward: autograd through the
    per-step recursion cost the host more than the step's GPU work (bench/BENCHMARKS.md). `passes`: the forward and
    backward functions (default ctc_forward, ctc_backward; OcrExtension.to_device replays them as CUDA graphs). The
    targets are padded or cut to one width, the steps, so the passes see one shape per head: a line longer than the
    steps cannot be aligned, and is left out either way."""
    steps = log_probs.shape[1]
    targets = nn.functional.pad(targets, (0, steps - targets.shape[1]))  # a negative pad cuts
    lengths = lengths.masked_fill(lengths > steps, -1)
    return _CTC.apply(log_probs, targets, lengths, passes or (ctc_forward, ctc_backward))


def ctc_forward(log_probs: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """CTC's loss, then what ctc_backward takes from it."""
    batch, steps, _ = log_probs.shape
    labels = targets.new_zeros(batch, 2 * targets.shape[1] + 1)  # blank, c1, blank, c2, ..., blank
    labels[:, 1::2] = targets
    emit = log_probs.gather(2, labels.unsqueeze(1).expand(-1, steps, -1)).transpose(0, 1)  # [steps, batch, width]
    may_skip = torch.zeros_like(labels, dtype=torch.bool)  # from the character two back, past the blank between
    may_skip[:, 2:] = (labels[:, 2:] != 0) & (labels[:, 2:] != labels[:, :-2])
    skip_cost = torch.where(may_skip, 0.0, NEVER)
    # Log-probability of the paths up to step t that end in each position, after two positions no path reaches
    # (so the shifts are views): four kernels a step.
    alpha = emit.new_full((steps, batch, emit.shape[2] + 2), NEVER)
    alpha[0, :, 2:4] = emit[0, :, :2]
    for t in range(1, steps):
        prev = alpha[t - 1]
        torch.add(torch.logaddexp(torch.logaddexp(prev[:, 2:], prev[:, 1:-1]), prev[:, :-2] + skip_cost), emit[t], out=alpha[t, :, 2:])
    alpha = alpha[:, :, 2:]
    # Paths end on the last character or the blank after it; an empty transcript's on the one blank.
    ends = torch.stack([2 * lengths, 2 * lengths - 1], 1).clamp(min=0)
    at_ends = alpha[-1].gather(1, ends)
    at_ends[:, 1].masked_fill_(lengths <= 0, NEVER)
    likelihood = at_ends.logsumexp(1)
    counted = (lengths >= 0) & (likelihood > NEVER / 2)
    weight = counted / torch.where(lengths > 0, lengths, steps) / counted.sum().clamp(min=1)
    return -(likelihood * weight).sum(), emit, alpha, labels, skip_cost, ends, likelihood, weight


def ctc_backward(emit, alpha, labels, skip_cost, ends, likelihood, weight, grad_output: torch.Tensor, classes: int) -> torch.Tensor:
    """The loss's gradient at log_probs [batch, steps, classes], from what ctc_forward returned."""
    steps, batch, width = emit.shape
    # Log-probability of the paths from each position at step t to the end, before two positions none leaves from.
    beta = emit.new_full((steps, batch, width + 2), NEVER)
    beta[-1, :, :width].scatter_(1, ends, emit[-1].gather(1, ends))
    skip_from = nn.functional.pad(skip_cost, (0, 2), value=NEVER)[:, 2:]  # whether position s + 2 may be reached from s
    for t in range(steps - 2, -1, -1):
        after = beta[t + 1]
        torch.add(
            torch.logaddexp(torch.logaddexp(after[:, :-2], after[:, 1:-1]), after[:, 2:] + skip_from), emit[t], out=beta[t, :, :width]
        )
    beta = beta[:, :, :width]
    posterior = (alpha + beta - emit - likelihood[None, :, None]).exp().transpose(0, 1)  # [batch, steps, width]
    scale = -(grad_output * weight)[:, None, None]
    grad = emit.new_zeros(batch, steps, classes)
    return grad.scatter_add_(2, labels.unsqueeze(1).expand(-1, steps, -1), posterior * scale)


class CudaGraphed:
    """`fn` (tensors and constants in, a tensor or a tuple of them out, no waiting on the device) replayed as one CUDA
    graph per shape of its inputs: captured on first use after a warm-up run; each call copies its inputs into the
    graph's buffers, launches the graph once and hands back copies of its outputs."""

    def __init__(self, fn):
        self.fn, self.graphs = fn, {}

    def __call__(self, *args):
        key = tuple((a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)
        if key not in self.graphs:
            try:
                self.graphs[key] = self.capture(args)
            except RuntimeError as error:  # a capture CUDA refuses costs launches, not the run
                warnings.warn(f"{self.fn.__name__} runs eagerly at {key}: its CUDA graph capture failed: {error}", stacklevel=2)
                self.graphs[key] = None
        if self.graphs[key] is None:
            return self.fn(*args)
        graph, inputs, outputs = self.graphs[key]
        for buffer, arg in zip(inputs, args):
            if isinstance(arg, torch.Tensor):
                buffer.copy_(arg)
        graph.replay()
        return outputs.clone() if isinstance(outputs, torch.Tensor) else tuple(o.clone() for o in outputs)

    def capture(self, args: tuple) -> tuple:
        inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread may allocate while the backward pass captures in autograd's
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self.fn(*inputs)
        return graph, inputs, outputs


class _CTC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_probs, targets, lengths, passes):
        loss, *saved = passes[0](log_probs, targets, lengths)
        ctx.save_for_backward(*saved)
        ctx.backward_pass, ctx.classes = passes[1], log_probs.shape[2]
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return ctx.backward_pass(*ctx.saved_tensors, grad_output, ctx.classes), None, None, None
