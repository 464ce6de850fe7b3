"""Block swap: keep the frozen weights of N transformer blocks off the compute device and bring each
block in only for its forward and for its backward (kohya's `--blocks_to_swap`).

A swapped block runs inside an autograd Function: the forward brings the block's frozen weights in,
runs it without keeping activations, sends them out; the backward brings them in again, recomputes
the block with gradients and back-propagates through it, then sends them out. So a swapped block is
also gradient-checkpointed, and the weights it needs are on the device exactly while it runs, in
whatever order autograd visits the graph. LoRA weights (trained) stay on the device: their gradients
and optimizer state never move. Blocks swapped are the last N of the double-then-single sequence (the
first needed again in backward).

The mechanism moves weights between a device and an offload place that may also change dtype: on
a GPU machine cuda <-> cpu; on a CPU-only machine the test moves float32 <-> float64 (lossless), which
runs the very same hooks and proves that every use of a block's weights found them brought in.
"""

from __future__ import annotations

import types

import torch


class _SwappedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, swap, index, run, n_inputs, *tensors_and_params):
        # the block's trainable (LoRA) weights come in as inputs too, only so that the outputs
        # require grad even when no activation does (the first block's input comes from frozen layers)
        tensors, ctx.n_params = tensors_and_params[:n_inputs], len(tensors_and_params) - n_inputs
        ctx.swap, ctx.index, ctx.run = swap, index, run
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        ctx.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]
        ctx.save_for_backward(*tensors)
        swap.bring_in(index)
        try:
            with torch.no_grad():
                outputs = run(*tensors)
        finally:
            swap.send_out(index)
        return tuple(o.contiguous() for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        swap = ctx.swap
        swap.bring_in(ctx.index)
        try:
            devices = list(range(torch.cuda.device_count())) if ctx.cuda_rng is not None else []
            with torch.random.fork_rng(devices=devices):
                torch.set_rng_state(ctx.rng)  # dropout in the recompute draws what the forward drew
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state_all(ctx.cuda_rng)
                with torch.enable_grad(), _autocast(ctx.autocast):
                    outputs = ctx.run(*inputs)
            pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad and g is not None]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        finally:
            swap.send_out(ctx.index)
        # the LoRA weights got their gradients from the inner backward already
        return (None, None, None, None, *[t.grad if t.requires_grad else None for t in inputs], *[None] * ctx.n_params)


class _autocast:
    def __init__(self, states):
        self.contexts = [torch.autocast(d, dtype=dt, enabled=on) for d, on, dt in states if on]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)


def _apply_to_trained(block, fn, recurse=True):
    """Module._apply of a swapped block: a `.to(...)` of the whole transformer (a task's, or accelerate's
    prepare) reaches only the block's trained (LoRA) weights; its frozen ones stay where the swap keeps
    them, so the model can be installed before it is placed on the card and never holds every block
    there at once."""
    for p in block.parameters():
        if p.requires_grad:
            p.data = fn(p.data)
            if p.grad is not None:
                p.grad.data = fn(p.grad.data)
    return block


def _checkpoint(module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


class BlockSwap:
    """Swap the last `count` blocks of a FluxTransformer2DModel.

    `device`: where blocks compute; `offload_device` / `offload_dtype`: where (and as what) their
    frozen weights wait. Install after LoRA injection, fp8 storage and gradient checkpointing; the
    model may be moved to `device` afterwards (the swapped blocks' frozen weights do not follow)."""

    def __init__(self, transformer, count: int, *, device, offload_device="cpu", offload_dtype=None):
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        if not 0 <= count <= len(blocks):
            raise ValueError(f"blocks_to_swap: {count} is outside 0-{len(blocks)} (this model has "
                             f"{len(transformer.transformer_blocks)} double + {len(transformer.single_transformer_blocks)} single blocks)")
        self.transformer = transformer
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.offload_dtype = offload_dtype
        self.blocks = blocks[len(blocks) - count:] if count else []
        self.ids = {id(b) for b in self.blocks}
        self.resident = [False] * len(self.blocks)
        self.moves = {"in": 0, "out": 0}
        self._dtypes: list[dict[str, torch.dtype]] = []
        self._installed = False

    def _frozen(self, index: int):
        block = self.blocks[index]
        for name, p in block.named_parameters():
            if not p.requires_grad:
                yield name, p
        yield from block.named_buffers()

    def bring_in(self, index: int) -> None:
        if self.resident[index]:
            return
        dtypes = self._dtypes[index]
        for name, t in self._frozen(index):
            t.data = t.data.to(self.device, dtype=dtypes[name], non_blocking=True)
        self.resident[index] = True
        self.moves["in"] += 1

    def send_out(self, index: int) -> None:
        if not self.resident[index]:
            return
        for _, t in self._frozen(index):
            dtype = self.offload_dtype if self.offload_dtype is not None and t.is_floating_point() else t.dtype
            t.data = t.data.to(self.offload_device, dtype=dtype)
        self.resident[index] = False
        self.moves["out"] += 1

    def install(self) -> BlockSwap:
        """Move the swapped blocks out, route their forward through the swap, keep the others on
        the device; diffusers' own gradient checkpointing goes on for the others only."""
        if self._installed:
            return self
        for index, block in enumerate(self.blocks):
            self._dtypes.append({name: t.dtype for name, t in self._frozen(index)})
            self.resident[index] = True
            self.send_out(index)
            block.forward = self._forward(index, block.forward)
            block._apply = types.MethodType(_apply_to_trained, block)
        self.moves = {"in": 0, "out": 0}
        if getattr(self.transformer, "gradient_checkpointing", False):
            self.transformer.enable_gradient_checkpointing(self.checkpointing_func)
        self._installed = True
        return self

    def checkpointing_func(self, module, *args):
        """diffusers' checkpointing for blocks that stay; swapped blocks recompute in their own
        backward already."""
        if id(module) in self.ids:
            return module(*args)
        return _checkpoint(module, *args)

    def _forward(self, index: int, original):
        swap = self

        def forward(hidden_states, encoder_hidden_states=None, temb=None, image_rotary_emb=None,
                    joint_attention_kwargs=None):
            def run(hs, ehs, tb, cos, sin):
                return original(hidden_states=hs, encoder_hidden_states=ehs, temb=tb, image_rotary_emb=(cos, sin),
                                joint_attention_kwargs=joint_attention_kwargs)

            cos, sin = image_rotary_emb
            tensors = (hidden_states, encoder_hidden_states, temb, cos, sin)
            if not torch.is_grad_enabled():  # sampling: in, run, out
                swap.bring_in(index)
                try:
                    return run(*tensors)
                finally:
                    swap.send_out(index)
            params = [p for p in swap.blocks[index].parameters() if p.requires_grad]
            return _SwappedBlock.apply(swap, index, run, len(tensors), *tensors, *params)

        return forward
