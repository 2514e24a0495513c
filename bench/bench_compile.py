"""What compiling mconnector.py costs, and what that cost depends on.

    python bench/bench_compile.py [--repeat N]

Importing without cached bytecode compiles the whole file first.  Each row is compile()
of a variant of the source, best of N, in this one process:

  as it is              the file
  comments blanked      every line that is only a comment left empty
  without docstrings    the module, class and function docstrings taken out (through the
                        AST, so that the code itself is the same)
  code from its AST     the code generation alone (compile() of the parsed tree)
  collector off         the file, with gc disabled while it compiles
  in sections           the sum of its sections (the map in the module docstring),
                        each compiled alone
Nothing here is a way to ship the module: the rows tell where the time goes.
"""
import argparse
import ast
import gc
import os
import re
import time

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'mconnector.py')


def best(source, repeat):
    fastest = float('inf')
    for _ in range(repeat):
        start = time.perf_counter()
        compile(source, 'mconnector.py', 'exec')
        fastest = min(fastest, time.perf_counter() - start)
    return fastest * 1000


def without_docstrings(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                             ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeat', type=int, default=9)
    options = parser.parse_args()
    n = options.repeat
    text = open(SOURCE, encoding='utf-8').read()
    lines = text.split('\n')
    tree = ast.parse(text)
    print('%d bytes, %d lines, %d AST nodes' % (len(text), len(lines),
                                                sum(1 for _ in ast.walk(tree))))
    whole = best(text, n)
    rows = [('as it is', len(text), whole)]
    blanked = '\n'.join('' if re.match(r'\s*#', line) else line for line in lines)
    rows.append(('comments blanked', len(blanked), best(blanked, n)))
    if hasattr(ast, 'unparse'):     # Python 3.9 on
        # Both through ast.unparse, so that the two differ in their docstrings only.
        with_docs = ast.unparse(ast.parse(text))
        no_docs = ast.unparse(without_docstrings(ast.parse(text)))
        rows.append(('(unparsed, with docstrings)', len(with_docs), best(with_docs, n)))
        rows.append(('without docstrings (unparsed)', len(no_docs), best(no_docs, n)))
    rows.append(('code from its AST', len(text), best(tree, n)))
    gc.disable()
    try:
        rows.append(('collector off', len(text), best(text, n)))
    finally:
        gc.enable()
    marks = [i for i, line in enumerate(lines) if re.match(r'# \d+\. ', line)]
    bounds = list(zip([0] + marks, marks + [len(lines)]))
    future = 'from __future__ import annotations\n'
    sections = [('' if start == 0 else future) + '\n'.join(lines[start:end])
                for start, end in bounds]
    rows.append(('in %d sections, summed' % len(sections), len(text),
                 sum(best(section, n) for section in sections)))
    print('%-32s %10s %12s %8s' % ('source', 'bytes', 'compile ms', 'ratio'))
    for name, size, ms in rows:
        print('%-32s %10d %12.1f %7.2fx' % (name, size, ms, ms / whole))
    print('(best of %d; the time of an uncached import is about "as it is" plus a cached '
          'import, bench/bench_start.py)' % n)


if __name__ == '__main__':
    main()
