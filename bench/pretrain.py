"""Pretraining throughput: featherlm's GPT against a nanoGPT-style reference model, in one process.

The reference is nanoGPT's ``model.py`` written out below (fused ``c_attn``, SDPA with
``is_causal``, LayerNorm with bias, tied ``wte``/``lm_head``, dropout 0; GELU in GPT-2's tanh form,
the one featherlm's gpt2 preset uses). Both sides get the same config, the same seeded batches of
random token ids, the same AdamW (decay on matrices only, lr 1e-3), fp32 and the same thread count;
one plain step (forward, cross-entropy, backward, clip 1.0, step, zero_grad) drives both.
featherlm's side is exactly what ``featherlm pretrain`` runs: ``PretrainModel`` around the
``Transformer`` of ``preset("gpt2")``, its loss summed then divided by the token count.

Before timing, the reference's weights are copied into featherlm's model (q/k/v split out of
``c_attn``) and the logits compared: the two compute the same function. Then ``--rounds`` rounds
of ``--steps`` timed steps each alternate between the sides (order flipped every round, after
``--warmup`` untimed steps each), so drifting machine load hits both alike; the median tokens/s
per side and their ratio are printed.

    .venv/bin/python bench/pretrain.py [--n-layer 4 --n-head 4 --d-model 128 --block-size 256
                                        --batch-size 16 --vocab-size 65 --steps 10 --rounds 5 --threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from featherlm.config import preset
from featherlm.model import Transformer
from featherlm.train.optim import make_adamw
from featherlm.train.pretrain import PretrainModel

# ----------------------------------------------------------------------------- nanoGPT's model, as written there


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias=True)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = LayerNorm(n_embd, bias=True)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)]),
            ln_f=LayerNorm(n_embd, bias=True),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


# ----------------------------------------------------------------------------- the comparison


def copy_reference_into(ref: GPT, model: Transformer, n_embd: int) -> None:
    """nanoGPT's weights under featherlm's names (c_attn split into q/k/v): the same function."""
    sd, t = {}, ref.transformer
    sd["embed_tokens.weight"], sd["embed_positions.weight"] = t.wte.weight, t.wpe.weight
    sd["norm.weight"], sd["norm.bias"] = t.ln_f.weight, t.ln_f.bias
    for i, block in enumerate(t.h):
        p = f"layers.{i}."
        for name, tensor in zip(("q_proj", "k_proj", "v_proj"), block.attn.c_attn.weight.split(n_embd), strict=True):
            sd[p + f"self_attn.{name}.weight"] = tensor
        for name, tensor in zip(("q_proj", "k_proj", "v_proj"), block.attn.c_attn.bias.split(n_embd), strict=True):
            sd[p + f"self_attn.{name}.bias"] = tensor
        pairs = {"self_attn.o_proj": block.attn.c_proj, "mlp.up_proj": block.mlp.c_fc,
                 "mlp.down_proj": block.mlp.c_proj, "input_layernorm": block.ln_1,
                 "post_attention_layernorm": block.ln_2}
        for name, module in pairs.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = module.weight, module.bias
    model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--vocab-size", type=int, default=65)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    L, H, C, T, B, V = args.n_layer, args.n_head, args.d_model, args.block_size, args.batch_size, args.vocab_size

    torch.manual_seed(0)
    ref = GPT(V, T, L, H, C)
    model = PretrainModel(Transformer(preset("gpt2", n_layer=L, n_head=H, n_kv_head=H, d_model=C, d_ff=4 * C,
                                             vocab_size=V, max_seq_len=T)), "causal")
    copy_reference_into(ref, model.backbone, C)
    x = torch.randint(V, (2, T + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model.backbone(x[:, :-1]).logits, ref(x[:, :-1])
    diff = float((ours - theirs).abs().max())
    assert diff < 1e-4, f"the two models differ (max logit difference {diff})"

    gen = torch.Generator().manual_seed(2)
    windows = [torch.randint(V, (B, T + 1), generator=gen) for _ in range(args.steps + args.warmup)]
    batches = [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]  # (x, y) as nanoGPT's get_batch
    sides = {
        "featherlm": (model, make_adamw(model, 1e-3, 0.1, (0.9, 0.99)),
                      lambda x, y: model(x, labels=y)["lm"] / y.numel()),
        "nanogpt": (ref, make_adamw(ref, 1e-3, 0.1, (0.9, 0.99)), lambda x, y: ref(x, y)),
    }
    params = {name: sum(p.numel() for p in m.parameters()) for name, (m, _, _) in sides.items()}
    assert params["featherlm"] == params["nanogpt"], params

    def run(name: str, timed: bool) -> float:
        m, opt, loss_of = sides[name]
        todo = batches[args.warmup:] if timed else batches[:args.warmup]
        start = time.perf_counter()
        for x, y in todo:
            loss = loss_of(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return len(todo) * B * T / (time.perf_counter() - start)

    speeds: dict[str, list[float]] = {"featherlm": [], "nanogpt": []}
    for name in speeds:
        run(name, timed=False)
    for r in range(args.rounds):
        for name in (("featherlm", "nanogpt") if r % 2 == 0 else ("nanogpt", "featherlm")):
            speeds[name].append(run(name, timed=True))
    median = {k: statistics.median(v) for k, v in speeds.items()}
    result = {"config": {"n_layer": L, "n_head": H, "d_model": C, "block_size": T, "batch_size": B, "vocab_size": V,
                         "params": params["featherlm"], "threads": args.threads, "dtype": "float32"},
              "max_logit_diff": diff, "featherlm_tokens_per_s": round(median["featherlm"], 1),
              "nanogpt_tokens_per_s": round(median["nanogpt"], 1),
              "ratio": round(median["featherlm"] / median["nanogpt"], 3),
              "rounds": {k: [round(s, 1) for s in v] for k, v in speeds.items()}}
    if args.json:
        print(json.dumps(result))
        return
    print(f"GPT L{L} H{H} C{C}, block {T}, batch {B}, vocab {V}: {params['featherlm']:,} parameters, fp32, "
          f"{args.threads} threads; logits agree to {diff:.1e}")
    for name in speeds:
        print(f"{name:>10}: {median[name]:9.1f} tokens/s  (rounds: {', '.join(f'{s:.0f}' for s in speeds[name])})")
    print(f"     ratio: {result['ratio']:.3f}x (featherlm / nanoGPT)")


if __name__ == "__main__":
    main()
