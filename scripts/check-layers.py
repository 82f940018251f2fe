#!/usr/bin/env python3
"""Checks that aegaeon's layers hold: no file includes a header of a layer it
may not use, no header cycle, and (given a build tree) no call of the
library's objects into a layer they may not use and no cycle of calls
between its files. Prints one line per fault, naming the file and the
include or the call, and exits 1 when there is any.

Usage: check-layers.py [--srcdir DIR] [--builddir DIR] [--table FILE] [--list]

The layers and the files' places are in scripts/layers.txt (--table). A file
in src/lib/LAYER/ is of that layer; other files of src/, python/ and examples/ must be
in a folder or file row of the table. --builddir reads the library's objects
(libaegaeon_core_la-*.o, with nm or $NM) and the Python module's
(aegaeon_native_la-*.o): a unit is a file together with its siblings of the
same stem (kv.c, kv_swap.c, kv_host.c...; py_*.c), and units may not call
each other in a cycle.
"""
import argparse
import os
import re
import subprocess
import sys

SOURCE_EXT = ('.c', '.h', '.cu')
INCLUDE_RE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')
OBJ_PREFIX = 'libaegaeon_core_la-'
# The Python module's objects: their calls are checked as the library's are.
MODULE_PREFIX = 'aegaeon_native_la-'


class Table:
    def __init__(self, path):
        self.order = []                 # layer names, lowest first
        self.may_use = {}
        self.folders = {}               # dir -> layer
        self.files = {}                 # path -> layer
        self.generated = {}             # name -> layer
        self.errors = []
        with open(path, encoding='utf-8') as f:
            for n, line in enumerate(f, 1):
                words = line.split('#', 1)[0].split()
                if not words:
                    continue
                self.row(path, n, words)

    def row(self, path, n, words):
        kind, args = words[0], words[1:]
        where = '%s:%d' % (path, n)
        if kind == 'layer' and args:
            for used in args[1:]:
                if used not in self.may_use:
                    self.errors.append('%s: layer %s uses %s, which is not a layer above it in the table'
                                       % (where, args[0], used))
            self.order.append(args[0])
            self.may_use[args[0]] = set(args[1:]) | {args[0]}
        elif kind in ('folder', 'file', 'generated') and len(args) == 2:
            if args[1] not in self.may_use:
                self.errors.append('%s: %s is no layer of the table' % (where, args[1]))
            {'folder': self.folders, 'file': self.files, 'generated': self.generated}[kind][args[0]] = args[1]
        else:
            self.errors.append('%s: cannot read "%s"' % (where, ' '.join(words)))


class Tree:
    """The sources of the tree and the layer of each."""

    def __init__(self, srcdir, table):
        self.srcdir = srcdir
        self.table = table
        self.layer = {}                 # relative path -> layer
        self.errors = []
        for top in ('src', 'python', 'include', 'examples'):
            for root, dirs, names in os.walk(os.path.join(srcdir, top)):
                dirs.sort()
                for name in sorted(names):
                    if name.endswith(SOURCE_EXT):
                        self.place(os.path.relpath(os.path.join(root, name), srcdir))
        for path in sorted(table.files):
            if path not in self.layer:
                self.errors.append('%s: in the table (%s) but not in the tree: remove its row '
                                   '(a file in src/lib/LAYER/ needs none)' % (path, table.files[path]))

    def place(self, path):
        parts = path.split(os.sep)
        if path in self.table.files:
            if len(parts) > 3 and parts[:2] == ['src', 'lib']:
                self.errors.append('%s: in the folder %s, and in the table too: remove its row'
                                   % (path, parts[2]))
            self.layer[path] = self.table.files[path]
            return
        if len(parts) > 3 and parts[:2] == ['src', 'lib']:
            if parts[2] in self.table.may_use:
                self.layer[path] = parts[2]
            else:
                self.errors.append('%s: src/lib/%s/ is no layer (the layers: %s)'
                                   % (path, parts[2], ', '.join(self.table.order)))
            return
        for folder, layer in self.table.folders.items():
            if path.startswith(folder + os.sep):
                self.layer[path] = layer
                return
        if parts[0] == 'include' and not path.endswith('.h'):
            return
        self.errors.append('%s: in no layer: add a row to the table (scripts/layers.txt) '
                           'or put it in its layer\'s folder' % path)

    def exists(self, path):
        return path in self.layer

    def resolve(self, including, bracket, name):
        """The tree's file an include names, or None for a system or generated header."""
        if name.startswith('aegaeon/'):
            path = os.path.normpath(os.path.join('include', name))
            return path if self.exists(path) else None
        if bracket == '<':
            return None
        here = os.path.normpath(os.path.join(os.path.dirname(including), name))
        if self.exists(here):
            return here
        # The -I directories: src/lib/ and its layers' folders.
        dirs = [os.path.join('src', 'lib')] + [os.path.join('src', 'lib', l) for l in self.table.order]
        found = [p for p in (os.path.normpath(os.path.join(d, name)) for d in dirs) if self.exists(p)]
        if len(found) > 1:
            self.errors.append('%s: #include "%s" could name %s' % (including, name, ' or '.join(found)))
        return found[0] if found else None


def check_includes(tree, faults):
    edges = {}
    count = 0
    for path in sorted(tree.layer):
        edges[path] = {}
        with open(os.path.join(tree.srcdir, path), encoding='utf-8', errors='replace') as f:
            for n, line in enumerate(f, 1):
                m = INCLUDE_RE.match(line)
                if not m:
                    continue
                target = tree.resolve(path, m.group(1), m.group(2))
                if target is None:
                    continue
                count += 1
                edges[path][target] = '%s:%d: #include %s%s%s' % (
                    path, n, m.group(1), m.group(2), '>' if m.group(1) == '<' else '"')
                mine, theirs = tree.layer[path], tree.layer[target]
                if theirs not in tree.table.may_use[mine]:
                    faults.append('%s:%d: #include %s%s%s: %s may not include %s (%s)' % (
                        path, n, m.group(1), m.group(2), '>' if m.group(1) == '<' else '"',
                        mine, theirs, target))
    for cycle in cycles(edges):
        faults.append('include cycle: ' + ' -> '.join(
            '%s (%s)' % (a, edges[a][b].split(': ', 1)[1]) for a, b in zip(cycle, cycle[1:] + cycle[:1])))
    return count


def cycles(edges):
    """One cycle through each strongly connected set of more than one node (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(path_in(edges, set(comp)))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def path_in(edges, comp):
    """A cycle within @comp, from its least node back to it."""
    start = min(comp)
    prev, todo = {start: None}, [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(edges.get(v, ())):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return list(reversed(path))
            if w in comp and w not in prev:
                prev[w] = v
                todo.append(w)
    return sorted(comp)


def objects(builddir):
    """The library's objects: {build-relative directory and name: path}, plain ones before .libs/."""
    found = {}
    for root, dirs, names in os.walk(builddir):
        dirs.sort()
        for name in names:
            if name.startswith((OBJ_PREFIX, MODULE_PREFIX)) and name.endswith('.o'):
                rel = os.path.relpath(root, builddir)
                key = (os.path.dirname(rel) if os.path.basename(rel) == '.libs' else rel, name)
                if key not in found or os.path.basename(root) != '.libs':
                    found[key] = os.path.join(root, name)
    return found


def unit_of(path):
    return os.path.join(os.path.dirname(path), os.path.basename(path).split('.')[0].split('_')[0])


def check_calls(tree, builddir, faults):
    nm = os.environ.get('NM', 'nm')
    defined, wanted, source = {}, {}, {}
    for (rel, name), obj in sorted(objects(builddir).items()):
        stem = name.split('-', 1)[1][:-2]
        src = None
        for ext in ('.c', '.cu'):
            cand = os.path.normpath(os.path.join(rel, stem + ext))
            if tree.exists(cand):
                src = cand
        if src is None and stem + '.c' in tree.table.generated:
            src = os.path.normpath(os.path.join(rel, stem + '.c'))
            tree.layer[src] = tree.table.generated[stem + '.c']
        if src is None:
            faults.append('%s: an object of the library with no source in the tree or the table' % obj)
            continue
        out = subprocess.run([nm, '-P', obj], capture_output=True, text=True)
        if out.returncode != 0:
            faults.append('%s: %s failed: %s' % (obj, nm, out.stderr.strip()))
            continue
        source[src] = obj
        wanted[src] = set()
        for line in out.stdout.splitlines():
            f = line.split()
            if len(f) < 2:
                continue
            if f[1] == 'U':
                wanted[src].add(f[0])
            elif f[1] in 'TDBRCWVG':
                defined.setdefault(f[0], src)
    edges, units = {}, {}
    calls = 0
    for src in sorted(wanted):
        for sym in sorted(wanted[src]):
            to = defined.get(sym)
            if to is None or to == src:
                continue
            calls += 1
            mine, theirs = tree.layer[src], tree.layer[to]
            if theirs not in tree.table.may_use[mine]:
                faults.append('%s: uses %s of %s: %s may not use %s' % (src, sym, to, mine, theirs))
            a, b = unit_of(src), unit_of(to)
            if a != b:
                units.setdefault(a, {}).setdefault(b, '%s -> %s (%s)' % (src, to, sym))
    for cycle in cycles(units):
        faults.append('call cycle: ' + ', '.join(units[a][b] for a, b in zip(cycle, cycle[1:] + cycle[:1])))
    module = len([s for s in source if s.startswith('python' + os.sep)])
    return len(source) - module, module, calls


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--srcdir', default=os.path.dirname(here))
    ap.add_argument('--builddir')
    ap.add_argument('--table', default=os.path.join(here, 'layers.txt'))
    ap.add_argument('--list', action='store_true', help='print each file and its layer')
    args = ap.parse_args()

    table = Table(args.table)
    tree = Tree(args.srcdir, table)
    faults = table.errors + tree.errors
    if args.list:
        for path in sorted(tree.layer, key=lambda p: (table.order.index(tree.layer[p]), p)):
            print('%-8s %s' % (tree.layer[path], path))
        return 0
    includes = check_includes(tree, faults)
    said = '%d files in %d layers, %d includes' % (len(tree.layer), len(table.order), includes)
    if args.builddir:
        objs, module, calls = check_calls(tree, args.builddir, faults)
        if objs == 0:
            faults.append('%s: no object of the library (%s*.o): build it first' % (args.builddir, OBJ_PREFIX))
        said += ', %d uses between %d objects of the library' % (calls, objs)
        if module:
            said += ' and %d of the Python module' % module
    for fault in faults:
        print('check-layers: ' + fault)
    if faults:
        print('check-layers: %d fault%s (%s)' % (len(faults), '' if len(faults) == 1 else 's', said))
        return 1
    print('check-layers: %s: the layers hold, no cycle' % said)
    return 0


if __name__ == '__main__':
    sys.exit(main())
