"""The decode step compiled ahead of time (AOTInductor), for the engine's `compile` mode.

Small-batch decoding is bound by weight bytes and per-call overhead, not arithmetic. `torch.compile`
removes the Python between kernels but keeps some around each call: guards, and lifting every
module tensor (~100 here) into the graph's inputs. An AOTInductor program has neither: it is
exported once, compiled to a shared library, and called with the few tensors that change (ids,
positions, the KV caches). The model's own weights are handed to it at load, not copied. One
program serves every batch size of continuous batching, 1..max_batch_size: it always applies the
attention mask (all true for a single sequence), which costs nothing measurable, and start-up
compiles ~40% sooner than with a second program for one sequence (RESULTS.md). An engine of
max_batch_size 1 gets an unmasked program of one sequence.

Batch size and length stay symbolic, so nothing compiles while serving. A step that fills the
whole context (the caches' length) runs eagerly: export cannot keep that one length symbolic.
On CPU a program is called through its library's C interface with ctypes, which releases the GIL
for the step (`_Program`), so a server's event loop keeps running while it decodes. Programs are
cached on disk under a key of what they depend on, not the weights (`_cache_dir`): a replica that
starts again, or serves another export of the same shape, loads them instead of compiling.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
from torch.export import Dim

import lm.inference
import lm.model
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
        self.model, self.cache_length = model, k_caches[0].shape[2]  # the engine's context
        self.k_caches, self.v_caches = k_caches, v_caches
        device = k_caches[0].device
        self.span = torch.empty(self.cache_length, device=device)
        self.program = self._build(max_batch_size, masked=max_batch_size > 1)

    def _build(self, max_batch: int, masked: bool):
        device = self.span.device
        step = _Step(self.model, masked)
        weights = {**dict(step.named_parameters()), **dict(step.named_buffers())}
        with tempfile.TemporaryDirectory(prefix="lm-decode-") as workdir:
            cache = _cache_dir()
            package = (cache / f"{self._key(weights, max_batch, masked)}.pt2") if cache else Path(workdir) / "decode.pt2"
            if not package.exists():
                self._compile(step, max_batch, masked, package)
            if device.type == "cpu":
                return _Program(str(package), Path(workdir), weights, device)  # the library is loaded; files can go
            # GPU programs also need their kernel binaries, which the package loader unpacks and finds.
            compiled = torch._inductor.aoti_load_package(str(package))
            compiled.load_constants({name: weights[name] for name in compiled.get_constant_fqns()},
                                    check_full_update=True, user_managed=True)  # the model's tensors, not copies
            return _LoadedProgram(compiled.loader)

    def _compile(self, step: _Step, max_batch: int, masked: bool, package: Path) -> None:
        device, n = self.span.device, len(self.k_caches)
        rows = 2 if masked else 1
        example = (torch.zeros(rows, dtype=torch.long, device=device), torch.full((rows,), 2, device=device),
                   self.span[:3], self.k_caches, self.v_caches)
        batch = {0: Dim("batch", min=1, max=max_batch)} if masked else None  # else one sequence, static
        length = {0: Dim("length", min=2, max=self.cache_length - 1)}
        with _fbgemm_set_aside(self.model), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")  # inside torch.export
            program = torch.export.export(step, example, dynamic_shapes=(batch, batch, length, [None] * n, [None] * n),
                                          strict=False)
            partial = package.with_name(f"{package.stem}.{os.getpid()}.partial.pt2")
            try:
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(partial), inductor_configs={"aot_inductor.package_constants_in_so": False})
                os.replace(partial, package)  # atomic: replicas starting together never load half a package
            finally:
                partial.unlink(missing_ok=True)  # a failed compile leaves nothing in the cache

    def _key(self, weights: dict[str, torch.Tensor], max_batch: int, masked: bool) -> str:
        """What a program depends on: the model's config, its tensors' names, shapes and dtypes (not their
        values, handed over at load), the caches, the batch sizes, torch, the CPU's vector ISA and int8
        kernel (lm.inference), and this code. Programs are therefore shared by every export of the same model shape."""
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        h = hashlib.sha256()
        h.update(json.dumps(dataclasses.asdict(self.model.cfg), sort_keys=True).encode())
        for name, tensor in sorted(weights.items()):
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        cache = self.k_caches[0]
        h.update(f"{len(self.k_caches)}x{tuple(cache.shape)}:{cache.dtype}:{cache.device.type}|{max_batch}|{masked}|"
                 f"{torch.__version__}|{pick_vec_isa() if cache.device.type == 'cpu' else ''}|"
                 f"{sorted({m.kernel for m in self.model.modules() if isinstance(m, Int8Linear)})}".encode())
        for module in (lm.model, lm.inference, sys.modules[__name__]):
            h.update(Path(module.__file__).read_bytes())
        return h.hexdigest()[:32]

    def __call__(self, ids: torch.Tensor, positions: list[int], k_caches: list[torch.Tensor],
                 v_caches: list[torch.Tensor]) -> torch.Tensor:
        length = max(positions) + 1
        if length >= self.cache_length or k_caches is not self.k_caches or v_caches is not self.v_caches:
            return self.model.decode(ids, positions, k_caches, v_caches)
        pos = torch.tensor(positions, device=ids.device)
        return self.program.run([ids, pos, self.span[:length], *self.k_caches, *self.v_caches])[0]


def _cache_dir() -> Path | None:
    """Where compiled programs are kept between starts: $LMSTACK_COMPILE_CACHE, else
    ~/.cache/lmstack/decode-programs (~1-2 MB a program; weights are not in them). None when it
    cannot be written: then every start compiles."""
    path = Path(os.environ.get("LMSTACK_COMPILE_CACHE") or Path.home() / ".cache" / "lmstack" / "decode-programs")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK) else None


class _Program:
    """One compiled CPU program, called through the model library's C interface with ctypes.

    Why not the package loader: its Python binding holds the GIL for the whole call. A serving
    replica decodes in a thread beside its event loop (requests in, tokens out), which would then
    stall for every step. ctypes releases the GIL for the call. The container gets the model's
    own tensors as user-managed constants (no copies), as the loader's `load_constants` does."""

    def __init__(self, package: str, workdir: Path, weights: dict[str, torch.Tensor], device: torch.device):
        with zipfile.ZipFile(package) as archive:
            libraries = [n for n in archive.namelist() if n.endswith(".so")]
            if len(libraries) != 1 or any(n.endswith(".json") and not n.endswith("metadata.json")
                                          for n in archive.namelist()):  # <library>.json: ops for a proxy executor
                raise RuntimeError("this compiled decode step is not one model library callable through its C "
                                   f"interface (package files: {archive.namelist()}); serve without compile")
            library = archive.extract(libraries[0], workdir)
        self.lib = ctypes.CDLL(library)  # stays mapped after its file is deleted
        self.handle = ctypes.c_void_p()
        self._check("CreateWithDevice", ctypes.byref(self.handle), ctypes.c_size_t(1), str(device).encode(), None)
        count = ctypes.c_size_t()
        self._check("GetNumConstants", self.handle, ctypes.byref(count))
        names, tensors = [], []
        for i in range(count.value):
            name, fqn = ctypes.c_char_p(), ctypes.c_char_p()
            self._check("GetConstantName", self.handle, ctypes.c_size_t(i), ctypes.byref(name))
            self._check("GetConstantOriginalFQN", self.handle, ctypes.c_size_t(i), ctypes.byref(fqn))
            names.append(name.value)
            tensors.append(weights[fqn.value.decode()])
        # The container keeps these handles (not copies) for its lifetime; they are freed in __del__.
        self.constant_handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(tensors)
        entries = [_ConstantEntry(name, _pointer(handle)) for name, handle in zip(names, self.constant_handles)]
        pairs = (_ConstantEntry * len(entries))(*entries)
        self._check("UpdateUserManagedConstantBufferPairs", self.handle, pairs, ctypes.c_size_t(len(names)),
                    ctypes.c_bool(False), ctypes.c_bool(True))
        outputs = ctypes.c_size_t()
        self._check("GetNumOutputs", self.handle, ctypes.byref(outputs))
        self.outputs = outputs.value

    def _check(self, function: str, *args) -> None:
        error = getattr(self.lib, f"AOTInductorModelContainer{function}")(*args)
        if error:
            raise RuntimeError(f"AOTInductorModelContainer{function} failed (error {error}); see the log above")

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(inputs)  # the container takes these
        outputs = (ctypes.c_void_p * self.outputs)()
        self._check("Run", self.handle, (ctypes.c_void_p * len(handles))(*map(_pointer, handles)),
                    ctypes.c_size_t(len(handles)), outputs, ctypes.c_size_t(self.outputs), None, None)
        return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs([_capsule(p) for p in outputs])

    def __del__(self):
        if getattr(self, "handle", None) and self.handle.value:
            self.lib.AOTInductorModelContainerDelete(self.handle)
            torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(self.constant_handles)  # freed with these


class _LoadedProgram:
    """A program run by the package loader (GPU): its binding holds the GIL for the call."""

    def __init__(self, loader):
        self.loader = loader

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.loader.boxed_run(inputs)


# torch's handle helpers pass pointers as unnamed PyCapsules; ctypes wants integers.
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype, _new_capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _pointer(capsule) -> int:
    return _capsule_pointer(capsule, None)


def _capsule(pointer: int):
    return _new_capsule(pointer, None, None)


class _ConstantEntry(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("handle", ctypes.c_void_p)]
