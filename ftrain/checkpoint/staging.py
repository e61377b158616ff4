"""Staging: copy the state off the live tensors into host buffers that every save reuses.

DCP's ``DefaultStager`` copies storage by storage with ``UntypedStorage.copy_``, which holds the GIL for the
whole copy of each storage: on a large state the training thread stalls behind it (docs/bench.md).
``Tensor.copy_`` releases the GIL, so this stager copies tensor by tensor into buffers it allocates once,
keyed by the tensor's place in the state dict, and hands DCP the buffers (re-wrapped as DTensors where the
source was one). Only the elements of each tensor are copied, never the padding of a larger storage.

On CUDA the buffers are pinned and the copies are non-blocking on a side stream that first waits for the
work the training stream had queued when ``stage`` was called. For the writer process the buffers live in
shared memory, so handing them over costs no copy.

A buffer is rewritten by the next ``stage``: the caller must not stage again before the previous save has
been written (``CheckpointManager`` keeps one save in flight).

When the state was just copied anyway (the local snapshot tier's copy of the same step), ``stage`` can be given
those copies (``Prestaged``): their tensors are handed to DCP as they are, with no second copy and no staging
buffer for them, so the local tier's two slots are all the host memory a checkpoint needs.
"""

from __future__ import annotations

import copy
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from ftrain._torch_compat import dtensor_spec, local_tensor, pin_host_memory, unpin_host_memory
from ftrain.checkpoint.state_tree import IMMUTABLE


class Prestaged(Protocol):
    """Copies of live tensors made at the step being saved, which a stage may hand to DCP instead of copying."""

    def ready(self) -> bool:
        """Block until the copies are complete; False if they failed (then the live tensors are copied)."""
        ...

    def copy_of(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The copy of ``tensor`` (same shape and dtype, on the host), or None."""
        ...


def _rebuild_dtensor(local: torch.Tensor, spec: Any, requires_grad: bool) -> DTensor:
    return DTensor(local, spec, requires_grad=requires_grad)


def _reduce_dtensor(tensor: DTensor) -> tuple[Any, tuple[Any, ...]]:
    return _rebuild_dtensor, (local_tensor(tensor), dtensor_spec(tensor), tensor.requires_grad)


def send_dtensors_by_local_tensor() -> None:
    """Make multiprocessing send a DTensor as its local tensor (shared memory, by descriptor) and its spec.

    torch's own pickling of a DTensor breaks when the local tensor is a view at a nonzero offset (the local tier's
    slot views, handed to ``async_process``'s writer): since pytorch/pytorch#167597 the wrapper carries that
    offset, so ``Tensor._reduce_ex_internal`` no longer sees a storage-less wrapper (``data_ptr() == 0``) and
    pickles the wrapper's null storage: "invalid python storage", or a segfault. The receiver builds the same
    DTensor. Registered for the whole process (multiprocessing has one reducer table); idempotent."""
    from multiprocessing.reduction import ForkingPickler

    ForkingPickler.register(DTensor, _reduce_dtensor)


class BufferStager(AsyncStager):
    """An ``AsyncStager`` for ``dcp.async_save`` that copies into reused host buffers in a background thread."""

    _synchronize_after_execute = False

    def __init__(self, *, pin_memory: bool = False, share_memory: bool = False) -> None:
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.share_memory = share_memory
        if share_memory:
            send_dtensors_by_local_tensor()
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._used: set[tuple[Any, ...]] = set()  # the keys the current stage has copied
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftrain-stage")
        self._stream = torch.cuda.Stream() if self.pin_memory else None
        self._future: Future[Any] | None = None
        self._lock = threading.Lock()
        self._prestaged: Prestaged | None = None  # for the stage in progress
        self.prestaged_next: Prestaged | None = None  # set by the caller for the next ``stage`` only
        self.copied_bytes = 0  # tensor bytes the last stage copied
        self.reused_bytes = 0  # tensor bytes the last stage took from its ``Prestaged``

    @property
    def buffer_bytes(self) -> int:
        """Host memory held by the staging buffers."""
        return sum(buffer.nbytes for buffer in self._buffers.values())

    def stage(self, state_dict: dict[str, Any], **_: Any) -> Future[dict[str, Any]]:
        """Start copying ``state_dict``; the future holds the staged copy."""
        ready = None
        if self._stream is not None:  # the copies must see every update the training stream has queued so far
            ready = torch.cuda.Event()
            ready.record()
        prestaged, self.prestaged_next = self.prestaged_next, None
        self._future = self._executor.submit(self._stage, state_dict, ready, prestaged)
        return self._future

    def synchronize_staging(self) -> None:
        if self._future is not None:
            self._future.result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        with self._lock:
            self._buffers.clear()

    def _stage(
        self, state_dict: dict[str, Any], ready: torch.cuda.Event | None, prestaged: Prestaged | None
    ) -> dict[str, Any]:
        with self._lock, torch.no_grad(), self._on_side_stream():
            if ready is not None:
                self._stream.wait_event(ready)  # type: ignore[union-attr]
            # The live tensors do not change before this stage is done (the optimizer waits for it), so if the
            # copies failed, copying the live tensors now still stages the right step.
            self._prestaged = prestaged if prestaged is not None and prestaged.ready() else None
            self._used = set()
            self.copied_bytes = self.reused_bytes = 0
            staged = self._copy(state_dict, ())
            if self._stream is not None:
                self._stream.synchronize()
            for key in self._buffers.keys() - self._used:  # entries the state no longer has (or prestaged)
                del self._buffers[key]
            self._prestaged = None
        return staged

    def _on_side_stream(self) -> AbstractContextManager[Any]:
        """In this (staging) thread: the side stream, on its own device. A new thread's current device is 0,
        and letting it stay 0 would give every rank a CUDA context on the first GPU."""
        if self._stream is None:
            return nullcontext()
        context = ExitStack()
        context.enter_context(torch.cuda.device(self._stream.device))
        context.enter_context(torch.cuda.stream(self._stream))
        return context

    def _copy(self, value: Any, key: tuple[Any, ...]) -> Any:
        if isinstance(value, DTensor):
            return DTensor(self._copy_tensor(local_tensor(value), key), dtensor_spec(value), requires_grad=False)
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value, key)
        if isinstance(value, dict):
            return {name: self._copy(item, (*key, name)) for name, item in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self._copy(item, (*key, index)) for index, item in enumerate(value)]
            return items if isinstance(value, list) else type(value)(items)
        if isinstance(value, IMMUTABLE):
            return value
        return copy.deepcopy(value)  # anything else a Stateful returned: never alias what training may change

    def _copy_tensor(self, tensor: torch.Tensor, key: tuple[Any, ...]) -> torch.Tensor:
        if self._prestaged is not None:
            copy_ = self._prestaged.copy_of(tensor)
            if copy_ is not None:
                self.reused_bytes += copy_.nbytes
                return copy_
        self._used.add(key)
        self.copied_bytes += tensor.nbytes
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = self._allocate(tensor)
            self._buffers[key] = buffer
        buffer.copy_(tensor.detach(), non_blocking=self._stream is not None and tensor.is_cuda)
        return buffer

    def _allocate(self, tensor: torch.Tensor) -> torch.Tensor:
        pin = self.pin_memory and tensor.is_cuda
        if not self.share_memory:
            return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
        buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu").share_memory_()
        if pin and buffer.nbytes:  # pin the shared pages in place, as DCP's own stager does
            pin_host_memory(buffer.data_ptr(), buffer.nbytes)
            weakref.finalize(buffer, unpin_host_memory, buffer.data_ptr())
        return buffer
