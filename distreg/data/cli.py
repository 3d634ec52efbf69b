"""`distreg data ...` subcommands."""
from __future__ import annotations


def _synth_tokens(args) -> int:
    from distreg.data.tokens import synth_tokens

    synth_tokens(args.out, num_tokens=args.tokens, vocab_size=args.vocab_size, num_shards=args.shards, seed=args.seed)
    print(f"wrote {args.tokens} tokens in {args.shards} shards to {args.out}")
    return 0


def add_data_commands(sub) -> None:
    p = sub.add_parser("synth-tokens", help="write a small learnable token corpus")
    p.add_argument("out", help="directory or fsspec URL")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_synth_tokens)
