"""Sparse execution: a masked network rebuilt so that its inference really skips the zero weights.

A masked method trains dense weights whose masked entries are zero, so its forward pass costs as
much as the dense network's. :func:`sparsify` copies such a network and replaces each ``Linear``
layer (Conv2d layers stay dense) by a layer of one *kind*:

* ``dense``: a plain ``nn.Linear`` with the layer's effective weights (the zeros multiplied as
  any weight): the reference every speed-up is measured against;
* ``masked``: the network as it was trained, unchanged (e.g. MorphoNet's ``W * mask`` product in
  every forward);
* ``csr``: any (unstructured) mask, as a CSR matrix with int32 indices, multiplied by
  ``torch.addmv`` / ``torch.addmm`` (MKL's sparse BLAS on CPU, cuSPARSE on CUDA);
* ``condensed``: constant fan-in (SRigL's condensed layer): ``indices`` and ``values`` of shape
  ``(out, k)``, k the largest fan-in, rows with fewer inputs padded with zero weights, so
  ``y[b, o] = sum_j values[o, j] * x[b, indices[o, j]] + bias[o]``; a neuron without inputs is
  its bias;
* ``semi24``: 2:4 (at most two non-zeros in every four consecutive inputs) through
  ``torch.sparse.to_sparse_semi_structured``, on CUDA devices whose kernels support it
  (:func:`semi_structured_available`), in float16.

A layer keeps a dense ``nn.Linear`` where its kind does not apply (density 1, a pattern that is
not 2:4, a shape the 2:4 kernels refuse); :func:`layer_kinds` says which kind each layer gets and
why. The outputs equal the masked network's to float tolerance (float16 rounding for ``semi24``).

Measured on one CPU thread (``scripts/bench_sparse.py``), the speed of the sparse kinds rests on
two choices: int32 indices (MKL's sparse products ran 1.7-3.3x faster with them than with int64
here), and, for batches of many examples, the batch split into tiles of ``TILE_BYTES`` of input
(the input columns a sparse row gathers then stay in the L2 cache: a 4096-wide layer at density
0.1 ran about 2.5x faster at batch 256 than without tiles).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("dense", "masked", "csr", "condensed", "semi24")
SPARSE_KINDS = ("csr", "condensed", "semi24")
CONDENSED_IMPLS = ("auto", "csr", "embedding_bag", "gather")
TILE_BYTES = 1 << 20  # input bytes per batch tile on CPU: 1 MiB, half of one core's L2 here
SMALL_BATCH = 32  # condensed "auto": fewer rows use the CSR kernel (the crossover measured on CPU)


class SparseUnavailable(RuntimeError):
    """A sparse kind cannot run here (``semi24`` without a CUDA device that has 2:4 kernels); says why."""


# -- which kind a layer gets ---------------------------------------------------------------------------


@functools.cache
def _semi_structured_on(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"2:4 sparse kernels run on CUDA only (the network is on {device.type})"
    if not torch.cuda.is_available():
        return False, "CUDA is not available (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"2:4 sparse kernels need compute capability >= 8.0, {device} has {major}.{minor}"
    try:  # the kernels may still be missing from this build: try one small product
        weight = torch.tensor([1.0, 0.0, 2.0, 0.0], device=device).repeat(64, 16).half()
        probe = _to_semi_structured(weight)
        torch.testing.assert_close(
            F.linear(torch.ones(1, 64, device=device, dtype=torch.float16), probe),
            torch.full((1, 64), 48.0, device=device, dtype=torch.float16),
        )
    except Exception as exc:  # a missing kernel raises anything from RuntimeError to NotImplementedError
        return False, f"torch's 2:4 kernels failed on {device}: {type(exc).__name__}: {exc}".split("\n")[0]
    return True, f"2:4 kernels available on {device} ({torch.cuda.get_device_name(device)})"


def semi_structured_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether ``semi24`` layers run on ``device`` (default: the current CUDA device), and why (not).

    Returns:
        ``(available, reason)``: the reason names the device, or what is missing.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return _semi_structured_on(device)


def _to_semi_structured(weight: Tensor) -> Tensor:
    """``weight`` in 2:4 form: cuSPARSELt where torch has it, CUTLASS otherwise."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured

    if torch.backends.cusparselt.is_available():
        return to_sparse_semi_structured(weight)
    return SparseSemiStructuredTensorCUTLASS.from_dense(weight)


def _semi_structured_shape(out_features: int, in_features: int) -> str | None:
    """Why the 2:4 kernels refuse a ``(out, in)`` float16 weight, or None when they take it."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    backend = (
        SparseSemiStructuredTensorCUSPARSELT
        if torch.backends.cusparselt.is_available()
        else SparseSemiStructuredTensorCUTLASS
    )
    limits = backend._DTYPE_SHAPE_CONSTRAINTS[torch.float16]
    rows, cols = limits.sparse_min_rows, limits.sparse_min_cols
    if out_features % rows or in_features % cols:
        return f"shape ({out_features}, {in_features}) is not a multiple of ({rows}, {cols})"
    return None


def is_two_four(weight: Tensor) -> bool:
    """Whether every four consecutive inputs of every row hold at most two non-zero weights."""
    out_features, in_features = weight.shape
    if in_features % 4:
        return False
    return bool(((weight != 0).view(out_features, in_features // 4, 4).sum(-1) <= 2).all())


def _why_dense(weight: Tensor, kind: str) -> str | None:
    """Why a layer of effective ``weight`` stays dense under ``kind``, or None when it becomes ``kind``."""
    nonzero = int(torch.count_nonzero(weight))
    if kind in ("dense", "masked"):  # every layer a plain Linear
        return kind
    if nonzero == weight.numel():
        return "density 1"
    if kind == "condensed" and bool((weight != 0).all(1).any()):
        return "a neuron reads every input: its condensed row would be larger than the dense one"
    if kind == "semi24":
        if not is_two_four(weight):
            return "not 2:4 (a group of four consecutive inputs has more than two non-zero weights)"
        return _semi_structured_shape(*weight.shape)
    return None


# -- effective weights ---------------------------------------------------------------------------------


@torch.no_grad()
def linear_weights(layer: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """The weight and bias that ``layer`` really multiplies by: ``layer(x) = x @ weight.T + bias``.

    A plain ``nn.Linear`` gives its parameters. A subclass with its own forward (MorphoNet's
    ``W * mask``) is probed: its outputs on the unit vectors, bias removed, are its weight's columns
    (exact: each output is one product by 1 plus products by 0).

    Raises:
        ValueError: a subclass whose forward is not the affine map it probes to.
    """
    if type(layer).forward is nn.Linear.forward:
        bias = None if layer.bias is None else layer.bias.detach().clone()
        return layer.weight.detach().clone(), bias
    probe = copy.deepcopy(layer)
    if probe.bias is not None:
        probe.bias.zero_()
    eye = torch.eye(layer.in_features, device=layer.weight.device, dtype=layer.weight.dtype)
    weight = probe(eye).T.contiguous()
    bias = (
        None
        if layer.bias is None
        else layer(torch.zeros_like(eye[:1]))[0] - probe(torch.zeros_like(eye[:1]))[0]
    )
    x = torch.randn(4, layer.in_features, device=eye.device, dtype=eye.dtype)
    if not torch.allclose(layer(x), F.linear(x, weight, bias), rtol=1e-4, atol=1e-5):
        raise ValueError(f"{type(layer).__name__} is not an affine map of its input: it cannot be sparsified")
    return weight, bias


# -- sparse layers -------------------------------------------------------------------------------------


def _tiles(x: Tensor) -> list[Tensor]:
    """``x`` (rows, features) split into batch tiles of about ``TILE_BYTES`` on CPU (one tile elsewhere)."""
    if x.device.type != "cpu":
        return [x]
    rows = max(1, TILE_BYTES // (x.shape[1] * x.element_size()))
    return list(x.split(rows))


def _joined(parts: list[Tensor], bias: Tensor) -> Tensor:
    """The (rows, out) products of the batch tiles, one after another, plus the bias."""
    y = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
    return y.add_(bias)


class _SparseLinear(nn.Module):
    """A linear layer whose weight is a CSR matrix built from its buffers ``crow``, ``col`` and
    ``values``; built once (not at every forward: that costs microseconds at batch 1) and rebuilt
    when the buffers move (``.to(device)``). A layer without bias has a zero one (one kernel)."""

    crow: Tensor
    col: Tensor
    values: Tensor
    bias: Tensor
    out_features: int
    in_features: int

    def _init_bias(self, bias: Tensor | None, weight: Tensor) -> None:
        bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.detach().clone()
        self.register_buffer("bias", bias, persistent=False)

    def _build_csr(self) -> None:
        with warnings.catch_warnings():  # torch warns once that its CSR support is in beta
            warnings.simplefilter("ignore", UserWarning)
            self._weight = torch.sparse_csr_tensor(
                self.crow,
                self.col,
                self.values.view(-1),
                (self.out_features, self.in_features),
                check_invariants=False,  # built from a valid matrix; checks would cost every time
            )

    def _apply(self, fn: Callable[..., Tensor], recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        self._build_csr()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:  # (..., in) as Linear takes it
            return self.forward(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return self._product(x)

    def _product(self, x: Tensor) -> Tensor:  # (rows, in) -> (rows, out)
        if x.shape[0] == 1:  # one sparse matrix-vector product (MKL's on CPU)
            return torch.addmv(self.bias, self._weight, x[0]).unsqueeze(0)
        return _joined([(self._weight @ tile.T).T for tile in _tiles(x)], self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()}"


class CSRLinear(_SparseLinear):
    """A linear layer whose weight is a CSR matrix (int32 indices): any unstructured mask.

    Args:
        weight: the effective weight (out, in), zeros where masked.
        bias: the bias (out,), or None.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.detach().to_sparse_csr()
        self.register_buffer("crow", csr.crow_indices().to(torch.int32), persistent=False)
        self.register_buffer("col", csr.col_indices().to(torch.int32), persistent=False)
        self.register_buffer("values", csr.values(), persistent=False)
        self._init_bias(bias, weight)
        self._build_csr()


class CondensedLinear(_SparseLinear):
    """SRigL's condensed layer: every output neuron reads its k inputs by index.

    ``indices`` (out, k) and ``values`` (out, k) hold each neuron's inputs in ascending order; a
    neuron with fewer than k inputs is padded with indices of inputs it does not read, whose values
    are zero; a neuron with none is its bias.

    Args:
        weight: the effective weight (out, in), zeros where masked.
        bias: the bias (out,), or None.
        impl: how the product is computed: ``csr`` (the rows as a CSR matrix of constant row
            length over the same memory: MKL's sparse mv/mm on CPU), ``embedding_bag``
            (``F.embedding_bag`` over the input's columns: one fused gather-multiply-sum),
            ``gather`` (``x[:, indices] * values`` summed); ``auto`` (default) takes ``csr`` below
            ``SMALL_BATCH`` rows and ``embedding_bag`` from there, the fastest on CPU in
            ``scripts/bench_sparse.py --variants``.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, impl: str = "auto") -> None:
        super().__init__()
        if impl not in CONDENSED_IMPLS:
            raise ValueError(f"impl={impl!r} is invalid: must be one of {CONDENSED_IMPLS}")
        self.impl = impl
        self.out_features, self.in_features = weight.shape
        nonzero = weight.detach() != 0
        self.fan_in = int(nonzero.sum(1).max()) if weight.numel() else 0
        # inputs read first, each group in ascending order (a stable sort): the first k columns of
        # a row are its inputs, then inputs whose weight is zero (the padding)
        order = torch.sort((~nonzero).to(torch.int8), dim=1, stable=True).indices[:, : self.fan_in]
        indices = order.to(torch.int32).contiguous()
        self.register_buffer("indices", indices, persistent=False)  # (out, k)
        self.register_buffer("values", weight.detach().gather(1, order).contiguous(), persistent=False)
        crow = torch.arange(0, self.out_features + 1, device=weight.device, dtype=torch.int32) * self.fan_in
        self.register_buffer("crow", crow, persistent=False)
        self.register_buffer("col", indices.view(-1), persistent=False)  # the memory of indices
        self._init_bias(bias, weight)
        self._build_csr()

    def _product(self, x: Tensor) -> Tensor:  # (rows, in) -> (rows, out)
        impl = self.impl
        if impl == "auto":
            impl = "csr" if x.shape[0] < SMALL_BATCH else "embedding_bag"
        if impl == "csr" or self.fan_in == 0:
            return super()._product(x)
        if impl == "embedding_bag":
            parts = [
                F.embedding_bag(
                    self.indices, tile.T.contiguous(), per_sample_weights=self.values, mode="sum"
                ).T
                for tile in _tiles(x)
            ]  # (rows, out) each
        else:  # gather: (rows, out, k) in tiles of about TILE_BYTES
            rows = max(1, TILE_BYTES // (self.values.numel() * x.element_size()))
            parts = [(tile[:, self.indices] * self.values).sum(-1) for tile in x.split(rows)]
        return _joined(parts, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fan_in={self.fan_in}, impl={self.impl}"


class SemiStructuredLinear(nn.Module):
    """A 2:4 sparse linear layer on CUDA (float16 weights; the input is cast to float16 and back).

    Args:
        weight: the effective weight (out, in), 2:4 sparse, on a CUDA device with 2:4 kernels.
        bias: the bias (out,), or None.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = _to_semi_structured(weight.detach().to(torch.float16).contiguous())
        self.bias = None if bias is None else bias.detach().to(torch.float16)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.float16)  # the 2:4 product takes 2-D inputs
        y = F.linear(rows, self.weight, self.bias).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4, float16"


# -- whole networks ------------------------------------------------------------------------------------


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _check_kind(kind: str, model: nn.Module) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: must be one of {KINDS}")
    if kind == "semi24":
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        available, reason = semi_structured_available(device)
        if not available:
            raise SparseUnavailable(f"semi24: {reason}")


def layer_kinds(model: nn.Module, kind: str) -> dict[str, str]:
    """What :func:`sparsify` makes of each ``Linear`` of ``model``: ``kind``, or ``dense (<reason>)``.

    Raises:
        ValueError: an unknown kind.
        SparseUnavailable: ``semi24`` where it cannot run (the reason of :func:`semi_structured_available`).
    """
    _check_kind(kind, model)
    if kind in ("dense", "masked"):
        return {name: kind for name, _ in _linears(model)}
    kinds = {}
    for name, layer in _linears(model):
        why = _why_dense(linear_weights(layer)[0], kind)
        kinds[name] = kind if why is None else f"dense ({why})"
    return kinds


@torch.no_grad()
def sparsify(model: nn.Module, kind: str, condensed_impl: str = "auto") -> nn.Module:
    """A copy of ``model`` for inference (eval mode) whose ``Linear`` layers run as ``kind``.

    ``masked`` is the copy itself; ``dense`` replaces every ``Linear`` by a plain one with its
    effective weights; a sparse kind replaces the layers it applies to (see :func:`layer_kinds`)
    by its layer and the others by plain ``Linear`` layers. Conv2d layers and everything else are
    copied as they are. ``model`` itself is not changed.

    Args:
        model: a network whose ``Linear`` weights carry zeros (from masks or otherwise).
        kind: one of :data:`KINDS`.
        condensed_impl: the :class:`CondensedLinear` ``impl`` (one of :data:`CONDENSED_IMPLS`).

    Raises:
        ValueError: an unknown kind or impl.
        SparseUnavailable: ``semi24`` where it cannot run.
    """
    _check_kind(kind, model)
    if condensed_impl not in CONDENSED_IMPLS:
        raise ValueError(f"condensed_impl={condensed_impl!r} is invalid: must be one of {CONDENSED_IMPLS}")
    net = copy.deepcopy(model).eval()
    if kind == "masked":
        return net
    for name, layer in _linears(net):
        weight, bias = linear_weights(layer)
        why = _why_dense(weight, kind)
        if why is not None:
            new: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias is not None)
            new = new.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias)
        elif kind == "csr":
            new = CSRLinear(weight, bias)
        elif kind == "condensed":
            new = CondensedLinear(weight, bias, condensed_impl)
        else:
            new = SemiStructuredLinear(weight, bias)
        if not name:  # the model is itself a Linear
            return new.eval()
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent), child, new.eval())
    return net
