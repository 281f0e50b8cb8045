"""torch.compile's caches carried between processes: what one process compiled (Inductor's kernels, AOTAutograd's
graphs; not Dynamo's tracing) saved as one file, local or s3://, and handed to torch.compile by the next process
before it compiles, so that a resumed training run or a restarted serving replica skips most of the compilation.
Loading unpickles the file: keep it where only the jobs' owners write, as checkpoints."""
from __future__ import annotations

import copyreg

import torch

from dmd_ray.data import storage


def stable_keys() -> None:
    """Makes torch.compile's cache keys the same in every process; call before compiling (idempotent).

    The keys hash each graph input's pickled metadata, its memory format included. A memory format pickles as a name
    ("torch.contiguous_format") that pickle looks up in every loaded module, in import order, taking the first
    module where the name resolves (pickle.whichmodule; the object has no __module__): torch._utils in a plain
    process, another module in a Ray worker that imported one with a `torch` attribute first (on the H200:
    cython.cimports.libc). So a Ray Train worker or a Serve replica computed other keys for the same graphs and
    found nothing in a cache file that another process wrote (BENCHMARKS.md, "compile cache"). Registered here, a
    memory format pickles through this module's function, the same in every process."""
    copyreg.pickle(type(torch.contiguous_format), _reduce_memory_format)


def _reduce_memory_format(memory_format: torch.memory_format):
    return _memory_format, (str(memory_format).removeprefix("torch."),)


def _memory_format(name: str) -> torch.memory_format:
    return getattr(torch, name)


def load(uri: str) -> bool:
    """Loads the artifacts at `uri` if there are any; True when some were loaded. Call before anything compiles."""
    if not uri or not storage.exists(uri):
        return False
    return torch.compiler.load_cache_artifacts(storage.read_bytes(uri)) is not None


def save(uri: str) -> int:
    """Writes what this process compiled to `uri`; the bytes written (0 when nothing)."""
    if not uri:
        return 0
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return 0
    storage.write_bytes(uri, artifacts[0])
    return len(artifacts[0])


def summary() -> str:
    """What this process compiled so far, and how much of it came from a cache (this machine's, or a loaded file):
    Dynamo graphs traced, and the Inductor and AOTAutograd graphs found against compiled; on a GPU also the graphs
    that CUDA graphs skipped (they then launch every kernel from the host at every call; TORCH_LOGS=cudagraphs says
    why)."""
    from torch._dynamo.utils import counters  # torch's own counters; absent keys read 0

    inductor, aot = counters["inductor"], counters["aot_autograd"]
    skips = f"; {inductor['cudagraph_skips']} skipped by CUDA graphs" if torch.cuda.is_initialized() else ""
    return (f"{counters['stats']['unique_graphs']} graphs traced; Inductor {inductor['fxgraph_cache_hit']} cached, "
            f"{inductor['fxgraph_cache_miss']} compiled; AOTAutograd {aot['autograd_cache_hit']} cached, {aot['autograd_cache_miss']} compiled{skips}")
