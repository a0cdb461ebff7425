import json, pathlib, collections, numpy as np, sys
root = pathlib.Path(sys.argv[1])
rows = collections.defaultdict(dict)
for f in root.rglob("result.json"):
  parts = f.relative_to(root).parts
  if "dense" in parts: continue
  cell, method, seed = parts[-4], parts[-3], parts[-2]
  r = json.loads(f.read_text())
  rows[(cell, method)][seed] = r["test_bpb"] if "test_bpb" in r else r.get("test_bits_per_byte")
out = []
for cell in sorted({c for c, _ in rows}):
  base = rows.get((cell, "post-shot"), {})
  for (c, m), by in sorted(rows.items()):
    if c != cell: continue
    v = np.array([by[s] for s in sorted(by)])
    d = [base[s] - by[s] for s in sorted(by) if s in base]
    out.append(f"| {cell} | {m} | {v.mean():.3f} +- {v.std(ddof=1) if len(v)>1 else 0:.3f} | "
               + (f"{np.mean(d):+.3f} +- {np.std(d, ddof=1) if len(d)>1 else 0:.3f}" if m != "post-shot" else "-") + f" | {len(v)} |")
print("| cell | method | test bpb | saved vs post-shot (paired) | seeds |\n|---|---|---|---|---|")
print("\n".join(out))
