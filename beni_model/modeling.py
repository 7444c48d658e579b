"""BeniForConditionalGeneration: vision tower -> connector -> causal LLM, with image features spliced in
wherever the image token stands in the prompt."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, BitsAndBytesConfig, PreTrainedModel, StaticCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from beni_model.config import BeniConfig
from beni_model.connectors import build_connector
from beni_model.extensions import extension_class
from beni_model.vision import VisionTower, vision_encoder_from_config, vision_encoder_from_pretrained


@dataclass
class BeniOutput(CausalLMOutputWithPast):
    extension_losses: dict[str, torch.FloatTensor] | None = None  # each extension's loss, where the batch has its targets


class BeniForConditionalGeneration(PreTrainedModel):
    config_class = BeniConfig
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config: BeniConfig):
        super().__init__(config)
        self.vision_tower = VisionTower(config, vision_encoder_from_config(config.vision_config, config.vision_stem))
        # Built right after the vision tower: a seed initialises the same weights as when the heads lived in it.
        self.extensions = nn.ModuleDict({name: extension_class(name)(config, settings) for name, settings in config.extensions.items()})
        self.connector = build_connector(config.connector_spec, config.vision_config.hidden_size, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self._decode_cache = self._compiled_decode = None  # greedy_generate's, made on first use
        self.post_init()
        self.apply_freeze_flags()

    @classmethod
    def from_parts(cls, config: BeniConfig, tokenizer, dtype: torch.dtype | None = None, load_in_4bit: bool = False):
        """Build a new model from pretrained parts: the encoder from `config.vision_model` and the LLM from
        `config.text_model` where given (else random init from the nested configs), a fresh connector, and the
        LLM's embeddings grown to hold `tokenizer`'s image token (see `chat.load_tokenizer`).

        `load_in_4bit` loads the LLM as NF4 through bitsandbytes for QLoRA (needs a CUDA GPU).
        """
        image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {config.image_token!r} token: load it with beni_model.chat.load_tokenizer.")
        if load_in_4bit and not torch.cuda.is_available():
            raise RuntimeError("load_in_4bit (QLoRA) needs a CUDA GPU; train in bf16 or with plain LoRA on this machine.")
        config.extensions = {name: extension_class(name).prepare(settings, tokenizer) for name, settings in config.extensions.items()}
        model = cls(config)
        if config.vision_model:
            model.vision_tower.encoder = vision_encoder_from_pretrained(config.vision_model, config.vision_config)
        if config.text_model:
            quantization = None
            if load_in_4bit:
                # Storage dtype equal to the compute dtype so FSDP sees one dtype per flat shard.
                quantization = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16,
                    bnb_4bit_quant_storage=torch.bfloat16,
                )
            model.language_model = AutoModelForCausalLM.from_pretrained(
                config.text_model,
                config=config.text_config,
                dtype=dtype,
                quantization_config=quantization,
                device_map={"": 0} if load_in_4bit else None,
            )
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        config.text_config = model.language_model.config
        config.image_token_id = image_token_id
        for extension in model.extensions.values():
            extension.start(model)
        if dtype is not None:
            for part in (model.vision_tower, model.connector, model.extensions):
                part.to(dtype)
            if not load_in_4bit:
                model.language_model.to(dtype)
        if load_in_4bit:
            for part in (model.vision_tower, model.connector, model.extensions):
                part.cuda()
        model.apply_freeze_flags()
        return model

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.apply_freeze_flags()  # loading swaps in fresh Parameters, which require grad
        return model

    def apply_freeze_flags(self) -> None:
        for part, frozen in (
            ("vision_tower", self.config.freeze_vision),
            ("connector", self.config.freeze_connector),
            ("language_model", self.config.freeze_text),
        ):
            for param in self.part_parameters(part):
                param.requires_grad_(not frozen and param.is_floating_point())  # quantized weights never train

    def part_parameters(self, part: str) -> list[nn.Parameter]:
        """A core part's parameters and the extensions' that follow it (Extension.part_of)."""
        params = list(getattr(self, part).parameters())
        for extension in self.extensions.values():
            params += [p for name, p in extension.named_parameters() if extension.part_of(name.split(".")[0]) == part]
        return params

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def embed(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features written over the image-token positions.

        `pixel_values` holds the batch's images in reading order: sample 0's images first, each sample's in the
        order its image tokens appear; text-only samples contribute none.
        """
        return self.merge(input_ids, self.vision_features(pixel_values))

    def vision_features(self, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        """The vision tower's output for the batch's images; None for a batch without images."""
        return self.vision_tower(pixel_values) if pixel_values is not None and pixel_values.shape[0] > 0 else None

    def merge(self, input_ids: torch.LongTensor, vision_features: torch.Tensor | None) -> torch.Tensor:
        """`embed` from the vision tower's output for the batch's images (None: no images)."""
        embeds = self.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.config.image_token_id
        features = None
        if vision_features is not None:
            features = self.connector(vision_features)
            extra = [e.image_embeddings(self, vision_features) for e in self.extensions.values()]
            features = torch.cat([features, *(x.to(features.dtype) for x in extra if x is not None)], dim=1)
        # Counting the mask waits on the GPU, which would stall every training step: train_step checks its batches
        # on the host instead.
        if not (self.training and input_ids.is_cuda):
            check_image_tokens(int(image_mask.sum()), *(features.shape[:2] if features is not None else (0, 0)))
        if features is None:
            return embeds
        # Positions found with a known count and written by index: masked_scatter's backward (masked_select) waits on
        # the GPU for its output size.
        positions = torch.nonzero_static(image_mask.flatten(), size=features.shape[0] * features.shape[1]).squeeze(1)
        return embeds.flatten(0, 1).index_copy(0, positions, features.flatten(0, 1).to(embeds.dtype)).view_as(embeds)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        extension_targets: dict[str, torch.Tensor] | None = None,
        **kwargs,
    ) -> "BeniOutput":
        """The LLM's output on the merged embeddings; given `extension_targets` (the loader's, see
        Extension.collate), also each extension's loss on the same vision features."""
        losses = None
        if inputs_embeds is None:
            features = self.vision_features(pixel_values)
            if extension_targets is not None and features is not None:
                losses = {name: e.loss(self, features, extension_targets) for name, e in self.extensions.items()}
                losses = {name: loss for name, loss in losses.items() if loss is not None} or None
            if input_ids is None:  # images and targets alone (the encoder stage): the extensions' losses, the LLM not run
                return BeniOutput(extension_losses=losses)
            inputs_embeds = self.merge(input_ids, features)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)
        return BeniOutput(**out, extension_losses=losses)

    @torch.no_grad()
    def extension_answers(self, pixel_values: torch.Tensor) -> list[str] | None:
        """The first extension's own answers for each image (Extension.answers), or None where none answers."""
        features = self.vision_features(pixel_values)
        for extension in self.extensions.values():
            if (answers := extension.answers(self, features)) is not None:
                return answers
        return None

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """The LLM's own generate (KV cache, sampling, stopping) from the merged prompt embeddings.

        Pad prompts on the left. Returns the prompt ids followed by the new tokens, like any causal LM.
        """
        return self.language_model.generate(
            input_ids=input_ids,
            inputs_embeds=self.embed(input_ids, pixel_values),
            attention_mask=attention_mask,
            **generate_kwargs,
        )

    @torch.inference_mode()  # less work per op than no_grad: decode is bound by per-op host time
    def greedy_generate(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
        min_new_tokens: int = 0,
        compile: bool = False,
    ) -> torch.LongTensor:
        """The tokens of `generate(do_sample=False)` through a plain loop over a static KV cache: decode is bound by
        per-step host work, and this drops generate's per-step machinery (logits processors, stopping criteria, input
        preparation, cache concatenation). With `compile` on CUDA the one-token step becomes a CUDA graph, so a step is
        a replay: 3-8x the decode throughput, after about a minute of compiling per model (and once more at the first
        new shape), which pays on long evals only (bench/BENCHMARKS.md).

        Pad prompts on the left. Rows that have emitted `eos_token_id` go on with `pad_token_id`; the loop stops when
        every row has. Returns the prompt ids followed by the new tokens, like `generate`.
        """
        batch, width = input_ids.shape
        length = -(-(width + max_new_tokens) // 64) * 64  # few cache shapes, so few CUDA graphs: see _static_cache
        cache = self._static_cache(batch, length, input_ids.device)
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # as generate derives them
        # The prefill (eager, like generate's) sees the prompt's mask, which the mask code pads to the cache with
        # zeros; the decode step one of the cache's length, with the slots after the current token left to causality.
        out = self.language_model(
            inputs_embeds=self.embed(input_ids, pixel_values),
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1]
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch, length - width)], dim=1)
        position = positions[:, -1:]
        decode = self._decode_step(input_ids.device, compile)
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        tokens = []
        for step in range(max_new_tokens):
            if step < min_new_tokens:
                logits[:, eos_token_id] = -torch.inf
            token = logits.argmax(-1).masked_fill(finished, pad_token_id)
            tokens.append(token)
            finished |= token == eos_token_id
            if step == max_new_tokens - 1 or finished.all():
                break
            position = position + 1
            logits = decode(token[:, None], position, mask, cache)
        return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)

    def _static_cache(self, batch: int, length: int, device: torch.device) -> StaticCache:
        """A static KV cache of `batch` rows and `length` slots, kept while calls ask for that shape: a CUDA graph of the
        decode step reads the cache at the address it was captured with (a new address is a new capture), and each new
        shape is one more graph. The eval's batches share one batch size, and rounding the length up to 64 slots puts
        its prompt widths into one or two lengths."""
        key = (batch, length, device, self.language_model.dtype)
        if self._decode_cache is None or self._decode_cache[0] != key:
            self._decode_cache = key, StaticCache(config=self.language_model.config, max_cache_len=length)
        cache = self._decode_cache[1]
        cache.reset()
        return cache

    def _decode_step(self, device: torch.device, compile: bool):
        """(token, position, mask, cache) -> next-token logits: with `compile` on CUDA compiled once per model with mode
        "reduce-overhead" (CUDA graphs), as generate compiles for static caches, and likewise not for quantizers that
        cannot compile (bitsandbytes); otherwise eager (on CPU compiling costs more than it saves). Shapes are left to
        torch.compile's default: the first call of another batch size or cache length recompiles once with those dims
        dynamic, and from then on a new shape costs a graph capture, not a compile."""
        quantizers = [getattr(part, "hf_quantizer", None) for part in (self, self.language_model)]  # from_pretrained's, from_parts'
        if not compile or device.type != "cuda" or any(q is not None and not q.is_compileable for q in quantizers):
            return self._decode
        if self._compiled_decode is None:
            self._compiled_decode = torch.compile(self._decode, mode="reduce-overhead")

        def step(*args):
            torch.compiler.cudagraph_mark_step_begin()  # the loop is done with the last step's logits: the replay may reuse them
            return self._compiled_decode(*args)

        return step

    def _decode(self, token, position, mask, cache) -> torch.Tensor:
        return self.language_model(
            input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True
        ).logits[:, -1]


def check_image_tokens(image_tokens: int, images: int, tokens_per_image: int) -> None:
    """A clear error where a batch's image-token count does not match its images."""
    if images == 0 and image_tokens:
        raise ValueError("The prompt has image tokens but no pixel_values were given.")
    if image_tokens != images * tokens_per_image:
        raise ValueError(
            f"The batch has {image_tokens} image tokens but {images} images of {tokens_per_image} tokens each: build "
            "prompts with beni_model.chat so every image marker expands to the connector's token count at this image size."
        )


AutoModelForImageTextToText.register(BeniConfig, BeniForConditionalGeneration)
