"""Training-memory planner: the bytes one rank holds in a training step, from the config alone.

Pure arithmetic (nothing is allocated), modelled on what gemmakit's trainer really keeps; every figure
is in bytes, per rank. A step of `gemmakit train` holds:

- parameters: fp32 master weights (the trainer keeps fp32; `--bf16` is autocast, not bf16 weights). LoRA
  keeps the frozen base in fp32 too; QLoRA keeps it as quant.py's int8 / int4 (`quant.weight_bytes`,
  norms and scales in bf16) plus the dequantization workspace. LoRA adapters are fp32.
- gradients: fp32, one per parameter that gets one (full fine-tuning: the text decoder; a vision tower
  gets none from text data; LoRA: the adapters).
- optimizer: AdamW's m and v in fp32 (8 bytes per trained parameter; the fused kernel adds nothing).
- FSDP2 (`gpus` > 1, train/parallel.py): parameters, gradients and optimizer state are sharded, each
  divided by the number of ranks. Each rank also holds the gathered (unsharded) root group -- the tied
  embedding, the final norm and a vision tower -- through the whole step (parallel.shard does not
  reshard the root after the forward), up to two gathered blocks (the running one and the prefetched
  next one) and, in the backward, two blocks' unsharded gradients with their fp32 reduce-scatter
  buffer. With `bf16` the mixed-precision policy gathers the parameters in bf16 (master weights,
  gradients and optimizer stay fp32), so the forward sees bf16 weights: autocast then makes no weight
  copies, and the residual stream is bf16.
- activations: the tensors autograd saves for the backward (`activation_bytes`, counted tensor by
  tensor from model.py, lora.py and qlora.py; tests/test_train_memory.py checks the count against the
  tensors a tiny model really saves). With activation checkpointing each block keeps only its input,
  and one block's activations are recomputed at a time in the backward. Under bf16 autocast the saved
  tensors include the bf16 copies autocast makes of the weights and of each projection's input.
- the loss head (`head_bytes`): the losses (train/losses.py) run the tied LM head `chunk` tokens at a
  time and compute each chunk's gradient inside the forward, so they hold a few [chunk x vocab] arrays,
  the hidden states' gradient [tokens x d], and when the head trains (full fine-tuning) its fp32
  [vocab x d] gradient plus up to two per-chunk [vocab x d] gradients (the previous chunk's is still
  referenced while the next is computed).

The peak is the larger of two moments: the end of the loss's forward (weights, optimizer state,
every saved activation, the head's buffers) and the end of the backward (weights, optimizer state,
every gradient, and for full fine-tuning two more [vocab x d] arrays while the embedding's two
gradients, the head's and the lookup's, are summed). The steady state is planned (step 2 on: AdamW's
state exists).

Not modelled: the framework's own memory (the Python/torch runtime, ~0.2 GiB on the CPU; a CUDA context
and kernels' workspaces on an accelerator), the allocator's fragmentation, the data loader.
`min_gpus` therefore leaves `HEADROOM` of each accelerator free.

Checked against the measured peak resident memory of the real Gemma 3 270M (tests/test_train_memory.py,
`@pytest.mark.real`): see the README's training section for the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gemmakit.config import Config

HEADROOM = 0.10  # of each accelerator's memory left for what is not modelled (runtime, fragmentation)
MODES = ("full", "lora", "qlora")
_MAX_GPUS = 4096


@dataclass(frozen=True)
class Setup:
    """One training configuration to plan for (the `gemmakit train` options of the same names)."""

    batch: int = 8  # sequences per micro-batch per rank (--batch-size)
    seq_len: int = 256  # tokens per sequence (--seq-len)
    mode: str = "full"  # "full", "lora" or "qlora"
    lora_rank: int = 16  # --lora-rank (lora, qlora)
    quantize_base: str = "int4"  # --quantize-base (qlora): "int8" or "int4"
    bf16: bool = False  # --bf16: bf16 autocast of the forward/backward
    activation_checkpointing: bool = False  # --activation-checkpointing
    chunk: int = 1024  # --chunk: tokens per LM-head chunk in the loss
    gpus: int = 1  # ranks (torchrun --nproc-per-node); FSDP2 shards across them when > 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown training mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mode == "qlora" and self.quantize_base not in ("int8", "int4"):
            raise ValueError(f"--quantize-base must be int8 or int4, got {self.quantize_base!r}")
        for name in ("batch", "seq_len", "chunk", "gpus") + (("lora_rank",) if self.mode != "full" else ()):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.mode == "qlora" and self.gpus > 1:
            raise ValueError("QLoRA (--quantize-base) runs in one process: gemmakit does not shard it under torchrun")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


# -- parameter counts ------------------------------------------------------------------------------

def matrix_shapes(config: Config) -> list[tuple[str, int, int]]:
    """(name, out, in) of one decoder block's projections, in lora.TARGETS' names."""
    c = config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return [("q_proj", q, c.d_model), ("k_proj", kv, c.d_model), ("v_proj", kv, c.d_model),
            ("o_proj", c.d_model, q), ("gate_proj", c.intermediate_size, c.d_model),
            ("up_proj", c.intermediate_size, c.d_model), ("down_proj", c.d_model, c.intermediate_size)]


def block_params(config: Config) -> int:
    """Parameters of one decoder block (projections and norms)."""
    return (config.param_counts()["non_embedding"] - config.d_model) // config.n_layers


def lora_params(config: Config, rank: int) -> tuple[int, int]:
    """(text decoder's, vision tower's) LoRA parameters of `lora.apply_lora(model, rank)`: A [rank, in] and
    B [out, rank] on every projection of lora.TARGETS -- in a SigLIP tower that is q/k/v_proj (its output
    projection is `out_proj`)."""
    text = config.n_layers * sum(rank * (o + i) for _, o, i in matrix_shapes(config))
    vision = 0 if config.vision is None else config.vision.n_layers * 3 * rank * 2 * config.vision.hidden_size
    return text, vision


def _vision_params(config: Config) -> int:
    counts = config.param_counts()
    return counts.get("vision", 0) + counts.get("projector", 0)


# -- the pieces ------------------------------------------------------------------------------------

def weight_bytes(config: Config, s: Setup) -> int:
    """Bytes of the model's parameters as the trainer keeps them, whole (before any sharding): fp32
    for full fine-tuning and LoRA (base and adapters), quant.py's int8/int4 base (bf16 norms and scales)
    plus fp32 adapters and the bf16 dequantization workspace for QLoRA (text decoder only: gemmakit's
    QLoRA refuses vision models)."""
    from gemmakit.quant import BLOCK_ELEMENTS
    from gemmakit.quant import weight_bytes as quantized_bytes

    counts = config.param_counts()
    text = counts["embedding"] + counts["non_embedding"]
    lora_text, lora_vision = lora_params(config, s.lora_rank) if s.mode != "full" else (0, 0)
    if s.mode == "qlora":
        return quantized_bytes(config, s.quantize_base, 2) + 4 * lora_text + 2 * BLOCK_ELEMENTS
    return 4 * (text + _vision_params(config) + lora_text + lora_vision)


def trained_params(config: Config, s: Setup) -> int:
    """Parameters that get a gradient and AdamW state from text data: the whole text decoder for full
    fine-tuning (a vision tower is not run), the text decoder's adapters for LoRA/QLoRA."""
    if s.mode == "full":
        counts = config.param_counts()
        return counts["embedding"] + counts["non_embedding"]
    return lora_params(config, s.lora_rank)[0]


def _bf16_weights(s: Setup) -> bool:
    """Does the forward see bf16 weights? QLoRA's bf16 base, and FSDP2's bf16 parameter dtype (`bf16` on
    more than one rank); otherwise the weights are fp32 and bf16 autocast casts them."""
    return s.mode == "qlora" or (s.bf16 and s.gpus > 1)


def _dtypes(s: Setup) -> tuple[int, int]:
    """(residual-stream bytes, compute bytes): the embedding's dtype carries the residual stream (fp32,
    or bf16 with bf16 weights); products run in bf16 under autocast or on bf16 weights."""
    residual = 2 if _bf16_weights(s) else 4
    return residual, 2 if (s.bf16 or s.mode == "qlora") else 4


def block_activation_bytes(config: Config, s: Setup, first: bool = False) -> int:
    """Bytes autograd saves for the backward in one decoder block (batch x seq_len tokens), counted from
    model.py's operations. `first`: the first block under LoRA/QLoRA, whose input (from the frozen
    embedding) needs no gradient, so its first norm saves nothing and, under bf16 autocast, the bf16
    copies of its frozen q/k/v weights are not kept."""
    c, n, b, t = config, s.tokens, s.batch, s.seq_len
    d, h, k, hd, inter = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.intermediate_size
    residual, a = _dtypes(s)
    full = s.mode == "full"
    frozen_input = first and not full
    # RMSNorm (fp32 inside): its input (an fp32 copy when the input is bf16) and rsqrt; the normalized
    # values too when its weight trains. Its bf16 output under autocast is cast again by each product.
    norms = 4 if c.post_norms else 2
    per_norm = 4 * n * d + 4 * n + (4 * n * d if full else 0)
    total = (norms - frozen_input) * per_norm
    # Products' inputs: one tensor shared by q/k/v and one by gate/up, unless autocast casts an fp32
    # input to bf16 once per product (and saves each copy). o_proj's and down_proj's inputs are already
    # in the compute dtype: the attention output (below) and the gated product (below).
    cast_each = a == 2 and residual == 4
    total += (3 if cast_each else 1) * n * d * a + (2 if cast_each else 1) * n * d * a
    if c.qk_norm:  # QK-norm: fp32 input (or copy) and rsqrt per head; normalized values when it trains
        total += 4 * n * hd * (h + k) + 4 * n * (h + k) + (4 * n * hd * (h + k) if full else 0)
    # Attention: RoPE saves only its cos/sin tables (shared, see activation_bytes). q, k, v in the
    # compute dtype, and the output, which o_proj reads.
    total += a * n * hd * (h + 2 * k) + a * n * h * hd
    if c.attn_softcap is None:  # SDPA: its log-sum-exp and the mask, converted to the compute dtype
        total += 4 * n * h + a * b * t * t
    else:  # Gemma 2, written out: capped scores, fp32 softmax, its bf16 copy for the product, bool mask
        total += b * h * t * t * (a + 4 + (2 if a == 2 else 0)) + b * t * t
    total += 4 * a * n * inter  # MLP: gate output, its GELU, up output, their product
    if s.mode != "full":  # LoRA: x A^T [n, rank] per adapted projection (B's input)
        total += 7 * a * n * s.lora_rank
    mats = sum(o * i for _, o, i in matrix_shapes(c))
    if a == 2:
        if not _bf16_weights(s):  # autocast's bf16 copies of the fp32 weights, kept for dL/dx
            skipped = sum(o * i for name, o, i in matrix_shapes(c) if name in ("q_proj", "k_proj", "v_proj"))
            total += 2 * (mats - (skipped if frozen_input else 0))
        if s.mode != "full" and s.gpus == 1:  # bf16 copies of the fp32 adapters (FSDP2 gathers them in bf16)
            total += 2 * sum(s.lora_rank * (o + i) for _, o, i in matrix_shapes(c))
    return total


def activation_bytes(config: Config, s: Setup, checkpointing: bool | None = None) -> int:
    """Bytes of activations saved for the backward at the end of the forward (through the final norm,
    the loss head's buffers not included: `head_bytes`). `checkpointing` (default: the setup's): each
    block keeps only its input, the rest is recomputed one block at a time in the backward
    (`recompute_bytes`)."""
    c, n = config, s.tokens
    residual, a = _dtypes(s)
    checkpointing = s.activation_checkpointing if checkpointing is None else checkpointing
    full = s.mode == "full"
    # RoPE's cos and sin [batch, seq_len, head_dim] per layer kind, in the residual's dtype, shared by
    # every block of that kind (and saved by checkpointing as the blocks' inputs).
    total = len(set(c.layer_types)) * 2 * n * c.head_dim * residual
    total += 4 * n * c.d_model + 4 * n + (4 * n * c.d_model if full else 0)  # final norm
    if full:
        total += 8 * n  # the embedding's int64 token ids
    if checkpointing:
        # Each block's input [n, d] and the positions (shared); autocast's cache of bf16 weight copies
        # (full fine-tuning: trained weights are cached) lives until the loss's forward has run.
        fp32_weights = a == 2 and not _bf16_weights(s)
        cached = 2 * c.n_layers * sum(o * i for _, o, i in matrix_shapes(c)) if full and fp32_weights else 0
        return total + c.n_layers * n * c.d_model * residual + 8 * n + cached
    return total + sum(block_activation_bytes(c, s, first=i == 0) for i in range(c.n_layers))


def recompute_bytes(config: Config, s: Setup) -> int:
    """With activation checkpointing: one block's activations, recomputed in the backward (0 without)."""
    return block_activation_bytes(config, s) if s.activation_checkpointing else 0


def head_bytes(config: Config, s: Setup) -> int:
    """Peak bytes of the loss head (train/losses.py's chunked cross-entropy) during the loss's forward,
    which also computes its gradient: the final hidden states and their gradient [tokens x d]; per
    chunk the logits [chunk x vocab] (plus an fp32 copy when they are bf16) and exp(logits - max), which
    becomes their gradient in place; a bf16 copy of the head's weight under bf16 autocast of a float
    head; and when the head trains (full fine-tuning) its [vocab x d] gradient (fp32; bf16 when FSDP2
    gathers the head in bf16), accumulated over the chunks, up to two chunks' own [vocab x d] gradients
    (the previous chunk's is still referenced while the next is computed) and under autocast the bf16
    gradient before its cast to fp32."""
    c, n = config, s.tokens
    residual, a = _dtypes(s)
    vd = c.vocab_size * c.d_model
    chunk = min(s.chunk, n)
    chunks = math.ceil(n / chunk)
    total = 2 * n * c.d_model * residual  # h and grad_h
    total += chunk * c.vocab_size * (a + 4 + (4 if a == 2 else 0))
    fp32_head = not _bf16_weights(s)  # else bf16: FSDP2's bf16 gathered head, or QLoRA's (dequantized by blocks)
    if a == 2 and fp32_head:
        total += 2 * vd  # autocast's bf16 copy of the fp32 head
    if s.mode == "full":  # gradients in the gathered head's dtype (FSDP2 reduces them in fp32 later)
        total += (4 if fp32_head else 2) * vd * (1 + min(chunks - 1, 2)) + (2 * vd if a == 2 and fp32_head else 0)
    return total


@dataclass(frozen=True)
class Plan:
    """Bytes per rank of one training step; `peak` is what one rank needs."""

    config: Config
    setup: Setup
    parameters: int  # master weights (sharded under FSDP)
    gradients: int
    optimizer: int  # AdamW m and v
    gathered: int  # FSDP2: unsharded root group and two blocks (0 on one rank)
    gathered_grads: int  # FSDP2: two blocks' unsharded gradients in the backward (0 on one rank)
    activations: int  # saved for the backward, as the setup runs (checkpointing or not)
    activations_no_checkpointing: int
    activations_checkpointing: int
    recompute: int  # one block recomputed in the backward (checkpointing only)
    head: int  # the loss head's buffers during the loss's forward
    embedding_grads: int  # two more [vocab x d] arrays at the embedding's backward (full fine-tuning)
    end_of_forward: int
    end_of_backward: int

    @property
    def peak(self) -> int:
        return max(self.end_of_forward, self.end_of_backward)


def plan(config: Config, s: Setup) -> Plan:
    """The per-rank memory of training `config` with setup `s` (see the module docstring)."""
    g = s.gpus
    params = math.ceil(weight_bytes(config, s) / g)
    trained = trained_params(config, s)
    grads, opt = math.ceil(4 * trained / g), math.ceil(8 * trained / g)
    gathered = gathered_grads = 0
    gathered_bytes = 2 if s.bf16 and g > 1 else 4  # FSDP2's param_dtype (parallel.shard's policy); fp32 on one rank
    if g > 1:
        root = config.vocab_size * config.d_model + config.d_model + _vision_params(config)
        gathered = gathered_bytes * (root + 2 * block_params(config))
        gathered_grads = 2 * (gathered_bytes + 4) * block_params(config) if s.mode == "full" else 0
    act_plain = activation_bytes(config, s, checkpointing=False)
    act_ckpt = activation_bytes(config, s, checkpointing=True)
    act = act_ckpt if s.activation_checkpointing else act_plain
    head = head_bytes(config, s)
    vd = config.vocab_size * config.d_model
    base = params + opt + gathered
    end_fwd = base + act + head
    # The backward: every gradient, a block being recomputed, and at the embedding two more [vocab x d]
    # arrays (measured on the 270M: 1.25 GiB): autograd adds the head's gradient (a transposed matmul
    # result) and the lookup's out of place, then copies the sum to the weight's layout; the lookup's own
    # is zero-filled memory the kernel writes only a few rows of. Under FSDP2 the embedding's gradient is
    # whole (computed against the gathered weight), in the gathered dtype, until its reduce-scatter at
    # the end of the backward (whose fp32 buffer is no larger than the two arrays in bf16).
    emb_grads = 2 * gathered_bytes * vd if s.mode == "full" else 0
    unsharded_emb = gathered_bytes * vd - math.ceil(4 * vd / g) if s.mode == "full" and g > 1 else 0
    end_bwd = base + grads + unsharded_emb + emb_grads + gathered_grads + recompute_bytes(config, s)
    return Plan(config, s, params, grads, opt, gathered, gathered_grads, act, act_plain, act_ckpt,
                recompute_bytes(config, s), head, emb_grads, end_fwd, end_bwd)


def min_gpus(config: Config, s: Setup, gpu_bytes: float, headroom: float = HEADROOM) -> int | None:
    """The fewest ranks of `gpu_bytes` each (FSDP2 across them, same per-rank micro-batch) whose planned
    peak fits in (1 - headroom) of their memory; None if none does (QLoRA: one rank or none)."""
    budget = gpu_bytes * (1 - headroom)
    limit = 1 if s.mode == "qlora" else _MAX_GPUS
    if plan(config, _with(s, gpus=limit)).peak > budget:  # what no sharding divides does not fit
        return None
    return next(n for n in range(1, limit + 1) if plan(config, _with(s, gpus=n)).peak <= budget)


def _with(s: Setup, **changes) -> Setup:
    import dataclasses

    return dataclasses.replace(s, **changes)


def parse_size(text: str) -> int:
    """Bytes of a size such as "80GB", "24 GiB", "512MB" (GB = GiB = 2**30 bytes: an "80 GB" accelerator
    has 80 GiB). Raises ValueError for anything else."""
    units = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
             "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0 or not math.isfinite(value):
        raise ValueError(f"not a memory size: {text!r} (write e.g. 80GB, 24GiB, 512MB)")
    return int(value * units[unit])


# -- printing --------------------------------------------------------------------------------------

def describe_setup(s: Setup) -> str:
    what = {"full": "full fine-tuning", "lora": f"LoRA rank {s.lora_rank}",
            "qlora": f"QLoRA rank {s.lora_rank} on an {s.quantize_base} base"}[s.mode]
    precision = "bf16 autocast" if s.bf16 else ("bf16 base" if s.mode == "qlora" else "fp32")
    ckpt = ", activation checkpointing" if s.activation_checkpointing else ""
    ranks = f"{s.gpus} ranks (FSDP2)" if s.gpus > 1 else "1 rank"
    return (f"{what}, {ranks}, micro-batch {s.batch} x {s.seq_len:,} tokens, {precision}{ckpt}, "
            f"LM-head chunks of {min(s.chunk, s.tokens):,} tokens")


def format_plan(p: Plan, fmt) -> str:
    """The plan as `gemmakit info --train` prints it; `fmt` formats a byte count."""
    s = p.setup
    param_kind = {"full": "fp32", "lora": "fp32 base + fp32 adapters",
                  "qlora": f"{s.quantize_base} base + fp32 adapters"}[s.mode]
    if s.mode == "qlora" and p.config.vision is not None:
        param_kind += " (the text decoder alone: gemmakit's QLoRA refuses vision models today)"
    shard = f", 1/{s.gpus} each" if s.gpus > 1 else ""
    lines = [f"training memory per rank: {describe_setup(s)}",
             f"  parameters   {fmt(p.parameters):>11}  {param_kind}{shard}",
             f"  gradients    {fmt(p.gradients):>11}  fp32, trained parameters only",
             f"  optimizer    {fmt(p.optimizer):>11}  AdamW m and v, fp32"]
    if s.gpus > 1:
        lines.append(f"  gathered     {fmt(p.gathered):>11}  FSDP2: the root (embedding, final norm"
                     f"{', vision tower' if p.config.vision is not None else ''}) and two blocks, "
                     f"{'bf16' if s.bf16 else 'fp32'}"
                     + (f"; {fmt(p.gathered_grads)} of two blocks' gradients in the backward"
                        if p.gathered_grads else ""))
    lines.append(f"  activations  {fmt(p.activations):>11}  saved for the backward; without checkpointing "
                 f"{fmt(p.activations_no_checkpointing)}, with {fmt(p.activations_checkpointing)}"
                 + (f" (+ {fmt(p.recompute)} for the block being recomputed)" if s.activation_checkpointing else ""))
    lines.append(f"  loss head    {fmt(p.head):>11}  chunked logits and gradients"
                 + (", the head's [vocab x d] gradient included" if s.mode == "full" else ""))
    where = "end of the loss's forward" if p.end_of_forward >= p.end_of_backward else "end of the backward"
    lines.append(f"  peak         {fmt(p.peak):>11}  at the {where} (forward {fmt(p.end_of_forward)}, "
                 f"backward {fmt(p.end_of_backward)}); plus the runtime (~0.2 GiB on the CPU, a CUDA context)")
    return "\n".join(lines)


def format_fits(config: Config, s: Setup, gpu_bytes: int, fmt) -> str:
    """The fewest accelerators of `gpu_bytes` for full fine-tuning, LoRA and QLoRA int8/int4 of `config`
    with the rest of `s` (batch, seq_len, precision, checkpointing, chunk)."""
    cells = []
    for mode, quant in (("full", "int4"), ("lora", "int4"), ("qlora", "int8"), ("qlora", "int4")):
        setup = _with(s, mode=mode, quantize_base=quant, gpus=1)
        n = min_gpus(config, setup, gpu_bytes)
        name = {"full": "full fine-tuning", "lora": f"LoRA r{s.lora_rank}"}.get(mode, f"QLoRA {quant}")
        cells.append(f"{name} {n if n is not None else '-'}")
    note = ("; QLoRA runs on one rank ('-': does not fit one)"
            + ("; gemmakit's QLoRA refuses vision models: their figures are for the text decoder alone"
               if config.vision is not None else ""))
    return (f"fewest {fmt(gpu_bytes)} accelerators (planned peak <= {1 - HEADROOM:.0%} of each; same micro-batch "
            f"per rank): " + ", ".join(cells) + note)


def fits_table(configs: list[Config], s: Setup, gpu_bytes: int, fmt) -> str:
    """A Markdown table: per config, the fewest accelerators of `gpu_bytes` for full fine-tuning, LoRA
    (rank s.lora_rank) and QLoRA int8 / int4 with the planned peak per rank on that many ("-": none fits;
    then the one-rank peak), the rest of `s` as given (the README's table). "*": gemmakit's QLoRA refuses
    vision models today, the figure is for the text decoder alone."""
    head = ("| model | parameters | full fine-tuning | LoRA r" + str(s.lora_rank) + " | QLoRA int8 | QLoRA int4 |\n"
            "|---|---:|---:|---:|---:|---:|")
    rows = [head]
    for c in configs:
        counts = c.param_counts()
        cells = [c.name, f"{sum(counts.values()) / 1e9:.2f}B"]
        for mode, quant in (("full", "int4"), ("lora", "int4"), ("qlora", "int8"), ("qlora", "int4")):
            setup = _with(s, mode=mode, quantize_base=quant, gpus=1)
            n = min_gpus(c, setup, gpu_bytes)
            mark = "*" if mode == "qlora" and c.vision is not None else ""
            peak = plan(c, _with(setup, gpus=n or 1)).peak
            cells.append(f"{n if n is not None else '-'}{mark} ({fmt(peak)}{' each' if n and n > 1 else ''})")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
