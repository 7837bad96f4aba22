#!/usr/bin/env python3
"""Applies one mutation of sim/mutations.txt to a tree (see scripts/mutants.sh).

  mutate.py list MUTATIONS            names, one a line
  mutate.py apply MUTATIONS NAME ROOT applies NAME under ROOT; exit 3 when its old text
                                      is not found exactly once (the mutation is stale)
"""
import sys


def parse(path):
    mutations, current, block = [], None, None
    for line in open(path, encoding="utf-8").read().split("\n"):
        if line.startswith("=== "):
            current = {"name": line[4:].strip(), "old": [], "new": []}
            mutations.append(current)
            block = None
        elif current is None or (block is None and line.startswith("#")):
            continue
        elif line.startswith("why: ") and block is None:
            current["why"] = line[5:]
        elif line.startswith("file: ") and block is None:
            current["file"] = line[6:].strip()
        elif line == "--- old":
            block = "old"
        elif line == "--- new":
            block = "new"
        elif block:
            current[block].append(line)
    for m in mutations:
        for key in ("old", "new"):
            while m[key] and m[key][-1] == "":
                m[key].pop()
            m[key] = "\n".join(m[key])
    return mutations


def main():
    command, path = sys.argv[1], sys.argv[2]
    mutations = parse(path)
    if command == "list":
        for m in mutations:
            print(m["name"])
        return 0
    name, root = sys.argv[3], sys.argv[4]
    m = next(m for m in mutations if m["name"] == name)
    target = f"{root}/{m['file']}"
    text = open(target, encoding="utf-8").read()
    if text.count(m["old"]) != 1:
        print(f"{name}: stale ({m['file']} holds its old text {text.count(m['old'])} times)")
        return 3
    open(target, "w", encoding="utf-8").write(text.replace(m["old"], m["new"]))
    print(f"{name}: {m.get('why', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
