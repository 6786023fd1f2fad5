"""Process-wide runtime state of the compiled core: ISA level, threads, and `quark.info()`.

The kernel thread count defaults to torch's, so Quark and torch kernels never oversubscribe the cores.
Reading it imports torch, so it is set when the kernel packages (quark.ops, quark.search) load, not at
`import quark`: the `quark` command and its --help start without torch."""
import contextlib
import importlib.util
import os
import platform
import warnings

from quark import _C

ISA_LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16", "amx")


def _check_isa_env():
    forced = os.environ.get("QUARK_ISA")
    if not forced:
        return
    if forced not in ISA_LEVELS:
        warnings.warn(f"QUARK_ISA={forced!r} is not one of {', '.join(ISA_LEVELS)}; ignored", stacklevel=3)
    elif ISA_LEVELS.index(forced) > ISA_LEVELS.index(_C.detected_isa()):
        warnings.warn(f"QUARK_ISA={forced!r} is above what this CPU supports ({_C.detected_isa()}); "
                      f"using {_C.detected_isa()}", stacklevel=3)


def _default_threads():
    env = os.environ.get("QUARK_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"QUARK_NUM_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"QUARK_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    import torch  # the default follows torch so Quark and torch kernels never oversubscribe the cores
    return torch.get_num_threads()


_threads_set = False


def init_threads():
    """Apply the default thread count once (QUARK_NUM_THREADS, else torch's); idempotent."""
    global _threads_set
    if not _threads_set:
        _C.set_num_threads(_default_threads())
        _threads_set = True


def num_threads():
    init_threads()
    return _C.num_threads()


def set_num_threads(n):
    global _threads_set
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    _C.set_num_threads(n)
    _threads_set = True


@contextlib.contextmanager
def isa(name):
    """Run the enclosed kernels on ISA level `name` (at most the detected one); tests use this to
    cover every path in one process. Outside tests, set QUARK_ISA before starting Python."""
    previous = _C.current_isa()
    _C.set_isa(name)
    try:
        yield
    finally:
        _C.set_isa(previous)


def _package_version(name):
    if importlib.util.find_spec(name) is None:
        return None
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return "unknown"


def info():
    """Version, CPU features, the ISA path of every kernel family, threads, and GPU stack."""
    import quark
    torch_version = _package_version("torch")
    cuda_available, cuda_devices = False, []
    if torch_version:
        import torch
        cuda_available = torch.cuda.is_available()
        cuda_devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_available else []
    return {
        "version": quark.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_features": {k: v for k, v in _C.cpu_features().items()},
        "isa_detected": _C.detected_isa(),
        "isa": _C.current_isa(),
        "kernel_paths": dict(_C.kernel_paths()),
        "threads": num_threads(),
        "torch": torch_version,
        "triton": _package_version("triton"),
        "cuda_available": cuda_available,
        "cuda_devices": cuda_devices,
        "cuda_kernels_built": _C.has_cuda(),
    }


def configure_parser(parser):
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run_cli(args):
    data = info()
    if args.json:
        import json
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    console = Console()
    console.print(f"[bold]quark {data['version']}[/bold]  python {data['python']}  {data['machine']}")
    present = [k for k, v in data["cpu_features"].items() if v and not k.startswith("os_")]
    console.print(f"cpu features: {' '.join(present) or '(none beyond baseline)'}")
    console.print(f"isa: {data['isa']} (detected {data['isa_detected']}; QUARK_ISA caps it)")
    table = Table("kernel family", "path")
    for family, path in sorted(data["kernel_paths"].items()):
        table.add_row(family, path)
    console.print(table)
    console.print(f"threads: {data['threads']} (QUARK_NUM_THREADS sets it)")
    console.print(f"torch: {data['torch']}  triton: {data['triton']}  cuda available: {data['cuda_available']} "
                  f"{' '.join(data['cuda_devices'])}  cuda kernels built: {data['cuda_kernels_built']}")
    return 0


_check_isa_env()
if os.environ.get("QUARK_NUM_THREADS"):
    init_threads()      # a bad value fails at import, naming the variable
