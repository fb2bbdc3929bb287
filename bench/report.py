"""Merge the bench/*.py results into bench/results.json and a Markdown table bench/results.md.

CPU results are what `make bench` writes here; the *-cuda.json files come from a lent GPU
(bench/gpu-run.sh) and are shown beside them, each table naming its machine."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"step": "results-step.json", "throughput": "results-throughput.json", "storage": "storage-demo.json",
         "memory": "memory-swinl.json", "step_cuda": "results-step-cuda.json",
         "throughput_cuda": "results-throughput-cuda.json", "precision": "results-precision.json",
         "writer": "results-writer.json"}


def _machine(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
            + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"))


def step_tables(step: dict) -> list[str]:
    lines = [f"Training step — {_machine(step['machine'])}", "",
             "| teacher → student | batch | (a) online s | (b) cached s | (c) memory s | (d) plain s | a/b | "
             "a/b by FLOPs | a/b by measured teacher time | b/c | b/c back to back | b/d | loader wait s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in step["results"]:
        s, q = r["seconds_per_step"], r["ratios"]
        lines.append(f"| {r['teacher']} → {r['student']} | {r['batch']} | {s['online']} | {s['cached']} | "
                     f"{s['memory']} | {s['plain']} | {q['a/b online/cached']} | {r['a/b_expected_by_flops']} | "
                     f"{r['a/b_expected_by_time']} | {q['b/c cached/memory']} | {q.get('b/c back to back', '–')} | "
                     f"{q['b/d cached/plain']} | {r['loader_wait_median_s']} |")
    first = step["results"][0]
    lines += ["", "| teacher | " + " | ".join(first["breakdown_s"]) + " | batched late speed-up | "
              "loader samples/s/worker | student samples/s |", "|---|" + "---|" * (len(first["breakdown_s"]) + 3)]
    for r in step["results"]:
        lines.append(f"| {r['teacher']} | " + " | ".join(str(v) for v in r["breakdown_s"].values())
                     + f" | {r['batched_late']['speedup']} | {r['loader']['samples_per_s_per_worker']} | "
                     f"{r['loader']['student_step_samples_per_s']} |")
    if "cuda_variants_s" in first:
        keys = list(first["cuda_variants_s"])
        lines += ["", "| teacher | in-memory step s: " + " | ".join(keys) + " | a/b with a bf16 online teacher |",
                  "|---|" + "---|" * (len(keys) + 1)]
        for r in step["results"]:
            v = r["cuda_variants_s"]
            lines.append(f"| {r['teacher']} | " + " | ".join(str(v.get(k)) for k in keys)
                         + f" | {r['ratios'].get('a/b with a bf16 online teacher', '–')} |")
    return lines


def throughput_table(t: dict) -> list[str]:
    where = _machine(t["machine"]) if "machine" in t else "see the step table's machine"
    lines = [f"Caching ({t['teacher']}, batch {t['batch']}, {t['views_per_image']} views an image) — {where}: "
             f"bare forward {t['bare_forward']['samples_per_s']} samples/s", "",
             "| engine | samples/s end to end | ratio to bare | steady-state ratio |", "|---|---|---|---|"]
    for j in t["jobs"]:
        lines.append(f"| {j['engine']} | {j['samples_per_s']} | {j['end_to_end_over_bare']} | {j.get('steady_over_bare')} |")
    return lines


def main() -> int:
    merged = {k: json.loads((ROOT / "bench" / f).read_text()) for k, f in PARTS.items() if (ROOT / "bench" / f).exists()}
    (ROOT / "bench/results.json").write_text(json.dumps(merged, indent=1))
    lines: list[str] = []
    for key, render in (("step", step_tables), ("throughput", throughput_table), ("step_cuda", step_tables),
                        ("throughput_cuda", throughput_table)):
        if key in merged:
            lines += ([""] if lines else []) + render(merged[key])
    if "memory" in merged:
        mm = merged["memory"]
        lines += ["", f"Peak RSS, {mm['teacher']} → {mm['student']}: cached {mm['peak_rss_mib']['cache']:.0f} MiB, "
                      f"online {mm['peak_rss_mib']['online']:.0f} MiB"]
    (ROOT / "bench/results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
