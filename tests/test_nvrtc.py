"""NVRTC, the compiler behind CuPy's RawModule, compiles npgpt's kernels: no GPU needed.

On a GPU, kernels.py hands kernels.source() (npgpt/kernels_*.cu, as one program) to
`cupy.RawModule`, which compiles it with NVRTC when the first kernel is looked up. The
emulator (emulated_cuda.py) runs the same code through g++, which accepts things NVRTC
refuses: a header NVRTC cannot find, a GCC builtin, a library call with no device version.
Here NVRTC itself compiles that source:
the NVRTC of CUDA 12 (the gpu extra's CuPy) and of CUDA 13 (gpu-cuda13's), each from its
NVIDIA wheel (the test extra installs both on Linux x86-64; a missing one is skipped),
called through ctypes, for compute capability 8.0 (A100) and 9.0 (H100).

The options are what kernels.py passes to RawModule (recorded by calling kernels.py's
own `_module` with a stand-in array module) plus what CuPy adds (CuPy 13.6 and 14.x:
`assemble_cupy_compiler_options` in cupy/_core/core.pyx, `_compile_with_cache_cuda`
and `_compile_using_nvrtc_no_warning` in cupy/cuda/compiler.py):
  --std=c++17   only when the options name no standard (CuPy 14; CuPy 13 added c++11)
  -ftz=true     denormal floats flush to zero
  -arch=sm_XX   the device's compute capability. CuPy asks NVRTC for a cubin (PTX, then
                ptxas to machine code) whenever NVRTC knows the architecture, as the
                NVRTC of CUDA 12 and 13 knows 8.0 and 9.0; so the ptxas stage runs here
                too. (CUPY_COMPILE_WITH_PTX=1 asks for -arch=compute_XX, PTX only: the
                first half of the same compile.)
  --device-as-default-execution-space
  -I folders    CCCL's (cub, thrust, libcudacxx), cupy/_core/include and the CUDA
                headers. Left out here: they exist only where CuPy and the CUDA headers
                are installed, and they matter only to #include lines, of which
                the source has none (test_kernels_cu_includes_nothing holds that), so
                NVRTC compiles the same program without them. NVRTC ignores an -I
                folder that does not exist, so passing made-up paths would prove nothing.
RawModule's other defaults leave the source as it is: backend 'nvrtc', no CuPy headers
prepended, translate_cucomplex and jitify off, no name_expressions; so get_function
looks a kernel up by its extern "C" name, which must be an entry of the compiled module.

Each compile adds --ptxas-options=-v, which writes ptxas's report of each kernel's
registers and spills into the log and changes no byte of the PTX or cubin;
`python tests/test_nvrtc.py` prints that report for sm_90.
"""
import ast
import ctypes
import functools
import re
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from npgpt import fused_attention, fused_optim, kernels

# CUDA major version -> (wheel, folder under the `nvidia` namespace package, library)
NVRTC_WHEELS = {"12": ("nvidia-cuda-nvrtc-cu12", "cuda_nvrtc", "libnvrtc.so.12"),
                "13": ("nvidia-cuda-nvrtc", "cu13", "libnvrtc.so.13")}
ARCHS = (80, 90)  # compute capabilities: A100, H100


class CompileError(Exception):
    """NVRTC refused the source; the message holds NVRTC's log."""


Compiled = namedtuple("Compiled", "ptx cubin log")


class Nvrtc:
    """The few calls of NVRTC's C API that CuPy's compiler makes, through ctypes."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)),
                    "nvrtcVersion")
        self.version = f"{major.value}.{minor.value}"

    def _check(self, result, call):
        if result != 0:  # NVRTC_SUCCESS
            raise RuntimeError(f"{call}: {self.lib.nvrtcGetErrorString(result).decode()}")

    def _read(self, program, what):
        """The bytes of nvrtcGet<what> (PTX, CUBIN, ProgramLog), after its size."""
        size = ctypes.c_size_t()
        self._check(getattr(self.lib, f"nvrtcGet{what}Size")(program, ctypes.byref(size)),
                    f"nvrtcGet{what}Size")
        buffer = ctypes.create_string_buffer(size.value)
        self._check(getattr(self.lib, f"nvrtcGet{what}")(program, buffer), f"nvrtcGet{what}")
        return buffer.raw[:size.value]

    def compile(self, source, options, name="kernels.cu"):
        """Compiled(ptx, cubin, log) of `source`; CompileError with NVRTC's log if refused.
        (cubin is empty for -arch=compute_XX, which asks for PTX only.)"""
        program = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(),
                                                name.encode(), 0, None, None),
                    "nvrtcCreateProgram")
        try:
            argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            result = self.lib.nvrtcCompileProgram(program, len(options), argv)
            log = self._read(program, "ProgramLog").rstrip(b"\0").decode()
            if result != 0:
                raise CompileError(f"NVRTC {self.version} refused {name} with options "
                                   f"{' '.join(options)}:\n{log}")
            ptx = self._read(program, "PTX").rstrip(b"\0").decode()
            return Compiled(ptx, self._read(program, "CUBIN"), log)
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(program))


def find_nvrtc(cuda):
    """(Nvrtc of CUDA `cuda` from its installed wheel, None) or (None, why not)."""
    wheel, folder, library = NVRTC_WHEELS[cuda]
    if not sys.platform.startswith("linux"):
        return None, f"NVRTC's wheels are loaded here as Linux libraries, not on {sys.platform}"
    try:
        import nvidia  # the namespace package NVIDIA's wheels install into
        roots = list(nvidia.__path__)
    except ImportError:
        roots = []
    for root in roots:
        if Path(root, folder, "lib", library).exists():
            return Nvrtc(Path(root, folder, "lib", library)), None
    return None, (f"CUDA {cuda}'s NVRTC ({wheel}, nvidia/{folder}/lib/{library}) is not "
                  f"installed; pip install -e '.[test]' installs it on Linux x86-64, or "
                  f"pip install {wheel}")


class _RecordingArrayModule:
    """Stands in for CuPy: RawModule returns the arguments kernels.py passes it."""

    def RawModule(self, **arguments):
        return arguments


def raw_module_arguments():
    """What kernels.py passes to xp.RawModule (its cached _module, called uncached)."""
    return kernels._module.__wrapped__(_RecordingArrayModule())


def cupy_options(options, cc):
    """The options CuPy's RawModule hands NVRTC for `options` on a device of compute
    capability `cc` (the -I folders left out: see the module docstring)."""
    options = tuple(options)
    if not any("-std=" in o for o in options):
        options += ("--std=c++17",)
    return options + ("-ftz=true", f"-arch=sm_{cc}", "--device-as-default-execution-space")


def launched_kernels():
    """The kernel names kernels.py, fused_attention.py and fused_optim.py launch: each
    _rows/_flat/_columns/_warp call's first argument, in each version kernels.SUFFIX names
    (float32, float16) unless it is FLOAT32_ONLY."""
    trees = [ast.parse(Path(module.__file__).read_text())
             for module in (kernels, fused_attention, fused_optim)]
    names = {node.args[0].value for tree in trees for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and node.func.id in ("_rows", "_flat", "_columns", "_warp") and node.args
             and isinstance(node.args[0], ast.Constant)}
    return {name + suffix for name in names for suffix in kernels.SUFFIX.values()
            if name not in kernels.FLOAT32_ONLY or suffix == ""}


Usage = namedtuple("Usage", "registers stack spill_stores spill_loads")
PTXAS_USAGE = re.compile(r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, "
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                         r"Used (\d+) registers", re.DOTALL)


@functools.lru_cache(maxsize=None)
def compile_kernels(nvrtc, cc):
    """kernels.source() compiled as CuPy's RawModule would for sm_`cc`, with ptxas's report."""
    arguments = raw_module_arguments()
    return nvrtc.compile(arguments["code"], cupy_options(arguments["options"], cc)
                         + ("--ptxas-options=-v",))


def register_usage(nvrtc, cc=90):
    """{kernel: Usage} from ptxas's report on sm_`cc`."""
    return {name: Usage(int(regs), int(stack), int(stores), int(loads))
            for name, stack, stores, loads, regs in
            PTXAS_USAGE.findall(compile_kernels(nvrtc, cc).log)}


@pytest.fixture(scope="module", params=sorted(NVRTC_WHEELS), ids=lambda c: f"cuda{c}")
def nvrtc(request):
    found, why_not = find_nvrtc(request.param)
    if found is None:
        pytest.skip(why_not)
    return found


def test_kernels_py_passes_only_source_and_options():
    arguments = raw_module_arguments()
    assert arguments["code"] == kernels.source()
    assert set(arguments) == {"code", "options"}, (
        f"kernels.py now passes {sorted(set(arguments) - {'code', 'options'})} to "
        "RawModule; make cupy_options do with them what CuPy does")


def test_kernels_cu_includes_nothing():
    includes = re.findall(r"^\s*#\s*include.*$", kernels.source(), re.MULTILINE)
    assert not includes, (
        f"kernels_*.cu now have {includes}: CuPy adds -I folders for CCCL, its own headers and "
        "the CUDA headers, which this test leaves out; add the folder the header lives in "
        "to cupy_options (from the wheel that ships it) so NVRTC here can find it")


def test_every_kernel_kernels_py_launches_is_defined_extern_c():
    defined = set(re.findall(r'extern "C" __global__ void (\w+)\(', kernels.source()))
    assert launched_kernels() == defined  # (the AST walk finds every launch)


@pytest.mark.parametrize("cc", ARCHS, ids=lambda cc: f"sm_{cc}")
def test_nvrtc_compiles_every_kernel_as_cupy_would(nvrtc, cc):
    compiled = compile_kernels(nvrtc, cc)
    assert f".target sm_{cc}" in compiled.ptx
    assert compiled.cubin, "NVRTC made no cubin for -arch=sm_XX (ptxas did not run)"
    entries = set(re.findall(r"^\.visible \.entry (\w+)\(", compiled.ptx, re.MULTILINE))
    missing = launched_kernels() - entries
    assert not missing, f"kernels.py looks up {sorted(missing)}, not in the PTX's {entries}"


def test_no_kernel_spills_registers_on_sm_90(nvrtc):
    usage = register_usage(nvrtc)
    assert set(usage) == launched_kernels()
    spilling = {name: u for name, u in usage.items() if u.spill_stores or u.spill_loads}
    assert not spilling, f"ptxas spills registers to local memory on sm_90: {spilling}"


def test_what_only_nvrtc_refuses_fails_with_its_log(nvrtc):
    # g++ (the emulator) finds <cmath>; NVRTC, given no include folder, does not
    code = '#include <cmath>\nextern "C" __global__ void k(float* x) { x[0] = std::exp(x[0]); }'
    with pytest.raises(CompileError, match=r'(?s)refused k\.cu.*could not open source file "cmath"'):
        nvrtc.compile(code, cupy_options(("--std=c++17",), 90), name="k.cu")


if __name__ == "__main__":
    for cuda in sorted(NVRTC_WHEELS):
        nvrtc, why_not = find_nvrtc(cuda)
        if nvrtc is None:
            print(why_not)
            continue
        print(f"NVRTC {nvrtc.version}, sm_90 (ptxas -v):")
        for name, u in register_usage(nvrtc).items():
            print(f"  {name:<24} {u.registers:3d} registers, {u.stack} B stack, "
                  f"{u.spill_stores} B spill stores, {u.spill_loads} B spill loads")
