"""The reproduction's report: markdown tables and plots from the per-seed summaries (analysis.py)."""
import re
import statistics
from pathlib import Path

from nanovoco.repro.analysis import KINDS, SHORTCUTS, VIEWS, ks_of
from nanovoco.repro.recipe import COMPRESSED_STEPS, TABLE1, VIDEO_OBJECTS, VIDEO_STEPS, VISION_TOKENS
from nanovoco.repro.stats import accuracy_se, mean_sd


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def with_se(x, se) -> str:
    return f"{pct(x)} ± {pct(se)}" if x is not None and se is not None else pct(x)


def over_seeds(per_seed: dict, name: str, key: str, fmt=pct) -> str:
    """A stage's number, mean ± sd over seeds (n/a where it was not measured); fmt writes each (default: %)."""
    ms = mean_sd(s[name].get(key) for s in per_seed.values())
    return "n/a" if ms is None else f"{fmt(ms[0])} ± {fmt(ms[1])}"


def nats(x) -> str:
    return f"{x:.3f}"


def tables(per_seed: dict) -> str:
    """Markdown tables: over seeds (mean ± sd), then each seed's numbers with their standard errors."""
    first = next(iter(per_seed.values()))
    zero_shot = [("SmolLM2 untrained, the scene as text", "zero_shot")] if "zero_shot" in first else []
    rows = [*TABLE1, *zero_shot, ("no image (each type's most common answer)", "no_image")]
    lines = table1(per_seed, rows) + gaps(per_seed) + shortcuts_table(per_seed) + table2(per_seed)
    if f"voco_any_k{run_ks(first)[0]}" in first:
        lines += table4(per_seed)
    return "\n".join(lines + each_seed(per_seed, rows)) + "\n"


def table1(per_seed: dict, rows) -> list[str]:
    """Table 1: each method's accuracy per question type, overall and as retention, mean ± sd over seeds."""
    seeds, first = list(per_seed), next(iter(per_seed.values()))
    types = sorted(first["full"]["by_type"])
    tokens = {"full": VISION_TOKENS, "no_image": 0, "zero_shot": "text"}
    lines = [f"## Table 1 in miniature: methods at K = 1 ({VISION_TOKENS} vision tokens -> 1), "
             f"{len(seeds)} seed(s): {', '.join(map(str, seeds))}", "",
             f"Accuracy (%) on {first['full']['n']} held-out questions per seed, retention (%) and the KL from the "
             "upper bound's answer distribution (nats per answer token), mean ± sd over seeds; the type columns are "
             "means.", "",
             "| method | tokens | " + " | ".join(types) + " | accuracy | retention | KL |",
             "|---|---:|" + "---:|" * (len(types) + 3)]
    for label, name in rows:
        cells = [f"{100 * statistics.mean(s[name]['by_type'][t] for s in per_seed.values()):.1f}" for t in types]
        lines.append(f"| {label} | {tokens.get(name, 1)} | " + " | ".join(cells)
                     + f" | {over_seeds(per_seed, name, 'overall')} | {over_seeds(per_seed, name, 'retention')} | "
                     f"{over_seeds(per_seed, name, 'kl', nats)} |")
    return lines


def gaps(per_seed: dict) -> list[str]:
    """Table 1's ordering, each consecutive pair of methods: the gap and whether it exceeds the noise."""
    first = next(iter(per_seed.values()))
    lines = ["", "Table 1's ordering, consecutive methods (accuracy points, mean over seeds ± its standard error: "
             "the larger of the questions' noise, combined over seeds, and the seeds' spread / sqrt(seeds)):", ""]
    for pair in first["gaps"]:
        gap = [s["gaps"][pair]["gap"] for s in per_seed.values()]
        within = sum(s["gaps"][pair]["se"] ** 2 for s in per_seed.values()) ** 0.5 / len(gap)
        se = max(within, statistics.stdev(gap) / len(gap) ** 0.5 if len(gap) > 1 else 0.0)
        mean = statistics.mean(gap)
        verdict = "holds" if mean > se else "reversed" if mean < -se else "within noise"
        lines.append(f"- {pair.replace('_k1', '')}: {100 * mean:+.1f} ± {100 * se:.1f} ({verdict})")
    return lines


def shortcuts_table(per_seed: dict) -> list[str]:
    """How often each method's answers are the shortcut's, on the question types that have one (SHORTCUTS)."""
    ks = run_ks(next(iter(per_seed.values())))
    shortcut_types = [t for t in SHORTCUTS if all(s["shortcuts"] and t in s["shortcuts"] for s in per_seed.values())]
    if not shortcut_types:
        return []
    lines = ["", "### What the answers are made of", "",
             "These question types can be scored on without finding what the question asks about (the object "
             "it names, or the middle of the image). For each, \"follows\" is how often a method's answer, right "
             "or wrong, is the shortcut's: " + "; ".join(f"{t}: {SHORTCUTS[t]}" for t in shortcut_types)
             + ". The last row is what the shortcut scores on these questions. A method that follows it every "
             "time and scores what it scores answers from what is in the image as a whole, not from the place "
             "asked about. In %, means over seeds.",
             "", "| method | " + " | ".join(f"{t} accuracy | {t} follows" for t in shortcut_types) + " |",
             "|---|" + "---:|---:|" * len(shortcut_types)]

    def cell(qtype, name, key):
        return f"{100 * statistics.mean(s['shortcuts'][qtype][name][key] for s in per_seed.values()):.1f}"

    for label, name in [*TABLE1, *((f"VoCo-LLaMA K = {k}", f"voco_k{k}") for k in ks[1:])]:
        lines.append(f"| {label} | " + " | ".join(f"{cell(t, name, 'accuracy')} | {cell(t, name, 'follows')}"
                                                  for t in shortcut_types) + " |")
    lines.append("| the shortcut itself | " + " | ".join(
        f"{100 * statistics.mean(s['shortcuts'][t]['shortcut'] for s in per_seed.values()):.1f} | 100"
        for t in shortcut_types) + " |")
    return lines


def table2(per_seed: dict) -> list[str]:
    """Table 2: VoCo-LLaMA's accuracy and retention at each K (and the any-K model's, if run)."""
    first = next(iter(per_seed.values()))
    ks = run_ks(first)
    any_k = f"voco_any_k{ks[0]}" in first
    lines = ["", f"## Table 2 in miniature: VoCo-LLaMA with K VoCo tokens ({VISION_TOKENS} vision tokens -> K)", ""]
    if any_k:
        lines += [f"One model per K (each {COMPRESSED_STEPS} steps), and one model for every K (`--any_k`: K drawn "
                  f"per sample, {2 * COMPRESSED_STEPS} steps, scored at each K).", "",
                  "| K | compression | per-K accuracy | per-K retention | per-K KL | one model: accuracy | "
                  "one model: retention | one model: KL |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| K | compression | accuracy | retention | KL |", "|---:|---:|---:|---:|---:|"]
    def columns(name):  # accuracy, retention and KL of one model
        return (f"{over_seeds(per_seed, name, 'overall')} | {over_seeds(per_seed, name, 'retention')} | "
                f"{over_seeds(per_seed, name, 'kl', nats)} |")

    for k in ks:
        lines.append(f"| {k} | {VISION_TOKENS // k}x | {columns(f'voco_k{k}')}"
                     + (f" {columns(f'voco_any_k{k}')}" if any_k else ""))
    return (lines + table2_by_type(per_seed, ks) + k_steps(per_seed, ks) + longer_table(per_seed, ks)
            + oracle_lines(per_seed) + content_table(per_seed, ks))


def table2_by_type(per_seed: dict, ks) -> list[str]:
    """Table 2 per question type: where each K loses (accuracy, mean over seeds), beside the upper bound."""
    first = next(iter(per_seed.values()))
    types = sorted(first["full"]["by_type"])
    lines = ["", "By question type (accuracy, %, mean over seeds):", "",
             "| K | " + " | ".join(types) + " |", "|---:|" + "---:|" * len(types)]
    for label, name in [*((str(k), f"voco_k{k}") for k in ks), ("64 (upper bound)", "full")]:
        lines.append(f"| {label} | " + " | ".join(
            f"{100 * statistics.mean(s[name]['by_type'][t] for s in per_seed.values()):.1f}" for t in types) + " |")
    return lines


def longer_table(per_seed: dict, ks) -> list[str]:
    """What Table 2's curve measures (repro --longer): retention at each K after 1x, 2x, ... the compressed stages'
    steps, and the gap from K = 1 to the largest K at each. A gap that stays as training goes on is what one token
    can hold (capacity); one that closes is how fast it learns (training speed)."""
    first = next(iter(per_seed.values()))
    factors = sorted({int(m.group(1)) for m in map(re.compile(r"voco_k\d+_x(\d+)").fullmatch, first) if m})
    if not factors:
        return []
    name = lambda k, f: f"voco_k{k}" if f == 1 else f"voco_k{k}_x{f}"  # noqa: E731
    lines = ["", "### Capacity or training speed: the same stages trained longer", "",
             f"Retention (%), mean ± sd over seeds, after {COMPRESSED_STEPS} steps (1x) and more; the last row is "
             f"the gap from K = 1 to K = {ks[-1]} (points, mean ± sd over seeds). A gap that stays is what one token "
             "can hold; a gap that closes is how fast it learns.", "",
             "| K | " + " | ".join(f"{f}x ({f * COMPRESSED_STEPS} steps)" for f in [1, *factors]) + " |",
             "|---:|" + "---:|" * (1 + len(factors))]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(over_seeds(per_seed, name(k, f), "retention") for f in [1, *factors])
                     + " |")
    gaps = []
    for f in [1, *factors]:
        ms = mean_sd(None if None in (s[name(ks[-1], f)]["retention"], s[name(1, f)]["retention"]) else
                     s[name(ks[-1], f)]["retention"] - s[name(1, f)]["retention"] for s in per_seed.values())
        gaps.append("n/a" if ms is None else f"{100 * ms[0]:+.1f} ± {100 * ms[1]:.1f}")
    return lines + [f"| gap K = {ks[-1]} - K = 1 | " + " | ".join(gaps) + " |"]


def k_steps(per_seed: dict, ks) -> list[str]:
    """Each step of Table 2's curve, K to the next K, per seed: the retention gained, and whether it is beyond twice
    its standard error (the two retentions' bootstrap errors combined)."""
    lines = ["", "Each step of the curve, per seed (retention points gained, ± the combined standard error; * beyond "
             "twice it):", ""]
    for a, b in zip(ks, ks[1:]):
        cells = [retention_gain(seed, s[f"voco_k{a}"], s[f"voco_k{b}"]) for seed, s in per_seed.items()]
        lines.append(f"- K = {a} -> {b}: " + "; ".join(cells))
    return lines


def retention_gain(seed, low: dict, high: dict) -> str:
    """One seed's retention of `high` minus that of `low` (points), ± the two bootstrap standard errors combined,
    starred when beyond twice that; n/a where either is undefined."""
    values = [part.get(key) for part in (low, high) for key in ("retention", "retention_se")]
    if None in values:
        return f"seed {seed} n/a"
    gain, se = high["retention"] - low["retention"], (low["retention_se"] ** 2 + high["retention_se"] ** 2) ** 0.5
    return f"seed {seed} {100 * gain:+.1f} ± {100 * se:.1f}" + ("*" if gain > 2 * se else "")


def oracle_lines(per_seed: dict) -> list[str]:
    """The per-image oracle of K: the fewest tokens that answer each image's questions as the largest K does."""
    first = next(iter(per_seed.values()))
    labels = {"voco_k": "the per-K models", "voco_any_k": "the one model for every K"}
    lines = []
    for family, label in labels.items():
        if family not in first.get("oracle", {}):
            continue
        ks = first["oracle"][family]["ks"]
        means = [s["oracle"][family]["mean_k"] for s in per_seed.values()]
        by_count = lambda n: statistics.mean(s["oracle"][family]["mean_k_by_count"][n]  # noqa: E731
                                             for s in per_seed.values())
        hist = {k: sum(s["oracle"][family]["histogram"][k] for s in per_seed.values()) for k in ks}
        total = sum(hist.values())
        lines += ["", f"Per-image oracle of {label}: the fewest tokens that answer all of an image's questions as "
                  f"K = {ks[-1]} does needs {statistics.mean(means):.2f} tokens per image on average (per seed: "
                  + ", ".join(f"{m:.2f}" for m in means) + "); images needing k: "
                  + ", ".join(f"{k}: {100 * hist[k] / total:.1f}%" for k in ks) + "; mean k by objects per image: "
                  + ", ".join(f"{n}: {by_count(n):.1f}" for n in first["oracle"][family]["mean_k_by_count"]) + "."]
    return lines


def content_table(per_seed: dict, ks) -> list[str]:
    """Accuracy by objects per image, and retention on the sparse and the crowded images, for each compressed
    method; then, per seed, how much less of the crowded images K = 1 keeps than of the sparse ones."""
    first = next(iter(per_seed.values()))
    if not first.get("content"):
        return []
    counts, crowded = list(first["content"]["n_by_count"]), first["content"]["crowded"]
    rows = [("full (upper bound)", "full"), *((f"VoCo-LLaMA K = {k}", f"voco_k{k}") for k in ks),
            *((f"one model for every K, at K = {k}", f"voco_any_k{k}") for k in ks if f"voco_any_k{k}" in first),
            ("avgpool + linear", "avgpool_k1"), ("Q-Former", "qformer_k1"), ("lower bound", "lower_bound_k1")]
    split = first["content"]["n_split"]
    lines = ["", "### By content: objects per image", "",
             f"Accuracy (%) by the number of objects in the image (held-out questions per seed: "
             + ", ".join(f"{n}: {first['content']['n_by_count'][n]}" for n in counts) + "), mean over seeds; "
             f"retention (%) on the sparse images (< {crowded} objects, {split['sparse']} questions) and the crowded "
             f"ones (>= {crowded}, {split['crowded']}), mean ± sd over seeds.", "",
             "| method | " + " | ".join(f"{n}" for n in counts) + " | retention, sparse | retention, crowded |",
             "|---|" + "---:|" * (len(counts) + 2)]
    for label, name in rows:
        stage = [s["content"]["stages"][name] for s in per_seed.values()]
        cells = [f"{100 * statistics.mean(st['by_count'][n] for st in stage):.1f}" for n in counts]
        for part in ("sparse", "crowded"):
            ms = mean_sd(st.get(part, {}).get("retention") for st in stage)  # a toy run may lack a part
            cells.append("n/a" if ms is None else f"{pct(ms[0])} ± {pct(ms[1])}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "The KL from the upper bound (nats per answer token) by objects per image, mean over seeds:", "",
              "| method | " + " | ".join(f"{n}" for n in counts) + " |", "|---|" + "---:|" * len(counts)]
    for label, name in rows[1:]:
        stage = [s["content"]["stages"][name] for s in per_seed.values()]
        if all(st["kl_by_count"] for st in stage):
            lines.append(f"| {label} | " + " | ".join(
                f"{statistics.mean(st['kl_by_count'][n] for st in stage):.3f}" for n in counts) + " |")
    lines += ["", f"What one token loses on the crowded images: VoCo-LLaMA K = 1's retention on the sparse minus the "
              "crowded images, per seed (± the combined bootstrap standard error; * beyond twice it): "]
    stage = lambda s: s["content"]["stages"]["voco_k1"]  # noqa: E731
    cells = [retention_gain(seed, stage(s).get("crowded", {}), stage(s).get("sparse", {}))
             for seed, s in per_seed.items()]
    return lines + ["; ".join(cells) + "."]


def table4(per_seed: dict) -> list[str]:
    """Table 4: each per-K model run at every K, and the one model for every K."""
    ks = run_ks(next(iter(per_seed.values())))
    lines = ["", "## Table 4 in miniature: each model run at every K", "",
             "Retention (%), mean ± sd over seeds, of the model trained at K (rows) when run at k (columns); "
             "the diagonal is Table 2's per-K column.", "",
             "| trained at | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for trained in ks:
        cells = [over_seeds(per_seed, f"voco_k{trained}" if k == trained else f"voco_k{trained}_at_k{k}",
                            "retention") for k in ks]
        lines.append(f"| K = {trained} | " + " | ".join(cells) + " |")
    lines.append("| every K (one model) | " + " | ".join(over_seeds(per_seed, f"voco_any_k{k}", "retention")
                                                         for k in ks) + " |")
    return lines


def each_seed(per_seed: dict, rows) -> list[str]:
    """Each seed's accuracy and retention with their standard errors, and how far the upper bound is above the
    no-image answer."""
    seeds, ks = list(per_seed), run_ks(next(iter(per_seed.values())))
    lines = ["", "## Each seed: accuracy ± standard error, retention ± standard error (paired bootstrap), in %", "",
             "| method | " + " | ".join(f"seed {s} accuracy | seed {s} retention" for s in seeds) + " |",
             "|---|" + "---:|---:|" * len(seeds)]
    for label, name in [*rows[:-1], *((f"VoCo-LLaMA K = {k}", f"voco_k{k}") for k in ks[1:]), rows[-1]]:
        cells = [with_se(s[name]["overall"], s[name]["se"]) + " | " + with_se(s[name]["retention"],
                                                                               s[name]["retention_se"])
                 for s in per_seed.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    above = [s["full"]["overall"] - s["no_image"]["overall"] for s in per_seed.values()]
    lines += ["", "Upper bound above the no-image answer, per seed: "
              + ", ".join(f"seed {s} {100 * g:+.1f}" for s, g in zip(seeds, above)) + " points."]
    return lines


def asked_kinds(per_seed: dict) -> list[str]:
    """The kinds of temporal question that every seed's held-out videos were asked."""
    return [k for k in KINDS if all(s["views"]["in order"][k] is not None for s in per_seed.values())]


def video_table(per_seed: dict) -> str:
    """The video stage's table: accuracy for each view, per kind of temporal question (mean ± sd over seeds) and per
    question type (means)."""
    first = next(iter(per_seed.values()))
    types, kinds = list(first["counts"]), asked_kinds(per_seed)
    n_kind = {k: sum(first["counts"].get(t, 0) for t in KINDS[k]) for k in kinds}
    lines = [f"## Video: do the per-frame caches carry time? ({len(per_seed)} seed(s))", "",
             f"The seed's K = 1 VoCo-LLaMA model trained {VIDEO_STEPS} more steps on moving-shapes videos "
             f"(synthetic_video: {VIDEO_OBJECTS} object(s), 4 frames, one move a frame), one VoCo token per frame. "
             f"Accuracy (%) on {first['n']} held-out questions per seed. Two kinds of question need the frames' order "
             "(reversing the video changes their answers): *when*, where an object was at the start or the end "
             f"(reading one frame chosen by its place in time; {n_kind.get('when', 0)} questions), and *motion*, "
             f"what moved which way (comparing frames; {n_kind.get('motion', 0)}); shape and frames_left are "
             "order-free controls. Kinds: mean ± sd over seeds; types: means. Chance is a uniform guess among a "
             "question's possible answers.", "",
             "| " + " | ".join(["answered from", *kinds, *types]) + " |",
             "|---|" + "---:|" * (len(kinds) + len(types))]
    labels = {"in order": "(a) per-frame caches in time order", "reversed": "(a) the same caches, reversed",
              "shuffled": "(b) the same caches, shuffled", "first frame only": "(c) the first frame's cache only",
              "last frame only": "(c) the last frame's cache only",
              "no video": "(d) no video (each type's most common answer)", "chance": "chance (a uniform guess)",
              "shuffled, read at the place": "(b) if read from the frames at the first and last places"}
    for view, label in labels.items():
        values = [s["views"][view] for s in per_seed.values()]
        cells = []
        for kind in kinds:
            ms = mean_sd(v[kind] for v in values)
            cells.append("" if ms is None else f"{pct(ms[0])} ± {pct(ms[1])}")
        cells += [f"{100 * statistics.mean(v['by_type'][t] for v in values):.1f}" if t in values[0]["by_type"] else ""
                  for t in types]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if kinds:
        lines += ["", "Above chance, per seed (points, one seed's standard error about "
                  + ", ".join(f"{pct(accuracy_se(0.5, n_kind[k]))} for {k}" for k in kinds) + "):"]
    for kind in kinds:
        above_chance = {view: ", ".join(f"{100 * (s['views'][view][kind] - s['views']['chance'][kind]):+.1f}"
                                for s in per_seed.values()) for view in ("in order", "shuffled")}
        lines.append(f"- {kind}: in order {above_chance['in order']}; shuffled {above_chance['shuffled']}")
    return "\n".join(lines) + "\n"


def video_plot(per_seed: dict, path: Path):
    """Accuracy per kind of temporal question for each view (bars: mean over seeds ± sd; one seed: ± standard
    error), against chance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, kinds = next(iter(per_seed.values())), asked_kinds(per_seed)
    views = [*VIEWS, "no video"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / max(1, len(kinds))  # a toy run's few questions may have none of a kind
    for j, (kind, color) in enumerate(zip(kinds, ("tab:blue", "tab:orange"))):
        n = sum(first["counts"].get(t, 0) for t in KINDS[kind])
        means, errs = [], []
        for view in views:
            values = [s["views"][view][kind] for s in per_seed.values()]
            means.append(100 * statistics.mean(values))
            errs.append(100 * (statistics.stdev(values) if len(values) > 1 else accuracy_se(values[0], n)))
        x = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(views))]
        label = f"{kind} ({', '.join(t for t in KINDS[kind] if t in first['counts'])})"
        ax.bar(x, means, width, yerr=errs, capsize=3, color=color, label=label)
        chance = 100 * statistics.mean(s["views"]["chance"][kind] for s in per_seed.values())
        ax.axhline(chance, color=color, ls="--", lw=1)
    ax.set_xticks(range(len(views)), [v.replace(" only", "").replace(" frame", "\nframe") for v in views])
    ax.set_ylabel("accuracy (%); dashed: chance")
    ax.set_ylim(0, 105)
    spread = "mean ± sd over seeds" if len(per_seed) > 1 else "± standard error"
    ax.set_title(f"Video questions that need the frames' order ({len(per_seed)} seed(s), {spread})")
    if kinds:
        ax.legend(fontsize=7, loc="upper right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot(per_seed: dict, path: Path):
    """Retention against K (mean ± sd over seeds; with one seed, ± its bootstrap standard error)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def point(name):
        values = [s[name]["retention"] for s in per_seed.values()]
        if any(v is None for v in values):
            return float("nan"), 0.0  # undefined retention is not drawn
        if len(values) == 1:
            se = next(iter(per_seed.values()))[name]["retention_se"]
            return 100 * values[0], 100 * (se or 0.0)
        return 100 * statistics.mean(values), 100 * statistics.stdev(values)

    ks = run_ks(next(iter(per_seed.values())))
    fig, (ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    kl_plot(per_seed, ks, kl_ax)
    y, err = zip(*(point(f"voco_k{k}") for k in ks))
    ax.errorbar(ks, y, yerr=err, fmt="o-", capsize=3, label="VoCo-LLaMA, one model per K")
    if f"voco_any_k{ks[0]}" in next(iter(per_seed.values())):
        y, err = zip(*(point(f"voco_any_k{k}") for k in ks))
        ax.errorbar(ks, y, yerr=err, fmt="D--", capsize=3, label="VoCo-LLaMA, one model for every K")
    for mode, marker in (("avgpool", "s"), ("qformer", "^")):
        y, err = point(f"{mode}_k1")
        ax.errorbar([1], [y], yerr=[err], fmt=marker, capsize=3, label=mode)
    ax.axhline(100, color="gray", lw=0.8, ls="--")
    ax.axhline(0, color="gray", lw=0.8, ls=":")
    ax.axhline(point("no_image")[0], color="tab:red", lw=0.8, ls="-.", label="no image (priors)")
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.8, 1.25 * ks[-1])  # explicit: with every retention undefined there would be no data to fit
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("compressed tokens per image (K)")
    ax.set_ylabel("compression retention (%)")
    spread = "mean ± sd over seeds" if len(per_seed) > 1 else "± standard error"
    ax.set_title(f"{VISION_TOKENS} vision tokens -> K ({len(per_seed)} seed(s), {spread})")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def kl_plot(per_seed: dict, ks, ax):
    """The KL from the upper bound against K (mean ± sd over seeds), the one-token baselines at K = 1."""
    def point(name):
        values = [s[name]["kl"] for s in per_seed.values()]
        if any(v is None for v in values):
            return float("nan"), 0.0
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    rows = [("VoCo-LLaMA, one model per K", "voco_k", "o-"), ("one model for every K", "voco_any_k", "D--")]
    for label, family, style in rows:
        if f"{family}{ks[0]}" in next(iter(per_seed.values())):
            y, err = zip(*(point(f"{family}{k}") for k in ks))
            ax.errorbar(ks, y, yerr=err, fmt=style, capsize=3, label=label)
    for label, name, marker in (("avgpool", "avgpool_k1", "s"), ("qformer", "qformer_k1", "^"),
                                ("lower bound", "lower_bound_k1", "x")):
        y, err = point(name)
        ax.errorbar([1], [y], yerr=[err], fmt=marker, capsize=3, label=label)
    ax.set(xscale="log", yscale="log", xlabel="compressed tokens per image (K)",
           ylabel="KL from the upper bound (nats per answer token)", title="The distillation: how far from the teacher")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.legend(fontsize=7)


def run_ks(summary: dict) -> list[int]:
    """The K of a seed's VoCo-LLaMA stages, in increasing order."""
    return ks_of(summary, "voco_k")


def curves_plot(summary: dict, seed: int, path: Path):
    """One seed's reference curves: each stage's training loss against its steps, and each compressed stage's KL
    from the upper bound (on the fixed held-out subset) against its updates, so that a user can lay a run beside
    them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, curve in summary["curves"].items():
        window = 10  # the loss of one step is noisy: a running mean over the last `window` steps
        loss = [statistics.mean(curve["loss"][max(0, i - window + 1):i + 1]) for i in range(len(curve["loss"]))]
        line, = loss_ax.plot(range(1, len(loss) + 1), loss, lw=1, label=name)
        if curve["kl"]:
            steps, kl = zip(*curve["kl"])
            kl_ax.plot(steps, kl, "o-", ms=2.5, lw=1, color=line.get_color(), label=name)
    loss_ax.set(yscale="log", xlabel="step", ylabel="training loss (running mean of 10 steps)",
                title=f"seed {seed}: training loss per stage")
    kl_ax.set(yscale="log", xlabel="updates", ylabel="KL from the upper bound (nats per answer token)",
              title="the distillation: KL on a fixed held-out subset")
    loss_ax.legend(fontsize=7)
    kl_ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def content_plot(per_seed: dict, path: Path):
    """Accuracy against objects per image (mean over seeds) for each method: where compression loses."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(per_seed.values()))
    counts, ks = list(first["content"]["n_by_count"]), run_ks(first)
    rows = [("full (upper bound)", "full", "k-"), *((f"VoCo-LLaMA K = {k}", f"voco_k{k}", "o-") for k in ks),
            ("avgpool + linear", "avgpool_k1", "s--"), ("Q-Former", "qformer_k1", "^--"),
            ("lower bound", "lower_bound_k1", "x:")]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, name, style in rows:
        y = [100 * statistics.mean(s["content"]["stages"][name]["by_count"][n] for s in per_seed.values())
             for n in counts]
        ax.plot(counts, y, style, ms=4, label=label)
    ax.set(xlabel="objects per image", ylabel="held-out accuracy (%)", ylim=(0, 102),
           title=f"Accuracy by content ({len(per_seed)} seed(s), mean)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
