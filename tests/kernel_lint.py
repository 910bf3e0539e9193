"""A static check of Triton kernels: no loop re-binds, without reading it first, a name bound before the loop.

Triton carries every name bound before a ``for``/``while`` and re-bound inside it around the loop, and the
compiled kernel requires it to keep its type and shape (the interpreter does not care). A name that the
loop overwrites before reading is a reused name, not an accumulator: ``w0, w1, _, _ = ...`` before a loop
and ``g0, g1, _, _ = ...`` with another shape inside it fails to compile. Names bound inside a loop are
local to it, as in Triton's code generator.
"""

from __future__ import annotations

import ast
import inspect
import textwrap


def _bound(node: ast.AST) -> set[str]:
    """Names a statement binds (assignment targets, augmented assignments, loop targets)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
    return out


def _first_access(body: list[ast.stmt]) -> dict[str, str]:
    """For each name of a loop body: "load" or "store", whichever comes first in execution order (within a
    statement the right-hand side is evaluated before the targets are bound; augmented assignments read)."""
    first: dict[str, str] = {}

    def visit(node):
        if isinstance(node, ast.Assign):
            visit(node.value)
            for t in node.targets:
                visit(t)
        elif isinstance(node, ast.AugAssign):
            if isinstance(node.target, ast.Name):
                first.setdefault(node.target.id, "load")
            visit(node.value)
        elif isinstance(node, ast.Name):
            first.setdefault(node.id, "store" if isinstance(node.ctx, ast.Store) else "load")
        else:
            for child in ast.iter_child_nodes(node):
                visit(child)

    for stmt in body:
        visit(stmt)
    return first


def reused_loop_names(fn) -> list[str]:
    """Problems of one kernel (a ``@triton.jit`` object or a plain function), as readable lines."""
    fn = getattr(fn, "fn", fn)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    problems = []

    def walk(body: list[ast.stmt], bound: set[str]) -> set[str]:
        bound = set(bound)
        for stmt in body:
            if isinstance(stmt, (ast.For, ast.While)):
                loop_body = stmt.body
                first = _first_access(loop_body)
                for name in sorted(_bound(ast.Module(body=loop_body, type_ignores=[])) & bound):
                    if first.get(name) == "store":
                        problems.append(f"{fn.__name__}, line {stmt.lineno + fn.__code__.co_firstlineno - 1}: "
                                        f"'{name}' is bound before the loop and re-bound inside it before any "
                                        f"read; give the loop's value a name of its own")
                inner = bound | (_bound(stmt.target) if isinstance(stmt, ast.For) else set())
                walk(loop_body, inner)  # names bound in the loop stay local to it
            elif isinstance(stmt, ast.If):
                bound |= walk(stmt.body, bound) | walk(stmt.orelse, bound)
            else:
                bound |= _bound(stmt)
        return bound

    walk(func.body, {a.arg for a in func.args.args})
    return problems
