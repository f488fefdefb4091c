"""Run report: ``metrics.json`` -> ``report.md`` and ``log.jsonl`` -> ``loss.png``.

``metrics.json`` schema (every number in ``report.md`` is read from it):

- ``run_name``, ``created`` (ISO time), ``device`` (words), ``config_file``.
- ``models``: ``{"teacher" | "pruned" | "distilled" | "peer<i>" | <trained role> (the other students of a mutual run, the trained
  roles): {"shape": {...}, "params": int,
  "non_embedding_params": int, "heldout": {"loss", "perplexity", "tokens"}, "agreement": float | None,
  "generations": [{"prompt", "completion"}]}}``; missing stages are left out.
- ``models.<name>.speed`` (optional): :func:`measure_speed` of that model (tokens/s of a forward at a
  fixed batch and of greedy generation), measured on the same machine in the same run.
- ``candidates``: ranked rows of the budget search (each a dict; shown as they are, and plotted as
  parameters against the search score when rows carry ``params`` and the score).
- ``training``: ``{"steps", "tokens", "seconds", "tokens_per_second", "losses": {name: weight}}``.
- ``teacher_samples`` (optional): ``{"folder", "prompts", "num_samples", "num_prompts", "max_new_tokens", "temperature",
  "top_p", "top_k", "new_tokens", "seconds", "tokens_per_second"}`` of the text the teacher wrote for training.
- ``stage_seconds``: ``{stage: seconds}`` in run order.
- ``commands``: ``{"reproduce": str, "load": str}``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODEL_ORDER = ("teacher", "pruned", "distilled")


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL log (a missing file gives no records)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Plot every ``loss*`` series of step records and held-out perplexity of eval records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind", "train") == "train" and "step" in r]
    evals = [r for r in records if r.get("kind") == "eval" and "step" in r]
    keys = sorted({k for r in train for k, v in r.items() if k.startswith("loss") and isinstance(v, (int, float))})
    if not keys and not evals:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in keys:
        pts = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], label=key)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("loss")
    ax1.set_title("training loss components")
    if keys:
        ax1.legend(fontsize=8)
    ppl_key = next((k for k in ("heldout_perplexity", "perplexity") if any(k in r for r in evals)), None)
    if ppl_key:
        pts = [(r["step"], r[ppl_key]) for r in evals if ppl_key in r]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="tab:red")
        ax2.set_yscale("log")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("held-out perplexity")
    ax2.set_title("student held-out perplexity")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_report(metrics: dict[str, Any], *, plot_name: str | None = "loss.png",
                  candidates_plot: str | None = None) -> str:
    """The markdown report of a run, every number taken from ``metrics``."""
    given = metrics.get("models", {})
    models = {k: given[k] for k in (*MODEL_ORDER, *sorted(set(given) - set(MODEL_ORDER))) if k in given}
    out = [f"# minidistill run `{metrics.get('run_name', '?')}`", ""]
    if metrics.get("created") or metrics.get("device"):
        out += [f"{metrics.get('created', '')} on {metrics.get('device', '?')}.", ""]

    out += ["## Models", ""]
    teacher_params = models.get("teacher", {}).get("params")
    rows = []
    for name, m in models.items():
        s = m.get("shape", {})
        share = m["params"] / teacher_params if teacher_params and m.get("params") else None
        rows.append([name, s.get("num_layers"), s.get("hidden_size"), s.get("num_heads"), s.get("num_kv_heads"),
                     s.get("intermediate_size"), m.get("params"), m.get("non_embedding_params"),
                     f"{share:.0%}" if share is not None else "-"])
    out += [_table(["model", "layers", "hidden", "heads", "KV heads", "MLP", "params", "non-embedding", "of teacher"], rows), ""]

    out += _quality_section(models, metrics.get("data", {}))
    out += _generations_section(metrics.get("generations") or [], models.get("teacher", {}), metrics.get("data", {}))
    out += _exits_section(metrics.get("exits") or [], models, metrics.get("data", {}))
    out += _speed_section(models)

    pruning = metrics.get("pruning")
    if pruning:
        out += _pruning_section(pruning)

    training = metrics.get("training")
    if training:
        out += ["## Training", ""]
        stop = training.get("stopped_by")
        planned = training.get("planned_steps")
        out += [_table(["steps", "planned", "tokens", "seconds", "tokens/s", "ended by"],
                       [[training.get("steps"), planned, training.get("tokens"), training.get("seconds"),
                         training.get("tokens_per_second"),
                         {"max_minutes": f"time budget ({_fmt(training.get('max_minutes'), 1)} min)",
                          "max_steps": "step count" if not training.get("max_minutes")
                          else f"planned steps (time budget {_fmt(training.get('max_minutes'), 1)} min)"}.get(stop, stop)]]),
                ""]
        if training.get("losses"):
            out += ["Loss components and weights: " + ", ".join(f"`{k}` x{_fmt(v)}" for k, v in training["losses"].items()), ""]
    samples = metrics.get("teacher_samples")
    if samples:
        out += ["## Teacher samples", "",
                f"Training text written by the teacher in `{samples.get('folder')}` (data source `teacher_samples`): "
                f"{samples.get('num_samples')} samples from {samples.get('num_prompts')} prompt(s) (`{samples.get('prompts')}`), "
                f"at most {samples.get('max_new_tokens')} new tokens each, temperature {_fmt(samples.get('temperature'))}, "
                f"top-p {_fmt(samples.get('top_p'))}, top-k {samples.get('top_k')}.", "",
                _table(["new tokens", "seconds", "tokens/s"],
                       [[samples.get("new_tokens"), samples.get("seconds"), samples.get("tokens_per_second")]]), ""]
    if plot_name:
        out += [f"![loss components and held-out perplexity]({plot_name})", ""]

    stages = metrics.get("stage_seconds")
    if stages:
        out += ["## Time per stage", ""]
        out += [_table(["stage", "seconds"], [[k, float(v)] for k, v in stages.items()] +
                       [["total", float(sum(stages.values()))]]), ""]

    candidates = metrics.get("candidates")
    if candidates:
        out += ["## Budget search (ranked)", ""]
        view = search_view(metrics)
        if view is not None:
            picked = view["picked"]
            line = (f"Picked: rank 1, {_fmt(picked['params'])} parameters, {view['score']} {_fmt(picked['y'], 4)}"
                    + (f" ({picked['family']})" if picked.get("family") else ""))
            if view["teacher"] is not None:
                line += f"; teacher: {_fmt(view['teacher']['params'])} parameters, {view['score']} {_fmt(view['teacher']['y'], 4)}"
            out += [line + ".", ""]
        if candidates_plot:
            out += [f"![budget search candidates]({candidates_plot})", ""]
        header = list(dict.fromkeys(k for c in candidates for k in c))
        out += [_table(header, [[c.get(h) for h in header] for c in candidates]), ""]

    gens = {name: m.get("generations") for name, m in models.items() if m.get("generations")}
    if gens:
        out += ["## Greedy generations", ""]
        prompts = [g["prompt"] for g in next(iter(gens.values()))]
        for i, prompt in enumerate(prompts):
            out += [f"**Prompt:** {prompt!r}", ""]
            out += [_table(["model", "completion"],
                           [[name, repr(g[i]["completion"]).replace("|", "\\|")] for name, g in gens.items() if i < len(g)]), ""]

    commands = metrics.get("commands", {})
    if commands:
        out += ["## Reproduce and load", ""]
        for title, key in (("Reproduce this run", "reproduce"), ("Load the distilled model", "load")):
            if commands.get(key):
                lang = "python" if key == "load" else "bash"
                out += [f"{title}:", "", f"```{lang}", commands[key].rstrip(), "```", ""]
    return "\n".join(out)


CANDIDATES_PNG = "candidates.png"


def search_view(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The budget search as plot points: ``{"score", "x_label", "points", "picked", "teacher"}``, or None.

    Points are the candidate rows with ``params`` and the search score (``search.score``: ``loss`` or
    ``kl``); ``distilled`` holds the score after the short distillation when candidates were ranked
    that way. The teacher's point needs its parameter count (``params / fraction`` of any row) and its
    score on the same scoring blocks: 0 for ``kl``, the sensitivity measurement's ``base`` for
    ``loss`` (None when the search did not measure it).
    """
    rows = metrics.get("candidates") or []
    pruning = metrics.get("pruning") or {}
    search = pruning.get("search") or {}
    score = search.get("score") or next((k for k in ("loss", "kl") if rows and k in rows[0]), None)
    points = [
        {"params": r["params"], "y": float(r[score]), "eligible": r.get("eligible", True), "rank": r.get("rank"),
         "family": r.get("family"), "distilled": r.get(f"distilled_{score}")}
        for r in rows if score and isinstance(r.get("params"), (int, float)) and isinstance(r.get(score), (int, float))
    ]
    if not points:
        return None
    picked = min(points, key=lambda p: (p["rank"] is None, p["rank"] or 0))
    teacher = None
    fraction = next((r["params"] / r["fraction"] for r in rows if r.get("fraction")), None)
    sensitivity = pruning.get("sensitivity") or {}
    base = 0.0 if score == "kl" else sensitivity.get("base") if sensitivity.get("score", "loss") == score else None
    if fraction is not None and base is not None:
        teacher = {"params": int(round(fraction)), "y": float(base)}
    kind = "non-embedding parameters" if search.get("non_embedding") else "parameters"
    return {"score": score, "x_label": kind, "points": points, "picked": picked, "teacher": teacher}


def plot_candidates(view: dict[str, Any], path: str | Path) -> Path:
    """Parameters against the search score: every candidate, the picked one starred, the teacher for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    pts = view["points"]
    for eligible, style in ((True, {"color": "tab:blue"}), (False, {"facecolors": "none", "edgecolors": "tab:gray"})):
        sel = [p for p in pts if p["eligible"] is eligible]
        if sel:
            ax.scatter([p["params"] / 1e6 for p in sel], [p["y"] for p in sel], s=28, zorder=2,
                       label="candidate" if eligible else "candidate (not eligible)", **style)
    distilled = [p for p in pts if isinstance(p.get("distilled"), (int, float))]
    if distilled:
        ax.scatter([p["params"] / 1e6 for p in distilled], [p["distilled"] for p in distilled], marker="^",
                   color="tab:green", s=30, zorder=2, label="after short distillation")
    picked = view["picked"]
    y = picked["distilled"] if isinstance(picked.get("distilled"), (int, float)) else picked["y"]
    ax.scatter([picked["params"] / 1e6], [y], marker="*", s=220, color="tab:red", zorder=3, label="picked")
    if view["teacher"] is not None:
        t = view["teacher"]
        ax.scatter([t["params"] / 1e6], [t["y"]], marker="D", s=50, color="black", zorder=3, label="teacher")
        ax.axhline(t["y"], color="black", linestyle=":", linewidth=1)
    ax.set_xlabel(f"{view['x_label']} (millions)")
    ax.set_ylabel(f"search {view['score']} (lower is better)")
    ax.set_title("budget search candidates")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _speed_section(models: dict[str, Any]) -> list[str]:
    """Forward and greedy-generation tokens/s of each measured model, and the ratio to the teacher's."""
    measured = {n: m["speed"] for n, m in models.items() if m.get("speed")}
    if not measured:
        return []
    ref = measured.get("teacher") or {}
    first = next(iter(measured.values()))
    rows = []
    for name, sp in measured.items():
        fwd, gen = sp.get("forward_tokens_per_s"), sp.get("generate_tokens_per_s")
        rows.append([name, _fmt(fwd, 0), _ratio(fwd, ref.get("forward_tokens_per_s"), name),
                     _fmt(gen, 1), _ratio(gen, ref.get("generate_tokens_per_s"), name)])
    return [
        "## Speed", "",
        _table(["model", "forward tokens/s", "x teacher", "greedy generation tokens/s", "x teacher"], rows), "",
        speed_note(first), "",
    ]


def speed_note(sp: dict[str, Any]) -> str:
    """How the speed numbers were measured (batch, lengths, device), from a :func:`measure_speed` result."""
    return (f"Forward: batch {sp.get('batch_size')} x {sp.get('seq_len')} tokens; greedy generation: batch 1, "
            f"{sp.get('new_tokens')} new tokens after a {sp.get('prompt_len')}-token prompt (KV cache); "
            f"median of {sp.get('repeats')} timed repeats after a warm-up, {sp.get('dtype')} on {sp.get('device')}, "
            "every model on the same machine in the same run.")


def _ratio(value: float | None, ref: float | None, name: str) -> str:
    if value is None or not ref or name == "teacher":
        return "-"
    return f"{value / ref:.2f}x"


def measure_speed(model, *, batch_size: int = 4, seq_len: int = 64, new_tokens: int = 16, prompt_len: int = 16,
                  repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Tokens/s of a forward over ``batch_size x seq_len`` random tokens and of greedy generation.

    Generation is batch 1, ``new_tokens`` tokens (EOS ignored) after a ``prompt_len``-token prompt,
    with the KV cache. Each figure is the median of ``repeats`` timed runs after one warm-up run;
    CUDA work is synchronised before the clock is read.
    """
    import statistics

    import torch

    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(device)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    was_training = model.training
    model.eval()
    generated: list[int] = []

    def generate() -> None:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        generated.append(out.shape[1] - prompt_len)

    try:
        with torch.no_grad():
            forward_s = timed(lambda: model(batch))
            generate_s = timed(generate)
    finally:
        model.train(was_training)
    if set(generated) != {new_tokens}:
        raise RuntimeError(f"greedy generation produced {sorted(set(generated))} tokens, expected {new_tokens}")
    return {
        "forward_tokens_per_s": batch_size * seq_len / forward_s,
        "generate_tokens_per_s": new_tokens / generate_s,
        "batch_size": batch_size, "seq_len": seq_len, "new_tokens": new_tokens, "prompt_len": prompt_len,
        "repeats": repeats, "device": str(device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def gap_closed(teacher: float | None, pruned: float | None, distilled: float | None) -> float | None:
    """Share of the pruned student's loss gap to the teacher that distillation removed (losses in nats)."""
    if None in (teacher, pruned, distilled) or pruned <= teacher:
        return None
    return (pruned - distilled) / (pruned - teacher)


def _quality_section(models: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """Perplexity per held-out set (x the teacher's), top-1 agreement, and the share of the gap closed."""
    sets = [(data.get("source") or "held-out", None)] + [
        (name, name) for name in sorted({k for m in models.values() for k in (m.get("heldout_sets") or {})})]

    def numbers(m: dict[str, Any], key: str | None) -> dict[str, Any]:
        return (m.get("heldout") or {}) if key is None else (m.get("heldout_sets") or {}).get(key) or {}

    teacher = models.get("teacher", {})
    header = ["model"] + [f"{label} ppl" for label, _ in sets] + ["top-1 agreement with teacher"]
    rows = []
    for name, m in models.items():
        row: list[Any] = [name]
        for _, key in sets:
            ppl, ref = numbers(m, key).get("perplexity"), numbers(teacher, key).get("perplexity")
            row.append("-" if ppl is None else f"{ppl:.2f}" + (f" ({ppl / ref:.2f}x)" if ref and name != "teacher" else ""))
        row.append(m.get("agreement"))
        rows.append(row)
    out = ["## Held-out quality", "", _table(header, rows), ""]
    tokens = [f"{label}: {_fmt(numbers(teacher, key).get('tokens'))} tokens" for label, key in sets
              if numbers(teacher, key).get("tokens")]
    if tokens:
        out += ["Held-out documents are never trained or calibrated on (" + "; ".join(tokens) + ").", ""]
    closed = []
    for label, key in sets:
        share = gap_closed(*(numbers(models.get(n, {}), key).get("loss") for n in MODEL_ORDER))
        if share is not None:
            closed.append(f"{label} {share:.0%}")
    if closed:
        out += ["Share of the pruned student's loss gap to the teacher closed by distillation: " + ", ".join(closed) + ".", ""]
    return out


def _perplexity_cells(entry: dict[str, Any], teacher: dict[str, Any], sets: list[str]) -> list[str]:
    """``entry``'s held-out perplexity, then each extra set's, each with its ratio to the teacher's."""
    def ppl(m: dict[str, Any], name: str | None) -> float | None:
        numbers = m.get("heldout") if name is None else (m.get("heldout_sets") or {}).get(name)
        return (numbers or {}).get("perplexity")

    out = []
    for name in (None, *sets):
        p, r = ppl(entry, name), ppl(teacher, name)
        out.append("-" if p is None else f"{p:.2f}" + (f" ({p / r:.2f}x)" if r else ""))
    return out


def _generations_section(generations: list[dict[str, Any]], teacher: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """Born-again generations: what each learned from and its held-out perplexity (x the teacher's) per set."""
    if not generations:
        return []
    sets = sorted({k for g in generations for k in (g.get("heldout_sets") or {})})
    header = ["generation", "learned from", f"{data.get('source') or 'held-out'} ppl", *(f"{name} ppl" for name in sets)]
    rows = [[g.get("generation"), g.get("learned_from"), *_perplexity_cells(g, teacher, sets)] for g in generations]
    return ["## Born-again generations", "", _table(header, rows), "",
            "Each generation has the student's shape; the last one is the distilled model.", ""]


def _exits_section(exits: list[dict[str, Any]], models: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """Early exits: held-out perplexity (x the teacher's) per set and forward speed (x the full distilled model)."""
    if not exits:
        return []
    teacher, full = models.get("teacher", {}), models.get("distilled", {})
    sets = sorted({k for e in exits for k in (e.get("heldout_sets") or {})})
    header = ["exit after layer", "layers run", f"{data.get('source') or 'held-out'} ppl", *(f"{n} ppl" for n in sets),
              "forward tokens/s", "x full model"]
    ref_fwd = (full.get("speed") or {}).get("forward_tokens_per_s")
    rows = []
    for e in exits:
        fwd = (e.get("speed") or {}).get("forward_tokens_per_s")
        rows.append([e.get("layer"), e.get("layers_run"), *_perplexity_cells(e, teacher, sets),
                     _fmt(fwd, 0), f"{fwd / ref_fwd:.2f}x" if fwd and ref_fwd else "-"])
    return ["## Early exits", "", _table(header, rows), "",
            "Each exit stops the distilled model after that layer (`minidistill.distill.exits.load_exit_model`); "
            "speed measured as in the Speed section.", ""]


def _pruning_section(pruning: dict[str, Any]) -> list[str]:
    """Importance and layer methods, re-fit, search facts and the per-axis sensitivity table."""
    out = ["## Pruning", ""]
    facts = [f"importance `{pruning.get('importance')}`", f"layers chosen by `{pruning.get('layer_method')}`"]
    if pruning.get("kept_layers") is not None:
        facts.append(f"kept layers {pruning['kept_layers']}")
    if pruning.get("refit"):
        facts.append(f"{pruning['refit']} projections re-fitted by least squares")
    out += ["; ".join(facts) + ".", ""]
    search = pruning.get("search") or {}
    if search:
        out += ["Search: " + ", ".join(f"{k} {_fmt(v) if not isinstance(v, (dict, list)) else v}" for k, v in search.items()), ""]
    sensitivity = pruning.get("sensitivity") or {}
    points = sensitivity.get("points") or []
    if points:
        how = "re-fitted" if sensitivity.get("reconstructed") else "no re-fit"
        score = sensitivity.get("score", "loss")
        out += [f"Per-axis sensitivity: search {score} with one axis pruned alone ({how}; teacher "
                f"{_fmt(sensitivity.get('base'), 4)}):", ""]
        rows = [[p["axis"], _fmt(p["keep"], 3), _shape_label(p["shape"]), _fmt(p["score"], 4), f"{p['increase']:+.4f}"]
                for p in points]
        out += [_table(["axis", "kept", "shape", score, "increase"], rows), ""]
    if pruning.get("sensitivity_plot"):
        out += [f"![per-axis sensitivity]({pruning['sensitivity_plot']})", ""]
    return out


def _shape_label(shape: dict[str, Any]) -> str:
    return (f"L{shape.get('num_layers')} D{shape.get('hidden_size')} H{shape.get('num_heads')}/KV{shape.get('num_kv_heads')} "
            f"I{shape.get('intermediate_size')}")


def write_report(run_dir: str | Path, metrics: dict[str, Any], *, log_file: str = "log.jsonl") -> Path:
    """Write ``metrics.json``, ``loss.png`` (from the run's JSONL log) and ``report.md`` into ``run_dir``."""
    run_dir = Path(run_dir)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    plot = plot_losses(read_log(run_dir / log_file), run_dir / "loss.png")
    view = search_view(metrics)
    search_plot = plot_candidates(view, run_dir / CANDIDATES_PNG) if view is not None else None
    report = run_dir / "report.md"
    report.write_text(render_report(metrics, plot_name=plot.name if plot else None,
                                    candidates_plot=search_plot.name if search_plot else None))
    logger.info("report written to %s", report)
    return report


class StageTimer:
    """Wall time of named stages of a run, logged as each one ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + took
            logger.info("stage %-16s %7.1f s", name, took)


def model_entry(model, *, heldout: dict[str, Any] | None, agreement: float | None,
                generations: list[dict[str, str]] | None) -> dict[str, Any]:
    """One ``models`` entry of metrics.json: shape, parameter counts, held-out numbers, generations."""
    from ..adapters import count_parameters, get_adapter

    return {
        "shape": get_adapter(model).shape(model.config),
        "params": count_parameters(model),
        "non_embedding_params": count_parameters(model, non_embedding=True),
        "heldout": heldout,
        "agreement": agreement,
        "generations": generations,
    }


def eval_records(records: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first (step 0: teacher and pruned student) and last (distilled student) eval records of a run log."""
    evals = [r for r in records if r.get("kind") == "eval"]
    if not evals:
        raise ValueError("the run log holds no evaluation record")
    return evals[0], evals[-1]


def heldout_of(record: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``{"loss", "perplexity", "tokens"}`` of an eval record's ``<prefix>_*`` fields."""
    return {k: record.get(f"{prefix}_{k}") for k in ("loss", "perplexity", "tokens")}
