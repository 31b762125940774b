"""A lean inference path through BLIP's text transformer (the weights of a transformers
``BlipTextModel`` / ``BlipTextLMHeadModel``, read in place; only the self-attention q/k/v weights are
concatenated into one fused projection).

Why: on small models the per-module Python overhead of the stock forward dominates, and
CapFilt runs the text side three times per candidate (decoder, ITC encoder, ITM encoder).
This module computes the same math (post-LN BERT layers with optional cross-attention) with

* ``F.scaled_dot_product_attention`` (SDPA: fused kernels on CUDA, fewer ops on CPU);
* cross-attention keys/values of each image computed ONCE and shared by every candidate
  text of that image (ITM) and every decoding step (captioning);
* a preallocated self-attention KV cache for decoding, from which finished rows are dropped.

Parity with transformers' own forward/generate is tested (``tests/test_capfilt_hf.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

CrossKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (B, H, N, d)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of ``logits (B, V)``: keep the smallest set of tokens whose
    probability mass reaches ``top_p`` (at least one), as transformers' ``TopPLogitsWarper``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False  # keep the most likely token
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, -float("inf"))


class FastText:
    """SDPA forward over the modules of a ``BlipTextModel`` (``bert``), plus an optional LM
    head (``BlipTextOnlyMLMHead``) for decoding."""

    def __init__(self, bert: torch.nn.Module, lm_head: Optional[torch.nn.Module] = None):
        self.emb = bert.embeddings
        self.layers = list(bert.encoder.layer)
        first = self.layers[0].attention.self
        self.heads = first.num_attention_heads
        self.head_dim = first.attention_head_size
        self.lm_head = lm_head
        # fused self-attention projections (one GEMM instead of three; a small copy of q/k/v)
        self.qkv = []
        for layer in self.layers:
            sa = layer.attention.self
            w = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]).detach()
            b = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]).detach()
            self.qkv.append((w, b))
        self.width = self.heads * self.head_dim

    # ---------------------------------------------------------------- pieces
    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, H*d) -> (B, H, L, d)
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:  # (B, H, L, d) -> (B, L, H*d)
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``(B, L)`` ids at positions ``start..start+L`` -> ``(B, L, H)``."""
        e = self.emb.word_embeddings(ids) + self.emb.position_embeddings.weight[start:start + ids.shape[1]]
        return self.emb.LayerNorm(e)

    def cross_kv(self, image_embeds: torch.Tensor) -> CrossKV:
        """Each layer's cross-attention keys and values of ``image_embeds (B, N, Dv)``."""
        out = []
        for layer in self.layers:
            ca = layer.crossattention.self
            out.append((self._split(ca.key(image_embeds)), self._split(ca.value(image_embeds))))
        return out

    @staticmethod
    def _ffn(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
        return layer.output.LayerNorm(layer.output.dense(h) + x)

    def _cross(self, layer: torch.nn.Module, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ca = layer.crossattention
        q = self._split(ca.self.query(x))
        ctx = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return ca.output.LayerNorm(ca.output.dense(self._merge(ctx)) + x)

    # ---------------------------------------------------------------- encoder
    def encode(self, ids: torch.Tensor, mask: torch.Tensor, cross: Optional[CrossKV] = None,
               index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Bidirectional encoding of ``ids (B, L)`` with padding ``mask (B, L)``; with
        ``cross`` (per-image keys/values) the image-grounded mode, text ``i`` attending to image
        ``index[i]``.  Returns ``(B, L, H)``."""
        x = self.embed(ids)
        attn_mask = mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        for li, layer in enumerate(self.layers):
            sa = layer.attention
            q, k, v = (self._split(t) for t in F.linear(x, *self.qkv[li]).split(self.width, dim=-1))
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            x = sa.output.LayerNorm(sa.output.dense(self._merge(ctx)) + x)
            if cross is not None:
                kk, vv = cross[li]
                if index is not None:
                    kk, vv = kk[index], vv[index]
                x = self._cross(layer, x, (kk, vv))
            x = self._ffn(layer, x)
        return x

    # ---------------------------------------------------------------- decoder
    @torch.no_grad()
    def decode(self, prompt_ids: torch.Tensor, image_embeds: torch.Tensor, *, sample: bool, top_p: float,
               max_new: int, min_new: int, eos_id: int,
               generator: Optional[torch.Generator] = None) -> list[list[int]]:
        """KV-cached nucleus sampling (from ``generator``: a per-shard stream, so concurrent
        shards in threads stay reproducible) or greedy decoding.  ``prompt_ids (B, P)`` (BOS first,
        the same prompt for every row), ``image_embeds (B, N, Dv)``.  Returns each row's new
        token ids without EOS.  Rows leave the batch when they emit EOS."""
        b, p = prompt_ids.shape
        total = p + max_new
        dev = prompt_ids.device
        cross = self.cross_kv(image_embeds)
        x = self.embed(prompt_ids)
        dtype = x.dtype
        caches = [(torch.empty(b, self.heads, total, self.head_dim, device=dev, dtype=dtype),
                   torch.empty(b, self.heads, total, self.head_dim, device=dev, dtype=dtype)) for _ in self.layers]
        out: list[list[int]] = [[] for _ in range(b)]
        active = torch.arange(b, device=dev)
        pos = 0
        for step in range(max_new):
            n = x.shape[1]
            for li, layer in enumerate(self.layers):
                sa = layer.attention
                q, k, v = (self._split(t) for t in F.linear(x, *self.qkv[li]).split(self.width, dim=-1))
                kc, vc = caches[li]
                kc[:, :, pos:pos + n] = k
                vc[:, :, pos:pos + n] = v
                ctx = F.scaled_dot_product_attention(q, kc[:, :, :pos + n], vc[:, :, :pos + n], is_causal=n > 1)
                h = sa.output.LayerNorm(sa.output.dense(self._merge(ctx)) + x)
                h = self._cross(layer, h, cross[li])
                x = self._ffn(layer, h)
            pos += n
            logits = self.lm_head(x[:, -1:, :])[:, 0, :].float()  # (b, V)
            if step < min_new:
                logits[:, eos_id] = -float("inf")
            if sample:
                probs = top_p_filter(logits, top_p).softmax(dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(dim=-1)
            done = nxt == eos_id
            for row, tok in zip(active[~done].tolist(), nxt[~done].tolist()):
                out[row].append(tok)
            if bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                active, nxt = active[keep], nxt[keep]
                caches = [(k[keep], v[keep]) for k, v in caches]
                cross = [(k[keep], v[keep]) for k, v in cross]
            x = self.embed(nxt.unsqueeze(1), start=pos)
        return out


__all__ = ["CrossKV", "FastText"]
