"""BeniForConditionalGeneration: vision tower -> connector -> causal LLM, with image features spliced in
wherever the image token stands in the prompt."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, BitsAndBytesConfig, PreTrainedModel, StaticCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from beni_model.config import LINE_TOKENS, READING_ALPHABET, BeniConfig
from beni_model.connectors import build_connector
from beni_model.vision import VisionTower, vision_encoder_from_config, vision_encoder_from_pretrained


@dataclass
class BeniOutput(CausalLMOutputWithPast):
    reading_loss: torch.FloatTensor | None = None  # the vision tower's reading head's, when given transcripts


class BeniForConditionalGeneration(PreTrainedModel):
    config_class = BeniConfig
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config: BeniConfig):
        super().__init__(config)
        self.vision_tower = VisionTower(config, vision_encoder_from_config(config.vision_config, config.vision_stem))
        self.connector = build_connector(config.connector_spec, config.vision_config.hidden_size, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        if config.reading_tokens:
            if config.reading_token_ids is None:
                raise ValueError("reading_tokens needs the LLM's token of each character: build the model with from_parts.")
            self.connector.reading_blank = nn.Parameter(torch.zeros(config.text_config.hidden_size))
            self.register_buffer("reading_token_ids", torch.tensor(config.reading_token_ids))
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
        if config.reading_tokens:
            config.reading_token_ids = character_token_ids(tokenizer)
        model = cls(config)
        if config.vision_model:
            model.vision_tower.encoder = vision_encoder_from_pretrained(config.vision_model, config.vision_config)
        if config.text_model:
            quantization = None
            if load_in_4bit:
                # Storage dtype equal to the compute dtype so FSDP sees one dtype per flat shard.
                quantization = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16,
                )
            model.language_model = AutoModelForCausalLM.from_pretrained(
                config.text_model, config=config.text_config, dtype=dtype, quantization_config=quantization,
                device_map={"": 0} if load_in_4bit else None,
            )
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        config.text_config = model.language_model.config
        config.image_token_id = image_token_id
        if config.reading_tokens:  # a blank starts as the mean character, not as a token of its own
            characters = model.reading_token_ids[: len(READING_ALPHABET)]
            model.connector.reading_blank.data = model.get_input_embeddings()(characters).mean(0).detach().float()
        if dtype is not None:
            model.vision_tower.to(dtype)
            model.connector.to(dtype)
            if not load_in_4bit:
                model.language_model.to(dtype)
        if load_in_4bit:
            model.vision_tower.cuda()
            model.connector.cuda()
        model.apply_freeze_flags()
        return model

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.apply_freeze_flags()  # loading swaps in fresh Parameters, which require grad
        return model

    def apply_freeze_flags(self) -> None:
        for part, frozen in (
            (self.vision_tower, self.config.freeze_vision),
            (self.connector, self.config.freeze_connector),
            (self.language_model, self.config.freeze_text),
        ):
            for param in part.parameters():
                param.requires_grad_(not frozen and param.is_floating_point())  # quantized weights never train

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
            if self.config.reading_tokens:
                reads = [self.reading_embeddings(vision_features)] + ([self.line_embeddings(vision_features)] if self.config.reading_lines else [])
                features = torch.cat([features, *(r.to(features.dtype) for r in reads)], dim=1)
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

    def reading_embeddings(self, vision_features: torch.Tensor) -> torch.Tensor:
        """The reading head's soft transcript as LLM input, [images, reads, text hidden]: each read's probabilities
        over blank and READING_ALPHABET weigh a learned blank (the connector's `reading_blank`, so it trains with the
        connector) and the LLM's own embedding of each character, so what the vision tower reads reaches the LLM as
        (nearly) the text's tokens, to copy as it copies a prompt."""
        probs = self.vision_tower.reading_scores(vision_features).float().softmax(-1)
        return probs @ self.reading_table()[:-1]

    def line_embeddings(self, vision_features: torch.Tensor) -> torch.Tensor:
        """The line head's transcript as LLM input, [images, LINE_TOKENS, text hidden]: each row's reads after CTC's
        collapse (a read is kept where its best class is neither the blank nor the read before's), each row that
        keeps one ended by a line break, packed in reading order and cut at LINE_TOKENS; a kept read enters as its
        probabilities over the reading table (as `reading_embeddings`), the slots after the last as the blank. The
        shapes never depend on what was read, so the step needs no sync and graphs."""
        scores = self.vision_tower.line_scores(vision_features).float()  # [images, rows, reads, classes]
        images, rows, _, classes = scores.shape
        best = scores.argmax(-1)
        kept = (best != 0) & (best != nn.functional.pad(best, (1, 0))[..., :-1])
        kept = torch.cat([kept, kept.any(-1, keepdim=True)], dim=2).flatten(1)  # each row's reads, then its line break
        # Slots over the table [blank, characters, line break]: the reads, a break per row, a last slot of blank.
        one_hot = torch.eye(classes + 1, device=scores.device)
        slots = torch.cat([nn.functional.pad(scores.softmax(-1), (0, 1)), one_hot[-1].expand(images, rows, 1, -1)], dim=2).flatten(1, 2)
        slots = torch.cat([slots, one_hot[0].expand(images, 1, -1)], dim=1)
        place = torch.where(kept, kept.cumsum(1) - 1, LINE_TOKENS).clamp(max=LINE_TOKENS)
        source = torch.full((images, LINE_TOKENS + 1), slots.shape[1] - 1, device=scores.device)
        source.scatter_(1, place, torch.arange(kept.shape[1], device=scores.device).expand(images, -1))
        picked = slots.gather(1, source[:, :LINE_TOKENS, None].expand(-1, -1, classes + 1))
        return picked @ self.reading_table()

    def reading_table(self) -> torch.Tensor:
        """The reads' embeddings, [blank, READING_ALPHABET's characters, line break] x text hidden (float32)."""
        return torch.cat([self.connector.reading_blank[None], self.get_input_embeddings()(self.reading_token_ids)]).float()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        reading_targets: torch.LongTensor | None = None,
        reading_lengths: torch.LongTensor | None = None,
        line_targets: torch.LongTensor | None = None,
        line_lengths: torch.LongTensor | None = None,
        **kwargs,
    ) -> "BeniOutput":
        """The LLM's output on the merged embeddings; given `reading_targets` and `reading_lengths` (the loader's,
        see VisionTower.reading_loss), also the reading head's loss on the same vision features, plus the line head's
        given `line_targets` and `line_lengths` (VisionTower.line_loss)."""
        reading_loss = None
        if inputs_embeds is None:
            features = self.vision_features(pixel_values)
            if reading_lengths is not None and features is not None:
                reading_loss = self.vision_tower.reading_loss(features, reading_targets, reading_lengths)
                if line_lengths is not None:
                    reading_loss = reading_loss + self.vision_tower.line_loss(features, line_targets, line_lengths)
            if input_ids is None:  # images and transcripts alone (the encoder stage): the reading loss, the LLM not run
                return BeniOutput(reading_loss=reading_loss)
            inputs_embeds = self.merge(input_ids, features)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)
        return BeniOutput(**out, reading_loss=reading_loss)

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
            inputs_embeds=self.embed(input_ids, pixel_values), attention_mask=attention_mask, position_ids=positions,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
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


def character_token_ids(tokenizer) -> list[int]:
    """The token of each READING_ALPHABET character and of the line break, alone; an error if one takes more than
    one token."""
    characters = READING_ALPHABET + "\n"
    ids = [tokenizer.encode(c, add_special_tokens=False) for c in characters]
    if split := [c for c, i in zip(characters, ids) if len(i) != 1]:
        raise ValueError(f"reading_tokens needs one token per printable character; this tokenizer splits {split[:5]}: leave reading_tokens off.")
    return [i[0] for i in ids]


AutoModelForImageTextToText.register(BeniConfig, BeniForConditionalGeneration)
