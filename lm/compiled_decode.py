"""The decode step compiled ahead of time (AOTInductor), for the engine's `compile` mode.

Small-batch decoding is bound by weight bytes and per-call overhead, not arithmetic. `torch.compile`
removes the Python between kernels but keeps some around each call: guards, and lifting every
module tensor (~100 here) into the graph's inputs. An AOTInductor program has neither: it is
exported once per shape class, compiled to a shared library, and called with the few tensors that
change (ids, positions, the KV caches). The model's own weights are handed to it at load, not
copied. Two shape classes cover continuous batching:

- one sequence (no mask);
- 2..max_batch_size sequences (always masked: `GPT.decode` masks whenever several decode together).

Batch size and length stay symbolic, so nothing compiles while serving. A step that fills the
whole context (length == block_size) runs eagerly: export cannot keep that one length symbolic.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.export import Dim

from lm.inference import Int8Linear
from lm.model import GPT


class _Step(nn.Module):
    """GPT.decode_step with the length carried as a tensor's size, which export keeps symbolic."""

    def __init__(self, model: GPT, masked: bool):
        super().__init__()
        self.model, self.masked = model, masked

    def forward(self, ids, pos, span, k_caches, v_caches):
        return self.model.decode_step(ids, pos, span.shape[0], self.masked, k_caches, v_caches)


@contextlib.contextmanager
def _fbgemm_set_aside(model: nn.Module):
    """Export cannot trace FBGEMM's packed int8 weights (a TorchScript object). The exported step
    runs Int8Linear's traced path (`torch._int_mm`), so they are set aside while exporting."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    kept = [m.dynamic for m in layers]
    for layer in layers:
        layer.dynamic = None
    try:
        yield
    finally:
        for layer, dynamic in zip(layers, kept):
            layer.dynamic = dynamic


class CompiledDecodeStep:
    """A drop-in for `model.decode(ids, positions, k_caches, v_caches)` on this engine's caches."""

    def __init__(self, model: GPT, max_batch_size: int, k_caches: list[torch.Tensor],
                 v_caches: list[torch.Tensor]):
        self.model, self.block_size = model, model.cfg.block_size
        self.k_caches, self.v_caches = k_caches, v_caches
        device = k_caches[0].device
        self.span = torch.empty(self.block_size, device=device)
        self.single = self._build(1, masked=False)
        self.batched = self._build(max_batch_size, masked=True) if max_batch_size > 1 else None

    def _build(self, max_batch: int, masked: bool):
        device, n = self.span.device, len(self.k_caches)
        rows = 2 if masked else 1
        example = (torch.zeros(rows, dtype=torch.long, device=device), torch.full((rows,), 2, device=device),
                   self.span[:3], self.k_caches, self.v_caches)
        batch = {0: Dim("batch", min=2, max=max_batch)} if masked and max_batch > 2 else None  # else static
        length = {0: Dim("length", min=2, max=self.block_size - 1)}
        step = _Step(self.model, masked)
        with _fbgemm_set_aside(self.model), torch.no_grad(), warnings.catch_warnings(), \
                tempfile.TemporaryDirectory(prefix="lm-decode-") as workdir:
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")  # inside torch.export
            program = torch.export.export(step, example, dynamic_shapes=(batch, batch, length, [None] * n, [None] * n),
                                          strict=False)
            path = torch._inductor.aoti_compile_and_package(  # the package is unpacked on load, then not needed
                program, package_path=str(Path(workdir) / "decode.pt2"),
                inductor_configs={"aot_inductor.package_constants_in_so": False})
            compiled = torch._inductor.aoti_load_package(path)
        weights = {**dict(step.named_parameters()), **dict(step.named_buffers())}
        compiled.load_constants({name: weights[name] for name in compiled.get_constant_fqns()},
                                check_full_update=True, user_managed=True)  # the model's tensors, not copies
        return compiled.loader

    def __call__(self, ids: torch.Tensor, positions: list[int], k_caches: list[torch.Tensor],
                 v_caches: list[torch.Tensor]) -> torch.Tensor:
        length = max(positions) + 1
        if length >= self.block_size or k_caches is not self.k_caches or v_caches is not self.v_caches:
            return self.model.decode(ids, positions, k_caches, v_caches)
        program = self.single if len(positions) == 1 else self.batched
        pos = torch.tensor(positions, device=ids.device)
        return program.boxed_run([ids, pos, self.span[:length], *self.k_caches, *self.v_caches])[0]
