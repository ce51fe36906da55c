"""The CPU kernels' runtime ISA dispatch (csrc/include/kexue/cpu_dispatch.h): the level API,
``KEXUE_CPU_ISA``, and the binary itself: wide vector instructions only where their level's
code is (a function compiled for AVX-512 that the linker shared with the baseline copy would
die with SIGILL on an AVX2 machine). The kernels are checked against the references at every
level by the target matrix of the other test files."""

from __future__ import annotations

import bisect
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from kexue_fast import _C

LEVELS = ("avx512bf16", "avx512", "avx2", "baseline")


def test_levels_are_known_best_first_and_end_in_baseline():
    isas = _C.cpu_isas()
    assert isas[-1] == "baseline"
    assert set(isas) <= set(LEVELS)
    assert list(isas) == sorted(isas, key=LEVELS.index)
    assert _C.cpu_isa() in isas


def test_set_cpu_isa_switches_and_rejects_what_it_cannot_run():
    before = _C.cpu_isa()
    try:
        for isa in _C.cpu_isas():
            _C.set_cpu_isa(isa)
            assert _C.cpu_isa() == isa
        _C.set_cpu_isa(before)
        with pytest.raises(ValueError, match="unknown CPU ISA level 'avx3'"):
            _C.set_cpu_isa("avx3")
        for isa in set(LEVELS) - set(_C.cpu_isas()):
            with pytest.raises(ValueError, match=f"does not support {isa}"):
                _C.set_cpu_isa(isa)
        assert _C.cpu_isa() == before  # a rejected level changes nothing
    finally:
        _C.set_cpu_isa(before)


def _import_with_env(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KEXUE_CPU_ISA=value)
    code = "from kexue_fast import _C; print(_C.cpu_isa())"
    # Outside the source tree: `-c` puts the current directory first on sys.path, and the
    # repository's kexue_fast/ has no built _C (the installed package has).
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir()
    )


@pytest.mark.parametrize("isa", ["auto", *_C.cpu_isas()])
def test_environment_variable_forces_the_level(isa):
    result = _import_with_env(isa)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (_C.cpu_isas()[0] if isa == "auto" else isa)


def test_environment_variable_naming_an_unknown_level_fails_the_import_clearly():
    result = _import_with_env("sse9")
    assert result.returncode != 0
    assert "KEXUE_CPU_ISA=sse9: unknown CPU ISA level 'sse9'" in result.stderr


def _level_of(name: str) -> int | None:
    """The ISA level (index into WIDE_FEATURES) a function's name puts it in: our kernels by
    their namespace, the bindings and the dispatch at the baseline; None for code of the
    standard library and other templates, whose level is that of their callers."""
    if "kexue::cpu_avx512bf16::" in name:
        return 3
    if "kexue::cpu_avx512::" in name:
        return 2
    if "kexue::cpu_avx2::" in name:
        return 1
    if "kexue::" in name or "pybind11" in name or "PyInit" in name:
        return 0
    return None


#: What each level may use: baseline none of these, AVX2 ymm registers, AVX-512 also zmm and
#: mask registers, avx512bf16 also the AVX512_BF16 instructions ("bf16").
WIDE_FEATURES = ((), ("ymm",), ("ymm", "zmm", "k"), ("ymm", "zmm", "k", "bf16"))
#: The AVX512_BF16 instructions (the registers they use are AVX-512's).
BF16_INSTRUCTION = re.compile(r"^(vcvtne2ps2bf16|vcvtneps2bf16|vdpbf16ps)")


def functions_with_misplaced_wide_instructions(library: str) -> dict[str, str]:
    """Functions of ``library`` that code of some ISA level can reach by direct calls (or
    jumps) and that use registers or instructions that level does not have (a template the linker kept from a
    wider level's copy and the baseline code calls), each with one offending instruction.
    Reads the symbol table (nm) and the disassembly (objdump); calls through pointers (the
    dispatch itself, OpenMP's outlined bodies) start from their own names."""
    symbols = subprocess.run(["nm", "-C", "-S", "--defined-only", library], capture_output=True, text=True, check=True)
    functions = {}  # start address -> (size, name)
    for line in symbols.stdout.splitlines():
        fields = line.split(" ", 3)
        if len(fields) == 4 and fields[2] in "TtWw":
            functions[int(fields[0], 16)] = (int(fields[1], 16), fields[3])
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True)
    instructions = [
        (int(m.group(1), 16), m.group(2))
        for m in re.finditer(r"^\s+([0-9a-f]+):\s+(.*)$", disassembly.stdout, flags=re.MULTILINE)
    ]
    addresses = [address for address, _ in instructions]
    features, callees = {}, {}  # per function start: wide registers and instructions used, functions called
    for start, (size, _) in functions.items():
        used, called = {}, set()
        i = bisect.bisect_left(addresses, start)
        while i < len(instructions) and instructions[i][0] < start + size:
            text = instructions[i][1]
            for register in re.findall(r"%(ymm|zmm|k[0-7]\b)", text):
                used.setdefault(register.rstrip("01234567"), text)
            if BF16_INSTRUCTION.match(text):
                used.setdefault("bf16", text)
            target = re.match(r"(?:call|jmp)\S*\s+([0-9a-f]+) <", text)
            if target and int(target.group(1), 16) in functions and int(target.group(1), 16) != start:
                called.add(int(target.group(1), 16))
            i += 1
        features[start], callees[start] = used, called
    misplaced = {}
    for root, (_, root_name) in functions.items():
        level = _level_of(root_name)
        if level is None:
            continue
        stack, seen = [root], {root}
        while stack:
            f = stack.pop()
            for feature, text in features[f].items():
                if feature not in WIDE_FEATURES[level]:
                    misplaced.setdefault(functions[f][1], f"{text} (reached from {root_name})")
            for g in callees[f] - seen:
                if _level_of(functions[g][1]) is None:  # a function with a level is checked as a root
                    seen.add(g)
                    stack.append(g)
    return misplaced


needs_binutils = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("nm", "objdump", "c++")), reason="needs a C++ compiler, nm and objdump"
)


@needs_binutils
def test_wide_instructions_stay_in_their_levels_code():
    symbols = subprocess.run(["nm", "--defined-only", _C.__file__], capture_output=True, text=True, check=True)
    assert "cpu_avx" in symbols.stdout or _C.cpu_isas() == ["baseline"], "the symbol table is missing (stripped?)"
    assert functions_with_misplaced_wide_instructions(_C.__file__) == {}


@needs_binutils
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 levels")
def test_the_avx512bf16_level_rounds_to_bfloat16_with_its_instruction():
    disassembly = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True
    )
    namespaces, function = set(), ""
    for line in disassembly.stdout.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif "vcvtneps2bf16" in line:
            level = re.search(r"kexue::(cpu_\w+)::", function)
            namespaces.add(level and level.group(1))
    assert namespaces == {"cpu_avx512bf16"}


SHARED_TEMPLATE = """
#include <cstddef>
#include <cstring>
#include <immintrin.h>
template <class T> __attribute__((noinline)) void triple(T* x, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) x[i] *= 3;
}
#if defined(__AVX512F__)
template <class T> __attribute__((noinline)) void round_16(const float* x, T* bits) {
#if defined(__AVX512BF16__)
  __m256bh r = _mm512_cvtneps_pbh(_mm512_loadu_ps(x));
#else
  __m256i r = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_loadu_si512(x), 16));
#endif
  std::memcpy(bits, &r, 32);
}
#endif
namespace kexue { namespace LEVEL { void entry(float* x, std::size_t n) { CALL; } } }
"""

FLAGS = {
    "cpu_baseline": [],
    "cpu_avx512": ["-mavx512f", "-mavx512bw", "-mprefer-vector-width=512"],
    "cpu_avx512bf16": ["-mavx512f", "-mavx512bw", "-mavx512bf16", "-mprefer-vector-width=512"],
}
#: (wider level, narrower level, the template both call, its name, what the wide copy uses)
SHARED = {
    "avx512-over-baseline": (
        "cpu_avx512",
        "cpu_baseline",
        "triple(x, n)",
        "void triple<float>(float*, unsigned long)",
        "zmm",
    ),
    "bf16-over-avx512": (
        "cpu_avx512bf16",
        "cpu_avx512",
        "round_16(x, reinterpret_cast<short*>(x))",
        "void round_16<short>(float const*, short*)",
        "vcvtneps2bf16",
    ),
}


@needs_binutils
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 registers")
@pytest.mark.parametrize("wide_first", [True, False])
@pytest.mark.parametrize("case", SHARED)
def test_the_binary_check_finds_a_template_shared_from_the_wide_copy(tmp_path, case, wide_first):
    # The hazard the baseline-first link order avoids, built on purpose: a template compiled
    # into a wider level's object and a narrower one's; the linker keeps the first object's copy.
    wide, narrow, call, name, feature = SHARED[case]
    objects = {}
    for level in (wide, narrow):
        source = tmp_path / f"{level}.cpp"
        source.write_text(SHARED_TEMPLATE.replace("LEVEL", level).replace("CALL", call))
        objects[level] = tmp_path / f"{level}.o"
        compile_ = ["c++", "-O3", "-fPIC", "-fvisibility=hidden", "-c", str(source), "-o", str(objects[level])]
        subprocess.run([*compile_, *FLAGS[level]], check=True)
    order = [wide, narrow] if wide_first else [narrow, wide]
    library = tmp_path / "liblevels.so"
    subprocess.run(["c++", "-shared", "-o", str(library), *(str(objects[level]) for level in order)], check=True)
    misplaced = functions_with_misplaced_wide_instructions(str(library))
    if wide_first:
        assert list(misplaced) == [name]
        assert feature in misplaced[name]
    else:
        assert misplaced == {}
