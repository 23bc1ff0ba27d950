"""A report a person can read: report.md and report.html (same tables, plots as PNG files in plots/)."""

from __future__ import annotations

import html
import re
from pathlib import Path

from alignment.evaluation import curves, plots


def _fmt(est: dict | None, digits: int = 3) -> str:
    if est is None:
        return "n/a"
    return f"{est['value']:.{digits}f} [{est['low']:.{digits}f}, {est['high']:.{digits}f}]"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def make_plots(results: dict, scores: dict[str, dict[str, list[float]]], out: Path) -> list[tuple[str, str]]:
    """(caption, relative path) of every figure written under out/plots."""
    figs = []
    names = [p["name"] for p in results["policies"]]
    for scorer, per_policy in scores.items():
        rel = f"plots/scores_{_slug(scorer)}.png"
        plots.score_distributions(per_policy, scorer, out / rel)
        figs.append((f"Distribution of {scorer} per policy", rel))
    if results["primary"] and len(names) >= 2:
        rel = f"plots/win_rates_{_slug(results['primary'])}.png"
        plots.win_rate_matrix(names, results["win_rates"][results["primary"]], results["primary"], out / rel)
        figs.append((f"Pairwise win rates ({results['primary']})", rel))
    if results["curve"]:
        rel = "plots/reward_vs_kl.png"
        plots.reward_vs_kl(results["curve"], results["primary"], out / rel)
        figs.append((f"{results['primary']} vs KL to the reference, checkpoints of one run", rel))
    return figs


def make_curve_plots(results: dict, out: Path) -> list[tuple[str, str]]:
    """(caption, relative path) of one training-curves figure per run the policies come from."""
    figs = []
    for run in results.get("runs", []):
        series = curves.read_series(run["dir"])
        chosen = curves.panels(series)
        if not chosen:
            continue
        rel = f"plots/curves_{_slug(run['policies'][0])}.png"  # policy names are unique; run directories' names need not be
        plots.training_curves(f"{run['dir']} ({run['stage'] or 'training'})", series, chosen, out / rel)
        figs.append((f"Training curves of {run['dir']} ({run['stage'] or 'training'}; policies "
                     f"{', '.join(run['policies'])})", rel))
    return figs


def tables(results: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) of every table; shared by the Markdown and HTML renderers."""
    conf = f"{results['stats']['confidence']:.0%}"
    out = []
    scorers = results["scorers"]
    with_ppl = any(r.get("perplexity") for r in results["per_policy"].values())
    header = (["policy", "step"] + [f"{s} (mean, {conf} CI)" for s in scorers] + ["KL to ref", "length (tokens)", "truncated"]
              + ([f"perplexity ({conf} CI)"] if with_ppl else []))
    rows = []
    for p in results["policies"]:
        r = results["per_policy"][p["name"]]
        rows.append([p["name"], "" if p["step"] is None else str(p["step"])] + [_fmt(r["scores"][s]) for s in scorers]
                    + [_fmt(r["kl"]), _fmt(r["length"], 1), f"{r['truncation_rate']:.1%}"]
                    + ([_fmt(r.get("perplexity"), 2)] if with_ppl else []))
    out.append(("Scores per policy", header, rows,
                f"Mean per sample; CIs are bootstrap percentile intervals over prompts ({results['stats']['bootstrap_samples']} resamples). "
                f"KL = mean over the policy's own samples of sum_t log pi(x_t) - log pi_ref(x_t), reference: {results['reference']['name']}."))
    episodic = [p for p in results["policies"] if results["per_policy"][p["name"]].get("episodes")]
    if episodic:
        primary = results["primary"]
        rows = []
        for p in episodic:
            r = results["per_policy"][p["name"]]
            e = r["episodes"]
            rows.append([p["name"], _fmt(r["scores"][primary]) if primary else "n/a", _fmt(e["turns"], 2),
                         _fmt(e["tool_calls"], 2), _fmt(e["error_rate"]),
                         ", ".join(f"{k} {v:.1%}" for k, v in e["errors"].items()) or "none"])
        out.append(("Multi-turn episodes", ["policy", f"success: {primary} ({conf} CI)", "turns", "tool calls",
                                            "episodes with an error", "errors by reason"], rows,
                    "Success is the headline scorer on each episode's last turn. Tool errors (unknown tool, bad "
                    "arguments, a tool that raised or timed out) are told to the model; a malformed call or an "
                    "environment that fails or hangs ends the episode."))
    for scorer, pairs in results["win_rates"].items():
        if not pairs:
            continue
        rows = [[p["a"], p["b"], _fmt(p), str(p["wins"]), str(p["ties"]), str(p["losses"])] for p in pairs]
        out.append((f"Win rates by {scorer}", ["A", "B", f"win rate of A ({conf} CI)", "wins", "ties", "losses"], rows,
                    "Every sample of A against every sample of B on the same prompt; a tie counts half."))
    judge = results.get("judge")
    if judge:
        rows = [[p["a"], p["b"], _fmt(p), str(p["wins"]), str(p["ties"]), str(p["losses"]), str(p["invalid_verdicts"]),
                 "n/a" if p["first_position_rate"] is None else f"{p['first_position_rate']:.2f}"] for p in judge["pairs"]]
        out.append((f"LLM judge ({judge['model']})", ["A", "B", f"win rate of A ({conf} CI)", "wins", "ties", "losses", "unreadable verdicts", "picks first shown"],
                    rows, f"{judge['prompts']} prompts per pair, each judged in both orders (position bias cancels)."))
    return out


def markdown(results: dict, figs: list[tuple[str, str]], curve_figs: list[tuple[str, str]]) -> str:
    s = results["sampling"]
    lines = ["# Evaluation report", "",
             f"{len(results['policies'])} policies on {results['prompts']['count']} prompts from `{results['prompts']['path']}`; "
             f"{s['n']} sample(s) per prompt, temperature {s['temperature']}, top_p {s['top_p']}, max_new_tokens {s['max_new_tokens']}, seed {s['seed']} "
             f"(engine: {results['engine']}).", ""]
    if results["primary"]:
        lines += [f"Headline scorer: **{results['primary']}**.", ""]
    for title, header, rows, note in tables(results):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines += ["", note, ""]
    for heading, group in (("Training curves", curve_figs), ("Plots", figs)):
        if group:
            lines += [f"## {heading}", ""]
            lines += [f"![{cap}]({rel})\n\n*{cap}*\n" for cap, rel in group]
    if results["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    lines += ["## Checkpoints", ""] + [f"- **{p['name']}**: `{p['source']}`" for p in results["policies"]] + [""]
    return "\n".join(lines)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 .3em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;font-size:.92em}
th{background:#f2f4f7}tr:nth-child(even) td{background:#fafafa}.note{color:#555;font-size:.88em;margin-bottom:1.5em}
figure{display:inline-block;margin:.5em 1em .5em 0}figcaption{font-size:.88em;color:#444}img{max-width:100%;border:1px solid #eee}
code{background:#f4f4f4;padding:0 .2em}"""


def html_report(results: dict, figs: list[tuple[str, str]], curve_figs: list[tuple[str, str]]) -> str:
    e = html.escape
    s = results["sampling"]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title>', f"<style>{CSS}</style></head><body>",
             "<h1>Evaluation report</h1>",
             f"<p>{len(results['policies'])} policies on {results['prompts']['count']} prompts from <code>{e(results['prompts']['path'])}</code>; "
             f"{s['n']} sample(s) per prompt, temperature {s['temperature']}, top_p {s['top_p']}, max_new_tokens {s['max_new_tokens']}, "
             f"seed {s['seed']} (engine: {e(results['engine'])}).</p>"]
    if results["primary"]:
        parts.append(f"<p>Headline scorer: <b>{e(results['primary'])}</b>.</p>")
    for title, header, rows, note in tables(results):
        parts.append(f"<h2>{e(title)}</h2><table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append(f'</tbody></table><div class="note">{e(note)}</div>')
    for heading, group in (("Training curves", curve_figs), ("Plots", figs)):
        if group:
            parts.append(f"<h2>{heading}</h2>")
            parts += [f'<figure><img src="{e(rel)}" alt="{e(cap)}"><figcaption>{e(cap)}</figcaption></figure>'
                      for cap, rel in group]
    if results["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in results["notes"]) + "</ul>")
    parts.append("<h2>Checkpoints</h2><ul>" + "".join(f"<li><b>{e(p['name'])}</b>: <code>{e(p['source'])}</code></li>" for p in results["policies"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(results: dict, scores: dict[str, dict[str, list[float]]], out: str | Path) -> dict[str, Path]:
    out = Path(out)
    figs, curve_figs = make_plots(results, scores, out), make_curve_plots(results, out)
    md, page = out / "report.md", out / "report.html"
    md.write_text(markdown(results, figs, curve_figs), encoding="utf-8")
    page.write_text(html_report(results, figs, curve_figs), encoding="utf-8")
    return {"markdown": md, "html": page, "plots": [out / rel for _, rel in curve_figs + figs]}
