"""Quantized exports of a saved beni model, each loaded back in a fresh process and re-scored on an eval set.

Schemes quantize the LLM's linear layers; the vision tower, the connector, the extensions and the output head stay
in full precision. Each export is a save_pretrained folder (safetensors, the quantization config inside config.json) that
`BeniForConditionalGeneration.from_pretrained` loads as it is:
- `nf4`: bitsandbytes 4-bit NormalFloat with double quantization (QLoRA's format);
- `int8`: bitsandbytes LLM.int8();
- `torchao-int8`: torchao int8 weight-only, per-channel scales (pure PyTorch kernels: CPU and GPU alike).
bitsandbytes 0.48+ runs both of its schemes on CPU too; where a scheme cannot run on this machine it is skipped
with the reason (see `unavailable`).
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, TorchAoConfig

from beni_model.evaluate import EvalSettings, default_device, evaluate, load_for_eval
from beni_model.export import export_llava
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.processing import load_processor

SCHEMES = ("nf4", "int8", "torchao-int8")
KEEP_FULL_PRECISION = ["vision_tower", "connector", "extensions", "lm_head"]
LIBRARY = {"nf4": "bitsandbytes", "int8": "bitsandbytes", "torchao-int8": "torchao"}


class ExportError(RuntimeError):
    """An export that must not ship: it did not quantize, did not load back, or did not generate."""


@dataclass(frozen=True)
class QuantizeSettings:
    schemes: tuple[str, ...] = SCHEMES
    llava: bool = True  # also write (and score) the LLaVA-format export where the model's parts allow it
    eval: EvalSettings = field(default_factory=EvalSettings)


def compute_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def quantization_config(scheme: str, device: str):
    if scheme == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(device),
            llm_int8_skip_modules=KEEP_FULL_PRECISION,
        )
    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP_FULL_PRECISION)
    if scheme == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=KEEP_FULL_PRECISION)
    raise ValueError(f"Unknown quantization scheme {scheme!r}: use one of {list(SCHEMES)}.")


def unavailable(scheme: str, device: str) -> str | None:
    """Why `scheme` cannot run on `device` on this machine, or None. Found out by quantizing and running a tiny
    LLM through the same transformers path the export takes."""
    library = LIBRARY.get(scheme)
    if library is None:
        raise ValueError(f"Unknown quantization scheme {scheme!r}: use one of {list(SCHEMES)}.")
    try:
        __import__(library)
    except ImportError:
        return f"{library} is not installed (pip install {library})."
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                tmp, quantization_config=quantization_config(scheme, device), device_map=device, dtype=compute_dtype(device)
            )
            model(torch.tensor([[1, 2, 3]], device=device))
        except Exception as e:  # noqa: BLE001 (a probe: any failure means "not here")
            return f"{scheme} does not run on {device} with {library} here: {str(e).splitlines()[0] if str(e) else type(e).__name__}."
    return None


def quantized_linears(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers whose weights are stored quantized: integer storage or a quantized tensor type."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (not module.weight.is_floating_point() or type(module.weight) not in (torch.nn.Parameter, torch.Tensor))
    ]


def weights_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def export_quantized(model_dir: str | Path, out_dir: str | Path, scheme: str, device: str | None = None) -> Path:
    """Quantize the saved model's LLM with `scheme` and save the whole model (and its processor) to `out_dir`."""
    device = device or default_device()
    model = BeniForConditionalGeneration.from_pretrained(
        model_dir,
        quantization_config=quantization_config(scheme, device),
        device_map=device,
        dtype=compute_dtype(device),
        freeze_vision=True,
        freeze_connector=True,
        freeze_text=True,  # an inference export; frozen also loads back as-is
    )
    check_quantized(model, scheme, model_dir)
    shutil.rmtree(out_dir, ignore_errors=True)  # no stale shard of an earlier export survives
    model.save_pretrained(out_dir)
    load_processor(model_dir, model.config).save_pretrained(out_dir)
    return Path(out_dir)


def check_quantized(model, scheme: str, where) -> None:
    layers = quantized_linears(model)
    if not layers:
        raise ExportError(f"The {scheme} export of {where} holds no quantized layer: the quantizer skipped the whole LLM.")
    stray = [n for n in layers if not n.startswith("language_model.") or n.startswith("language_model.lm_head")]
    if stray:
        raise ExportError(f"The {scheme} export of {where} quantized layers that must stay in full precision: {stray[:3]}.")


# ---------------------------------------------------------------- scoring, in a fresh process


def score_exports(
    exports: dict[str, Path], eval_json: str | Path, image_root: str | Path, out_dir: str | Path, settings: EvalSettings, device: str
) -> list[dict]:
    """Load each export from disk and score it (the body of the fresh process): size, load time, tokens/s, score.
    A failure is recorded as the export's `error` and the others still run."""
    # Import the quantization libraries before any clock starts, so no export's load time pays for them.
    for library in {LIBRARY[name] for name in exports if name in LIBRARY}:
        __import__(library)
    results = []
    for name, folder in exports.items():
        row, model = {"name": name, "path": str(folder), "size_mb": round(weights_bytes(folder) / 1e6, 3)}, None
        try:
            start = time.perf_counter()
            model, tokenizer = load_for_eval(folder, device)
            row["load_s"] = round(time.perf_counter() - start, 3)
            row["quantized_layers"] = len(quantized_linears(model))
            if name in SCHEMES:
                check_quantized(model, name, folder)
            result = evaluate(model, tokenizer, eval_json, image_root, Path(out_dir) / name, settings, title=f"{name} export")
            summary = result.summary
            if summary["generated_tokens"] == 0:
                raise ExportError(f"The {name} export generated no token.")
            row.update(
                {k: summary[k] for k in ("correct", "total", "accuracy", "tokens_per_s", "samples_per_s")}, report=str(result.report)
            )
        except Exception as e:  # noqa: BLE001 (recorded, then raised in the parent with the export's name)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        results.append(row)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def score_in_fresh_process(exports: dict[str, Path], eval_json, image_root, out_dir, settings: EvalSettings, device: str) -> list[dict]:
    """Run `score_exports` in a new Python process, so every export loads from its files alone."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    request = out_dir / "request.json"
    request.write_text(
        json.dumps(
            {
                "exports": {k: str(v) for k, v in exports.items()},
                "eval_json": str(eval_json),
                "image_root": str(image_root),
                "out_dir": str(out_dir),
                "settings": {"batch_size": settings.batch_size, "max_new_tokens": settings.max_new_tokens},
                "device": device,
            }
        )
    )
    done = subprocess.run([sys.executable, "-m", "beni_model.quantize", str(request)], capture_output=True, text=True, check=False)
    results_file = out_dir / "results.json"
    if done.returncode != 0 or not results_file.is_file():
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"Scoring the exports in a fresh process failed (exit {done.returncode}): {tail[0]}")
    return json.loads(results_file.read_text())


def raise_if_broken(rows: list[dict]) -> None:
    broken = [r for r in rows if "error" in r]
    if broken:
        r = broken[0]
        raise ExportError(f"The {r['name']} export at {r['path']} is broken: {r['error']}")


@dataclass
class ExportReport:
    rows: list[dict]  # one per scored folder, the reference first, with score_delta against it
    skipped: dict[str, str]  # scheme (or "llava") -> why it was not exported


def export_all(
    model_dir: str | Path,
    out_dir: str | Path,
    eval_json: str | Path,
    image_root: str | Path,
    settings: QuantizeSettings = QuantizeSettings(),
    device: str | None = None,
) -> ExportReport:
    """Every scheme's export (and the LLaVA one) under out_dir/<name>, scored in a fresh process against the
    unquantized model. Raises ExportError, naming the export, if any export is broken."""
    device, out_dir = device or default_device(), Path(out_dir)
    exports, skipped = {"reference": Path(model_dir)}, {}
    for scheme in settings.schemes:
        reason = unavailable(scheme, device)
        if reason:
            skipped[scheme] = reason
        else:
            exports[scheme] = export_quantized(model_dir, out_dir / scheme, scheme, device)
    if settings.llava:
        model = BeniForConditionalGeneration.from_pretrained(model_dir, freeze_vision=True, freeze_connector=True, freeze_text=True)
        shutil.rmtree(out_dir / "llava", ignore_errors=True)
        try:
            exports["llava"] = export_llava(model, out_dir / "llava", load_processor(model_dir, model.config))
        except ValueError as e:  # the parts do not fit LLaVA's layout; the message says which
            skipped["llava"] = str(e)
        del model
    rows = score_in_fresh_process(exports, eval_json, image_root, out_dir / "scores", settings.eval, device)
    raise_if_broken(rows)
    reference = rows[0]
    for r in rows:
        r["score_delta"] = r["correct"] - reference["correct"]
        r["size_ratio"] = round(r["size_mb"] / reference["size_mb"], 3)
    return ExportReport(rows, skipped)


def main() -> None:
    parser = argparse.ArgumentParser(description="Score saved exports (the fresh process of export_all).")
    parser.add_argument("request", help="request.json written by score_in_fresh_process")
    request = json.loads(Path(parser.parse_args().request).read_text())
    exports = {k: Path(v) for k, v in request["exports"].items()}
    rows = score_exports(
        exports, request["eval_json"], request["image_root"], request["out_dir"], EvalSettings(**request["settings"]), request["device"]
    )
    (Path(request["out_dir"]) / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
