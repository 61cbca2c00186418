"""Masked discrete-diffusion trajectory planner: a bidirectional transformer over trajectory tokens.

Training (masked diffusion, as in LLaDA / WAM-Diff): draw r ~ U(0, 1], mask each token with
probability r, and minimise  (1/r) * sum_{masked i} -log p(x0_i | x_r, c) / L, an upper bound on
-log p(x0 | c) / L. Decoding starts from all-mask and commits a scheduled number of tokens per
step in one of four orders (confidence, random, causal, reverse). Sequence log-likelihoods for RL
come from ``logp_one_step`` (d1's one-step unmasking: all free tokens masked, one pass) or
``logp_elbo`` (stratified ELBO: fixed mask counts, random masks within each), and ``exact_logp``
enumerates every order for short free sets to measure both.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from dpolicy.drive.checkpoint import build_planner, read_planner_dir, save_planner
from dpolicy.drive.encoder import make_encoder
from dpolicy.drive.tokenizer import TrajectoryTokenizer
from dpolicy.errors import ConfigError, ShapeError
from dpolicy.policy.checkpoint import register_kind

ORDERS = ("confidence", "random", "causal", "reverse")


def masked_diffusion_loss(logits: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(1/r) * sum over masked tokens of cross-entropy, over L, averaged over the batch.

    logits (B, L, V), x0 (B, L) ids, mask (B, L) bool, r (B,) masking probability in (0, 1].
    """
    ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")        # (B, L)
    return ((ce * mask).sum(1) / r / x0.shape[1]).mean()


class MoEFeedForward(nn.Module):
    """A dense feed-forward (the shared expert) plus ``experts`` small routed ones (hidden width ``hidden_routed``):
    each token's gate softmax(W_g z) keeps its ``top_k`` experts, renormalised (token-choice routing, so a
    token's output never depends on the rest of the batch). WAM-Diff adds LoRA experts beside the FFN it
    keeps as the shared expert; here the routed experts are two-layer MLPs. The experts are evaluated
    densely and the gate zeroes all but the chosen ones: at this size that is cheaper than gathering.
    ``balance`` holds the Switch-Transformer load-balancing term of the last forward pass
    (experts * sum_i share of tokens whose first choice is i * mean gate of i; 1 when balanced)."""

    def __init__(self, d: int, hidden: int, experts: int, hidden_routed: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ConfigError(f"top_k must be in [1, experts={experts}], got {top_k}.")
        self.shared = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.gate = nn.Linear(d, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, d, hidden_routed) / math.sqrt(d))
        self.b1 = nn.Parameter(torch.zeros(experts, hidden_routed))
        self.w2 = nn.Parameter(torch.randn(experts, hidden_routed, d) / math.sqrt(hidden_routed) * 0.1)
        self.top_k = top_k
        self.balance = torch.zeros(())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(z), -1)                                      # (..., E)
        top = probs.topk(self.top_k, -1)
        g = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
        g = g / g.sum(-1, keepdim=True)
        h = F.gelu(torch.einsum("...d,edh->...eh", z, self.w1) + self.b1)      # (..., E, H)
        routed = torch.einsum("...eh,ehd,...e->...d", h, self.w2, g)
        E = probs.shape[-1]
        first = F.one_hot(top.indices[..., 0], E).float().reshape(-1, E).mean(0)
        self.balance = E * (first * probs.reshape(-1, E).mean(0)).sum()
        return self.shared(z) + routed


class _Block(nn.Module):
    """A pre-norm transformer layer whose feed-forward is ``MoEFeedForward``."""

    def __init__(self, d: int, heads: int, experts: int, hidden_routed: int, top_k: int):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff = MoEFeedForward(d, 2 * d, experts, hidden_routed, top_k)

    def forward(self, x, pad):
        h = self.n1(x)
        x = x + self.att(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.ff(self.n2(x))


class _MoEBody(nn.Module):
    def __init__(self, d: int, heads: int, layers: int, experts: int, hidden_routed: int, top_k: int):
        super().__init__()
        self.layers = nn.ModuleList(_Block(d, heads, experts, hidden_routed, top_k) for _ in range(layers))

    def forward(self, x, src_key_padding_mask=None):
        for blk in self.layers:
            x = blk(x, src_key_padding_mask)
        return x

    def balance(self) -> torch.Tensor:
        return torch.stack([blk.ff.balance for blk in self.layers]).mean()


@register_kind("drive_masked")
class MaskedTokenPlanner(nn.Module):
    def __init__(self, tokenizer: TrajectoryTokenizer, d: int = 64, layers: int = 2, heads: int = 4, encoder: str = "flat",
                 encoder_layers: int = 2, ego_dropout: float = 0.0, order: str = "confidence", experts: int = 0,
                 expert_hidden: int = 32, top_k: int = 2, balance_weight: float = 0.01):
        super().__init__()
        if order not in ORDERS:
            raise ConfigError(f"decoding order {order!r} is unknown; choose from {', '.join(ORDERS)}.")
        self.tok = tokenizer
        # order: the decoding order the planner is evaluated with by default (RL sets the one it trained)
        self.cfg = {"d": d, "layers": layers, "heads": heads, "encoder": encoder, "encoder_layers": encoder_layers,
                    "ego_dropout": ego_dropout, "tokenizer": tokenizer.config(), "order": order}
        if experts:  # a mixture-of-experts feed-forward in every layer; 0: the dense transformer layers
            self.cfg.update(experts=experts, expert_hidden=expert_hidden, top_k=top_k, balance_weight=balance_weight)
        self.encoder = make_encoder(encoder, d, encoder_layers, heads, ego_dropout)
        self.embed = nn.Embedding(tokenizer.vocab + 1, d)
        self.pos = nn.Parameter(torch.randn(tokenizer.length, d) * 0.02)
        if experts:
            self.body = _MoEBody(d, heads, layers, experts, expert_hidden, top_k)
        else:
            layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
            self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, tokenizer.vocab)
        self.register_buffer("valid", tokenizer.valid_mask(), persistent=False)

    def save(self, path, metadata: dict | None = None):
        return save_planner(self, path, metadata)

    @classmethod
    def load(cls, d, meta: dict, device="cpu") -> "MaskedTokenPlanner":
        cfg, state = read_planner_dir(d, meta)
        keys = ("d", "layers", "heads", "encoder", "encoder_layers", "ego_dropout")
        moe = ("experts", "expert_hidden", "top_k", "balance_weight")  # absent: a dense planner
        return build_planner(cls, d, cfg, state, lambda c: cls(TrajectoryTokenizer(**c["tokenizer"]), **{k: c[k] for k in keys},
                                                               order=c.get("order", "confidence"),
                                                               **{k: c[k] for k in moe if k in c}), device)

    def logits(self, obs: dict, tokens: torch.Tensor, gen: torch.Generator | None = None, ctx=None) -> torch.Tensor:
        """(B, L) ids (mask id where masked) -> (B, L, V) logits; ids a position cannot take are -inf.

        ``ctx``: the encoder's ``tokens(obs)`` when already computed (decoding reuses it at every step)."""
        if tokens.dim() != 2 or tokens.shape[1] != self.tok.length:
            raise ShapeError(f"tokens must have shape (B, {self.tok.length}), got {tuple(tokens.shape)}.")
        ctx, valid = self.encoder.tokens(obs, gen) if ctx is None else ctx
        x = torch.cat([ctx, self.embed(tokens) + self.pos], 1)
        pad = torch.cat([~valid, torch.zeros_like(tokens, dtype=torch.bool)], 1)
        h = self.body(x, src_key_padding_mask=pad)[:, ctx.shape[1]:]
        return self.head(h).masked_fill(~self.valid, float("-inf"))

    def loss(self, obs: dict, x0: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        B, L = x0.shape
        # stratified r over the batch lowers the loss variance; r is kept away from 0 (weight 1/r)
        u = (torch.arange(B, device=x0.device) + torch.rand(B, device=x0.device, generator=gen)) / B
        r = (u[torch.randperm(B, device=x0.device, generator=gen)]).clamp(min=1.0 / L)
        mask = torch.rand(B, L, device=x0.device, generator=gen) < r[:, None]
        xt = torch.where(mask, torch.full_like(x0, self.tok.mask_id), x0)
        loss = masked_diffusion_loss(self.logits(obs, xt, gen), x0, mask, r)
        if isinstance(self.body, _MoEBody):
            loss = loss + self.cfg["balance_weight"] * self.body.balance()
        return loss

    @torch.no_grad()
    def decode(self, obs: dict, steps: int = 8, order: str = "confidence", temperature: float = 0.0,
               gen: torch.Generator | None = None, n: int = 1, return_steps: bool = False):
        """Tokens (B*n, L): ``n`` samples per observation (rows grouped per observation).

        With ``return_steps`` also the decoding step (0-based, (B*n, L)) at which each token was
        committed, which ``logp_replay`` needs."""
        if order not in ORDERS:
            raise ConfigError(f"decoding order {order!r} is unknown; choose from {', '.join(ORDERS)}.")
        L = self.tok.length
        if not 1 <= steps <= L:
            raise ConfigError(f"decoding steps must be in [1, {L}], got {steps}.")
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}.")
        if n > 1:
            obs = {k: v.repeat_interleave(n, 0) for k, v in obs.items()}
        first = next(iter(obs.values()))
        B, dev = first.shape[0], first.device
        x = torch.full((B, L), self.tok.mask_id, dtype=torch.long, device=dev)
        pos = torch.arange(L, device=dev, dtype=torch.float32)
        wp = (pos // 2)  # waypoint index of each token (x and y of a waypoint share it)
        done = 0
        when = torch.full((B, L), -1, dtype=torch.long, device=dev)
        ctx = self.encoder.tokens(obs)
        for k in range(1, steps + 1):
            target = math.ceil(L * k / steps)
            logits = self.logits(obs, x, ctx=ctx)
            if temperature == 0:
                cand = logits.argmax(-1)
            else:
                probs = F.softmax(logits / temperature, -1)
                cand = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).reshape(B, L)
            conf = F.softmax(logits, -1).gather(-1, cand[..., None])[..., 0]
            if order == "confidence":
                key = conf
            elif order == "random":
                key = torch.rand(B, L, device=dev, generator=gen)
            elif order == "causal":
                key = (-wp + 0.1 * (pos % 2 == 0)).expand(B, L)
            else:
                key = (wp + 0.1 * (pos % 2 == 0)).expand(B, L)
            masked = x == self.tok.mask_id
            key = torch.where(masked, key, torch.full_like(key, float("-inf")))
            pick = key.topk(target - done, dim=1).indices
            x.scatter_(1, pick, cand.gather(1, pick))
            when.scatter_(1, pick, torch.full_like(pick, k - 1))
            done = target
        return (x, when) if return_steps else x

    def logp_replay(self, obs: dict, tokens: torch.Tensor, when: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Per-token log-probs (B, L) of a decoded sample at the states decoding actually visited
        (tokens committed at step >= k masked at step k), as in MDPO. With the decoding order held
        fixed this is the exact log-likelihood of the sample under temperature-``temperature`` sampling."""
        out = torch.zeros(tokens.shape, device=tokens.device)
        ctx = self.encoder.tokens(obs)
        for k in range(int(when.max()) + 1):
            xt = torch.where(when >= k, torch.full_like(tokens, self.tok.mask_id), tokens)
            lp = F.log_softmax(self.logits(obs, xt, ctx=ctx) / temperature, -1).gather(-1, tokens[..., None])[..., 0]
            out = out + lp * (when == k)
        return out

    def logp_one_step(self, obs: dict, tokens: torch.Tensor, free: torch.Tensor | None = None) -> torch.Tensor:
        """d1 one-step unmasking: every free token masked, one pass; per-token log-probs (B, L), 0 off ``free``."""
        free = torch.ones_like(tokens, dtype=torch.bool) if free is None else free
        xt = torch.where(free, torch.full_like(tokens, self.tok.mask_id), tokens)
        lp = F.log_softmax(self.logits(obs, xt), -1).gather(-1, tokens[..., None])[..., 0]
        return lp * free

    def logp_elbo(self, obs: dict, tokens: torch.Tensor, free: torch.Tensor | None = None, nodes: int = 4,
                  gen: torch.Generator | None = None, stratified: bool = True) -> torch.Tensor:
        """Per-token ELBO contributions (B, L) whose sum estimates log p(free tokens | the rest).

        ELBO = sum_{m=1}^{K} E_{|M|=m}[(1/m) sum_{i in M} log p(x_i | x outside M)] for K free tokens.
        ``stratified``: ``nodes`` fixed mask counts spread over 1..K (weight K/nodes each), a random
        mask within each; otherwise each node draws its count uniformly (plain Monte Carlo).
        """
        free = torch.ones_like(tokens, dtype=torch.bool) if free is None else free
        B, L = tokens.shape
        K = free.sum(1)                                                        # (B,)
        out = torch.zeros(B, L, device=tokens.device)
        ctx = self.encoder.tokens(obs)
        for j in range(nodes):
            if stratified:
                m = ((j + 0.5) / nodes * K).ceil().clamp(min=1)
            else:
                m = (torch.rand(B, device=tokens.device, generator=gen) * K).floor() + 1
            score = torch.rand(B, L, device=tokens.device, generator=gen).masked_fill(~free, 2.0)
            rank = score.argsort(1).argsort(1)
            mask = rank < m[:, None]
            xt = torch.where(mask, torch.full_like(tokens, self.tok.mask_id), tokens)
            lp = F.log_softmax(self.logits(obs, xt, ctx=ctx), -1).gather(-1, tokens[..., None])[..., 0]
            out = out + lp * mask * (K / nodes / m)[:, None]
        return out

    @torch.no_grad()
    def exact_logp(self, obs: dict, tokens: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        """log p(free tokens | the rest) under random-order, one-token-per-step decoding (B,), by
        enumerating all K! orders; K = number of free tokens, the same in every row, at most 6."""
        K = int(free[0].sum())
        if not (free.sum(1) == K).all() or K > 6 or K < 1:
            raise ConfigError(f"exact_logp needs the same 1..6 free tokens in every row, got counts {free.sum(1).tolist()}.")
        B = tokens.shape[0]
        idx = free.nonzero()[:, 1].reshape(B, K)
        total = []
        ctx = self.encoder.tokens(obs)
        for perm in itertools.permutations(range(K)):
            xt = torch.where(free, torch.full_like(tokens, self.tok.mask_id), tokens)
            lp = torch.zeros(B, device=tokens.device)
            for p in perm:
                pos = idx[:, p]
                logit = self.logits(obs, xt, ctx=ctx)[torch.arange(B), pos]
                lp = lp + F.log_softmax(logit, -1).gather(1, tokens[torch.arange(B), pos][:, None])[:, 0]
                xt[torch.arange(B), pos] = tokens[torch.arange(B), pos]
            total.append(lp)
        return torch.logsumexp(torch.stack(total), 0) - math.log(math.factorial(K))
