"""Shared pieces of the kernels: input checks, launch geometry, the mask-counting kernel, the fp32 dot policy.

The data movers move raw bits: a tensor of any 1/2/4/8-byte dtype (fp32, fp16, bf16, fp8, integers) is
viewed as the integer type of its width, so one compiled kernel serves every dtype of that width and
zero padding is the all-zero bit pattern (+0.0 for floats).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dms_perf._runtime import INTERPRET

BITS_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# Per-program bytes of one [BLOCK_S, D] tile on the GPU: large enough for 16-byte vector accesses
# and many bytes in flight, small enough to keep several programs resident per SM.
GPU_TILE_BYTES = 16384
# Programs per SM a launch aims for (left_pad, the prefill prep; the masked movers use their own).
GPU_PROGRAMS_PER_SM = 4
# The interpreter runs programs one after another in Python: fewer, larger programs are faster,
# but keep several chunks per row so that the cross-chunk prefix logic is exercised on CPU.
INTERPRET_BLOCK_S = 64
INTERPRET_TARGET_PROGRAMS = 16
# Chunk counts are read by every program in blocks of this many.
COUNT_BLOCK = 1024
# bool_gather / compact take one launch while a program counts at most this many mask bytes itself
# (from L2, but every program of a row repeats it); past it, the count kernel's launch is cheaper.
ONE_LAUNCH_MAX_COUNT = 32768
# Mask bytes a program counts per step in one-launch mode: large, so that few dependent steps remain.
MASK_SCAN_BLOCK = 16384
# Launch geometry of the masked movers (bool_gather, compact), read at every call: tile bytes (of the
# whole tile; only its selected rows are read), programs per SM, warps and pipeline stages per program.
# benchmarks/tune_movement.py sweeps them on a GPU (results in benchmarks/NOTES.md).
MASKED_TILE_BYTES = 32768
MASKED_PROGRAMS_PER_SM = 16
MASKED_NUM_WARPS = 4
MASKED_NUM_STAGES = 3
# Index / length vectors up to this size are checked in Python after one copy to the host: cheaper
# than a chain of small device reductions. Longer ones are reduced on the device, then read once.
HOST_CHECK_MAX = 2048


# The one fp32 precision policy of the attention kernels (prefill ``fused.py`` and decode
# ``decode/kernel.py``), passed to every ``tl.dot`` as ``input_precision``: fp32 inputs multiply in full
# fp32 ("ieee", on the FMA units rather than the tensor cores). The fp32 path serves the tests, which hold
# it to fp32 accuracy against fp64 references; speed is the 16-bit inputs' concern, and for fp16 / bf16
# operands the precision setting has no effect, so they get Triton's default unchanged.
FP32_DOT_PRECISION = "ieee"
TRITON_DEFAULT_DOT_PRECISION = "tf32"


def attention_dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the attention kernels' dots for inputs of ``dtype``."""
    return FP32_DOT_PRECISION if dtype == torch.float32 else TRITON_DEFAULT_DOT_PRECISION


def cdiv(a: int, b: int) -> int:
    """Plain-int ceil division (``triton.cdiv`` is a constexpr function, ~2 us a call on the host)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1), without ``triton.next_power_of_2``'s host cost."""
    return 1 << (n - 1).bit_length()


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory viewed as the integer dtype of the same width (no copy)."""
    return t.view(BITS_DTYPES[t.element_size()])


def check_tensor(name: str, t, *, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_data_dtype(name: str, t: torch.Tensor) -> None:
    """The kernels move bits of any real dtype 1, 2, 4 or 8 bytes wide."""
    if t.element_size() not in BITS_DTYPES or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(
            f"{name} must have a 1, 2, 4 or 8-byte real dtype (e.g. float32/float16/bfloat16), got {t.dtype}"
        )


def check_data(name: str, t, *, ndim: int) -> None:
    """A data tensor: any dtype 1, 2, 4 or 8 bytes wide, contiguous along its last dimension."""
    check_tensor(name, t, ndim=ndim)
    check_data_dtype(name, t)
    if t.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_device_usable(name: str, t: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter needs CPU tensors."""
    expected = "cpu" if INTERPRET else "cuda"
    if t.device.type != expected:
        raise ValueError(
            f"{name} is on {t.device}, but the Triton kernels run on {expected} here "
            f"({'interpreter' if INTERPRET else 'compiled'} mode)"
        )


def check_mask(name: str, mask, shape: tuple[int, ...], data_name: str, data: torch.Tensor) -> None:
    """A contiguous bool mask of the given shape on the data's device."""
    check_tensor(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} to match {data_name}, got {tuple(mask.shape)}")
    check_same_device(name, mask, data_name, data)
    if not mask.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {mask.stride()}")


def check_index_tensor(name: str, t, length: int, data_name: str, data: torch.Tensor) -> None:
    """A 1-D integer tensor of the given length on the data's device."""
    check_tensor(name, t, ndim=1)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if t.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries (one per row of {data_name}), got {t.shape[0]}")
    check_same_device(name, t, data_name, data)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


# CUDA limits the second grid dimension, which indexes rows (N or B*H) in the row-wise kernels.
MAX_GRID_ROWS = 65535
# ... and the first to 2**31 - 1 programs.
MAX_GRID_AXIS_0 = 2**31 - 1


def check_grid_rows(name: str, rows: int) -> None:
    if rows > MAX_GRID_ROWS:
        raise ValueError(f"{name} = {rows} rows exceed the {MAX_GRID_ROWS} rows one launch can cover")


def check_size_argument(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def host_check_values(t: torch.Tensor) -> tuple[int, int, bool]:
    """``(min, max, has_duplicates)`` of a non-empty integer vector, with one host synchronization."""
    if t.numel() <= HOST_CHECK_MAX:
        values = t.tolist()
        return min(values), max(values), len(set(values)) != len(values)
    ordered = torch.sort(t).values
    lo, hi, repeats = torch.stack([ordered[0], ordered[-1], (ordered[1:] == ordered[:-1]).any().to(t.dtype)]).tolist()
    return lo, hi, bool(repeats)


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device, per_sm: int) -> int:
    """Programs per launch that fill the GPU: ``per_sm`` per SM (4 on an H100's 132 SMs give 528)."""
    if INTERPRET:
        return INTERPRET_TARGET_PROGRAMS
    return per_sm * sm_count(device.index if device.index is not None else torch.cuda.current_device())


def block_rows(row_elems: int, element_size: int, tile_bytes: int | None = None) -> int:
    """Rows per [BLOCK_S, BLOCK_D] tile: about ``tile_bytes`` (default GPU_TILE_BYTES) on the GPU, a
    power of two in [16, 256]."""
    if INTERPRET:
        return INTERPRET_BLOCK_S
    rows = max(1, (tile_bytes or GPU_TILE_BYTES) // (next_power_of_2(row_elems) * element_size))
    return max(16, min(256, 1 << (rows.bit_length() - 1)))


def chunk_geometry(
    rows: int, seq_len: int, block_s: int, device: torch.device, per_sm: int = GPU_PROGRAMS_PER_SM
) -> tuple[int, int, int]:
    """Split each of ``rows`` rows of ``seq_len`` tokens into chunks of whole tiles.

    Returns ``(chunk, n_chunks, tiles_per_chunk)``: enough chunks in all to fill the device even at
    8 rows (``per_sm`` programs per SM), few enough that each program's scan over earlier chunks'
    counts stays cheap.
    """
    n_tiles = cdiv(seq_len, block_s)
    tiles = max(1, min(n_tiles, cdiv(rows * n_tiles, target_programs(device, per_sm))))
    chunk = tiles * block_s
    return chunk, cdiv(seq_len, chunk), tiles


def masked_geometry(rows: int, seq_len: int, row_elems: int, element_size: int, device: torch.device):
    """The masked movers' launch: ``(block_s, chunk, n_chunks, tiles, launch_options)`` from the
    MASKED_* settings as they are at this call."""
    block_s = block_rows(row_elems, element_size, MASKED_TILE_BYTES)
    chunk, n_chunks, tiles = chunk_geometry(rows, seq_len, block_s, device, MASKED_PROGRAMS_PER_SM)
    return block_s, chunk, n_chunks, tiles, {"num_warps": MASKED_NUM_WARPS, "num_stages": MASKED_NUM_STAGES}


@triton.jit
def tile_mask(row_ok, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_S, BLOCK_D] mask from a per-row mask; the column test only when D is not a power of two
    (a row-only mask keeps whole rows uniform, so accesses stay 16-byte vectors)."""
    if BLOCK_D == D:
        return row_ok[:, None]
    else:
        return row_ok[:, None] & (tl.arange(0, BLOCK_D) < D)[None, :]


@triton.jit
def count_true(mask_ptr, lo, hi, BLOCK: tl.constexpr):
    """Number of True in ``mask[lo:hi]`` (int32) of a bool mask viewed as uint8, BLOCK bytes a step."""
    total = 0
    for off in range(lo, hi, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        total += tl.sum(tl.load(mask_ptr + idx, mask=idx < hi, other=0).to(tl.int32), axis=0)
    return total


@triton.jit
def _count_chunks_kernel(mask_ptr, counts_ptr, S, CHUNK, n_chunks, COUNT_BLOCK: tl.constexpr):
    """counts[r, c] = number of True in mask[r, c*CHUNK : (c+1)*CHUNK]."""
    c = tl.program_id(0)
    r = tl.program_id(1)
    start = c * CHUNK
    row = mask_ptr + r.to(tl.int64) * S
    tl.store(counts_ptr + r * n_chunks + c, count_true(row, start, tl.minimum(start + CHUNK, S), COUNT_BLOCK))


def count_chunks(mask_rows: torch.Tensor, chunk: int, n_chunks: int) -> torch.Tensor:
    """Per-chunk True counts ``[rows, n_chunks]`` int32 of a contiguous bool mask ``[rows, S]`` (no host sync)."""
    rows, seq_len = mask_rows.shape
    counts = torch.empty((rows, n_chunks), dtype=torch.int32, device=mask_rows.device)
    _count_chunks_kernel[(n_chunks, rows)](
        mask_rows.view(torch.uint8), counts, seq_len, chunk, n_chunks, COUNT_BLOCK=COUNT_BLOCK
    )
    return counts


def check_cache_addressing(op: str, starts, block_table, page_rows, heads: tuple[int, int], rows: int,
                           device: torch.device) -> None:
    """How the decode kernels find a head's cache rows: ``starts`` (contiguous segments) or ``block_table``
    with ``page_rows`` (pages), exactly one of the two.

    ``heads`` is ``(B, Hkv)``, ``rows`` the row count of the K/V buffers (paged: ``num_pages *
    page_rows``), ``device`` the other inputs'. ``starts``: int64 ``[B, Hkv]``; ``block_table``: int32
    ``[B, Hkv, max_pages]`` (any strides), ``page_rows`` a power of two dividing ``rows``.
    """
    if (starts is None) == (block_table is None):
        given = "both" if starts is not None else "neither"
        raise ValueError(f"{op}: give starts (a contiguous cache) or block_table (a paged cache), got {given}")
    if block_table is None:
        if page_rows is not None:
            raise ValueError(f"{op}: page_rows={page_rows!r} goes with a block_table, and none was given")
        check_tensor("starts", starts)
        if starts.dtype != torch.int64:
            raise TypeError(f"{op}: starts must be an int64 tensor, got {starts.dtype}")
        if tuple(starts.shape) != tuple(heads):
            raise ValueError(f"{op}: starts must be [B, Hkv] = {tuple(heads)} like lengths, got {tuple(starts.shape)}")
        if starts.device != device:
            raise ValueError(f"{op}: starts is on {starts.device} but the other inputs are on {device}")
        return
    check_tensor("block_table", block_table)
    if block_table.dtype != torch.int32:
        raise TypeError(f"{op}: block_table must be an int32 tensor, got {block_table.dtype}")
    if block_table.dim() != 3 or tuple(block_table.shape[:2]) != tuple(heads) or block_table.shape[2] < 1:
        raise ValueError(
            f"{op}: block_table must be [B, Hkv, max_pages] with [B, Hkv] = {tuple(heads)} and max_pages >= 1, "
            f"got {tuple(block_table.shape)}"
        )
    if block_table.device != device:
        raise ValueError(f"{op}: block_table is on {block_table.device} but the other inputs are on {device}")
    if isinstance(page_rows, bool) or not isinstance(page_rows, int) or page_rows < 1 or page_rows & (page_rows - 1):
        raise ValueError(f"{op}: page_rows must be a power of two with a block_table, got {page_rows!r}")
    if rows % page_rows:
        raise ValueError(
            f"{op}: the paged K/V buffers must be whole pages viewed as [num_pages * page_rows, D]; "
            f"{rows} rows are not a multiple of page_rows={page_rows}"
        )
