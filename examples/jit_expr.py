"""A small JIT: compile an arithmetic expression over float64 to x86-64 machine code.

The expression (in ``x``) becomes one function

    void kernel(const double *src, double *dst, int64_t n)   # dst[i] = expr(src[i])

made of SSE2 scalar-double instructions, encoded by the helpers below (no
assembler needed). It runs over an array in one call; the same expression
as a Python function runs over the same values for comparison.

    python examples/jit_expr.py
    python examples/jit_expr.py "x * x - 3 * x + 2" --n 100000
    python examples/jit_expr.py -- "-x * 2"

Grammar: numbers, ``x``, ``+ - * /``, unary ``-``, ``e ** k`` (integer k from
0 to 16), ``sqrt(e)``, ``abs(e)``, ``min(a, b)``, ``max(a, b)``. As in IEEE
arithmetic, division by zero gives inf (NaN for 0/0), sqrt of a negative
number NaN and overflow inf, where Python would raise; ``min``/``max`` give
their second argument when either is NaN (the rule of minsd/maxsd).

The results are checked against the expression evaluated by Python with
those same rules (Python's own arithmetic wherever it gives a value); inf
equals inf of the same sign and NaN equals NaN in that comparison. Python's
speed is that of the expression as written, unless Python raises for some x:
then that of the version with the IEEE rules, and the output says so.
"""

from __future__ import annotations

import argparse
import array
import ast
import ctypes
import math
import platform
import struct
import time
from collections.abc import Callable

from mmap_alloc import MapAlloc, Region

DEFAULT = "(x * x - 3 * x + 2) / (1 + x * x) + sqrt(abs(x)) * 0.5"

# ------------------------------------------------------------------ encoding
#
# SSE2 scalar-double instructions: [prefix] [REX] 0F opcode ModRM [disp32]
#   prefix F2 selects the scalar-double form (addsd ...), 66 the packed-double
#   form (xorpd, andpd, movapd).
#   REX = 0100 W R X B; R extends ModRM.reg and B ModRM.rm to reach xmm8-15.
#   ModRM = mod(2 bits) reg(3) rm(3): mod 11 is register-direct; mod 00 with
#   rm 101 is [rip + disp32], disp32 counted from the end of the instruction.

SCALAR, PACKED = 0xF2, 0x66
MOVSD_LOAD, MOVSD_STORE = 0x10, 0x11  # F2 0F 10 /r: xmm <- m64;  F2 0F 11 /r: m64 <- xmm
ADDSD, MULSD, SUBSD, DIVSD = 0x58, 0x59, 0x5C, 0x5E
MINSD, MAXSD, SQRTSD = 0x5D, 0x5F, 0x51
MOVAPD, ANDPD, XORPD = 0x28, 0x54, 0x57  # with prefix 66
RDI, RSI = 7, 6  # general registers holding src and dst (System V ABI)

BINARY = {ast.Add: ADDSD, ast.Sub: SUBSD, ast.Mult: MULSD, ast.Div: DIVSD}
CALLS = {"min": MINSD, "max": MAXSD}
SIGN = struct.unpack("<d", struct.pack("<Q", 1 << 63))[0]  # -0.0: only the sign bit
MAGNITUDE = struct.unpack("<d", struct.pack("<Q", (1 << 63) - 1))[0]  # NaN with all other bits


def sse(prefix: int, opcode: int, reg: int, rm: int, mod: int = 0b11) -> bytes:
    """One SSE instruction with xmm ``reg`` and ``rm`` (a register, or a base
    register when ``mod`` is 00)."""
    rex = 0x40 | (reg >> 3) << 2 | (rm >> 3)
    modrm = mod << 6 | (reg & 7) << 3 | (rm & 7)
    return bytes([prefix, *([rex] if rex != 0x40 else []), 0x0F, opcode, modrm])


def sse_rip(prefix: int, opcode: int, reg: int) -> bytes:
    """An SSE instruction whose memory operand is [rip + disp32]; the four
    zero bytes at its end are the displacement, patched later."""
    return sse(prefix, opcode, reg, 0b101, mod=0b00) + bytes(4)


def number(node: ast.expr) -> float | None:
    """The value of a numeric literal, or None for any other node."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        try:
            return float(node.value)  # type: ignore[arg-type]
        except OverflowError:
            raise ValueError(f"the constant {node.value!r} is too large for a float64") from None
    return None


class Compiler:
    """Turns an expression tree into code, keeping constants in a pool after it.

    Values live in xmm registers used as a stack: xmm0 holds x, the node
    evaluated at depth d goes to xmm(d).
    """

    def __init__(self) -> None:
        self.code = bytearray()
        self.constants: dict[bytes, int] = {}  # 8 bytes of a double -> pool index
        self.fixups: list[tuple[int, int]] = []  # (offset of a disp32, pool index)

    def constant(self, prefix: int, opcode: int, reg: int, value: float) -> None:
        """Emit ``op xmm(reg), [constant]``."""
        key = struct.pack("<d", value)
        index = self.constants.setdefault(key, len(self.constants))
        self.code += sse_rip(prefix, opcode, reg)
        self.fixups.append((len(self.code) - 4, index))

    def load(self, node: ast.expr, reg: int) -> None:
        """Emit code that leaves the value of ``node`` in xmm(reg)."""
        if reg > 15:
            raise ValueError("expression too deeply nested for 15 registers")
        if isinstance(node, ast.Name) and node.id == "x":
            self.code += sse(PACKED, MOVAPD, reg, 0)
        elif (value := number(node)) is not None:
            self.constant(SCALAR, MOVSD_LOAD, reg, value)
        elif isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            self.load(node.left, reg)
            self.operate(BINARY[type(node.op)], reg, node.right)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            self.power(node, reg)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            self.load(node.operand, reg)
            self.constant(SCALAR, MOVSD_LOAD, reg + 1, SIGN)
            self.code += sse(PACKED, XORPD, reg, reg + 1)  # flip the sign bit
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd):
            self.load(node.operand, reg)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            self.call(node.func.id, node.args, reg)
        else:
            raise ValueError(f"cannot compile {ast.unparse(node)!r}")

    def operate(self, opcode: int, reg: int, right: ast.expr) -> None:
        """xmm(reg) = xmm(reg) <op> right, with x and constants used in place."""
        if isinstance(right, ast.Name) and right.id == "x":
            self.code += sse(SCALAR, opcode, reg, 0)
        elif (value := number(right)) is not None:
            self.constant(SCALAR, opcode, reg, value)
        else:
            self.load(right, reg + 1)
            self.code += sse(SCALAR, opcode, reg, reg + 1)

    def power(self, node: ast.BinOp, reg: int) -> None:
        exponent = node.right
        if not (isinstance(exponent, ast.Constant) and type(exponent.value) is int):
            raise ValueError("only integer constant exponents are supported")
        if not 0 <= exponent.value <= 16:
            raise ValueError("exponents must lie between 0 and 16")
        if exponent.value == 0:
            self.constant(SCALAR, MOVSD_LOAD, reg, 1.0)
            return
        self.load(node.left, reg)
        if exponent.value > 1:
            self.code += sse(PACKED, MOVAPD, reg + 1, reg)
            for _ in range(exponent.value - 1):
                self.code += sse(SCALAR, MULSD, reg, reg + 1)

    def call(self, name: str, args: list[ast.expr], reg: int) -> None:
        if name == "sqrt" and len(args) == 1:
            self.load(args[0], reg)
            self.code += sse(SCALAR, SQRTSD, reg, reg)
        elif name == "abs" and len(args) == 1:
            self.load(args[0], reg)
            self.constant(SCALAR, MOVSD_LOAD, reg + 1, MAGNITUDE)
            self.code += sse(PACKED, ANDPD, reg, reg + 1)  # clear the sign bit
        elif name in CALLS and len(args) == 2:
            self.load(args[0], reg)
            self.operate(CALLS[name], reg, args[1])
        else:
            raise ValueError(f"unknown function {name}() with {len(args)} argument(s)")

    def kernel(self, tree: ast.expr) -> bytes:
        """The whole function: a loop over n doubles, then the constant pool."""
        self.code += bytes([0x48, 0x85, 0xD2])  # test rdx, rdx   (REX.W 85 /r)
        self.code += bytes([0x0F, 0x8E]) + bytes(4)  # jle done       (rel32, patched)
        skip = len(self.code)
        loop = len(self.code)
        self.code += sse(SCALAR, MOVSD_LOAD, 0, RDI, mod=0b00)  # movsd xmm0, [rdi]
        self.load(tree, 1)
        self.code += sse(SCALAR, MOVSD_STORE, 1, RSI, mod=0b00)  # movsd [rsi], xmm1
        self.code += bytes([0x48, 0x83, 0xC7, 8])  # add rdi, 8      (REX.W 83 /0 ib)
        self.code += bytes([0x48, 0x83, 0xC6, 8])  # add rsi, 8
        self.code += bytes([0x48, 0xFF, 0xCA])  # dec rdx         (REX.W FF /1)
        self.code += bytes([0x0F, 0x85])  # jnz loop        (rel32 from the next instruction)
        self.code += struct.pack("<i", loop - (len(self.code) + 4))
        self.code[skip - 4 : skip] = struct.pack("<i", len(self.code) - skip)
        self.code += bytes([0xC3])  # done: ret
        self.code += bytes(-len(self.code) % 16)  # the pool starts 16-byte aligned
        pool = len(self.code)
        for at, index in self.fixups:
            self.code[at : at + 4] = struct.pack("<i", pool + 8 * index - (at + 4))
        for value in self.constants:  # dicts keep insertion order = pool index
            self.code += value
        return bytes(self.code)


def parse(expression: str) -> ast.expr:
    return ast.parse(expression, mode="eval").body


def python_function(expression: str) -> Callable[[float], float]:
    """The same expression as a Python function of x, with Python's own rules
    (it raises where IEEE arithmetic gives inf or NaN)."""
    namespace = {"sqrt": math.sqrt, "abs": abs, "min": min, "max": max}
    function: Callable[[float], float] = eval(f"lambda x: {expression}", namespace)
    return function


# ------------------------------------------------------------------ IEEE rules in Python


def ieee_div(a: float, b: float) -> float:
    """a / b as divsd computes it: +-inf for a nonzero a over zero, NaN for 0/0."""
    try:
        return a / b
    except ZeroDivisionError:
        if a == 0 or math.isnan(a):
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def ieee_sqrt(a: float) -> float:
    """sqrt as sqrtsd computes it: NaN below zero (sqrt(-0.0) is -0.0)."""
    return math.nan if a < 0 else math.sqrt(a)


def ieee_pow(a: float, k: int) -> float:
    """a ** k for an integer k >= 0: +-inf where Python raises OverflowError."""
    try:
        return a**k
    except OverflowError:
        return math.copysign(math.inf, a) if k % 2 else math.inf


def ieee_min(a: float, b: float) -> float:
    """minsd: a if a < b, else b (so b whenever either is NaN)."""
    return a if a < b else b


def ieee_max(a: float, b: float) -> float:
    """maxsd: a if a > b, else b (so b whenever either is NaN)."""
    return a if a > b else b


class _IEEEForm(ast.NodeTransformer):
    """Rewrites an expression so that Python follows the IEEE rules the code does:
    constants become floats, ``/``, ``**``, sqrt, min and max call the functions above."""

    def visit_Constant(self, node: ast.Constant) -> ast.expr:
        if type(node.value) is int:
            return ast.copy_location(ast.Constant(float(node.value)), node)
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.expr:
        if isinstance(node.op, ast.Pow):  # the exponent stays an int
            return self._call("ieee_pow", node, self.visit(node.left), node.right)
        self.generic_visit(node)
        if isinstance(node.op, ast.Div):
            return self._call("ieee_div", node, node.left, node.right)
        return node

    def visit_Call(self, node: ast.Call) -> ast.expr:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id in ("sqrt", "min", "max"):
            node.func = ast.copy_location(ast.Name(f"ieee_{node.func.id}", ast.Load()), node.func)
        return node

    @staticmethod
    def _call(name: str, node: ast.expr, *args: ast.expr) -> ast.expr:
        return ast.copy_location(ast.Call(ast.Name(name, ast.Load()), list(args), []), node)


def ieee_function(expression: str) -> Callable[[float], float]:
    """The expression as a Python function of x that follows the IEEE rules:
    Python's own result wherever Python gives one, inf or NaN where it raises."""
    tree = ast.parse(f"lambda x: {expression}", mode="eval")
    tree = ast.fix_missing_locations(_IEEEForm().visit(tree))
    namespace = {
        "ieee_div": ieee_div,
        "ieee_sqrt": ieee_sqrt,
        "ieee_pow": ieee_pow,
        "ieee_min": ieee_min,
        "ieee_max": ieee_max,
        "abs": abs,
    }
    function: Callable[[float], float] = eval(compile(tree, "<expression>", "eval"), namespace)
    return function


def difference(got: float, expected: float) -> float:
    """How far ``got`` is from ``expected``: 0 when they are equal (inf equals inf
    of the same sign, NaN equals NaN), inf when only one is inf or NaN, else the
    relative difference."""
    if got == expected or (math.isnan(got) and math.isnan(expected)):
        return 0.0
    if not (math.isfinite(got) and math.isfinite(expected)):
        return math.inf
    return abs(got - expected) / max(abs(expected), 1e-300)


def first_failure(f: Callable[[float], float], xs: list[float]) -> tuple[float, Exception] | None:
    """The first x for which ``f`` raises an arithmetic error, with the error."""
    for x in xs:
        try:
            f(x)
        except (ArithmeticError, ValueError) as exc:
            return x, exc
    return None


Kernel = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def best_of(runs: int, action: Callable[[], object]) -> float:
    """The shortest of ``runs`` timings of ``action``, in seconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def time_python(
    f: Callable[[float], float], xs: list[float], runs: int
) -> tuple[float, list[float]]:
    """The best time of ``[f(x) for x in xs]``, and its result."""
    result: list[float] = []

    def run() -> None:
        result[:] = [f(x) for x in xs]

    return best_of(runs, run), result


def time_jit(region: Region, source: int, target: int, n: int, runs: int) -> float:
    """The best time of one call of the code in ``region`` over n values."""
    kernel = region.function(Kernel)  # pins the region until this returns
    return best_of(runs, lambda: kernel(source, target, n))


def count(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("expression", nargs="?", default=DEFAULT)
    parser.add_argument("--n", type=count, default=1_000_000, help="array length (0 or more)")
    parser.add_argument(
        "--runs", type=positive, default=3, help="timings to take the best of (1 or more)"
    )
    parser.add_argument("--dump", action="store_true", help="print the machine code in hex")
    args = parser.parse_args()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise SystemExit(f"jit_expr emits x86-64 code; this machine is {platform.machine()}")

    try:
        code = Compiler().kernel(parse(args.expression))
    except (SyntaxError, ValueError) as exc:
        raise SystemExit(f"jit_expr: {exc}") from None
    alloc = MapAlloc()
    region: Region = alloc.alloc(len(code))
    region[: len(code)] = code
    region.make_exec()

    print(f"expression  : {args.expression}")
    print(f"machine code: {len(code)} bytes at 0x{region.address:x} ({region.perms})")
    if args.dump:
        print(code.hex(" "))
    n = args.n
    if n == 0:
        print("n           : 0 values: nothing to time or compare")
        alloc.dealloc(region)
        return

    xs = [-5.0 + 10.0 * i / max(n - 1, 1) for i in range(n)]
    src = array.array("d", xs)
    dst = array.array("d", bytes(8 * n))
    source, target = src.buffer_info()[0], dst.buffer_info()[0]

    reference = ieee_function(args.expression)
    failure = None
    try:
        t_python, _ = time_python(python_function(args.expression), xs, args.runs)
    except (ArithmeticError, ValueError):
        failure = first_failure(python_function(args.expression), xs)
        t_python, _ = time_python(reference, xs, args.runs)
    expected = [reference(x) for x in xs]
    t_jit = time_jit(region, source, target, n, args.runs)

    worst = max((difference(a, b) for a, b in zip(dst, expected, strict=True)), default=0.0)
    print(f"n           : {n} float64 values")
    if failure is not None:
        x, error = failure
        print(
            f"pure Python raises {type(error).__name__} ({error}) at x = {x:g}: "
            "timing it with the IEEE rules instead"
        )
    print(f"pure Python : {t_python * 1e3:9.3f} ms")
    print(f"JIT         : {t_jit * 1e3:9.3f} ms  ({speedup(t_python, t_jit)})")
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        vector = np.frombuffer(src, dtype=np.float64)
        names = {"sqrt": np.sqrt, "abs": np.abs, "min": np.minimum, "max": np.maximum, "x": vector}
        with np.errstate(all="ignore"):  # inf and NaN, as above
            t_numpy = best_of(args.runs, lambda: eval(args.expression, names))
        print(f"numpy       : {t_numpy * 1e3:9.3f} ms  (JIT {t_numpy / t_jit:.1f}x numpy's speed)")
    infinite = sum(1 for value in dst if math.isinf(value))
    nans = sum(1 for value in dst if math.isnan(value))
    if infinite or nans:
        print(f"non-finite  : {infinite} inf, {nans} NaN (IEEE results)")
    print(f"max relative difference from Python: {worst:.3g}")
    if worst > 1e-12:
        raise SystemExit("the JIT disagrees with Python")

    alloc.dealloc(region)


def speedup(slow: float, fast: float) -> str:
    """The JIT's time ``fast`` against Python's ``slow``, in words."""
    if fast <= 0 or slow <= 0:
        return "too fast to compare with pure Python"
    ratio = slow / fast
    if ratio >= 1.5:
        return f"{ratio:.0f}x faster than pure Python"
    return f"{ratio:.2f}x the speed of pure Python"


if __name__ == "__main__":
    main()
