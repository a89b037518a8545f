"""A tiny random Qwen2.5-VL (model + processor) built offline from configs, for tests and wiring checks.

Its answers are meaningless; it exists so that every code path of a transformers VLM backend (chat template,
image tokens, left-padded batched `generate`) runs on CPU in well under a second with no download.
"""

from __future__ import annotations

import re
from typing import Any

TINY_MODEL_ID = "tiny-random/qwen2.5-vl"

SPECIAL_TOKENS = [
    "<|endoftext|>",  # Qwen's pad token
    "<|im_start|>",
    "<|im_end|>",  # end of a turn, and so the end of generation
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Words the tiny tokenizer knows as one token each: the chat roles, the engine's prompt words and the nouns
# tests use. Every other piece of text is spelled one character at a time from _CHARS.
_WORDS = (
    "system user assistant you are a helpful please detect in this image answer the question with object "
    "objects indexes index candidate numbered boxes box drawn on to and or is there yes no of it its "
    "person man woman girl boy dog cat ball car shape square circle red green blue left right obj"
).split()

# Printable ASCII (letters, digits, punctuation, space) and newline as single-character tokens: everything a
# JSON answer needs, so grammar-constrained decoding can spell any key, number or string (and digits one by
# one, like Qwen's tokenizer, so "12" and "<obj12>" are made of digit tokens).
_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

# Qwen2.5-VL's chat template cut down to what the engine sends: text and image/video parts per message.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2_5_vl(*, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor): a random Qwen2_5_VLForConditionalGeneration of about 80k parameters and a
    Qwen2_5_VLProcessor whose images become 4 x 4 patches (56 x 56 pixels, merge size 1)."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {token: i for i, token in enumerate(dict.fromkeys(SPECIAL_TOKENS + ["[UNK]"] + _WORDS + _CHARS))}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    # Known words first (longest first), else one character: every piece is in the vocabulary, and nothing,
    # spaces included, is dropped, so encoding then decoding gives the text back.
    alternatives = "|".join(re.escape(w) for w in sorted(_WORDS, key=len, reverse=True))
    word_level.pre_tokenizer = pre_tokenizers.Split(Regex(f"{alternatives}|[\\s\\S]"), behavior="isolated")
    word_level.decoder = decoders.Fuse()  # tokens are joined as they are, with nothing between them
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        padding_side="left",  # decoder-only batched generation
        clean_up_tokenization_spaces=False,  # never rewrite " ," inside a JSON string
    )
    pixels = 56 * 56
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, merge_size=1),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(
            min_pixels=pixels, max_pixels=pixels, merge_size=1, do_sample_frames=False
        ),
        chat_template=CHAT_TEMPLATE,
    )
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,  # prompts spelled by character are long
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            bos_token_id=vocab["<|endoftext|>"],
            eos_token_id=vocab["<|im_end|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=32,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=1,
            temporal_patch_size=2,
            window_size=14,
            fullatt_block_indexes=[0],
        ),
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    model.generation_config.eos_token_id = vocab["<|im_end|>"]
    return model.eval(), processor
