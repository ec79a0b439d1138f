"""Greedy decoding of the study (megatron_ift.studies.generate) on a saved random tiny model.

Checks: batched right-padded logits equal one-by-one logits; ``generate`` equals a token-by-token
argmax loop and stops at a stop token; the Frozen Lake policy maps tokens to actions. Run as a
plain process (a world of one): ``python study_generate.py OUT_DIR``.
"""

import json
import os
import sys

from megatron_ift.platform import bootstrap

PLATFORM = bootstrap()

import torch  # noqa: E402

from megatron_ift.checkpoint import layout  # noqa: E402
from megatron_ift.checkpoint.model_io import save_model  # noqa: E402
from megatron_ift.config_io import to_dict  # noqa: E402
from megatron_ift.models.config import ModelConfig  # noqa: E402
from megatron_ift.models.gpt import build_gpt_chunks  # noqa: E402
from megatron_ift.parallel import ParallelConfig  # noqa: E402
from megatron_ift.studies import generate  # noqa: E402
from megatron_ift.studies.frozen_lake import Codec, vocabulary


def main(out: str) -> None:
    generate.world_of_one(PLATFORM)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                      vocab_size=len(vocabulary()), make_vocab_size_divisible_by=16,
                      max_position_embeddings=48, transformer_impl="local")
    (model,) = build_gpt_chunks(cfg, ParallelConfig(), PLATFORM)
    ckpt = os.path.join(out, layout.iter_name(1))
    save_model([model], ckpt)
    layout.write_metadata(ckpt, {"model": to_dict(cfg)})
    layout.mark_latest(out, 1)

    loaded = generate.LoadedModel(out, PLATFORM)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 9, 48)]
    batched = loaded.last_logits(seqs)
    single = torch.cat([loaded.last_logits([s]) for s in seqs])
    assert batched.shape == (4, cfg.vocab_size), batched.shape
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():
        direct = model(torch.tensor([seqs[1]]), torch.arange(17)[None], None)[0, -1, : cfg.vocab_size]
    torch.testing.assert_close(batched[1], direct, rtol=1e-5, atol=1e-5)  # weights really loaded

    prompts = seqs[:3]
    outs = loaded.generate(prompts, max_new_tokens=6, stop_ids=[])
    for p, o in zip(prompts, outs):
        ref = list(p)
        for _ in range(6):
            ref.append(loaded.greedy_next([ref])[0])
        assert o == ref[len(p):], (o, ref[len(p):])
    stop = outs[0][2]
    stopped = loaded.generate(prompts[:1], max_new_tokens=6, stop_ids=[stop])[0]
    assert stopped == outs[0][: outs[0].index(stop) + 1], (stopped, outs[0])
    # Generation never runs past the model's positions.
    long = loaded.generate([seqs[3][:46]], max_new_tokens=10, stop_ids=[])[0]
    assert len(long) == 2, long

    policy = generate.frozen_lake_policy(loaded)
    codec = Codec()
    acts = policy(seqs[:3] + [list(range(60))])
    nxt = loaded.greedy_next(seqs[:3])
    assert acts[:3] == [codec.action_of(t) for t in nxt] and acts[3] is None, acts
    with open(os.path.join(out, "ok.json"), "w") as fh:
        json.dump({"ok": True}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
