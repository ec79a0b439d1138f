"""A pretrained chat model (an import or a fine-tuned run) answering study questions: the model's
own tokenizer and chat template, greedy decoding with megatron-core's KV cache
(:class:`megatron_ift.inference.decoder.KVCacheDecoder`, as ``megatron-ift generate`` does), and
the teacher-forced loss of reference answers. One process, a world of one, on the CPU.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_ift.platform import Platform
from megatron_ift.studies.generate import _right_padded, world_of_one


class ChatModel:
    """A checkpoint in evaluation mode with its tokenizer.

    Args:
        path: a run directory (its ``latest``), an ``iter_*`` folder, or an imported checkpoint.
        platform: where this process computes.
        tokenizer_dir: the tokenizer folder (default: found from the checkpoint, as
            ``megatron-ift generate`` finds it).
        batch_size: prompts decoded together (one KV cache of ``batch_size`` rows).
    """

    def __init__(self, path: str, platform: Platform, tokenizer_dir: Optional[str] = None,
                 batch_size: int = 32) -> None:
        from megatron_ift.data.tokenizer import load_tokenizer
        from megatron_ift.inference.decoder import KVCacheDecoder
        from megatron_ift.inference.loading import find_tokenizer, load_for_inference, stop_token_ids

        world_of_one(platform)
        self.model, self.cfg, self.ckpt = load_for_inference(path, None, platform)
        self.tokenizer_dir = find_tokenizer(self.ckpt, tokenizer_dir)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        # Stop at EOS and at the chat template's end of turn (ChatML's <|im_end|>, when the
        # tokenizer's EOS is another token).
        stops = set(stop_token_ids(self.tokenizer, self.tokenizer_dir))
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
            stops.add(end_of_turn)
        self.stop_ids = sorted(stops)
        self.decoder = KVCacheDecoder(self.model, self.cfg, platform)
        self.batch_size = batch_size

    def encode_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a conversation with the assistant's turn opened (the chat template)."""
        from megatron_ift.inference.cli import encode

        return encode(self.tokenizer, list(messages), False, self.tokenizer_dir)

    def answer_ids(self, messages: Sequence[dict], answer: str) -> tuple[list[int], list[int]]:
        """``(prompt ids, answer ids)`` of a conversation and its reference answer, as the chat
        template renders the whole exchange (the answer runs to the end of the rendering: the
        answer text, the end-of-turn token and what the template puts after it)."""
        prompt = self.encode_prompt(messages)
        full = self.tokenizer.apply_chat_template(
            list(messages) + [{"role": "assistant", "content": answer}], tokenize=True)
        if isinstance(full, dict) or hasattr(full, "keys"):  # transformers 5: a BatchEncoding
            full = full["input_ids"]
        full = list(full)
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template renders the prompt differently with and without "
                             "the answer; the held-out loss needs the prompt as a prefix")
        return prompt, full[len(prompt):]

    def generate(self, prompts: Sequence[Sequence[dict]], max_new_tokens: int) -> list[str]:
        """Greedy answers (decoded, special tokens dropped) to user conversations.

        Prompts are decoded in batches of similar length: the KV cache shares one offset per
        batch, so a batch costs as many steps as its longest prompt plus the answer.
        """
        from megatron_ift.inference.sampling import SamplingConfig

        ids = [self.encode_prompt(p) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        sampling = SamplingConfig(max_new_tokens=max_new_tokens)
        out: list[str] = [""] * len(ids)
        for lo in range(0, len(order), self.batch_size):
            chunk = order[lo: lo + self.batch_size]
            new = self.decoder.generate([ids[i] for i in chunk], sampling, self.stop_ids)
            for i, toks in zip(chunk, new):
                out[i] = self.tokenizer.decode(toks, skip_special_tokens=True)
        return out

    @torch.no_grad()
    def answer_nll(self, prompts: Sequence[Sequence[dict]], answers: Sequence[str],
                   batch_size: int = 8) -> float:
        """Teacher-forced loss of reference answers (:meth:`answer_ids`), nats per token, token
        mean over all items."""
        seqs, starts = [], []
        for p, a in zip(prompts, answers):
            prompt, answer = self.answer_ids(p, a)
            seqs.append(prompt + answer)
            starts.append(len(prompt))
        total, count = 0.0, 0
        v = self.cfg.vocab_size
        for lo in range(0, len(seqs), batch_size):
            chunk, first = seqs[lo: lo + batch_size], starts[lo: lo + batch_size]
            tokens, positions = _right_padded(chunk)
            logits = self.model(tokens, positions, None)[..., :v].float()  # [b, s, v]
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
            for i, (s, f) in enumerate(zip(chunk, first)):
                total -= logp[i, f - 1: len(s) - 1].sum().item()
                count += len(s) - f
        return total / max(count, 1)
