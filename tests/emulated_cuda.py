"""A CPU stand-in for cupy.RawModule: CUDA C++ kernels compiled by g++ and run in fibers.

RawModule(code).get_function(name)(grid, block, args) runs an `extern "C" __global__`
kernel of `code` over the whole grid, as CuPy would launch it, after CuPy's checks and
stricter ones, so that a test on a machine without a GPU catches what would go wrong on
one:
  - each argument must fit its declared C parameter: a pointer takes a C-contiguous
    ndarray of exactly the pointee's dtype; a scalar takes a NumPy scalar of exactly its
    type (a Python int or float is refused: CuPy passes it as a 64-bit value, which an
    `int` or `float` parameter reads as garbage);
  - array arguments may not overlap (unless both are const: each is copied, so writes
    through one could not be seen through the other);
  - each array is copied between guard zones (NaN for floats, so an out-of-bounds read
    spreads NaN; 0xA5 bytes for integers); a guard written to, or a const array's
    contents changed, raises EmulatedCudaError after the launch.
tests/emulated_cuda.h says what the kernels may use and how threads are scheduled: warps
one after another, lanes as fibers that meet at __shfl_xor_sync. Not emulated: shared
memory, __syncthreads, atomics (a kernel using them does not compile), streams, timing,
and any race that depends on the memory model or on threads running at the same time.
"""
import ctypes
import hashlib
import operator
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HEADER = Path(__file__).resolve().with_name("emulated_cuda.h")
CACHE = Path(tempfile.gettempdir()) / "npgpt-emulated-cuda"
FLAGS = ["-std=c++17", "-O2", "-shared", "-fPIC"]
GUARD = 64  # elements at least, each side of every array argument
GUARD_BYTE = 0xA5
FLOAT_GUARD = {np.dtype(np.float16): np.uint16(0x7E5A).view(np.float16),
               np.dtype(np.float32): np.uint32(0x7FC0DEAD).view(np.float32),
               np.dtype(np.float64): np.uint64(0x7FF8DEADDEADDEAD).view(np.float64)}

# C type -> (dtype, ctypes type)
TYPES = {
    "float": (np.float32, ctypes.c_float), "double": (np.float64, ctypes.c_double),
    "int": (np.int32, ctypes.c_int32), "unsigned": (np.uint32, ctypes.c_uint32),
    "unsigned int": (np.uint32, ctypes.c_uint32), "long long": (np.int64, ctypes.c_int64),
    "long long int": (np.int64, ctypes.c_int64), "unsigned char": (np.uint8, ctypes.c_uint8),
    "bool": (np.bool_, ctypes.c_bool),
    "half_t": (np.float16, ctypes.c_uint16)}  # kernels_common.cu's float16 storage

TEMPLATE = """
#define EMUCUDA_IMPLEMENTATION
#include "{header}"
extern "C" const char* emucuda_error() {{ return ::emucuda::error_message; }}
"""
LAUNCHER = """
extern "C" int emucuda_launch_{name}(unsigned emu_gx, unsigned emu_gy, unsigned emu_gz,
        unsigned emu_bx, unsigned emu_by, unsigned emu_bz{params}) {{
    auto body = [&]() {{ {name}({args}); }};
    return ::emucuda::launch({{emu_gx, emu_gy, emu_gz}}, {{emu_bx, emu_by, emu_bz}},
                             &::emucuda::call<decltype(body)>, &body);
}}
"""


class CompileError(RuntimeError):
    """g++ refused the code; the message holds its stderr."""


class EmulatedCudaError(RuntimeError):
    """A launch failed, or a kernel wrote where it must not."""


def _compiler():
    return shlex.split(os.environ.get("CXX") or "g++")


def compiler_missing():
    """None when the C++ compiler ($CXX, else g++) is on PATH, else why not (a skip reason)."""
    command = _compiler()
    if command and shutil.which(command[0]):
        return None
    name = " ".join(command) or "g++"
    return f"no C++ compiler to emulate CUDA kernels with ({name} is not on PATH)"


class Param:
    """One parameter of a kernel, from its declaration ("const float* __restrict__ x")."""

    def __init__(self, decl):
        self.decl = " ".join(decl.split())
        match = re.fullmatch(r"(.*?)\b(\w+)", self.decl)
        if not match or match[1].count("*") > 1 or "[" in self.decl:
            raise ValueError(f"cannot emulate the kernel parameter {self.decl!r}")
        kind, self.name = match[1], match[2]
        self.pointer = "*" in kind
        self.const = self.pointer and "const" in kind.split("*")[0].split()
        words = kind.replace("*", " ").split()
        self.ctype = " ".join(w for w in words if w not in ("const", "__restrict__"))
        if self.ctype not in TYPES:
            raise ValueError(f"cannot emulate the kernel parameter type of {self.decl!r}")
        self.dtype = np.dtype(TYPES[self.ctype][0])
        self.argtype = ctypes.c_void_p if self.pointer else TYPES[self.ctype][1]


def parse_kernels(code):
    """{name: [Param, ...]} of every extern "C" __global__ void kernel in code."""
    code = re.sub(r"//[^\n]*|/\*.*?\*/", " ", code, flags=re.S)
    kernels = {}
    for m in re.finditer(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', code):
        decls = [d for d in m[2].split(",") if d.strip() not in ("", "void")]
        kernels[m[1]] = [Param(d) for d in decls]
    return kernels


def _build(source):
    """The path of the shared library built from source (cached by content)."""
    command = _compiler()
    key = hashlib.sha256("\0".join([HEADER.read_text(), source, *command, *FLAGS]).encode())
    CACHE.mkdir(parents=True, exist_ok=True)
    library = CACHE / f"{key.hexdigest()}.so"
    if library.exists():
        return library
    cpp = library.with_suffix(".cpp")  # kept: g++'s messages point into it
    fd, tmp = tempfile.mkstemp(dir=CACHE, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(source)
    os.replace(tmp, cpp)
    fd, tmp = tempfile.mkstemp(dir=CACHE, suffix=".so.tmp")
    os.close(fd)
    try:
        result = subprocess.run([*command, *FLAGS, "-o", tmp, str(cpp)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise CompileError(f"emulated CUDA: {' '.join(command)} failed on {cpp}:\n"
                               f"{result.stderr}")
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


class RawModule:
    """cupy.RawModule(code=..., options=...) on the CPU; options other than -D are ignored."""

    def __init__(self, code, options=(), **ignored):
        self.kernels = parse_kernels(code)
        defines = "".join("#define {} {}\n".format(*(o[2:].split("=", 1) + ["1"])[:2])
                          for o in options if o.startswith("-D"))
        launchers = "".join(LAUNCHER.format(
            name=name, params="".join(f", {p.decl}" for p in params),
            args=", ".join(p.name for p in params)) for name, params in self.kernels.items())
        source = (f'{defines}#include "{HEADER}"\n#line 1 "kernel code"\n{code}\n'
                  f'#line 1 "emulated_cuda.py launchers"\n{TEMPLATE.format(header=HEADER)}'
                  f'{launchers}')
        self._library = ctypes.CDLL(str(_build(source)))
        self._library.emucuda_error.restype = ctypes.c_char_p

    def get_function(self, name):
        if name not in self.kernels:
            raise AttributeError(f"no extern \"C\" __global__ kernel named {name!r} in the "
                                 f"module (it has {sorted(self.kernels)})")
        launch = getattr(self._library, f"emucuda_launch_{name}")
        launch.restype = ctypes.c_int
        launch.argtypes = [ctypes.c_uint] * 6 + [p.argtype for p in self.kernels[name]]
        return Kernel(name, self.kernels[name], launch, self._library.emucuda_error)


def _dims(value, what, limits):
    dims = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{what} must be an int or a tuple of 1 to 3 ints, not {value!r}")
    dims = tuple(operator.index(d) for d in dims) + (1,) * (3 - len(dims))
    if any(not 1 <= d <= limit for d, limit in zip(dims, limits)):
        raise ValueError(f"{what} {value!r} outside CUDA's limits {limits}")
    return dims


class Kernel:
    """A kernel of a RawModule: kernel(grid, block, args, shared_mem=0), as CuPy's."""

    def __init__(self, name, params, launch, error):
        self.name, self.params, self._launch, self._error = name, params, launch, error

    def _where(self, k):
        return f"kernel {self.name}: argument {k} ({self.params[k].decl})"

    def _check(self, k, arg):
        p = self.params[k]
        if p.pointer:
            if not isinstance(arg, np.ndarray):
                raise TypeError(f"{self._where(k)} needs an array, not {type(arg).__name__}")
            if arg.dtype != p.dtype:
                raise TypeError(f"{self._where(k)} needs dtype {p.dtype}, not {arg.dtype}")
            if not arg.flags.c_contiguous:
                raise ValueError(f"{self._where(k)}: the array is not C-contiguous (the "
                                 "kernel gets a raw pointer and would read it wrongly)")
            if not p.const and not arg.flags.writeable:
                raise ValueError(f"{self._where(k)}: the array is read-only")
            return arg.view(np.ndarray)
        if not isinstance(arg, np.generic):
            raise TypeError(f"{self._where(k)} needs np.{p.dtype.type.__name__}(...), not "
                            f"{type(arg).__name__}: CuPy passes a Python int or float as a "
                            f"64-bit value (and an array as a pointer), which a "
                            f"'{p.ctype}' parameter reads as garbage")
        if arg.dtype != p.dtype:
            raise TypeError(f"{self._where(k)} needs np.{p.dtype.type.__name__}(...), not "
                            f"np.{arg.dtype.type.__name__}")
        return arg

    def __call__(self, grid, block, args, shared_mem=0):
        if not isinstance(args, tuple):
            raise TypeError(f"kernel {self.name}: args must be a tuple, not "
                            f"{type(args).__name__}")
        if len(args) != len(self.params):
            raise TypeError(f"kernel {self.name} takes {len(self.params)} arguments "
                            f"({', '.join(p.decl for p in self.params)}), got {len(args)}")
        if shared_mem != 0:
            raise ValueError(f"kernel {self.name}: shared_mem={shared_mem}: the emulation "
                             "has no shared memory")
        grid = _dims(grid, f"kernel {self.name}: grid", (2**31 - 1, 65535, 65535))
        block = _dims(block, f"kernel {self.name}: block", (1024, 1024, 64))
        if block[0] * block[1] * block[2] > 1024:
            raise ValueError(f"kernel {self.name}: block {block} has over 1024 threads")
        args = [self._check(k, a) for k, a in enumerate(args)]
        arrays = [k for k, p in enumerate(self.params) if p.pointer]
        for i in arrays:
            for j in arrays:
                if i < j and not (self.params[i].const and self.params[j].const) \
                        and np.shares_memory(args[i], args[j]):
                    raise ValueError(f"kernel {self.name}: arguments {i} and {j} overlap in "
                                     "memory (the emulator copies each array, so it cannot "
                                     "run a kernel on aliased arrays)")
        buffers = {k: _guarded_copy(args[k]) for k in arrays}
        values = [buffers[k][1].ctypes.data if k in buffers else a.item()
                  for k, a in enumerate(args)]
        if self._launch(*grid, *block, *values) != 0:
            raise EmulatedCudaError(f"kernel {self.name} failed: "
                                    f"{self._error().decode(errors='replace')}")
        for k, (buffer, inside, before, after) in buffers.items():
            raw = buffer.view(np.uint8)
            g = before.size
            if not (np.array_equal(raw[:g], before) and np.array_equal(raw[-g:], after)):
                raise EmulatedCudaError(f"kernel {self.name} wrote outside argument {k} "
                                        f"({self.params[k].decl}, {args[k].size} elements)")
            if self.params[k].const:
                if not np.array_equal(raw[g:-g], args[k].reshape(-1).view(np.uint8)):
                    raise EmulatedCudaError(f"kernel {self.name} changed const argument {k} "
                                            f"({self.params[k].decl})")
            else:
                args[k].reshape(-1)[...] = inside


def _guarded_copy(array):
    """(buffer, its inside holding a copy of array, bytes before, bytes after)."""
    guard = max(GUARD, min(array.size, 1 << 16))
    buffer = np.empty(array.size + 2 * guard, array.dtype)
    raw = buffer.view(np.uint8)
    raw[...] = GUARD_BYTE
    if array.dtype in FLOAT_GUARD:
        buffer[...] = FLOAT_GUARD[array.dtype]
    inside = buffer[guard:guard + array.size]
    inside[...] = array.reshape(-1)
    g = guard * array.dtype.itemsize
    return buffer, inside, raw[:g].copy(), raw[-g:].copy()
