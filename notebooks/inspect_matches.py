# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Inspect the matches of a memorization audit
#
# Loads the detect stage's outputs of one run directory and shows what the HTML report shows:
# every prompt screened with its reproduction rate, then, for each extracted prompt, the
# generated sample beside the training image it reproduces, with their distance, the
# threshold, the sample's seed and the command that regenerates it; and the cliques of the
# flagged prompts. Set `RUN_DIR` below, or the environment variable `MEMAUDIT_RUN_DIR`. Edit
# `notebooks/inspect_matches.py`; the `.ipynb` is generated from it
# (`jupytext --sync notebooks/inspect_matches.py`).

# %%
import os
from pathlib import Path

# Jupyter starts the kernel in notebooks/, hence the "..".
RUN_DIR = Path(os.environ.get("MEMAUDIT_RUN_DIR", "../outputs/demo"))
MEMBERS_SHOWN = 4  # clique members shown beside each prompt's best sample
MAX_PROMPTS = 20

# %%
import matplotlib.pyplot as plt
import pandas as pd

from pipeline.report import extracted_prompts, flagged_prompts, load_run, load_thumbnail, prompt_table
from pipeline.text import display_text

results = load_run(RUN_DIR / "detect")
memorized = results.memorized
print(f"{len(memorized)} prompts screened, {int(memorized['flagged'].sum())} flagged", end="")
if results.verified:
    print(
        f", {int(memorized['extracted'].sum())} extracted (a sample within {results.delta} {results.metric_name} of a training image)"
    )
else:
    print(" (verification did not run: no training set given)")
print("settings:", results.summary.get("settings"))

# %% [markdown]
# ## Every prompt
# Extracted prompts first, by reproduction rate (the share of a prompt's samples within the
# threshold of a training image, with its 95% Wilson interval), then flagged ones (a clique of at
# least `min_clique` near-identical samples), then by clique size. Prompt ids and captions come
# from other tools' folders and the web: `display_text` shows their control and bidi-control
# characters as escapes and shortens them.

# %%
table = prompt_table(results)
shown = table.assign(
    prompt_id=table["prompt_id"].map(lambda v: display_text(v, 40)),
    caption=table["caption"].map(lambda v: display_text(v, 60)),
)
if results.verified:
    shown["reproduction"] = [
        f"{rate:.0%} [{low:.0%}, {high:.0%}]"
        for rate, low, high in zip(table["reproduction_rate"], table["reproduction_ci_low"], table["reproduction_ci_high"])
    ]
    shown = shown.drop(columns=["reproduction_rate", "reproduction_ci_low", "reproduction_ci_high"])
shown.head(200)

# %% [markdown]
# ## Extracted prompts: the generated sample beside the training image
# The first panel is the sample closest to a training image, the second that training image
# (cropped as it was compared), then other members of the prompt's clique. The command remakes
# the sample from the run's recorded recipe.


# %%
def show(row, first: list[tuple[str, Path | None]], skip: str = "") -> None:
    """One figure: the panels of ``first`` ((title, image path)), then up to MEMBERS_SHOWN
    members of the prompt's clique (its most central sample first), sample file ``skip`` left out."""
    members = [f for f in dict.fromkeys([row["representative_file"], *row["member_files"]]) if f != skip][:MEMBERS_SHOWN]
    panels = first + [(display_text(f.rsplit("/", 1)[-1], 30), results.sample_path(f)) for f in members]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6), squeeze=False)
    for ax, (title, path) in zip(axes[0], panels):
        image = load_thumbnail(path, 256) if path is not None else None
        if image is not None:
            ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f'{display_text(row["prompt_id"], 40)}: "{display_text(row["caption"], 60)}"', fontsize=9)
    fig.tight_layout()
    plt.show()


extracted = extracted_prompts(results).head(MAX_PROMPTS)
for row in extracted.to_dict("records"):
    seed = "not recorded" if pd.isna(row["seed"]) else row["seed"]
    print(
        f"{display_text(row['prompt_id'], 80)}: distance {row['best_distance']:.4f} <= threshold {results.delta} ({results.metric_name})"
    )
    print(
        f"  sample #{row['best_sample']} ({display_text(row['best_sample_file'], 80)}), seed {seed}; "
        f"training image {display_text(row['best_train_key'], 80)}"
    )
    print(
        f"  {row['samples_matched']} of {row['n_samples']} samples within the threshold ({row['reproduction_rate']:.0%}, "
        f"95% CI {row['reproduction_ci_low']:.0%}-{row['reproduction_ci_high']:.0%})"
    )
    print(f"  regenerate: {row['command']}" if row["command"] else "  no recipe recorded for it: cannot be regenerated")
    sample = results.sample_path(row["best_sample_file"]) if row["best_sample_file"] else None
    first = [
        (f"sample #{row['best_sample']}\n{results.metric_name} {row['best_distance']:.3f}", sample),
        (f"train {display_text(row['best_train_key'], 30)}", results.match_path(row["prompt_id"])),
    ]
    show(row, first, skip=row["best_sample_file"])
if extracted.empty:
    print("no extracted prompt in", RUN_DIR, "" if results.verified else "(verification did not run)")

# %% [markdown]
# ## Other captions' training images reproduced
# Prompts not extracted (no sample is within the threshold of one of their own duplicates) whose
# samples are within it of a training image of another caption: the model reproduces that
# image under a caption that is not its own.

# %%
others = extracted_prompts(results, other=True).head(MAX_PROMPTS)
for row in others.to_dict("records"):
    print(
        f"{display_text(row['prompt_id'], 80)}: {row['samples_matched_other']} of {row['n_samples']} samples within "
        f"{results.delta} of another caption's image; closest {display_text(row['best_train_key'], 80)} at {row['best_distance']:.4f}"
    )
    sample = results.sample_path(row["best_sample_file"]) if row["best_sample_file"] else None
    show(
        row,
        [
            (f"sample #{row['best_sample']}", sample),
            (f"train {display_text(row['best_train_key'], 30)}", results.match_path(row["prompt_id"])),
        ],
        skip=row["best_sample_file"],
    )
if others.empty:
    print("none in", RUN_DIR)

# %% [markdown]
# ## Flagged prompts not extracted: their cliques

# %%
flagged = flagged_prompts(results)
if results.verified:
    flagged = flagged[~flagged["extracted"]]
for row in flagged.head(MAX_PROMPTS).to_dict("records"):
    print(
        f"{display_text(row['prompt_id'], 80)}: clique {row['clique_size']}/{row['n_samples']}, "
        f"max distance in clique {row['max_pair_distance']:.3f}"
    )
    show(row, [])
if flagged.empty:
    print("none in", RUN_DIR)
